"""L2 spatial pooling: out_c = sqrt(sum_{h,w} X[h, w, c]^2), 1-Lipschitz.

By the triangle inequality per channel, | ||a_c|| - ||b_c|| | <= ||a_c - b_c||, and
summing squares over c gives ||pool(a) - pool(b)|| <= ||a - b||.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.l2_pool import l2_pool

__all__ = ["L2Pool"]


class L2Pool(nn.Module):
    """(B, h, w, C) -> (B, C): the L2 norm of each channel over all positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_pool(x)
