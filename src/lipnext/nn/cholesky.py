"""Cholesky-orthogonal dense layers (LiResNet++): an unconstrained V is mapped to a
matrix with orthonormal rows (or columns) by whitening with its Cholesky factor.

Wide V (m x n, m <= n):  V V^T = L L^T,  W = L^{-1} V   =>  W W^T = I_m.
Tall V (m > n):          V^T V = L L^T,  W = V L^{-T}   =>  W^T W = I_n.

In exact arithmetic ||W||_2 = 1; the float32 factorisation leaves a small drift, so
the certificate uses ``lipnext.bounds.spectral_norm_bound`` on W as computed.
"""
from __future__ import annotations


import torch
from torch import nn

from ..bounds import spectral_norm_bound
from ..rounding import Step, linear, translate
from .orthogonal import random_orthogonal

__all__ = ["cholesky_orthogonal", "CholeskyLinear"]


def cholesky_orthogonal(v: torch.Tensor) -> torch.Tensor:
    """W with orthonormal rows (m <= n) or columns (m > n), W = L^{-1} V or V L^{-T}."""
    if v.shape[-2] <= v.shape[-1]:
        lower = torch.linalg.cholesky(v @ v.mT)
        return torch.linalg.solve_triangular(lower, v, upper=False)
    lower = torch.linalg.cholesky(v.mT @ v)
    return torch.linalg.solve_triangular(lower, v.mT, upper=False).mT


class CholeskyLinear(nn.Module):
    """y = x W^T + b with W = cholesky_orthogonal(V) of shape (out, in)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        q = random_orthogonal(max(in_features, out_features))
        self.weight = nn.Parameter(q[:out_features, :in_features].contiguous())
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def matrix(self) -> torch.Tensor:
        """The effective weight W (float32, as the forward pass computes it)."""
        return cholesky_orthogonal(self.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.matrix().to(x.dtype).mT
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        """Sound bound on ||W||_2 for W as computed."""
        return float(spectral_norm_bound(self.matrix()))

    @torch.no_grad()
    def rounding_steps(self, name: str) -> list[Step]:
        """The GEMM by W (as computed), + b."""
        w = self.matrix()
        steps = [linear(w, name, lip=float(spectral_norm_bound(w)))]
        return steps + ([translate(self.bias, f"{name}.bias")] if self.bias is not None else [])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
