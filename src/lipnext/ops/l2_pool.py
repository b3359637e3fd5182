"""L2 spatial pooling: out_c = sqrt(sum_{h,w} X[h, w, c]^2 + 1e-12), 1-Lipschitz."""
from __future__ import annotations

import torch

from .registry import kernel_op

__all__ = ["EPS", "l2_pool", "reference"]

EPS = 1e-12


def reference(x: torch.Tensor) -> torch.Tensor:
    """(B, h, w, C) -> (B, C), accumulated in at least fp32 and returned in x's dtype."""
    # sqrt(||x||^2 + d) keeps a finite gradient at 0 and stays 1-Lipschitz:
    # its gradient x / sqrt(||x||^2 + d) has norm < 1.
    x2 = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 pools in fp32, fp64 stays fp64
    return torch.sqrt(x2.square().sum(dim=(-3, -2)) + EPS).to(x.dtype)


l2_pool = kernel_op("l2_pool", reference)
