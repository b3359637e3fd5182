"""Baselines (LiResNet-style, BRONet-style): their layers' maths, the soundness of their
Lipschitz bounds, and that they certify, save/load and train like LipNeXt."""
import math

import pytest
import torch

import lipnext
from lipnext.certify import certify
from lipnext.io import load_model, save_model
from lipnext.losses import emma_loss
from lipnext.models import BRONet, LiResNet, create_model, list_models
from lipnext.bounds import circular_conv_spectrum, operator_norm_bound, residual_conv_norm_bound
from lipnext.nn import (BROConv2d, BROLinear, CholeskyLinear, MinMax, block_reflector,
                        cholesky_orthogonal, circular_conv2d, circular_conv2d_adjoint,
                        power_iteration_residual_conv)
from lipnext.optim import build_optimizer


def dense_operator(fn, shape, dtype=torch.float64):
    """The matrix of a linear map on tensors of ``shape`` (columns = images of the basis)."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=dtype).reshape(n, *shape)
    return fn(basis).reshape(n, -1).T


def tiny(cls, **kw):
    kw = {"depth": 2, "width": 8, "num_classes": 4, "image_size": 8, "patch_size": 2,
          "dense_depth": 1, **kw}
    return cls(**kw)


# --- layers --------------------------------------------------------------------------

def test_conv_spectrum_bound_equals_the_dense_operator_norm():
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64) * 0.3
    a = dense_operator(lambda x: circular_conv2d(x, w), (4, 6, 5))
    exact = torch.linalg.matrix_norm(a, 2).item()
    bound = operator_norm_bound(circular_conv_spectrum(w, (6, 5)))
    assert exact <= bound <= exact * (1 + 1e-8)


def test_residual_bound_accounts_for_the_skip_connection():
    w = torch.randn(6, 6, 3, 3, dtype=torch.float64) * 0.2
    a = dense_operator(lambda x: x + circular_conv2d(x, w), (6, 5, 7))
    exact = torch.linalg.matrix_norm(a, 2).item()
    bound = residual_conv_norm_bound(w, (5, 7))
    assert exact <= bound <= exact * (1 + 1e-8)
    # the skip matters: bounding conv alone and adding 1 is looser, ignoring it is unsound
    conv_only = operator_norm_bound(circular_conv_spectrum(w, (5, 7)))
    assert conv_only < exact < 1 + conv_only


def test_adjoint_and_power_iteration_is_a_lower_estimate():
    w = torch.randn(6, 6, 3, 3) * 0.3
    x, y = torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5)
    torch.testing.assert_close((circular_conv2d(x, w) * y).sum(),
                               (x * circular_conv2d_adjoint(y, w)).sum(), rtol=1e-4, atol=1e-4)
    u = torch.randn(1, 6, 5, 5, dtype=torch.float64)
    bound = residual_conv_norm_bound(w, (5, 5))
    for iters in (1, 3, 200):
        sigma, _ = power_iteration_residual_conv(w.double(), u / u.norm(), iters)
        assert sigma.item() <= bound
    assert sigma.item() == pytest.approx(bound, rel=1e-3)


def test_power_iteration_recovers_from_a_translation_invariant_iterate():
    """A spatially constant u only sees frequency 0 and stays there exactly; the restart
    noise used in training must let the estimate reach the true norm."""
    w = torch.zeros(4, 4, 3, 3)
    w[:, :, 1, 2] = 2.0 * torch.eye(4)           # I + 2 shift: norm 3 at f = 0, smaller elsewhere
    w[:, :, 1, 1] = -2.0 * torch.eye(4)          # (I - 2 I + 2 shift): |1 - 2 + 2 e^{i f}| <= 3, = 1 at f = 0
    true = residual_conv_norm_bound(w, (4, 4))
    u = torch.ones(1, 4, 4, 4) / 8.0
    stuck, _ = power_iteration_residual_conv(w, u, 200)
    assert stuck.item() < 0.5 * true             # the plain iteration never leaves frequency 0
    sigma, u = power_iteration_residual_conv(w, u, 50, restart_noise=1e-2)
    assert sigma.item() == pytest.approx(true, rel=1e-3) and sigma.item() <= true * (1 + 1e-6)


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (7, 7)])
def test_cholesky_orthogonal_rows_or_columns(shape):
    w = cholesky_orthogonal(torch.randn(*shape, dtype=torch.float64))
    g = w @ w.T if shape[0] <= shape[1] else w.T @ w
    torch.testing.assert_close(g, torch.eye(min(shape), dtype=torch.float64))
    layer = CholeskyLinear(shape[1], shape[0])
    with torch.no_grad():
        layer.weight.add_(torch.randn(shape))
    assert layer.lipschitz_bound() >= torch.linalg.matrix_norm(layer.matrix().double(), 2).item()


def test_block_reflector_is_orthogonal_and_a_reflection():
    v = torch.randn(7, 3, dtype=torch.complex128)
    w = block_reflector(v)
    torch.testing.assert_close(w.mH @ w, torch.eye(7, dtype=torch.complex128))
    torch.testing.assert_close(w @ v, -v)             # range(V) is reflected
    assert BROLinear(12, 5).matrix().shape == (5, 12)


def test_bro_convolution_is_an_orthogonal_operator():
    conv = BROConv2d(6, (5, 6), kernel_size=3, rank=2)
    with torch.no_grad():
        conv.weight.mul_(3.0)
    a = dense_operator(lambda x: conv(x.float()).double(), (6, 5, 6))
    torch.testing.assert_close(a.T @ a, torch.eye(a.shape[0], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    exact = torch.linalg.matrix_norm(a, 2).item()
    assert exact <= conv.lipschitz_bound() * (1 + 1e-6) and conv.lipschitz_bound() < 1 + 1e-4


def test_minmax_is_norm_preserving_and_1_lipschitz():
    x, y = torch.randn(50, 8), torch.randn(50, 8)
    act = MinMax(dim=-1)
    torch.testing.assert_close(act(x).norm(dim=1), x.norm(dim=1))
    assert ((act(x) - act(y)).norm(dim=1) <= (x - y).norm(dim=1) + 1e-6).all()


# --- models --------------------------------------------------------------------------

def test_registered_baselines_and_equal_parameter_pairs():
    names = list_models()
    for n in ["liresnet_l7w64", "liresnet_l11w128", "liresnet_l12w128", "liresnet_l12w512",
              "bronet_l6w96", "bronet_l12w128", "bronet_l12w172", "bronet_l12w512"]:
        assert n in names
    count = lambda n: sum(p.numel() for p in create_model(n).parameters())  # noqa: E731
    ref = count("lipnext_l8w128")
    for n in ["liresnet_l7w64", "bronet_l6w96"]:
        assert count(n) == pytest.approx(ref, rel=0.1)


def _empirical_lipschitz(model, steps=60):
    """Largest ||f(x) - f(x')|| / ||x - x'|| found by gradient ascent over input pairs."""
    model.eval()
    x = torch.rand(16, model.in_chans, *model.image_size, requires_grad=True)
    d = (0.05 * torch.randn_like(x)).requires_grad_()
    opt = torch.optim.Adam([x, d], lr=0.02)
    best = 0.0
    for _ in range(steps):
        num = (model.forward_features(x + d) - model.forward_features(x)).norm(dim=1)
        ratio = num / d.flatten(1).norm(dim=1)
        best = max(best, ratio.max().item())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


@pytest.mark.parametrize("cls", [LiResNet, BRONet])
def test_bound_holds_against_gradient_ascent(cls):
    model = tiny(cls)
    model.validate_inputs = False
    with torch.no_grad():                 # move away from the 1-Lipschitz initialisation
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(0.3 * torch.randn_like(p) * p.abs().mean())
    if cls is LiResNet:                   # a stale power-iteration estimate: bound must use the true norm
        for b in model.blocks:
            b.sigma.mul_(0.8)
    bound = model.lipschitz_bound()
    emp = _empirical_lipschitz(model)
    assert emp <= bound
    assert emp > 0.3 * bound              # the ascent is strong enough for the test to fail


def test_liresnet_bound_uses_the_true_norm_not_the_power_iteration_estimate():
    model = tiny(LiResNet, dense_depth=0)
    est = model.power_iteration_factors()
    for b, s in zip(model.blocks, est):
        true = residual_conv_norm_bound(b.weight, b.grid)
        assert s <= true
        assert b.lipschitz_bound() == pytest.approx(true / s)
    f = model.lipschitz_factors()
    assert model.lipschitz_bound() == pytest.approx(f["stem"] * f["blocks"] * f["dense"])


@pytest.mark.parametrize("cls", [LiResNet, BRONet])
def test_trains_certifies_and_round_trips(cls, tmp_path):
    model = tiny(cls)
    opt = build_optimizer(model, lr=1e-2)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    losses = []
    for _ in range(4):
        loss = emma_loss(model(x), y, model.head_weight(), model.lipschitz_bound(), 36 / 255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks.parameters())
    model.eval()
    cert = certify(model, x, y)
    assert cert.lipschitz == pytest.approx(model.lipschitz_bound())
    assert (cert.radius >= 0).all()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()   # LiResNet's train mode refreshes s
    assert type(loaded) is cls
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded.lipschitz_bound() == pytest.approx(model.lipschitz_bound())
    assert model.forward_head(model.forward_features(x).double()).dtype == torch.float64


@pytest.mark.parametrize("cls", [LiResNet, BRONet])
def test_clear_errors(cls):
    with pytest.raises(ValueError, match="even width"):
        tiny(cls, width=7)
    with pytest.raises(ValueError, match="patch_size"):
        tiny(cls, patch_size=3)
    with pytest.raises(ValueError, match="input channels"):
        tiny(cls)(torch.rand(2, 1, 8, 8))


def test_create_model_by_name_for_other_sizes():
    m = lipnext.create_model("bronet_l6w96", num_classes=3, image_size=16)
    assert m(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    m = lipnext.create_model("liresnet_l7w64", num_classes=3, in_chans=1, image_size=8)
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 3)
