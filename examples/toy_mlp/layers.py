"""An orthogonal dense layer, the toy baseline's one layer file.

    y = x W^T + b,   W = Q[:out, :in],  Q an n x n orthogonal matrix, n = max(in, out)

A block of an orthogonal matrix has ||W||_2 <= 1. Q is an ``OrthogonalParameter``, so
lipnext's manifold optimizer keeps it on O(n); ``lipschitz_bound()`` measures ||W||_2 from
the weights as they are (``lipnext.bounds.spectral_norm_bound``), and ``rounding_steps()``
gives the layer's float64 program for the certificate's rounding bound (one GEMM, one
addition: the steps ``lipnext.rounding.linear`` and ``translate``).
"""
from __future__ import annotations

import torch
from torch import nn

from lipnext.bounds import spectral_norm_bound
from lipnext.nn import OrthogonalParameter, random_orthogonal
from lipnext.rounding import Step, linear, translate

__all__ = ["OrthogonalDense"]


class OrthogonalDense(nn.Module):
    """y = x W^T + b with W = Q[:out, :in], Q orthogonal."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = OrthogonalParameter(random_orthogonal(max(in_features, out_features)))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def matrix(self) -> torch.Tensor:
        """W = Q[:out, :in]."""
        return self.weight[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix().to(x.dtype).mT + self.bias.to(x.dtype)

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        """Sound bound on ||W||_2 (the bias is a translation)."""
        return float(spectral_norm_bound(self.matrix()))

    def rounding_steps(self, name: str) -> list[Step]:
        """h -> h W^T -> + b in float64, with their rounding bounds."""
        w = self.matrix()
        return [linear(w, name, lip=float(spectral_norm_bound(w))), translate(self.bias, f"{name}.bias")]
