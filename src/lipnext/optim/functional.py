"""The manifold optimizer's arithmetic as pure functions, shared by every driver.

ManifoldAdam (one process), DDPManifoldAdam (owner-sharded under DDP) and ShardedManifoldAdam
(FSDP) differ only in where X, G and the state live; each step they all call these
functions (docs/CORE.md, Optimizer), in the spirit of torch.optim's functional ``adam()``:

    A = skew(X^T G)                           lie_gradient; X^T G by pull_back, or from the
                                              backward (Lie-form gradients, lipnext.nn.lie)
    c_m, c_g, 1 - b2^t                                        adam_coefficients (NAdam or Adam)
    m <- b1 m + (1 - b1) A,  v <- b2 v + (1 - b2) A * A       update_moments_
    U = -lr (D + wd skew(X)),  D = (c_m m + c_g A) / (sqrt(v / (1 - b2^t)) + eps)
                                                              manifold_step_direction
    X <- X exp(U); with Lookahead S <- S + U, and every K steps
    X_slow <- X_slow exp(alpha S), X <- X_slow, S <- 0 (no X exp(U))   orthogonal_update

The state tensors are modified in place; X is returned (a new tensor).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.host import index_on
from .exp_update import exp_update
from .plans import Planner

__all__ = ["adam_coefficients", "adam_foreach_", "lie_gradient", "lookahead_due",
           "lookahead_euclidean_", "manifold_step_direction", "orthogonal_update",
           "pull_back", "skew", "update_moments_"]


def skew(x: Tensor) -> Tensor:
    """(X - X^T) / 2, the skew-symmetric part (exactly antisymmetric: halving is exact)."""
    return torch.sub(x, x.mT).mul_(0.5)


def lie_gradient(x: Tensor, g: Tensor) -> Tensor:
    """A = (X^T G - G^T X) / 2: the Riemannian gradient at X, pulled back to the Lie algebra."""
    return skew(x.mT @ g)


def pull_back(x: Tensor, g: Tensor, pulled: list[bool]) -> Tensor:
    """X^T G for a stack (k, n, n); rows whose gradient is already X^T G (``pulled``, Lie form:
    ``lipnext.nn.lie``) are kept, so they cost no product."""
    if all(pulled):
        return g
    if not any(pulled):
        return x.mT @ g
    rows = index_on([i for i, done in enumerate(pulled) if not done], g.device)
    return g.index_copy(0, rows, x[rows].mT @ g[rows])


def adam_coefficients(step: Tensor, mu_product: Tensor, betas: tuple[float, float],
                      momentum_decay: float, nesterov: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Advance ``step`` (and ``mu_product``) in place; return float64 (c_m, c_g, 1 - b2^t).

    Adam: c_m = 1 / (1 - b1^t), c_g = 0. NAdam (as torch.optim.NAdam):
    mu_t = b1 (1 - 0.5 * 0.96^(t * momentum_decay)), c_m = mu_{t+1} / (1 - mu_1...mu_{t+1}),
    c_g = (1 - mu_t) / (1 - mu_1...mu_t).
    """
    beta1, beta2 = betas
    step += 1
    t = step.double()
    mu = beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = beta1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    mu_product.mul_(mu)
    if nesterov:
        prod = mu_product.double()
        return mu_next / (1 - prod * mu_next), (1 - mu) / (1 - prod), 1 - beta2**t
    return 1 / (1 - beta1**t), torch.zeros_like(t), 1 - beta2**t


def update_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor,
                    betas: tuple[float, float]) -> None:
    """m <- b1 m + (1 - b1) G,  v <- b2 v + (1 - b2) G * G (in place)."""
    exp_avg.lerp_(grad, 1 - betas[0])
    exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])


def manifold_step_direction(x: Tensor, xtg: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                            c_m: Tensor, c_g: Tensor, bc2: Tensor, *, lr: float,
                            betas: tuple[float, float], eps: float,
                            weight_decay: float = 0.0) -> Tensor:
    """The skew step U of a stack (k, n, n) from ``xtg`` = X^T G (``pull_back``), A = skew(X^T G);
    the moments are updated in place.

    ``c_m``, ``c_g``, ``bc2`` are (k, 1, 1) in the dtype of X (see ``adam_coefficients``).
    """
    a = skew(xtg)
    update_moments_(exp_avg, exp_avg_sq, a, betas)
    scale = -lr * bc2.sqrt()          # U = scale (c_m m + c_g A) / (sqrt(v) + eps sqrt(1 - b2^t))
    denom = exp_avg_sq.sqrt().add_(eps * bc2.sqrt())
    d = (exp_avg * (c_m * scale)).addcmul_(a, c_g * scale).div_(denom)
    del a, denom
    if weight_decay:
        d.add_(skew(x), alpha=-lr * weight_decay)
    return d


def lookahead_due(step: Tensor, k: int) -> Tensor:
    """Boolean mask of the entries whose step count is a multiple of k (Lookahead sync)."""
    return torch.remainder(step, k) == 0


def orthogonal_update(x: Tensor, u: Tensor, slow: Tensor | None = None,
                      lookahead_sum: Tensor | None = None, due: Tensor | None = None,
                      alpha: float = 0.5, method: str = "fast_exp",
                      precision: str = "fp32", planner: Planner | None = None) -> Tensor:
    """X exp(U), with manifold Lookahead when ``slow`` is given: S <- S + U, and where ``due``
    (a CPU bool per row) X_slow <- X_slow exp(alpha S), S <- 0, X <- X_slow.

    A row that syncs restarts from X_slow, so its X exp(U) is not computed (it would be
    discarded). ``slow`` and ``lookahead_sum`` are updated in place; X is returned (new).
    ``planner`` (``optim.plans``) fixes each rotation's plan on the host; without it each is
    planned from its own matrix (host reads)."""
    def rotate(kind: str, xs: Tensor, a: Tensor, rows: list[int] | None = None) -> Tensor:
        rotations = planner(kind, a, rows) if planner is not None else None
        return exp_update(xs, a, method=method, precision=precision, skew=True, rotations=rotations)

    if slow is None:
        return rotate("step", x, u)
    lookahead_sum.add_(u)
    flags = due.tolist()
    if not any(flags):
        return rotate("step", x, u)
    if all(flags):                           # the usual case: a stack's rows sync together
        synced = rotate("sync", slow, alpha * lookahead_sum)
        slow.copy_(synced)
        lookahead_sum.zero_()
        return synced
    rows = [i for i, f in enumerate(flags) if f]
    rest_rows = [i for i, f in enumerate(flags) if not f]
    idx, rest = index_on(rows, x.device), index_on(rest_rows, x.device)
    synced = rotate("sync", slow[idx], alpha * lookahead_sum[idx], rows)
    slow[idx] = synced
    lookahead_sum[idx] = 0
    out = torch.empty_like(x)
    out[idx] = synced
    out[rest] = rotate("step", x[rest], u[rest], rest_rows)
    return out


def adam_foreach_(params: list[Tensor], grads: list[Tensor], exp_avg: list[Tensor],
                  exp_avg_sq: list[Tensor], c_m: Tensor, c_g: Tensor, bc2: Tensor, *, lr: float,
                  betas: tuple[float, float], eps: float, weight_decay: float,
                  nesterov: bool) -> None:
    """The Euclidean Adam/NAdam step with decoupled weight decay p <- (1 - lr wd) p, in place.

    ``c_m``, ``c_g``, ``bc2`` are float64 CPU vectors, one entry per parameter."""
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avg, grads, 1 - betas[0])
    torch._foreach_mul_(exp_avg_sq, betas[1])
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - betas[1])
    denom = torch._foreach_div(exp_avg_sq, bc2.tolist())
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    if nesterov:
        torch._foreach_addcdiv_(params, grads, denom, (-lr * c_g).tolist())
    torch._foreach_addcdiv_(params, exp_avg, denom, (-lr * c_m).tolist())


def lookahead_euclidean_(fast: list[Tensor], slow: list[Tensor], alpha: float) -> None:
    """slow <- slow + alpha (fast - slow), fast <- slow (in place)."""
    if fast:
        torch._foreach_lerp_(slow, fast, alpha)
        torch._foreach_copy_(fast, slow)
