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

from collections.abc import Sequence

import torch
from torch import nn

from ..nn import L2Pool, NormalizedLinear
from ..nn.cholesky import CholeskyLinear
from ..nn.conv_bounds import circular_conv2d, power_iteration_residual_conv, \
    residual_conv_norm_bound
from ..nn.minmax import MinMax
from .base import resolve_geometry, resolve_mean
from .conv_trunk import ConvTrunkModel

__all__ = ["LiResNet", "LiResBlock"]


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
        """||I + conv_W||_2 (exact per-frequency SVD, float64, with slack) / s."""
        return residual_conv_norm_bound(self.weight, self.grid) / float(self.sigma)

    def extra_repr(self) -> str:
        return f"width={self.width}, grid={self.grid}, kernel_size={self.kernel_size}"


class LiResNet(ConvTrunkModel):
    """LiResNet-style classifier on raw pixels in [0, 1] of shape (B, in_chans, H, W)."""

    arch = "liresnet"

    def __init__(self, depth: int = 12, width: int = 128, num_classes: int = 10, in_chans: int = 3,
                 image_size: int | Sequence[int] = 32, patch_size: int | None = None,
                 kernel_size: int = 3, dense_depth: int = 2, power_iters: int = 10,
                 mean: Sequence[float] | None = None, seed: int | None = None):
        super().__init__()
        hw, patch_size = resolve_geometry(image_size, patch_size)
        if depth < 0 or dense_depth < 0 or width < 2 or width % 2 or num_classes < 2:
            raise ValueError(f"need depth >= 0, dense_depth >= 0, an even width >= 2 and "
                             f"num_classes >= 2; got {depth}, {dense_depth}, {width}, {num_classes}")
        if kernel_size % 2 == 0 or power_iters < 1:
            raise ValueError(f"need an odd kernel_size and power_iters >= 1, got {kernel_size}, "
                             f"{power_iters}")
        mean = resolve_mean(mean, in_chans)
        self._config = dict(depth=depth, width=width, num_classes=num_classes, in_chans=in_chans,
                            image_size=list(hw), patch_size=patch_size, kernel_size=kernel_size,
                            dense_depth=dense_depth, power_iters=power_iters, mean=mean, seed=seed)
        self.depth, self.width, self.num_classes, self.in_chans = depth, width, num_classes, in_chans
        self.image_size, self.patch_size = hw, patch_size
        grid = (hw[0] // patch_size, hw[1] // patch_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        with torch.random.fork_rng(enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.stem = CholeskyLinear(in_chans * patch_size ** 2, width)
            self.blocks = nn.ModuleList(LiResBlock(width, grid, kernel_size, power_iters)
                                        for _ in range(depth))
            self.pool = L2Pool()
            self.dense = nn.ModuleList(CholeskyLinear(width, width) for _ in range(dense_depth))
            self.act = MinMax(dim=-1)
            self.head = NormalizedLinear(width, num_classes)
        self.validate_inputs = True

    @torch.no_grad()
    def lipschitz_factors(self) -> dict[str, float]:
        """Sound bounds of the stem, the product over blocks and the product over dense layers."""
        blocks = dense = 1.0
        for b in self.blocks:
            blocks *= b.lipschitz_bound()
        for layer in self.dense:
            dense *= layer.norm_bound()
        return {"stem": self.stem.norm_bound(), "blocks": blocks, "dense": dense}

    def power_iteration_factors(self) -> list[float]:
        """The stored power-iteration estimates s of ||I + conv_W|| (lower estimates)."""
        return [float(b.sigma) for b in self.blocks]

