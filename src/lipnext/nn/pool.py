"""L2 spatial pooling: out_c = sqrt(sum_{h,w} X[h, w, c]^2), 1-Lipschitz.

By the triangle inequality per channel, | ||a_c|| - ||b_c|| | <= ||a_c - b_c||, and
summing squares over c gives ||pool(a) - pool(b)|| <= ||a - b||.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.l2_pool import EPS, l2_pool
from ..rounding import Step
from ..rounding import l2_pool as l2_pool_step

__all__ = ["L2Pool"]


class L2Pool(nn.Module):
    """(B, h, w, C) -> (B, C): the L2 norm of each channel over all positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_pool(x)

    def lipschitz_bound(self) -> float:
        """1 (module doc)."""
        return 1.0

    def rounding_steps(self, name: str) -> list[Step]:
        """Squares, a sum over positions, + eps, sqrt (``lipnext.rounding.l2_pool``)."""
        return [l2_pool_step(EPS, name)]
