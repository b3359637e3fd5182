"""torch.func (jvp, vjp, jacrev, vmap) and double backward on every built-in model (issue 21, 7):
values equal to autograd's, fresh, after build_optimizer, inside the engine's Lie-form step,
and under the ablation switches; build_optimizer leaves .grad as autograd computes it."""
import pytest
import torch
from torch.func import functional_call, jacrev, jvp, vjp, vmap

import lipnext
from lipnext.engine.step import TrainStep
from lipnext.engine.distributed import DistInfo
from lipnext.losses import emma_loss
from lipnext.nn import has_lie_gradient, lie_form_gradients
from lipnext.optim import build_optimizer

MODELS = [("lipnext_l4w64", {}), ("lipnext_l4w64", {"pos_encoding": "shared"}),
          ("lipnext_l4w64", {"pos_encoding": "none", "padding": "zero"}),
          ("lipnext_l4w64", {"activation": "minmax"}), ("liresnet_l7w64", {}), ("bronet_l6w96", {})]


def make(name, kw, seed=0):
    kw = {"num_classes": 3, "in_chans": 1, "image_size": 8, "patch_size": 2, "seed": seed, **kw}
    if name.startswith("lipnext"):
        kw.update(depth=2, width=16)
    else:
        kw.update(depth=2, width=16, dense_depth=1)
    m = lipnext.create_model(name, **kw).double().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "bias" in n or "pos" in n:
                p.normal_(0, 0.3)              # nonzero biases and p: every path carries signal
    return m


def autograd_jacobian(m, x):
    return torch.autograd.functional.jacobian(m, x)            # through the custom Functions


def tol(name):
    """BRO layers compute in float32 inside a float64 model (their FFT and solve), so forward- and
    reverse-mode sums agree to float32 precision there; the other models compute in float64."""
    return dict(rtol=1e-5, atol=1e-6) if name.startswith("bronet") else dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("state", ["fresh", "build_optimizer", "lie_step"])
@pytest.mark.parametrize("name,kw", MODELS)
def test_torch_func_transforms_equal_autograd(name, kw, state):
    m = make(name, kw)
    if state != "fresh":
        build_optimizer(m, lr=1e-3)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    v = torch.randn_like(x)
    with lie_form_gradients(m, state == "lie_step"):
        ref = autograd_jacobian(m, x)                          # (2, 3, 2, 1, 8, 8)
        jac = jacrev(m)(x)
        out, tangent = jvp(m, (x,), (v,))
        _, pull = vjp(m, x)
        cot = torch.randn(2, 3, dtype=torch.float64)
        batched = vmap(lambda xi: m(xi[None])[0])(x)
    torch.testing.assert_close(jac, ref, **tol(name))
    torch.testing.assert_close(tangent, torch.einsum("bkcdhw,cdhw->bk", ref, v), **tol(name))
    torch.testing.assert_close(pull(cot)[0], torch.einsum("bkcdhw,bk->cdhw", ref, cot), **tol(name))
    with torch.no_grad():
        torch.testing.assert_close(batched, m(x), **tol(name))
        torch.testing.assert_close(out, m(x), **tol(name))


@pytest.mark.parametrize("lie", [False, True])
@pytest.mark.parametrize("name,kw", MODELS)
def test_double_backward_equals_torch_func(name, kw, lie):
    """A gradient penalty ||d f / d x||^2 differentiated again w.r.t. the parameters: autograd's
    create_graph path through the custom Functions = torch.func's composition of plain ops."""
    m = make(name, kw)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    params = {k: p.detach() for k, p in m.named_parameters()}

    def penalty(p):
        gx = torch.func.grad(lambda xx: functional_call(m, p, (xx,)).square().sum())(x)
        return gx.square().sum()
    ref = torch.func.grad(penalty)(params)
    with lie_form_gradients(m, lie):
        m.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        gx, = torch.autograd.grad(m(xx).square().sum(), xx, create_graph=True)
        gx.square().sum().backward()
        for k, p in m.named_parameters():
            want = ref[k]
            if has_lie_gradient(p):                           # the engine's form: X^T G
                want = p.detach().mT @ want
            scale = want.abs().max().item()                     # float32 noise of BRO is relative to it
            torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=(1e-6 if name.startswith("bronet")
                                                                      else 1e-12) * scale, msg=k)


def test_build_optimizer_leaves_grad_as_autograd_computes_it():
    """Before: build_optimizer switched the model to Lie-form gradients, so .grad held X^T G
    for any later backward the user ran. Now the switch lives in the engine's step only."""
    m, ref = make("lipnext_l4w64", {}), make("lipnext_l4w64", {})
    ref.load_state_dict(m.state_dict())
    opt = build_optimizer(m, lr=1e-3)
    x, y = torch.rand(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    for model in (m, ref):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    for (k, p), q in zip(m.named_parameters(), ref.parameters()):
        assert not has_lie_gradient(p), k
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=k)
    step = TrainStep(m, m, opt, emma_loss, DistInfo(), torch.device("cpu"))
    assert step(0, x, y, 1e-3, 0.1, None) is not None
    assert not any(getattr(mod, "lie_gradients", False) for mod in m.modules())   # off again
    assert all(p.grad is None and not has_lie_gradient(p) for p in m.parameters())
