"""Check (a): every orthogonal weight is on the manifold, and its bound is sound.

For each :class:`~lipnext.nn.OrthogonalParameter` X: the orthogonality error
max_ij |X^T X - I|_ij, its exact spectral norm sigma_max(X) (float64 SVD) and the
sound bound of :func:`lipnext.bounds.spectral_norm_bound`, which must not be below
sigma_max. The model's ``lipschitz_bound()`` is reported next to them and must be
finite and positive.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..bounds import spectral_norm_bound
from ..nn import is_orthogonal, orthogonality_error
from .report import CheckResult

__all__ = ["orthogonality_check"]


@torch.no_grad()
def orthogonality_check(model: nn.Module, tol: float = 1e-4) -> CheckResult:
    """Fails when some orthogonal weight has error > tol or a bound below sigma_max."""
    weights = {}
    for name, p in model.named_parameters():
        if not is_orthogonal(p):
            continue
        sigma = torch.linalg.matrix_norm(p.detach().double(), ord=2).item()
        bound = spectral_norm_bound(p).item()
        weights[name] = {"error": orthogonality_error(p), "sigma_max": sigma, "bound": bound}
    lip = float(model.lipschitz_bound())
    off = [n for n, w in weights.items() if not w["error"] <= tol]
    unsound = [n for n, w in weights.items() if not w["bound"] >= w["sigma_max"] * (1 - 1e-12)]
    bad_lip = not (math.isfinite(lip) and lip > 0)
    details = {"tol": tol, "lipschitz_bound": lip, "num_orthogonal": len(weights),
               "max_error": max((w["error"] for w in weights.values()), default=None),
               "max_sigma": max((w["sigma_max"] for w in weights.values()), default=None),
               "off_manifold": off, "unsound_bound": unsound, "weights": weights}
    if hasattr(model, "lipschitz_factors"):
        details["lipschitz_factors"] = dict(model.lipschitz_factors())
    if not weights:
        summary = f"no orthogonal weights; claimed L = {lip:.6g}"
    else:
        summary = (f"{len(weights)} orthogonal weights, max Gram error (X^T X - I, max abs) = {details['max_error']:.2e} "
                   f"(tol {tol:g}), max sigma = {details['max_sigma']:.6f}, claimed L = {lip:.6f}")
    if off:
        summary += f"; {len(off)} off the manifold (e.g. {off[0]}): retract them (lipnext.optim.retract_model)"
    if unsound:
        summary += f"; spectral bound below sigma_max for {unsound[:3]}"
    if bad_lip:
        summary += "; lipschitz_bound() is not finite and positive"
    return CheckResult("orthogonality", not (off or unsound or bad_lip), summary, details)
