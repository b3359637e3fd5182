"""beta-Abs on channels-last tokens: y_c = |x_c| for the first k channels, y_c = x_c after."""
from __future__ import annotations

import torch

from .registry import kernel_op

__all__ = ["beta_abs", "reference"]


def reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """|x| on channels [0, k) of the last dimension, identity on the rest."""
    if k == 0:
        return x
    if k == x.shape[-1]:
        return x.abs()
    a, rest = torch.split(x, [k, x.shape[-1] - k], dim=-1)
    return torch.cat([a.abs(), rest], dim=-1)


beta_abs = kernel_op("beta_abs", reference)
