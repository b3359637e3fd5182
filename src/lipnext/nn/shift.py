"""Spatial Shift: a parameter-free spatial mixer of norm at most 1.

Tokens are channels-last, (B, h, w, C). The channels are split into five groups:
four groups of ``alpha * C`` channels are moved by one position up, down, left and
right, the rest stays. With ``padding="circular"`` the moves wrap around: S is a
permutation of the coordinates, an isometry, ||S(X)|| = ||X|| and ||S||_2 = 1
(docs/CORE.md, Model and Theorem 1). With ``padding="zero"`` the entries pushed out of
the grid are dropped and zeros come in: every output coordinate is 0 or a distinct
input coordinate, so S is a partial isometry (a coordinate projection followed by a
permutation), ||S(X)|| <= ||X|| and ||S||_2 <= 1; the Lipschitz bound is unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.shift import PADDINGS, spatial_shift
from ..rounding import Step, exact

__all__ = ["PADDINGS", "SpatialShift", "spatial_shift"]


class SpatialShift(nn.Module):
    """S(X): four groups of ``round(alpha * C)`` channels each moved one step (circular or zero padding)."""

    def __init__(self, channels: int, alpha: float = 1 / 8, padding: str = "circular"):
        super().__init__()
        if not 0 <= alpha <= 0.25:
            raise ValueError(f"alpha counts channels per direction and must lie in [0, 1/4], got {alpha}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        self.channels = channels
        self.alpha = alpha
        self.padding = padding
        self.group = int(round(alpha * channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spatial_shift(x, self.group, self.padding)

    def lipschitz_bound(self) -> float:
        """1: a permutation (circular) or a partial isometry (zero padding)."""
        return 1.0

    def rounding_steps(self, name: str) -> list[Step]:
        """Copies (and zeros): exact."""
        return [exact(self.forward, name)]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, alpha={self.alpha}, group={self.group}, padding={self.padding}"
