"""MinMax activation (GroupSort of size 2) along a channel dimension.

1 for channels-first tensors, -1 for LipNeXt's channels-last tokens: the channels are
split into halves (a, b) and mapped to (max(a, b), min(a, b)), a 1-Lipschitz,
norm-preserving sorting of each pair.
"""
from __future__ import annotations

import torch
from torch import nn

from ..rounding import Step, exact

__all__ = ["MinMax"]


class MinMax(nn.Module):
    """(a, b) -> (max(a, b), min(a, b)) on channel halves along ``dim`` (even size)."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=self.dim)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=self.dim)

    def lipschitz_bound(self) -> float:
        """1: sorting each pair of coordinates is 1-Lipschitz."""
        return 1.0

    def rounding_steps(self, name: str) -> list[Step]:
        """max and min: exact in floating point."""
        return [exact(self.forward, name)]
