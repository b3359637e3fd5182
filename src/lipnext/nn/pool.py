"""L2 spatial pooling: out_c = sqrt(sum_{h,w} X[h, w, c]^2), 1-Lipschitz.

By the triangle inequality per channel, | ||a_c|| - ||b_c|| | <= ||a_c - b_c||, and
summing squares over c gives ||pool(a) - pool(b)|| <= ||a - b||.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["L2Pool"]


class L2Pool(nn.Module):
    """(B, h, w, C) -> (B, C): the L2 norm of each channel over all positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sqrt(||x||^2 + d) keeps a finite gradient at 0 and stays 1-Lipschitz:
        # its gradient x / sqrt(||x||^2 + d) has norm < 1.
        x2 = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 pools in fp32, fp64 stays fp64
        return torch.sqrt(x2.square().sum(dim=(-3, -2)) + 1e-12).to(x.dtype)
