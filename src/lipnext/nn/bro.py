"""Block reflector orthogonal (BRO) layers (Lai et al., 2025, BRONet).

For V (n x r) of full column rank, P = V (V^H V)^{-1} V^H is the orthogonal projector
onto range(V) and the block reflector

    W = I - 2 V (V^H V)^{-1} V^H = I - 2 P

is orthogonal (unitary for complex V): W^H W = I - 4P + 4P^2 = I. No iteration, no
matrix exponential: one r x r solve.

BRO convolution: the spatial kernel V (C, r, k, k) is zero-padded to the n1 x n2 grid and
Fourier transformed; at every frequency f, V_hat(f) (C x r) gives a unitary W(f). Since
V is real, W(-f) = conj W(f), so y = irfft2(W(f) rfft2(x)) (orthonormal FFTs) is a real
orthogonal map of the (C, n1, n2) input: a convolution with circular padding whose
kernel spans the whole grid.

Certificates use the matrices W(f) as the forward pass computes them (float32/complex64),
bounded in float64 (``operator_norm_bound``), so drift from an ill-conditioned V^H V is
accounted for.
"""
from __future__ import annotations

import torch
from torch import nn

from ..bounds import operator_norm_bound
from ..rounding import Step, bro_conv, linear, translate
from .orthogonal import random_orthogonal

__all__ = ["block_reflector", "BROLinear", "BROConv2d"]


def block_reflector(v: torch.Tensor) -> torch.Tensor:
    """W = I - 2 V (V^H V)^{-1} V^H for a batch of (n, r) matrices V, r < n."""
    n = v.shape[-2]
    vh = v.mH
    proj = v @ torch.linalg.solve(vh @ v, vh)
    return torch.eye(n, dtype=v.dtype, device=v.device) - 2 * proj


class BROLinear(nn.Module):
    """Dense orthogonal layer y = x W^T + b, W = block_reflector(V) (n x n), optionally
    truncated to its top-left (out, in) block (norm <= 1) for a change of width."""

    def __init__(self, in_features: int, out_features: int, rank: int | None = None,
                 bias: bool = True):
        super().__init__()
        n = max(in_features, out_features)
        rank = rank or n // 2
        if not 0 < rank < n:
            raise ValueError(f"BRO rank must lie in (0, {n}), got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight = nn.Parameter(random_orthogonal(n)[:, :rank].contiguous())
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def matrix(self) -> torch.Tensor:
        """The effective (out, in) weight, as the forward pass computes it."""
        return block_reflector(self.weight.float())[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.matrix().to(x.dtype).mT
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        """Sound bound on ||W||_2 for W as computed (float64 SVD + slack)."""
        return operator_norm_bound(self.matrix())

    @torch.no_grad()
    def rounding_steps(self, name: str) -> list[Step]:
        """The GEMM by W (as computed), + b."""
        w = self.matrix()
        steps = [linear(w, name, lip=operator_norm_bound(w))]
        return steps + ([translate(self.bias, f"{name}.bias")] if self.bias is not None else [])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class BROConv2d(nn.Module):
    """Orthogonal convolution (C channels, circular padding) built per frequency by BRO."""

    def __init__(self, channels: int, grid: tuple[int, int], kernel_size: int = 3,
                 rank: int | None = None):
        super().__init__()
        rank = rank or channels // 2
        if not 0 < rank < channels:
            raise ValueError(f"BRO rank must lie in (0, {channels}), got {rank}")
        if kernel_size > min(grid):
            raise ValueError(f"kernel_size {kernel_size} exceeds the {grid[0]}x{grid[1]} grid")
        self.channels, self.grid, self.kernel_size, self.rank = channels, tuple(grid), kernel_size, rank
        w = torch.randn(channels, rank, kernel_size, kernel_size) * 0.1 / kernel_size
        # Orthonormal centre tap so V_hat(f) is well conditioned at every frequency at init.
        w[:, :, kernel_size // 2, kernel_size // 2] = random_orthogonal(channels)[:, :rank]
        self.weight = nn.Parameter(w)

    def spectrum(self) -> torch.Tensor:
        """W(f) for the half spectrum, complex64 (n1, n2 // 2 + 1, C, C)."""
        v = torch.fft.rfft2(self.weight.float(), s=self.grid)       # (C, r, n1, n2//2+1)
        return block_reflector(v.permute(2, 3, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, n1, n2) -> (B, C, n1, n2)."""
        dtype = x.dtype
        xf = torch.fft.rfft2(x.float(), norm="ortho")                   # (B, C, n1, m)
        yf = torch.einsum("hwoc,bchw->bohw", self.spectrum(), xf)
        return torch.fft.irfft2(yf, s=self.grid, norm="ortho").to(dtype)

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        """Sound bound on the operator norm: max over frequencies of ||W(f)||_2."""
        return operator_norm_bound(self.spectrum())

    @torch.no_grad()
    def rounding_steps(self, name: str) -> list[Step]:
        """rfft2, W(f) per frequency, irfft2 (``lipnext.rounding.bro_conv``)."""
        spec = self.spectrum()
        return [bro_conv(spec, self.grid, operator_norm_bound(spec), name)]

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, grid={self.grid}, kernel_size={self.kernel_size}, "
                f"rank={self.rank}")
