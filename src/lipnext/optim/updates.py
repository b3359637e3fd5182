"""The rotation of the orthogonal update X <- X Q(U), U skew-symmetric (docs/CORE.md, Optimizer).

    fast_exp:  Q = exp(U) by the truncated Taylor series of ``fast_exp`` (exact exp above ||U||_F = 1)
    exact:     Q = exp(U) by torch.linalg.matrix_exp
    cayley:    Q = (I - U/2)^{-1} (I + U/2), orthogonal for every skew U (I - U/2 is invertible:
               its eigenvalues are 1 - i lambda / 2 != 0); Q = exp(U) + O(||U||^3)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .fast_exp import fast_exp

__all__ = ["UPDATES", "cayley"]


def cayley(u: Tensor) -> Tensor:
    """(I - U/2)^{-1} (I + U/2) for a batch (..., n, n) of skew-symmetric U."""
    eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
    return torch.linalg.solve(eye - u / 2, eye + u / 2)


UPDATES: dict[str, Callable[[Tensor], Tensor]] = {
    "fast_exp": fast_exp, "exact": torch.linalg.matrix_exp, "cayley": cayley}
