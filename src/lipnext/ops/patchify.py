"""Non-overlapping p x p patches: (B, C, H, W) -> (B, H/p, W/p, C p^2), a permutation of
the pixels, hence an isometry."""
from __future__ import annotations

import torch

from .registry import kernel_op

__all__ = ["patchify", "reference"]


def reference(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p, W/p, C p^2), each row one flattened p x p patch."""
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, hh // p, ww // p, c * p * p)


patchify = kernel_op("patchify", reference)
