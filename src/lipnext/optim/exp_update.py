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

With ``fast_exp`` and a skew A, a matrix that is zero outside its first k <= n/16 rows and
columns (the step of the patch stem's Q, whose layer reads only k columns) takes
``ops.border_exp`` instead: the same X exp(A), exactly, in O(n^2 k).

Which of those each matrix takes (and FastExp's plan) is read from A itself, on the host,
unless ``rotations`` fixes it (``optim.plans``: the optimizer's plans, chosen without reading
the device).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.border_exp import border_exp_update, border_widths
from ..ops.exp import exact_expm1, fast_expm1, grouped
from ..ops.precision import Precision, product
from .plans import Rotations

__all__ = ["METHODS", "exp_update"]

METHODS = ("fast_exp", "exact", "cayley")


def _cayley_expm1(a: Tensor) -> Tensor:
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(eye - a / 2, a)


def exp_update(x: Tensor, a: Tensor, *, method: str = "fast_exp", precision: str = "fp32",
               skew: bool = False, rotations: Rotations | None = None) -> Tensor:
    """X exp(A) (or X cay(A) for "cayley") for X (..., m, n), A (..., n, n), returned in X's dtype.

    E - I and X (E - I) are computed in ``precision`` (float64 for "fp64", float32 otherwise);
    the sum X + X (E - I) is formed in the wider of that and X's dtype, so a float64 X keeps
    float64 accuracy where U is 0 or tiny (and X is returned unchanged for U = 0).
    ``skew``: A is exactly skew by construction (``fast_expm1`` skips its check).
    ``rotations`` (``fast_exp`` and ``skew`` only): each matrix's border width or FastExp plan,
    fixed on the host; then nothing is read to the host.
    """
    if method not in METHODS:
        raise ValueError(f"unknown update method {method!r}; use one of {', '.join(METHODS)}")
    prec = product(precision, x.device)
    if (a.dim() < 2 or a.shape[-1] != a.shape[-2] or x.shape[-1] != a.shape[-1]
            or x.shape[:-2] != a.shape[:-2]):
        raise ValueError(f"exp_update needs X (..., m, n) and A (..., n, n) with the same batch "
                         f"shape, got {tuple(x.shape)} and {tuple(a.shape)}")
    flat_x, flat_a = x.reshape(-1, *x.shape[-2:]), a.reshape(-1, *a.shape[-2:])
    if rotations is not None:
        if method != "fast_exp" or not skew:
            raise ValueError("exp_update's rotations are plans of fast_exp for skew A")
        keys = rotations.keys
    elif method == "fast_exp" and skew:
        keys = [("fast_exp", None) if k is None else ("border", k) for k in border_widths(flat_a)]
    else:
        keys = [("fast_exp", None)] * len(flat_a)
    clipped = rotations.clipped if rotations is not None else None

    def rotate(key: tuple, xs: Tensor, us: Tensor) -> Tensor:
        if key[0] == "border":
            return border_exp_update(xs, us, key[1], prec)
        return _dense_update(xs, us, method, precision, prec, skew, key[1], clipped)

    return grouped(keys, rotate, flat_x, flat_a).view(x.shape)


def _dense_update(x: Tensor, a: Tensor, method: str, precision: str, prec: Precision,
                  skew: bool, plan: tuple[int, int] | None = None,
                  clipped: Tensor | None = None) -> Tensor:
    """X + X (E - I) for stacks (b, m, n), (b, n, n), E - I by ``method`` (FastExp with ``plan``
    when given), in X's dtype."""
    xw, aw = x.to(prec.dtype), a.to(prec.dtype)
    if method == "fast_exp":
        fixed = {} if plan is None else dict(plan=plan, clipped=clipped)
        w = fast_expm1(aw, precision, skew=skew, **fixed)
    else:
        w = (exact_expm1 if method == "exact" else _cayley_expm1)(aw)
    if x.dtype.itemsize <= prec.dtype.itemsize:
        return prec.addmm(xw, xw, w).to(x.dtype)
    return x + prec.mm(xw, w).to(x.dtype)
