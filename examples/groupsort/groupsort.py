"""GroupSort (Anil, Lucas, Grosse, ICML 2019) as a LipNeXt activation: one file with its
forward, its Lipschitz bound and its float64 step.

    y = sort each group of ``group`` consecutive channels, descending (channels last)

Sorting a group is a permutation that depends on the input, and it is continuous, so it is
1-Lipschitz in L2 (and norm-preserving); in floating point it only moves numbers, so its
float64 step is exact (``lipnext.rounding.exact``). ``import groupsort`` registers the
activation ``group_sort``: ``LipNeXt(activation="group_sort")``, or on the command line
``lipnext --import groupsort train model.kwargs.activation=group_sort ...``.
"""
from __future__ import annotations

import torch
from torch import nn

from lipnext.nn.activation import register_activation
from lipnext.rounding import Step, exact

__all__ = ["GroupSort"]


class GroupSort(nn.Module):
    """Sort groups of ``group`` consecutive channels (last dimension) in descending order."""

    def __init__(self, channels: int, group: int = 2):
        super().__init__()
        if group < 1 or channels % group:
            raise ValueError(f"GroupSort needs groups of {group} to tile {channels} channels")
        self.channels, self.group = channels, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.channels // self.group, self.group)).sort(
            dim=-1, descending=True).values.flatten(-2)

    def lipschitz_bound(self) -> float:
        """1: a continuous, piecewise permutation."""
        return 1.0

    def rounding_steps(self, name: str) -> list[Step]:
        """Sorting moves numbers without arithmetic: exact."""
        return [exact(self.forward, name)]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, group={self.group}"


register_activation("group_sort", lambda channels, beta: GroupSort(channels, 2))
