"""Spatial shift of channels-last tokens (B, h, w, C): four channel groups of size g moved
by one position up, down, left and right, the rest unchanged. ``circular`` wraps around
(a permutation of the coordinates); ``zero`` drops what leaves the grid and lets zeros in
(a coordinate projection followed by a permutation)."""
from __future__ import annotations

import torch

from .registry import kernel_op

__all__ = ["PADDINGS", "reference", "spatial_shift"]

PADDINGS = ("circular", "zero")


def _move(x: torch.Tensor, step: int, dim: int, padding: str) -> torch.Tensor:
    """out[i] = x[i - step] along ``dim`` (step = +-1): wrapped, or 0 where i - step is off the grid."""
    if padding == "circular":
        return torch.roll(x, step, dims=dim)
    n = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = 1
    zeros = x.new_zeros(shape)
    if step > 0:
        return torch.cat([zeros, x.narrow(dim, 0, n - 1)], dim=dim)
    return torch.cat([x.narrow(dim, 1, n - 1), zeros], dim=dim)


def reference(x: torch.Tensor, group: int, padding: str = "circular") -> torch.Tensor:
    """Move four channel groups of size ``group`` by +-1 along h and w."""
    g = group
    if g == 0:
        return x
    up, down, left, right, rest = torch.split(x, [g, g, g, g, x.shape[-1] - 4 * g], dim=-1)
    return torch.cat([
        _move(up, -1, -3, padding),
        _move(down, 1, -3, padding),
        _move(left, -1, -2, padding),
        _move(right, 1, -2, padding),
        rest,
    ], dim=-1)


spatial_shift = kernel_op("shift", reference)
