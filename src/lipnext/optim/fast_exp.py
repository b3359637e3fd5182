"""FastExp: the matrix exponential of small skew-symmetric matrices by truncated Taylor series.

For A with ||A||_F below a threshold, exp(A) ~ sum_{j<=k} A^j / j!, with the order k
chosen per matrix from ``TAYLOR_THRESHOLDS`` (docs/CORE.md, Optimizer):

    ||A||_F < 0.05 -> k = 2,   < 0.25 -> k = 3,   < 1 -> k = 4,   else torch.linalg.matrix_exp.

The truncation error is at most ||A||_F^{k+1} / (k+1)! (times e^{||A||}); for a skew A
the result is orthogonal up to a term of order ||A||^{k+1} (k odd) or ||A||^{k+2} (k even).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["EXP_METHODS", "PRECISIONS", "TAYLOR_THRESHOLDS", "exp_update", "fast_exp"]

#: ways to compute exp(U) in ``exp_update``, and the arithmetic it may run in.
EXP_METHODS = ("fast_exp", "exact", "cayley")
PRECISIONS = ("fp32", "fp64", "tf32", "bf16")

#: (bound, order) pairs: a matrix with ||A||_F < bound (first match) uses that Taylor order.
TAYLOR_THRESHOLDS: tuple[tuple[float, int], ...] = ((0.05, 2), (0.25, 3), (1.0, 4))

_BOUNDS = torch.tensor([b for b, _ in TAYLOR_THRESHOLDS], dtype=torch.float64)
_ORDERS = torch.tensor([k for _, k in TAYLOR_THRESHOLDS] + [0])  # 0 marks "exact"


def fast_exp(a: Tensor) -> Tensor:
    """exp(A) for a batch (..., n, n), in the dtype of A.

    The Taylor terms A^j / j! are computed for the whole stack (one batched matmul per
    term) up to the highest order any matrix needs and added per matrix by its own
    order; only the matrices with ||A||_F >= 1 go to ``torch.linalg.matrix_exp``.
    """
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"fast_exp expects (..., n, n) matrices, got shape {tuple(a.shape)}")
    flat = a.reshape(-1, *a.shape[-2:])
    norms = torch.linalg.matrix_norm(flat.detach()).to("cpu", torch.float64)  # one sync
    order = _ORDERS[torch.bucketize(norms, _BOUNDS, right=True)]
    exact = (order == 0).nonzero().squeeze(1)
    if len(exact) == len(flat):
        return torch.linalg.matrix_exp(a)

    out = flat.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(1)  # I + A
    term = flat
    for k in range(2, int(order.max()) + 1):
        term = (term @ flat).div_(k)
        needs = (order >= k).to(flat.device, flat.dtype).view(-1, 1, 1)
        out.addcmul_(term, needs)
    if len(exact):
        idx = exact.to(flat.device)
        out[idx] = torch.linalg.matrix_exp(flat[idx])
    return out.view(a.shape)


def exp_update(x: Tensor, a: Tensor, *, method: str = "fast_exp", precision: str = "fp32") -> Tensor:
    """X exp(A) for stacks of X (orthogonal) and A (skew), returned in the dtype of X.

    ``method``: ``fast_exp`` (above), ``exact`` (``torch.linalg.matrix_exp``) or ``cayley``
    ((I - A/2)^{-1} (I + A/2), orthogonal for any skew A, second order in A). ``precision``
    ``fp64`` computes in float64; the other choices compute in float32 (at least the
    dtype of X) here.
    """
    if method not in EXP_METHODS:
        raise ValueError(f"unknown update {method!r}; choose one of {', '.join(EXP_METHODS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    dtype = torch.float64 if precision == "fp64" else torch.promote_types(x.dtype, torch.float32)
    xd, ad = x.to(dtype), a.to(dtype)
    if method == "fast_exp":
        e = fast_exp(ad)
    elif method == "exact":
        e = torch.linalg.matrix_exp(ad)
    else:
        eye = torch.eye(a.shape[-1], dtype=dtype, device=a.device)
        e = torch.linalg.solve(eye - ad / 2, eye + ad / 2)
    return (xd @ e).to(x.dtype)
