"""X[:rows, :cols] whose gradient into X is X^T G_full: the Lie form of an orthogonal
weight's gradient (``lipnext.nn.lie``), G_full the slice's gradient zero-padded to X's shape
(cost n rows cols). The backward is out of place, so it is differentiable again (double
backward); under torch.func transforms the slice is plain slicing (autograd's G)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lie_slice"]


class _LieSlice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rows: int, cols: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.cut = rows, cols
        return x[:rows, :cols]

    @staticmethod
    def backward(ctx, g: Tensor):                 # out of place: differentiable again
        x, = ctx.saved_tensors
        rows, cols = ctx.cut
        pulled = x[:rows].mT @ g                  # X^T G_full: only its first cols columns are nonzero
        return torch.nn.functional.pad(pulled, (0, x.shape[1] - cols)), None, None


def lie_slice(x: Tensor, rows: int | None = None, cols: int | None = None) -> Tensor:
    """X[:rows, :cols] (all of X by default) whose gradient into X is X^T G_full (plain slicing
    under torch.func transforms)."""
    n, m = x.shape
    rows, cols = n if rows is None else rows, m if cols is None else cols
    if torch._C._are_functorch_transforms_active():
        return x[:rows, :cols]
    return _LieSlice.apply(x, rows, cols)
