"""Last-layer-normalised head: z = W f + b with rows w_i = v_i / ||v_i||_2.

The head is not 1-Lipschitz as a whole; certification uses the pairwise constants
||w_y - w_j||_2 (docs/CORE.md, Certificates).
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["NormalizedLinear"]


class NormalizedLinear(nn.Module):
    """Linear C -> K whose weight rows are normalised to unit L2 norm in the forward pass."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = nn.Parameter(torch.randn(num_classes, in_features) / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def normalized_weight(self) -> torch.Tensor:
        """w_i = v_i / ||v_i||_2 (rows of unit norm)."""
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.normalized_weight().to(f.dtype).mT + self.bias.to(f.dtype)

    def affine_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) of z = W f + b as the forward pass uses them (W normalised in float32)."""
        return self.normalized_weight().detach(), self.bias.detach()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"
