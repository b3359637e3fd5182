"""Spatial Shift: a parameter-free, norm-preserving spatial mixer (a permutation).

Tokens are channels-last, (B, h, w, C). The channels are split into five groups:
four groups of ``alpha * C`` channels are rolled by one position up, down, left and
right with wrap-around (circular), the rest stays. Being a permutation of the
coordinates, S is an isometry: ||S(X)|| = ||X|| and ||S||_2 = 1 (docs/CORE.md, Model and Theorem 1).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SpatialShift", "spatial_shift"]


def spatial_shift(x: torch.Tensor, group: int) -> torch.Tensor:
    """Roll four channel groups of size ``group`` by +-1 along h and w (circular)."""
    g = group
    if g == 0:
        return x
    up, down, left, right, rest = torch.split(x, [g, g, g, g, x.shape[-1] - 4 * g], dim=-1)
    return torch.cat([
        torch.roll(up, -1, dims=-3),
        torch.roll(down, 1, dims=-3),
        torch.roll(left, -1, dims=-2),
        torch.roll(right, 1, dims=-2),
        rest,
    ], dim=-1)


class SpatialShift(nn.Module):
    """S(X): four groups of ``round(alpha * C)`` channels each shifted one step (circular)."""

    def __init__(self, channels: int, alpha: float = 1 / 8):
        super().__init__()
        if not 0 <= alpha <= 0.25:
            raise ValueError(f"alpha counts channels per direction and must lie in [0, 1/4], got {alpha}")
        self.channels = channels
        self.alpha = alpha
        self.group = int(round(alpha * channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spatial_shift(x, self.group)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, alpha={self.alpha}, group={self.group}"
