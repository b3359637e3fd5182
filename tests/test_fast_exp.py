"""FastExp (scaling and squaring of Paterson–Stockmeyer Taylor), low-precision products, exp_update."""
import importlib
import math

import pytest
import torch

import lipnext.ops.exp as ops_exp
from lipnext.nn import random_orthogonal
from lipnext.optim import exp_plan, exp_update, fast_exp, fast_expm1
from lipnext.ops.exp import (_STRUCTURED_BLOCKS, _norm_estimate, exp_cost, exp_plans,
                             structured_product, truncation_bound)
from lipnext.ops.precision import PRECISIONS, product, round_tf32


def gaussian_skew(n, norm, batch=(), seed=0):
    """Skew (*batch, n, n) float64 matrices of Frobenius norm `norm`, Gaussian entries."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, n, n, generator=g, dtype=torch.float64)
    a = a - a.mT
    return a * (norm / torch.linalg.matrix_norm(a))[..., None, None]


def nadam_like_skew(n, norm, batch=(), seed=0):
    """The sign-like skew steps of NAdam (entries ~ +-1) on a low-rank + noise gradient."""
    g = torch.Generator().manual_seed(seed)
    u, v = (torch.randn(*batch, n, 2, generator=g, dtype=torch.float64) for _ in range(2))
    noise = torch.randn(*batch, n, n, generator=g, dtype=torch.float64)
    grad = u @ v.mT + 0.3 * noise
    d = torch.sign(grad - grad.mT)
    return d * (norm / torch.linalg.matrix_norm(d))[..., None, None]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def orth_error(x):
    x = x.double()
    return (x.mT @ x - torch.eye(x.shape[-1], dtype=torch.float64)).abs().max().item()


# ---------------------------------------------------------------- the exponential

NORMS = [1e-4, 0.05, 0.5, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("kind", [gaussian_skew, nadam_like_skew])
@pytest.mark.parametrize("norm", NORMS)
def test_fast_exp_matches_float64_matrix_exp(kind, norm):
    a = kind(48, norm, batch=(3,))
    exact = torch.linalg.matrix_exp(a)
    # float64: the plan targets u = 2^-53
    assert max_err(fast_exp(a), exact) < 1e-13
    # float32: as accurate as torch.linalg.matrix_exp in float32 (rounding level)
    a32 = a.float()
    ours = fast_exp(a32)
    assert ours.dtype == torch.float32
    assert max_err(ours, exact) <= max(2e-7, 1.5 * max_err(torch.linalg.matrix_exp(a32), exact))
    assert orth_error(ours) < 1e-6


def test_the_regimes_are_all_exercised():
    """Orders 2, 4 and 6 without squaring, and order 6 with s squarings, rising with the norm."""
    plans = [exp_plans(nadam_like_skew(48, norm).float())[0] for norm in NORMS + [0.2]]
    assert {(2, 0), (4, 0), (6, 0)} <= set(plans)
    assert any(k == 6 and s >= 1 for k, s in plans)
    costs = [exp_cost(p) for p in plans[:-1]]
    assert costs == sorted(costs)


@pytest.mark.parametrize("plan", [(2, 0), (4, 0), (6, 0), (2, 3), (4, 2), (6, 2)])
def test_each_plan_evaluates_its_formula(monkeypatch, plan):
    """fast_exp = T_k(A / 2^s)^(2^s), T_k the Taylor polynomial of order k (float64)."""
    module = importlib.import_module("lipnext.ops.exp")  # the name fast_exp is the function
    monkeypatch.setattr(module, "exp_plan", lambda theta, u: plan)
    k, s = plan
    a = nadam_like_skew(10, 0.5)
    b = a / 2 ** s
    t = torch.eye(10, dtype=torch.float64)
    for j in range(1, k + 1):
        t = t + torch.linalg.matrix_power(b, j) / math.factorial(j)
    torch.testing.assert_close(fast_exp(a), torch.linalg.matrix_power(t, 2 ** s), rtol=0,
                               atol=2 ** s * 1e-15)   # rounding, amplified by the squarings


def test_plan_meets_the_bound_with_the_fewest_products():
    u = 2.0 ** -24
    for theta in [0.0, 1e-3, 0.02, 0.3, 1.0, 2.5, 17.0]:
        k, s = exp_plan(theta, u)
        assert truncation_bound(k, s, theta) <= u
        cheaper = [(o, exp_cost((k, s)) - 1 - exp_cost((o, 0))) for o in (2, 4, 6)]
        assert all(truncation_bound(o, t, theta) > u for o, t in cheaper if t >= 0)
    assert exp_cost((2, 0)) == 1 and exp_cost((4, 3)) == 5 and exp_cost((6, 1)) == 4



def brute_force_plan(theta, u):
    """Every plan by cost, cheapest first; at a cost the one with the smallest bound."""
    for cost in range(1, 200):
        plans = [(o, cost - exp_cost((o, 0))) for o in (2, 4, 6) if cost >= exp_cost((o, 0))]
        err, plan = min((truncation_bound(o, t, theta), (o, t)) for o, t in plans)
        if err <= u:
            return plan


@pytest.mark.parametrize("u", [2.0 ** -8, 2.0 ** -24, 2.0 ** -53])       # bf16, fp32, fp64
def test_plan_is_the_brute_force_plan_also_at_the_cost_limits(u):
    """exp_plan skips the costs whose precomputed limit is below theta: the same plan as trying
    every cost, on a sweep and on both sides of each limit."""
    thetas = [10.0 ** (e / 8) for e in range(-64, 25)]
    limits = [ops_exp._cost_limit(cost, u) for cost in range(1, 12)]
    thetas += [lim * (1 + d) for lim in limits for d in (-1e-9, -1e-12, 0.0, 1e-12, 1e-9)]
    for theta in thetas:
        assert exp_plan(theta, u) == brute_force_plan(theta, u), theta

def test_norm_estimate_is_close_below_the_spectral_norm():
    for kind in (gaussian_skew, nadam_like_skew):
        a = kind(256, 2.0, batch=(2,)).float()
        true = torch.linalg.matrix_norm(a.double(), ord=2)
        est = _norm_estimate(a @ a).double()
        assert (est <= true * (1 + 1e-5)).all() and (est >= 0.9 * true).all()


def test_mixed_batch_plans_per_matrix():
    norms = torch.tensor([[1e-4, 3.0, 0.05], [0.5, 1e-3, 2.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 3, 7, 7, generator=g, dtype=torch.float64)
    a = a - a.mT
    a = a * (norms / torch.linalg.matrix_norm(a))[..., None, None]
    out = fast_exp(a)
    assert out.shape == a.shape
    assert len(set(exp_plans(a))) > 2
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], fast_exp(a[i, j]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", [512, 515])
def test_structured_products_are_the_full_products(n):
    """B^2 (symmetric) and B^2 B (skew) from 9/16 of the multiply-adds, odd sizes included
    (uneven row blocks): every block below the diagonal is the mirrored block above it;
    what FastExp returns for a large skew stack matches float64 matrix_exp."""
    b = gaussian_skew(n, 2.0, batch=(2,)).double()
    b2 = structured_product(b, b, product("fp64"), 1)
    torch.testing.assert_close(b2, b @ b, rtol=0, atol=1e-14)
    b3 = structured_product(b2, b, product("fp64"), -1)
    torch.testing.assert_close(b3, b2 @ b, rtol=0, atol=1e-14)
    q = _STRUCTURED_BLOCKS
    edges = [n * i // q for i in range(q + 1)]
    for lo, hi in zip(edges, edges[1:]):             # below the diagonal block: mirrored
        assert torch.equal(b2[:, hi:, lo:hi], b2[:, lo:hi, hi:].mT)
        assert torch.equal(b3[:, hi:, lo:hi], -b3[:, lo:hi, hi:].mT)
    a = gaussian_skew(n, 3.0, batch=(2,)).float()
    assert {p[0] for p in exp_plans(a, skew=True)} == {6}          # B^3 is used
    assert max_err(fast_expm1(a, skew=True) + torch.eye(n), torch.linalg.matrix_exp(a.double())) < 1e-6


def test_non_skew_input_is_exact_and_errors_are_clear():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    assert exp_plans(a) == [None, None, None]
    torch.testing.assert_close(fast_exp(a), torch.linalg.matrix_exp(a), rtol=0, atol=1e-13)
    nilpotent_ish = torch.tensor([[0.0, 100.0], [1e-4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(fast_exp(nilpotent_ish), torch.linalg.matrix_exp(nilpotent_ish))
    with pytest.raises(ValueError, match="n, n"):
        fast_exp(torch.zeros(3, 4))
    assert torch.isnan(fast_exp(torch.full((2, 3, 3), float("nan")))).all()
    assert torch.equal(fast_exp(torch.zeros(2, 5, 5)), torch.eye(5).expand(2, 5, 5))


# ---------------------------------------------------------------- low-precision products


def test_round_tf32_is_round_to_nearest_even_on_a_10_bit_mantissa():
    x = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -10, -(1 + 2 ** -11 + 2 ** -20),
                      float("inf"), 0.0])
    want = torch.tensor([1.0, 1 + 2 ** -9, 1 + 2 ** -10, -(1 + 2 ** -10), float("inf"), 0.0])
    assert torch.equal(round_tf32(x), want)
    y = torch.randn(10000)
    r = round_tf32(y)
    assert ((r - y).abs() <= 2 ** -11 * y.abs()).all()
    assert torch.equal(round_tf32(r), r)
    assert round_tf32(torch.tensor([float("nan")])).isnan().all()


@pytest.mark.parametrize("name", PRECISIONS)
def test_products_are_within_their_error_constant(name):
    g = torch.Generator().manual_seed(5)
    prec = product(name)
    a, b = (torch.randn(2, 40, 40, generator=g, dtype=prec.dtype) for _ in range(2))
    exact = a.double() @ b.double()
    bound = prec.error_constant(40) * (a.double().abs() @ b.double().abs())
    assert ((prec.mm(a, b).double() - exact).abs() <= bound).all()
    c = torch.randn(2, 40, 40, generator=g, dtype=prec.dtype)
    fused = prec.addmm(c, a, b, beta=2.0, alpha=0.5).double()
    assert ((fused - (2 * c.double() + 0.5 * exact)).abs() <= bound + 1e-6).all()
    if name in ("tf32", "bf16"):   # really lower precision than fp32
        assert (prec.mm(a, b).double() - exact).abs().max() > 1e-5


def test_unknown_precision_and_method_are_clear_errors():
    x, a = torch.eye(3), torch.zeros(3, 3)
    with pytest.raises(ValueError, match="fp64, fp32, tf32, bf16"):
        exp_update(x, a, precision="fp16")
    with pytest.raises(ValueError, match="fast_exp, exact, cayley"):
        exp_update(x, a, method="pade")
    with pytest.raises(ValueError, match="same batch shape"):
        exp_update(torch.eye(4), a)


# ---------------------------------------------------------------- exp_update


def test_exp_update_methods_follow_their_formulas():
    a = gaussian_skew(12, 0.7, batch=(2,))
    x = torch.stack([random_orthogonal(12, dtype=torch.float64) for _ in range(2)])
    eye = torch.eye(12, dtype=torch.float64)
    expected = {"fast_exp": x @ torch.linalg.matrix_exp(a), "exact": x @ torch.linalg.matrix_exp(a),
                "cayley": x @ torch.linalg.solve(eye - a / 2, eye + a / 2)}
    for method, want in expected.items():
        got = exp_update(x, a, method=method, precision="fp64")
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
        got32 = exp_update(x.float(), a.float(), method=method)
        assert got32.dtype == torch.float32 and max_err(got32, want) < 1e-6
    assert max_err(fast_expm1(a), torch.linalg.matrix_exp(a) - eye) < 1e-14


@pytest.mark.parametrize("name,u_op", [("tf32", 2.0 ** -11), ("bf16", 2.0 ** -15)])
def test_low_precision_error_scales_with_the_step(name, u_op):
    """X + X (E - I): the rounding error is ~ u ||A||, not u ||X|| (it would be for X E)."""
    x = random_orthogonal(64)
    for norm in (1e-3, 1e-1):
        a = nadam_like_skew(64, norm)
        want = x.double() @ torch.linalg.matrix_exp(a)
        err = max_err(exp_update(x, a.float(), precision=name), want)
        assert err <= 3e-8 + 8 * u_op * norm


# ---------------------------------------------------------------- drift without retraction


def nadam_steps(n, steps, lr_norm, seed=0):
    """Skew NAdam steps D of a low-rank + noise gradient stream, scaled to ||lr D||_F = lr_norm."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(n, n, dtype=torch.float64)
    v = torch.zeros_like(m)
    b1, b2 = 0.9, 0.999
    for t in range(1, steps + 1):
        u, w = (torch.randn(n, 2, generator=g, dtype=torch.float64) for _ in range(2))
        grad = u @ w.T + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64)
        a = (grad - grad.T) / 2
        m.lerp_(a, 1 - b1)
        v.mul_(b2).addcmul_(a, a, value=1 - b2)
        d = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + 1e-8)
        yield (d * (lr_norm / d.norm())).float()


@pytest.mark.parametrize("name", ["tf32", "bf16", "fp32"])
def test_drift_stays_at_fp32_level_over_1000_steps(name):
    n = 64
    x = random_orthogonal(n)
    drift = [orth_error(x)]
    for u in nadam_steps(n, 1000, 3e-4 * n):       # ||lr D||_F ~ 3e-4 C at lr 1e-3
        x = exp_update(x, u, precision=name)
        drift.append(orth_error(x))
    per_step = max(b - a for a, b in zip(drift, drift[1:]))
    assert per_step <= 1e-6
    assert drift[-1] - drift[0] <= 1e-4


def test_a_kernel_registered_for_exp_is_what_the_optimizer_runs():
    from lipnext.ops import register_kernel, unregister_kernel
    from lipnext.ops.exp import reference
    calls = []
    register_kernel("exp", "cpu", lambda a, *args, **kw: calls.append(kw) or reference(a, *args, **kw))
    try:
        x, u = torch.eye(6), nadam_like_skew(6, 0.3).float()
        out = exp_update(x, u, skew=True)
    finally:
        unregister_kernel("exp", "cpu")
    assert calls == [{"skew": True}]
    torch.testing.assert_close(out, torch.linalg.matrix_exp(u.double()).float(), rtol=0, atol=1e-6)
    exp_update(x, u)
    assert len(calls) == 1                       # unregistered: the reference again
