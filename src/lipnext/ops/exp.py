"""FastExp: exp(A) - I by scaling and squaring of a Paterson–Stockmeyer Taylor polynomial.

For each matrix A of a batch (skew-symmetric in the optimizer) and B = A / 2^s
(docs/CORE.md, Optimizer):

    W_0 = B + B^2 / 2                                    Taylor order 2
    W_0 = B + B^2 (I/2 + B/6 + B^2/24)                   order 4, Paterson–Stockmeyer
    W_0 = B + B^2/2 + B^3/6 + B^3 (B + B^2/5 + B^3/30)/24    order 6, B^3 = B^2 B
    W_{j+1} = 2 W_j + W_j^2 = (I + W_j)^2 - I            the s squarings
    exp(A) - I ~ W_s,        fast_exp(A) = I + W_s

A^2 is the first product (B^2 = A^2 / 4^s is exact), so orders 2, 4 and 6 cost 1 + s,
2 + s and 3 + s matrix products (order 3 would cost what order 4 costs). For skew A,
A^2 is symmetric and B^3 skew: from C = 512 on each is computed as 9/16 of a product
(``structured_product``: eight row blocks, each from its diagonal block on; the blocks
below the diagonal by symmetry). Carrying W = E - I rather than E keeps each rounding
error proportional to ||A||, not to ||E|| = 1.

Plan (``exp_plan``), per matrix: the fewest products whose truncation bound
2^s r_k(b) (1 + r_k(b))^(2^s - 1), b = theta / 2^s, is at most the unit roundoff u of the
working dtype, where r_k(b) = sum_{j>k} b^j / j! bounds ||T_k(B) - exp(B)||_2 when
||A||_2 <= theta (and ||exp(B)||_2 = 1, A skew). theta is the smaller of

* a bound: A is normal, so ||A||_2^2 = ||A^2||_2 <= ||A^2||_F, and
  theta_b = min(||A||_F, sqrt(||fl(A^2)||_F + c ||A||_F^2)), c the product's rounding
  constant (``Precision.error_constant``);
* an estimate: 1.1 x the larger of ||A^2||_F / ||A||_F (a lower bound on ||A||_2) and
  the power-iteration value of ||A||_2 from 8 steps on -A^2 (``_norm_estimate``; as
  scipy's expm, which estimates ||A^p||_1), computed only where it can change the cost.
  It is within 5 % of ||A||_2 on random and NAdam-like skew matrices, where theta_b is
  1.2-3.4x too large.

So the truncation error is at most ~u unless the estimate is off by more than the
margin (a 10 % underestimate raises it by 1.6x). Matrices that are not exactly skew go
to ``torch.linalg.matrix_exp``.

``fast_expm1`` is the op ``exp`` of ``lipnext.ops`` (a kernel registered for a device type
replaces ``reference`` there); the optimizer reaches it through ``optim.exp_update``.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .host import index_on, to_device
from .precision import Precision, product
from .registry import kernel_op

__all__ = ["exact_expm1", "exp_cost", "exp_theta", "grouped", "exp_plan", "exp_plans", "exp_work", "fast_exp",
           "fast_expm1", "plan_limit", "reference", "structured_product"]

_PRODUCTS = {2: 1, 4: 2, 6: 3}       # Taylor order -> matrix products before squaring
_POWER_STEPS, _POWER_BLOCK, _MARGIN = 8, 4, 1.1     # the norm estimate of ``_plans``
_STRUCTURED_MIN = 512        # from here on B^2 and B^3 are block-triangular products (measured on a CPU)
_STRUCTURED_BLOCKS = 8       # row blocks of ``structured_product``: 9/16 of a product


def truncation_bound(order: int, squarings: int, theta: float) -> float:
    """Bound on ||T_k(A / 2^s)^(2^s) - exp(A)||_2 for skew A with ||A||_2 <= theta."""
    m = 2.0 ** squarings
    b = theta / m
    if b >= 1:
        return math.inf
    term = b ** (order + 1) / math.factorial(order + 1)
    r, j = term, order + 1
    while term > 1e-17 * r:
        j += 1
        term *= b / j
        r += term
    return m * r * math.exp(min((m - 1) * math.log1p(r), 700.0))


def exp_cost(plan: tuple[int, int]) -> int:
    """Matrix products of a plan (order, squarings): the polynomial's, then the squarings."""
    order, squarings = plan
    return _PRODUCTS[order] + squarings


def exp_work(plan: tuple[int, int], n: int) -> float:
    """Multiply-adds of a plan on an n x n skew matrix, in units of n^3 (one product): B^2 and
    B^3 count (q + 1) / 2q from ``_STRUCTURED_MIN`` on (``structured_product``)."""
    order, squarings = plan
    q = _STRUCTURED_BLOCKS
    structured = (q + 1) / (2 * q) if n >= _STRUCTURED_MIN else 1.0
    return {2: structured, 4: structured + 1, 6: 2 * structured + 1}[order] + squarings


def _plans_of_cost(cost: int) -> list[tuple[int, int]]:
    return [(k, cost - base) for k, base in _PRODUCTS.items() if cost >= base]


@functools.cache
def plan_limit(plan: tuple[int, int], u: float) -> float:
    """The largest theta for which ``plan`` (order, squarings) meets u (bisection from below)."""
    order, squarings = plan
    lo, hi = 0.0, 2.0 ** squarings                     # b = theta / 2^s < 1
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if truncation_bound(order, squarings, mid) <= u else (lo, mid)
    return lo


@functools.cache
def _cost_limit(cost: int, u: float) -> float:
    """The largest theta for which some plan of ``cost`` products meets u (bisection, from
    below: truncation_bound grows with theta), so costs whose limit is below theta are skipped."""
    return max(plan_limit(plan, u) for plan in _plans_of_cost(cost))


def exp_plan(theta: float, u: float) -> tuple[int, int]:
    """(order, squarings): the cheapest plan with truncation bound <= u for skew A, ||A||_2 <= theta."""
    if not math.isfinite(theta):
        return 4, 0                       # the result is inf/nan whatever the plan
    s_min = max(0, math.floor(math.log2(theta)) + 1) if theta > 0 else 0   # b < 1
    cost = 1 + s_min
    while _cost_limit(cost, u) < theta * (1 - 1e-9):   # no plan of this cost can meet u
        cost += 1
    while True:
        err, plan = min((truncation_bound(k, s, theta), (k, s)) for k, s in _plans_of_cost(cost))
        if err <= u:
            return plan
        cost += 1


@functools.lru_cache(maxsize=32)
def _start_block(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The power iteration's unit start rows (``_POWER_BLOCK``, n), the same for every matrix:
    drawn once on the CPU from seed 0 (the same on every device), kept on ``device``."""
    x = torch.randn(_POWER_BLOCK, n, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return to_device(x / x.norm(dim=-1, keepdim=True), device)


def _norm_estimate(a2: Tensor) -> Tensor:
    """~||A||_2 of skew A: sqrt(||M x|| / ||x||) after power steps on M = -A^2 (PSD).

    Fixed random start block (deterministic), ``_POWER_STEPS`` matrix-block products of
    O(n^2) each. The result never exceeds ||A||_2: ``_plans`` multiplies it by ``_MARGIN``.
    """
    x = _start_block(a2.shape[-1], a2.dtype, a2.device).expand(len(a2), -1, -1)
    ratio = torch.zeros(len(a2), _POWER_BLOCK, dtype=a2.dtype, device=a2.device)
    for _ in range(_POWER_STEPS):
        y = torch.bmm(x, a2).neg_()            # rows x^T M = (M x)^T, M symmetric
        ratio = y.norm(dim=-1)
        x = y / ratio.clamp_min(torch.finfo(a2.dtype).tiny).unsqueeze(-1)
    return ratio.amax(-1).sqrt()


def _theta(flat: Tensor, a2: Tensor, prec: Precision) -> Tensor:
    """theta per matrix, on the device: min(theta_b, 1.1 max(estimate, ||A^2||_F / ||A||_F)), as
    ``_plans`` takes it, with the estimate computed for every matrix (no host read)."""
    fro, fro2 = torch.linalg.matrix_norm(flat), torch.linalg.matrix_norm(a2)
    bound = torch.minimum(fro, (fro2 + prec.error_constant(flat.shape[-1]) * fro * fro).sqrt())
    lower = torch.where(fro > 0, fro2 / fro, torch.zeros_like(fro))
    return torch.minimum(bound, _MARGIN * torch.maximum(lower, _norm_estimate(a2)))


def _plans(flat: Tensor, a2: Tensor, prec: Precision, skew: bool) -> list[tuple[int, int] | None]:
    """Per matrix the plan of ``exp_plan``, or None where it is not exactly skew.

    theta = min(theta_b, 1.1 max(estimate, ||A^2||_F / ||A||_F)), the second a lower bound on
    ||A||_2 (||A^2||_F <= ||A||_2 ||A||_F). The power-iteration estimate is computed only
    for the matrices where it can change the cost: those whose plans at theta_b and at
    1.1 x the lower bound differ. ``skew``: A is skew by construction; no check.
    """
    norms = [torch.linalg.matrix_norm(flat), torch.linalg.matrix_norm(a2)]
    if not skew:
        norms.append((flat + flat.mT).abs().amax((-2, -1)))
    stats = torch.stack(norms).to("cpu", torch.float64).T.tolist()
    u = torch.finfo(prec.dtype).eps / 2
    c = prec.error_constant(flat.shape[-1])
    bounds = [min(fro, math.sqrt(fro2 + c * fro * fro)) for fro, fro2, *_ in stats]
    lower = [_MARGIN * fro2 / fro if fro > 0 else 0.0 for fro, fro2, *_ in stats]
    plans = [exp_plan(min(b, lo), u) for b, lo in zip(bounds, lower)]
    unsure = [i for i, (b, p) in enumerate(zip(bounds, plans)) if exp_cost(exp_plan(b, u)) != exp_cost(p)]
    if unsure:
        est = _norm_estimate(a2[unsure]).to("cpu", torch.float64).tolist()
        for i, e in zip(unsure, est):
            plans[i] = exp_plan(min(bounds[i], max(lower[i], _MARGIN * e)), u)
    return [p if skew or row[2] == 0 else None for p, row in zip(plans, stats)]


def structured_product(a: Tensor, b: Tensor, prec: Precision, sign: int) -> Tensor:
    """A B for a stack whose products are known to be symmetric (``sign`` 1: B^2 of a skew B)
    or skew (-1: B^2 B), in (q + 1) / 2q of the multiply-adds (q = ``_STRUCTURED_BLOCKS``):
    with the rows cut into q blocks, block row i is computed from its diagonal block on,
    A[rows_i] B[:, rows_i:], and the blocks left of the diagonal are sign x the transposes of
    those above it (each entry is a dot product that the full product computes too). Below
    ``_STRUCTURED_MIN`` rows it is one product."""
    n = a.shape[-1]
    if n < _STRUCTURED_MIN:
        return prec.mm(a, b)
    edges = [n * i // _STRUCTURED_BLOCKS for i in range(_STRUCTURED_BLOCKS + 1)]
    out = torch.empty_like(a)
    for lo, hi in zip(edges, edges[1:]):
        out[:, lo:hi, lo:] = prec.mm(a[:, lo:hi], b[:, :, lo:])
        if hi < n:
            above = out[:, lo:hi, hi:].mT
            out[:, hi:, lo:hi] = above if sign > 0 else -above
    return out


def _order6(w: Tensor, b: Tensor, b2: Tensor, prec: Precision) -> Tensor:
    """w + B^3/6 + B^3 (B + B^2/5 + B^3/30)/24 for w = B + B^2/2: Taylor order 6 (B skew)."""
    b3 = structured_product(b2, b, prec, -1)
    tail = torch.add(b, b2, alpha=0.2).add_(b3, alpha=1 / 30)
    return prec.addmm(w.add_(b3, alpha=1 / 6), b3, tail, alpha=1 / 24)


def _check_square(a: Tensor) -> None:
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"expected (..., n, n) matrices, got shape {tuple(a.shape)}")


def _square(flat: Tensor, prec: Precision, skew: bool) -> Tensor:
    """A^2 of a stack: 9/16 of a product when A is skew (``structured_product``)."""
    return structured_product(flat, flat, prec, 1) if skew else prec.mm(flat, flat)


def _working(a: Tensor, precision: str | None) -> Precision:
    if precision is None:
        precision = "fp64" if a.dtype == torch.float64 else "fp32"
    return product(precision, a.device)


def exp_plans(a: Tensor, precision: str | None = None, *,
              skew: bool = False) -> list[tuple[int, int] | None]:
    """The (order, squarings) that ``fast_expm1`` uses per matrix (None: matrix_exp)."""
    _check_square(a)
    prec = _working(a, precision)
    flat = a.reshape(-1, *a.shape[-2:]).to(prec.dtype)
    return _plans(flat, _square(flat, prec, skew), prec, skew)


def exp_theta(a: Tensor, precision: str | None = None) -> Tensor:
    """theta (the ||A||_2 that the plans are chosen for) of each matrix of an exactly skew batch,
    as a tensor on A's device: nothing is read to the host."""
    _check_square(a)
    prec = _working(a, precision)
    flat = a.reshape(-1, *a.shape[-2:]).to(prec.dtype)
    return _theta(flat, _square(flat, prec, True), prec).view(a.shape[:-2])


def exact_expm1(a: Tensor) -> Tensor:
    """exp(A) - I by ``torch.linalg.matrix_exp``: where A is not skew, and ``update="exact"``."""
    return torch.linalg.matrix_exp(a) - torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


def _planned(b: Tensor, b2: Tensor, plan: tuple[int, int], prec: Precision,
             g: Tensor | None = None) -> Tensor:
    """W_s for one plan (order, s) on a stack: B = A, B^2 = A^2 on entry (scaled here, by g 2^-s
    per matrix when ``g`` is given)."""
    order, squarings = plan
    if g is not None:
        f = (g * 2.0 ** -squarings).view(-1, 1, 1)
        b, b2 = b * f, b2.mul_(f * f)
    elif squarings:
        b, b2 = b * 2.0 ** -squarings, b2.mul_(4.0 ** -squarings)
    w = torch.add(b, b2, alpha=0.5)
    if order == 4:
        w = prec.addmm(w, b2, torch.add(b, b2, alpha=0.25), alpha=1 / 6)
    elif order == 6:
        w = _order6(w, b, b2, prec)
    for _ in range(squarings):
        w = prec.addmm(w, w, w, beta=2.0)
    return w


def grouped(keys: list, fn: Callable[..., Tensor], *stacks: Tensor) -> Tensor:
    """fn(key, *rows) on the rows of ``stacks`` that share a key, reassembled in row order:
    one call on the whole stacks (no gather) when every row has the same key."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    if len(groups) == 1:
        return fn(keys[0], *stacks)
    out = None
    for key, rows in groups.items():
        idx = index_on(rows, stacks[0].device)
        part = fn(key, *(s[idx] for s in stacks))
        if out is None:
            out = part.new_empty((len(keys), *part.shape[1:]))
        out.index_copy_(0, idx, part)
    return out


def reference(a: Tensor, precision: str | None = None, *, skew: bool = False,
              plan: tuple[int, int] | None = None, clipped: Tensor | None = None) -> Tensor:
    """exp(A) - I for a batch (..., n, n), products in ``precision`` (default: A's dtype).

    Returns the working dtype (float64 for fp64, else float32). The matrices that share a
    plan are evaluated as one stack (one batched call per product; gathered only when the
    stack holds more than one plan), after one or two host syncs for the plans.
    ``skew=True`` promises that A is exactly skew (A = -A^T in floating point, as the
    optimizer's steps are) and skips the check; a matrix that is not gets a wrong result.

    ``plan`` (order, squarings), for an exactly skew batch: every matrix takes that plan and
    nothing is read to the host. A matrix whose theta (``exp_theta``) exceeds the plan's limit L
    (``plan_limit``) is scaled to it, so the result is exp(g A) - I with g = min(1, L / theta):
    within u of its exponential, always; ``clipped`` (an integer tensor on A's device) counts the
    matrices with g < 1.
    """
    _check_square(a)
    prec = _working(a, precision)
    flat = a.reshape(-1, *a.shape[-2:]).to(prec.dtype)
    a2 = _square(flat, prec, skew or plan is not None)
    if plan is not None:
        limit = plan_limit(plan, torch.finfo(prec.dtype).eps / 2)
        g = (limit / _theta(flat, a2, prec)).clamp_(max=1.0)
        if clipped is not None:
            clipped += (g < 1).sum()
        return _planned(flat, a2, plan, prec, g).view(a.shape)
    plans = _plans(flat, a2, prec, skew)

    def evaluate(plan: tuple[int, int] | None, b: Tensor, b2: Tensor) -> Tensor:
        return exact_expm1(b) if plan is None else _planned(b, b2, plan, prec)

    return grouped(plans, evaluate, flat, a2).view(a.shape)


fast_expm1 = kernel_op("exp", reference)


def fast_exp(a: Tensor) -> Tensor:
    """exp(A) for a batch (..., n, n), in the dtype of A: I + ``fast_expm1(A)``."""
    w = fast_expm1(a)
    w.diagonal(dim1=-2, dim2=-1).add_(1)
    return w.to(a.dtype)
