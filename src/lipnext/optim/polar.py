"""Polar retraction: the orthogonal matrix nearest X, Q = U V^T for X = U S V^T.

Two methods, both batched over (..., n, n) and computed in high precision (float64 by
default, then cast back to the dtype of X):

- ``"svd"``: Q = U V^T from ``torch.linalg.svd``.
- ``"newton_schulz"``: X is scaled by 1 / sqrt(||X^T X||_inf) (so sigma_max <= 1 < sqrt(3),
  inside the basin of convergence), then X <- 1.5 X - 0.5 X X^T X = X (1.5 I - 0.5 X^T X)
  until max|X^T X - I| <= 100 sqrt(n) eps; matrices not converged after ``steps``
  iterations (e.g. near-singular ones) fall back to the SVD.
- ``"auto"``: Newton–Schulz on CUDA (GEMMs only), the SVD elsewhere; the SVD stays the test
  oracle of Newton–Schulz.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..nn.orthogonal import is_orthogonal, orthogonality_error

__all__ = ["METHODS", "group_by_shape", "polar_retract", "resolve_method", "retract_",
           "retract_model"]

METHODS = ("auto", "svd", "newton_schulz")


def resolve_method(method: str, device: torch.device) -> str:
    """``auto`` -> ``newton_schulz`` on CUDA, ``svd`` elsewhere; other names unchanged."""
    if method not in METHODS:
        raise ValueError(f"unknown polar method {method!r}; use {', '.join(METHODS)}")
    if method == "auto":
        return "newton_schulz" if device.type == "cuda" else "svd"
    return method


def _svd_polar(x: Tensor) -> Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def _newton_schulz_polar(x: Tensor, steps: int) -> Tensor:
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    tol = 100 * x.shape[-1] ** 0.5 * torch.finfo(x.dtype).eps

    def converged(gram: Tensor) -> Tensor:  # per matrix; NaN counts as not converged
        return (gram - eye).abs().amax((-2, -1)) <= tol

    gram = x.mT @ x
    scale = gram.abs().sum(-1).amax(-1).rsqrt()[..., None, None]  # sigma_max^2 <= ||X^T X||_inf
    y, gram = x * scale, gram * scale**2
    for _ in range(steps):
        if converged(gram).all():
            break
        y = y @ (1.5 * eye - 0.5 * gram)
        gram = y.mT @ y
    bad = ~converged(gram)
    if bad.any():
        y[bad] = _svd_polar(x[bad])
    return y


def polar_retract(x: Tensor, method: str = "auto", steps: int = 16,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """U V^T for X = U S V^T (batched), computed in ``dtype`` and returned in X's dtype.

    ``steps`` is the maximum number of Newton–Schulz iterations (unused by ``"svd"``).
    """
    y = x.detach().to(dtype)
    if resolve_method(method, x.device) == "svd":
        q = _svd_polar(y)
    else:
        q = _newton_schulz_polar(y, steps)
    return q.to(x.dtype)


def group_by_shape(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    """Split tensors into lists of equal (shape, dtype, device), in first-seen order."""
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)
    return list(groups.values())


@torch.no_grad()
def retract_(tensors: Iterable[Tensor], method: str = "auto", steps: int = 16) -> float:
    """Replace each square matrix in place by its polar factor, one batch per shape.

    Returns the largest drift max|X^T X - I| seen before the retraction (0.0 if none).
    """
    drift = 0.0
    for batch in group_by_shape(tensors):
        x = torch.stack(batch)
        drift = max(drift, orthogonality_error(x))
        torch._foreach_copy_(batch, list(polar_retract(x, method, steps).unbind(0)))
    return drift


def retract_model(model_or_params: nn.Module | Iterable[Tensor], method: str = "svd",
                  steps: int = 16) -> float:
    """Polar-retract every ``OrthogonalParameter`` of a module (or of an iterable) in place.

    Returns the largest drift max|X^T X - I| before the retraction.
    """
    params = (model_or_params.parameters() if isinstance(model_or_params, nn.Module)
              else model_or_params)
    return retract_([p for p in params if is_orthogonal(p)], method, steps)
