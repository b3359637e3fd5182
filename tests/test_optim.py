"""Manifold optimizer: FastExp, polar retraction, ManifoldAdam, Lookahead, build_optimizer."""
import copy
import io

import pytest
import torch
from torch import nn

import lipnext.optim.functional as functional
import lipnext.optim.polar as polar
from lipnext.nn import (OrthogonalParameter, PositionalEncoding, orthogonality_error,
                        random_orthogonal)
from lipnext.optim import (ManifoldAdam, build_optimizer, fast_exp, lie_gradient,
                           polar_retract, retract_model)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_skew(n, norm, batch=(), dtype=torch.float64):
    """Skew-symmetric (*batch, n, n) matrices with Frobenius norm exactly `norm` (float64 first)."""
    a = torch.randn(*batch, n, n, dtype=torch.float64)
    a = a - a.mT
    norm = torch.as_tensor(norm, dtype=torch.float64)
    return (a * (norm / torch.linalg.matrix_norm(a))[..., None, None]).to(dtype)


def orth_error(x):
    """max |X^T X - I| over a batch, in float64."""
    return max(orthogonality_error(m) for m in x.reshape(-1, *x.shape[-2:]))


def same_component_target(x0, scale):
    """A target on the same connected component of O(n) as x0."""
    return x0 @ torch.linalg.matrix_exp(random_skew(x0.shape[-1], scale, dtype=x0.dtype))


# FastExp and exp_update: tests/test_fast_exp.py


# ---------------------------------------------------------------- Riemannian direction and step


def test_lie_gradient_is_skew_and_is_the_directional_derivative():
    x = random_orthogonal(9, dtype=torch.float64)
    g = torch.randn(9, 9, dtype=torch.float64)
    a = lie_gradient(x, g)
    assert torch.equal(a, -a.mT)
    torch.testing.assert_close(a, (x.T @ g - g.T @ x) / 2)
    # d/dt <G, X exp(t W)> at 0 equals <A, W> for every skew W
    w = random_skew(9, 1.0)
    h = 1e-6
    fd = ((g * (x @ torch.linalg.matrix_exp(h * w))).sum()
          - (g * (x @ torch.linalg.matrix_exp(-h * w))).sum()) / (2 * h)
    torch.testing.assert_close(fd, (a * w).sum(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("nesterov", [False, True])
def test_adam_and_nadam_steps_are_skew(monkeypatch, nesterov):
    seen = []
    monkeypatch.setattr(functional, "exp_update",
                        lambda x, u, **kw: seen.append(u.clone()) or x @ fast_exp(u))
    x = OrthogonalParameter(random_orthogonal(10))
    opt = ManifoldAdam([x], lr=1e-2, nesterov=nesterov)
    for _ in range(5):
        x.grad = torch.randn(10, 10)
        opt.step()
    assert len(seen) == 5
    for u in seen:          # exactly skew in floating point: fast_expm1 is told so (skew=True)
        assert torch.equal(u, -u.mT)
        assert u.abs().max() > 0
    assert torch.equal(opt.state[x]["exp_avg"], -opt.state[x]["exp_avg"].mT)


# ---------------------------------------------------------------- orthogonality and retraction


def procrustes_run(params, targets, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(((x - t) ** 2).sum() for x, t in zip(params, targets))
        loss.backward()
        opt.step()
    return loss.item()


@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_orthogonal_after_many_steps_then_retraction(method):
    shapes = [16, 16, 16, 24, 24]  # two stacks
    xs = [OrthogonalParameter(random_orthogonal(n)) for n in shapes]
    targets = [random_orthogonal(n) for n in shapes]
    opt = ManifoldAdam(xs, lr=3e-3, nesterov=True, lookahead_k=5)
    procrustes_run(xs, targets, opt, 300)
    drift = max(orthogonality_error(x) for x in xs)
    assert 0 < drift < 1e-4
    assert retract_model(xs, method=method) == pytest.approx(drift)
    assert max(orthogonality_error(x) for x in xs) < 1e-6
    assert all(x.dtype == torch.float32 for x in xs)


def test_polar_retract_is_u_vt():
    x = torch.randn(3, 2, 11, 11, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(x)
    torch.testing.assert_close(polar_retract(x), u @ vh, rtol=0, atol=1e-12)
    x32 = x.float()
    q = polar_retract(x32)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, (u @ vh).float(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        polar_retract(x, method="qr")


@pytest.mark.parametrize("kind", ["near_orthogonal", "gaussian"])
def test_newton_schulz_agrees_with_svd_without_fallback(monkeypatch, kind):
    q = torch.stack([random_orthogonal(12, dtype=torch.float64) for _ in range(4)])
    x = q + 1e-3 * torch.randn_like(q) if kind == "near_orthogonal" else torch.randn_like(q)
    expected = polar_retract(x, "svd")

    def no_svd(_):
        raise AssertionError("fell back to the SVD")

    monkeypatch.setattr(polar, "_svd_polar", no_svd)
    out = polar_retract(x, "newton_schulz", steps=30)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_newton_schulz_falls_back_to_svd_when_not_converged():
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    x[1, :, 0] *= 1e-6  # nearly singular: 2 iterations cannot converge
    torch.testing.assert_close(polar_retract(x, "newton_schulz", steps=2),
                               polar_retract(x, "svd"), rtol=0, atol=1e-10)


def test_retract_model_only_touches_orthogonal_parameters():
    model = nn.Module()
    model.a = OrthogonalParameter(random_orthogonal(6) + 1e-3 * torch.randn(6, 6))
    model.b = OrthogonalParameter(random_orthogonal(4) + 1e-3 * torch.randn(4, 4))
    model.w = nn.Parameter(torch.randn(6, 6))
    w = model.w.detach().clone()
    assert retract_model(model) > 1e-4
    assert orthogonality_error(model.a) < 1e-6 and orthogonality_error(model.b) < 1e-6
    assert torch.equal(model.w, w)


def test_optimizer_retract_also_retracts_lookahead_slow_copies():
    x = OrthogonalParameter(random_orthogonal(8))
    opt = ManifoldAdam([x], lookahead_k=3)
    x.grad = torch.randn(8, 8)
    opt.step()
    with torch.no_grad():
        x.add_(1e-3)
        opt.state[x]["slow"].add_(1e-3)
    assert opt.retract("newton_schulz") > 1e-4
    assert orthogonality_error(x) < 1e-6 and orthogonality_error(opt.state[x]["slow"]) < 1e-6


# ---------------------------------------------------------------- optimisation


@pytest.mark.parametrize("nesterov", [False, True])
def test_procrustes_converges_on_the_manifold(nesterov):
    x0 = random_orthogonal(12)
    target = same_component_target(x0, 3.0)
    x = OrthogonalParameter(x0.clone())
    opt = ManifoldAdam([x], lr=0.05, nesterov=nesterov)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = ((x - target) ** 2).sum()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[0] > 1.0 and losses[100] < 1e-2 * losses[0]
    assert (x - target).norm() < 1e-3
    assert orthogonality_error(x) < 1e-4


def test_euclidean_params_follow_torch_adam_adamw_nadam():
    cases = [
        (dict(), torch.optim.Adam, dict()),
        (dict(weight_decay=0.1), torch.optim.AdamW, dict(weight_decay=0.1)),
        (dict(nesterov=True), torch.optim.NAdam, dict()),
        (dict(nesterov=True, weight_decay=0.1), torch.optim.NAdam,
         dict(weight_decay=0.1, decoupled_weight_decay=True)),
    ]
    for ours_kw, ref_cls, ref_kw in cases:
        p = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3, 4))]
        q = [nn.Parameter(t.detach().clone()) for t in p]
        ours = ManifoldAdam(p, lr=1e-2, **ours_kw)
        ref = ref_cls(q, lr=1e-2, **ref_kw)
        for _ in range(20):
            for a, b in zip(p, q):
                a.grad = torch.randn_like(a)
                b.grad = a.grad.clone()
            ours.step()
            ref.step()
        for a, b in zip(p, q):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=ref_cls.__name__)


def test_orthogonal_lr_scale_and_no_weight_decay_by_default():
    x = OrthogonalParameter(random_orthogonal(10, dtype=torch.float64))
    b = nn.Parameter(torch.ones(10, dtype=torch.float64))
    lr = 1e-3
    opt = ManifoldAdam([{"params": [x]}, {"params": [b]}], lr=lr, weight_decay=0.1)
    orth, plain = opt.param_groups
    assert orth["orthogonal"] and not plain["orthogonal"]
    assert orth["orthogonal_lr_scale"] == 0.5 and orth["orthogonal_weight_decay"] == 0.0

    # zero gradient: only the ordinary parameter decays
    x0 = x.detach().clone()
    x.grad, b.grad = torch.zeros_like(x), torch.zeros_like(b)
    opt.step()
    assert torch.equal(x, x0)
    torch.testing.assert_close(b, torch.full_like(b, 1 - lr * 0.1))

    # first Adam step is ~ sign(A): X^T X_new = exp(-0.5 lr sign(A))
    x.grad = torch.randn_like(x)
    opt.state.clear()
    a = lie_gradient(x0, x.grad)
    opt.step()
    step = (x0.T @ x.detach() - x.detach().T @ x0) / 2  # = U + O(U^3)
    torch.testing.assert_close(step, -0.5 * lr * torch.sign(a), rtol=0, atol=1e-8)


def test_orthogonal_weight_decay_pulls_towards_identity():
    x = OrthogonalParameter(random_orthogonal(8))
    opt = ManifoldAdam([x], lr=1e-2, orthogonal_weight_decay=1.0)
    before = (x - torch.eye(8)).norm().item()
    for _ in range(10):
        x.grad = torch.zeros_like(x)
        opt.step()
    assert (x - torch.eye(8)).norm().item() < before
    assert orthogonality_error(x) < 1e-5


# ---------------------------------------------------------------- state and Lookahead


def make_problem(seed):
    gen = torch.Generator().manual_seed(seed)
    params = [OrthogonalParameter(random_orthogonal(n, gen)) for n in (8, 8, 8, 12, 12)]
    plain = [nn.Parameter(torch.randn(8, generator=gen)),
             nn.Parameter(torch.randn(4, 8, generator=gen))]
    targets = [random_orthogonal(n, gen) for n in (8, 8, 8, 12, 12)]
    return params, plain, targets


def loss_of(params, plain, targets):
    loss = sum(((x - t) ** 2).sum() for x, t in zip(params, targets))
    return loss + (plain[1] @ params[0] @ plain[0]).pow(2).sum() + plain[0].pow(4).sum()


def run_steps(opt, params, plain, targets, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_of(params, plain, targets).backward()
        opt.step()


def make_opt(params, plain):
    return ManifoldAdam([{"params": params}, {"params": plain}], lr=1e-2, nesterov=True,
                        weight_decay=0.05, lookahead_k=3)


def test_state_dict_round_trip_is_bit_identical():
    params, plain, targets = make_problem(1)
    opt = make_opt(params, plain)
    run_steps(opt, params, plain, targets, 7)  # mid Lookahead cycle

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    params2 = [OrthogonalParameter(p.detach().clone()) for p in params]
    plain2 = [nn.Parameter(p.detach().clone()) for p in plain]
    opt2 = make_opt(params2, plain2)
    opt2.load_state_dict(saved)
    assert set(opt2.state[params2[0]]) == {"step", "mu_product", "exp_avg", "exp_avg_sq",
                                           "slow", "lookahead_sum", "exp_plan"}

    run_steps(opt, params, plain, targets, 8)
    run_steps(opt2, params2, plain2, targets, 8)
    for a, b in zip(params + plain, params2 + plain2):
        assert torch.equal(a, b)
    for a, b in zip(params + plain, params2 + plain2):
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key]), key



@pytest.mark.parametrize("how", ["assign", "data", "in_place"])
def test_state_replaced_by_the_user_is_what_the_next_step_uses(how):
    """The stacked buffers notice a state tensor that was replaced (a new object, or new memory
    behind the old one through .data) and re-stack; in-place edits act on the rows directly."""
    runs = []
    for edit in (how, "reference"):
        params, plain, targets = make_problem(4)
        opt = make_opt(params, plain)
        run_steps(opt, params, plain, targets, 2)
        for p in (params[1], plain[1]):
            state = opt.state[p]
            if edit == "assign":
                state["exp_avg"] = torch.zeros_like(state["exp_avg"])
            elif edit == "data":
                state["exp_avg"].data = torch.zeros_like(state["exp_avg"])
            else:
                state["exp_avg"].zero_()
        if edit == "reference":                          # the same state, stacked from scratch
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        run_steps(opt, params, plain, targets, 2)
        runs.append([p.detach().clone() for p in params + plain])
    for a, b in zip(*runs):
        assert torch.equal(a, b)

def test_batched_equals_per_matrix():
    params, plain, targets = make_problem(2)
    single = [OrthogonalParameter(p.detach().clone()) for p in params]
    batched = ManifoldAdam(params, lr=1e-2, nesterov=True, lookahead_k=3)
    per_matrix = ManifoldAdam([{"params": [p]} for p in single], lr=1e-2, nesterov=True,
                              lookahead_k=3)
    for _ in range(10):
        for opt, ps in ((batched, params), (per_matrix, single)):
            opt.zero_grad()
            sum(((x - t) ** 2).sum() + x.sum() ** 2 for x, t in zip(ps, targets)).backward()
            opt.step()
    for a, b in zip(params, single):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_lookahead_one_cycle_follows_the_formula(monkeypatch):
    k, alpha = 4, 0.5
    params, plain, targets = make_problem(3)
    params2 = [OrthogonalParameter(p.detach().clone()) for p in params]
    plain2 = [nn.Parameter(p.detach().clone()) for p in plain]
    start = [p.detach().clone() for p in params + plain]

    steps = []  # the Lie-algebra steps U of the plain optimizer, per stack
    monkeypatch.setattr(functional, "exp_update",
                        lambda x, u, **kw: steps.append(u.clone()) or x @ fast_exp(u))
    plain_opt = ManifoldAdam([{"params": params2}, {"params": plain2}], lr=1e-2)
    run_steps(plain_opt, params2, plain2, targets, k)
    monkeypatch.undo()

    la = ManifoldAdam([{"params": params}, {"params": plain}], lr=1e-2, lookahead_k=k,
                      lookahead_alpha=alpha)
    run_steps(la, params, plain, targets, k - 1)
    for a, b in zip(params + plain, params2 + plain2):  # fast weights are plain Adam until the sync
        assert not torch.equal(a, b)
    run_steps(la, params, plain, targets, 1)

    sums = [sum(steps[i::2]) for i in range(2)]  # two stacks (8 and 12)
    s_all = list(sums[0]) + list(sums[1])
    for x, x0, s in zip(params, start, s_all):
        expected = x0.double() @ torch.linalg.matrix_exp(alpha * s.double())
        torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
        assert orthogonality_error(x) < 1e-5
        assert torch.equal(la.state[x]["slow"], x.detach())
        assert not la.state[x]["lookahead_sum"].any()
    for p, p0, fast in zip(plain, start[len(params):], plain2):
        torch.testing.assert_close(p, p0 + alpha * (fast - p0))
        assert torch.equal(la.state[p]["slow"], p.detach())


def test_lookahead_without_sync_matches_plain_optimizer():
    params, plain, targets = make_problem(4)
    params2 = [OrthogonalParameter(p.detach().clone()) for p in params]
    plain2 = [nn.Parameter(p.detach().clone()) for p in plain]
    la = ManifoldAdam([{"params": params}, {"params": plain}], lr=1e-2, lookahead_k=4)
    ref = ManifoldAdam([{"params": params2}, {"params": plain2}], lr=1e-2)
    run_steps(la, params, plain, targets, 3)
    run_steps(ref, params2, plain2, targets, 3)
    for a, b in zip(params + plain, params2 + plain2):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- groups, edge cases, factory

def test_sync_step_does_not_compute_the_discarded_update(monkeypatch):
    """On a sync step each matrix is rotated once (X_slow exp(alpha S)), not twice."""
    params, plain, targets = make_problem(5)
    opt = ManifoldAdam([{"params": params}, {"params": plain}], lr=1e-2, lookahead_k=2)
    calls = []
    real = functional.exp_update
    monkeypatch.setattr(functional, "exp_update",
                        lambda x, u, **kw: calls.append(len(x)) or real(x, u, **kw))
    run_steps(opt, params, plain, targets, 2)
    assert calls == [3, 2, 3, 2]          # two stacks (8 x 8 and 12 x 12), one rotation each


def test_stack_with_rows_at_different_steps_matches_per_matrix():
    """A stack whose rows sync on different steps (one skipped a step): each row as alone."""
    params, plain, targets = make_problem(6)
    single = [OrthogonalParameter(p.detach().clone()) for p in params]
    batched = ManifoldAdam(params, lr=1e-2, lookahead_k=2)
    per_matrix = ManifoldAdam([{"params": [p]} for p in single], lr=1e-2, lookahead_k=2)
    for step in range(5):
        for opt, ps in ((batched, params), (per_matrix, single)):
            opt.zero_grad()
            sum(((x - t) ** 2).sum() for x, t in zip(ps, targets)).backward()
            if step == 0:
                ps[0].grad = None             # row 0 of the 8 x 8 stack is one step behind
            opt.step()
    assert batched.state[params[0]]["step"] == 4 and batched.state[params[1]]["step"] == 5
    for a, b in zip(params, single):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(params, single):
        torch.testing.assert_close(batched.state[a]["slow"], per_matrix.state[b]["slow"],
                                   rtol=0, atol=1e-6)



def test_group_classification():
    x, w = OrthogonalParameter(torch.eye(3)), nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="mixes"):
        ManifoldAdam([x, w])
    with pytest.raises(ValueError, match="square"):
        ManifoldAdam([{"params": [w], "orthogonal": True}])
    opt = ManifoldAdam([{"params": [nn.Parameter(torch.eye(3))], "orthogonal": True},
                        {"params": [x], "orthogonal": False}])
    assert [g["orthogonal"] for g in opt.param_groups] == [True, False]
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [x, w]})
    assert len(opt.param_groups) == 2


def test_plain_tensor_in_orthogonal_group_stays_orthogonal():
    x = nn.Parameter(random_orthogonal(6))
    opt = ManifoldAdam([{"params": [x], "orthogonal": True}], lr=1e-2)
    for _ in range(5):
        x.grad = torch.randn(6, 6)
        opt.step()
    assert orthogonality_error(x) < 1e-5


def test_none_grads_are_skipped_and_nan_does_not_crash():
    x, y = OrthogonalParameter(random_orthogonal(5)), OrthogonalParameter(random_orthogonal(5))
    b = nn.Parameter(torch.zeros(5))
    opt = ManifoldAdam([{"params": [x, y]}, {"params": [b]}], lookahead_k=2)
    y0 = y.detach().clone()
    x.grad = torch.randn(5, 5)
    opt.step()
    assert torch.equal(y, y0) and not opt.state[y] and not opt.state[b]
    y.grad = torch.randn(5, 5)
    opt.step()  # the stack changes composition
    assert opt.state[x]["step"].item() == 2 and opt.state[y]["step"].item() == 1
    x.grad = torch.full((5, 5), float("nan"))
    b.grad = torch.full((5,), float("inf"))
    opt.step()
    assert torch.isnan(x).all()


def test_low_precision_weight_is_updated_in_fp32():
    x = OrthogonalParameter(random_orthogonal(8).to(torch.bfloat16))
    opt = ManifoldAdam([x], lr=1e-2, lookahead_k=2)
    x.grad = torch.randn(8, 8, dtype=torch.bfloat16)
    opt.step()
    assert x.dtype == torch.bfloat16
    assert opt.state[x]["exp_avg"].dtype == torch.float32
    assert opt.state[x]["slow"].dtype == torch.float32


def test_build_optimizer_groups():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.r = OrthogonalParameter(random_orthogonal(8))
            self.pos = PositionalEncoding((2, 2))
            self.head = nn.Linear(8, 3)
            self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)

    model = Tiny()
    opt = build_optimizer(model, weight_decay=0.05)
    orth, decay, no_decay = opt.param_groups
    assert orth["params"] == [model.r] and orth["orthogonal"]
    assert orth["orthogonal_weight_decay"] == 0.0 and orth["orthogonal_lr_scale"] == 0.5
    assert decay["params"] == [model.head.weight] and decay["weight_decay"] == 0.05
    assert {id(p) for p in no_decay["params"]} == {id(model.pos.pos), id(model.head.bias)}
    assert no_decay["weight_decay"] == 0.0
    assert all(g["nesterov"] and g["lookahead_k"] == 5 and g["lookahead_alpha"] == 0.5
               for g in opt.param_groups)
    # and it trains
    x = torch.randn(4, 2, 2, 8)
    for _ in range(3):
        opt.zero_grad()
        model.head(model.pos(x) @ model.r).pow(2).sum().backward()
        opt.step()
    assert orthogonality_error(model.r) < 1e-5
    copy.deepcopy(opt.state_dict())
