"""LiResNet-style baseline (Hu et al., "Scaling in Depth: Unlocking Robustness
Certification on ImageNet", NeurIPS 2023; LiResNet++, ICLR 2024).

Trunk on images x in [0, 1] (mean subtracted, no std division):

    stem   patches(x - mean) W_0^T,            W_0 Cholesky-orthogonal (d = C_in p^2 -> C)
    block  x <- MinMax((x + conv_W(x)) / s + b), circular 3x3 conv, s a power-iteration
           estimate of ||I + conv_W||_2 (``power_iters`` = 10 steps per training forward
           from the stored vector, as LiResNet++'s num_lc_iter; the normalisation of the
           linear residual block)
    pool   L2 pooling over positions (decision: replaces LiResNet's flatten neck so that
           the small configurations have parameter counts comparable to LipNeXt)
    dense  f <- MinMax(f W_i^T + b_i), W_i Cholesky-orthogonal (LiResNet++'s dense layers)
    head   last-layer-normalised linear layer (rows of unit norm)

Sound bound (docs/CORE.md, Certificates): power iteration only gives a lower estimate, so the certificate
uses the exact norm of each residual operator, max over Fourier frequencies of
sigma_max(I + K_hat(f)) in float64 (Sedghi et al. 2019) with a rounding slack, divided by
the stored s:

    L = ||W_0|| * prod_blocks ||I + conv_W|| / s * prod_dense ||W_i||.

MinMax, pooling and the translations (mean, biases) are 1-Lipschitz.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..bounds import residual_conv_norm_bound
from ..nn import CholeskyLinear, MinMax, circular_conv2d, power_iteration_residual_conv
from ..program import lipschitz_of, steps_of
from ..rounding import Step, residual_conv, scale, translate
from .conv_trunk import ConvTrunkConfig, ConvTrunkModel
from .registry import register_arch, register_sizes

__all__ = ["LiResNet", "LiResNetConfig", "LiResBlock"]


class LiResBlock(nn.Module):
    """z = MinMax((x + conv_W(x)) / s + b) on (B, C, h, w), s ~ ||I + conv_W|| (power iteration)."""

    def __init__(self, width: int, grid: tuple[int, int], kernel_size: int = 3,
                 power_iters: int = 10, warmup_iters: int = 50):
        super().__init__()
        self.width, self.grid, self.kernel_size = width, tuple(grid), kernel_size
        self.power_iters = power_iters
        self.weight = nn.Parameter(torch.randn(width, width, kernel_size, kernel_size)
                                   / (width * kernel_size ** 2))
        self.bias = nn.Parameter(torch.zeros(width, 1, 1))
        u = torch.randn(1, width, *grid)
        sigma, u = power_iteration_residual_conv(self.weight, u / u.norm(), warmup_iters)
        self.register_buffer("u", u)
        self.register_buffer("sigma", sigma.detach().clone())
        self.act = MinMax(dim=1)

    def normaliser(self) -> torch.Tensor:
        """s: in training ``power_iters`` power-iteration steps from the stored vector plus
        1 % random noise (differentiable in W), which update the stored estimate; in
        evaluation the stored s."""
        if not self.training:
            return self.sigma
        sigma, u = power_iteration_residual_conv(self.weight, self.u, self.power_iters,
                                                 restart_noise=1e-2)
        with torch.no_grad():
            self.u.copy_(u)
            self.sigma.copy_(sigma.detach())
        return sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.normaliser().to(x.dtype)
        y = (x + circular_conv2d(x, self.weight.to(x.dtype))) / s + self.bias.to(x.dtype)
        return self.act(y)

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        """||I + conv_W||_2 (exact per-frequency SVD, float64, with slack) / s, times MinMax's 1."""
        return residual_conv_norm_bound(self.weight, self.grid) / float(self.sigma) * lipschitz_of(self.act, "act")

    @torch.no_grad()
    def rounding_steps(self, name: str) -> list[Step]:
        """x + conv_W(x) (k^2 GEMMs over shifted inputs), / s, + b, MinMax."""
        conv_lip = residual_conv_norm_bound(self.weight, self.grid)
        return [residual_conv(self.weight, conv_lip, f"{name}.conv"),
                scale(self.sigma, divide=True, name=f"{name}.1/s"), translate(self.bias, f"{name}.bias"),
                *steps_of(self.act, f"{name}.act")]

    def extra_repr(self) -> str:
        return f"width={self.width}, grid={self.grid}, kernel_size={self.kernel_size}"


@dataclass(kw_only=True)
class LiResNetConfig(ConvTrunkConfig):
    """The conv trunk's options with an odd ``kernel_size`` and ``power_iters`` >= 1 power-iteration
    steps per training forward."""

    power_iters: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel_size % 2 == 0 or self.power_iters < 1:
            raise ValueError(f"need an odd kernel_size and power_iters >= 1, got {self.kernel_size}, "
                             f"{self.power_iters}")


@register_arch
class LiResNet(ConvTrunkModel):
    """LiResNet-style classifier on raw pixels in [0, 1] of shape (B, in_chans, H, W)."""

    arch = "liresnet"
    config_class = LiResNetConfig

    dense_layer = CholeskyLinear

    def make_block(self, c: LiResNetConfig) -> nn.Module:
        return LiResBlock(c.width, c.grid, c.kernel_size, c.power_iters)

    def power_iteration_factors(self) -> list[float]:
        """The stored power-iteration estimates s of ||I + conv_W|| (lower estimates)."""
        return [float(b.sigma) for b in self.blocks]


# configurations paired with LipNeXt at equal parameter counts: l7w64 ~ lipnext_l8w128,
# l11w128 ~ lipnext_l12w256
register_sizes("liresnet", "LiResNet-style", {
    "liresnet_l7w64": (7, 64, "0.27M params, pairs with lipnext_l8w128 (0.28M)"),
    "liresnet_l11w128": (11, 128, "1.66M params, pairs with lipnext_l12w256 (1.64M)"),
    "liresnet_l12w128": (12, 128, "1.81M params"),
    "liresnet_l12w512": (12, 512, "28.9M params, LiResNet-paper-scale width"),
})
