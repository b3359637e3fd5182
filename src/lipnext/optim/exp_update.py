"""The orthogonal update X exp(A), computed as X + X (E - I) (docs/CORE.md, Optimizer).

E - I comes from ``method``:

    fast_exp:  W = fast_expm1(A)                  scaling and squaring, Paterson–Stockmeyer
    exact:     W = torch.linalg.matrix_exp(A) - I
    cayley:    W = (I - A/2)^{-1} (I + A/2) - I = (I - A/2)^{-1} A      (one solve)

and every matrix product (those inside fast_expm1, and X W) runs in ``precision``
(``lipnext.ops.precision``); the sum X + X W is fp32 (fp64 for "fp64"). Since
||W|| ~ ||A||, the product's rounding error is about u ||X|| ||A||: the low-precision
arithmetic only ever touches the small quantities, and the orthogonality drift of X
stays at the fp32 level (tests/test_fast_exp.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.exp import exact_expm1, fast_expm1
from ..ops.precision import product

__all__ = ["METHODS", "exp_update"]

METHODS = ("fast_exp", "exact", "cayley")


def _cayley_expm1(a: Tensor) -> Tensor:
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(eye - a / 2, a)


def exp_update(x: Tensor, a: Tensor, *, method: str = "fast_exp", precision: str = "fp32",
               skew: bool = False) -> Tensor:
    """X exp(A) (or X cay(A) for "cayley") for X (..., m, n), A (..., n, n), returned in X's dtype.

    E - I and X (E - I) are computed in ``precision`` (float64 for "fp64", float32 otherwise);
    the sum X + X (E - I) is formed in the wider of that and X's dtype, so a float64 X keeps
    float64 accuracy where U is 0 or tiny (and X is returned unchanged for U = 0).
    ``skew``: A is exactly skew by construction (``fast_expm1`` skips its check).
    """
    if method not in METHODS:
        raise ValueError(f"unknown update method {method!r}; use one of {', '.join(METHODS)}")
    prec = product(precision, x.device)
    if (a.dim() < 2 or a.shape[-1] != a.shape[-2] or x.shape[-1] != a.shape[-1]
            or x.shape[:-2] != a.shape[:-2]):
        raise ValueError(f"exp_update needs X (..., m, n) and A (..., n, n) with the same batch "
                         f"shape, got {tuple(x.shape)} and {tuple(a.shape)}")
    xw, aw = x.to(prec.dtype), a.to(prec.dtype)
    if method == "fast_exp":
        w = fast_expm1(aw, precision, skew=skew)
    else:
        w = (exact_expm1 if method == "exact" else _cayley_expm1)(aw)
    flat, w = xw.reshape(-1, *x.shape[-2:]), w.reshape(-1, *w.shape[-2:])
    if x.dtype.itemsize <= prec.dtype.itemsize:
        return prec.addmm(flat, flat, w).view(x.shape).to(x.dtype)
    return x + prec.mm(flat, w).view(x.shape).to(x.dtype)
