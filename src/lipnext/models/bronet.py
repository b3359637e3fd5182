"""BRONet-style baseline (Lai et al., "Enhancing Certified Robustness via Block Reflector
Orthogonal Layers and Logit Annealing Loss", ICML 2025).

Trunk on images x in [0, 1] (mean subtracted, no std division):

    stem   patches(x - mean) W_0^T, W_0 the top-left (C x d) block of a BRO matrix
    block  x <- MinMax(BROConv(x) + b): per Fourier frequency f a unitary
           W(f) = I - 2 V(f) (V(f)^H V(f))^{-1} V(f)^H (circular padding, orthogonal)
    pool   L2 pooling over positions (decision, as in the LiResNet-style baseline)
    dense  f <- MinMax(f W_i^T + b_i), W_i = I - 2 V (V^T V)^{-1} V^T (dense BRO)
    head   last-layer-normalised linear layer

Every layer is orthogonal in exact arithmetic; the certificate bounds the matrices the
forward pass actually computes (float32), in float64 with a rounding slack:

    L = ||W_0|| * prod_blocks max_f ||W(f)|| * prod_dense ||W_i||.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn import L2Pool, NormalizedLinear
from ..nn.bro import BROConv2d, BROLinear
from ..nn.minmax import MinMax
from .base import resolve_geometry, resolve_mean
from .conv_trunk import ConvTrunkModel

__all__ = ["BRONet", "BROBlock"]


class BROBlock(nn.Module):
    """z = MinMax(BROConv(x) + b) on (B, C, h, w)."""

    def __init__(self, width: int, grid: tuple[int, int], kernel_size: int = 3,
                 rank: int | None = None):
        super().__init__()
        self.conv = BROConv2d(width, grid, kernel_size, rank)
        self.bias = nn.Parameter(torch.zeros(width, 1, 1))
        self.act = MinMax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x) + self.bias.to(x.dtype))


class BRONet(ConvTrunkModel):
    """BRONet-style classifier on raw pixels in [0, 1] of shape (B, in_chans, H, W)."""

    arch = "bronet"

    def __init__(self, depth: int = 12, width: int = 128, num_classes: int = 10, in_chans: int = 3,
                 image_size: int | Sequence[int] = 32, patch_size: int | None = None,
                 kernel_size: int = 3, rank: int | None = None, dense_depth: int = 2,
                 mean: Sequence[float] | None = None, seed: int | None = None):
        super().__init__()
        hw, patch_size = resolve_geometry(image_size, patch_size)
        if depth < 0 or dense_depth < 0 or width < 2 or width % 2 or num_classes < 2:
            raise ValueError(f"need depth >= 0, dense_depth >= 0, an even width >= 2 and "
                             f"num_classes >= 2; got {depth}, {dense_depth}, {width}, {num_classes}")
        mean = resolve_mean(mean, in_chans)
        rank = rank or width // 2
        self._config = dict(depth=depth, width=width, num_classes=num_classes, in_chans=in_chans,
                            image_size=list(hw), patch_size=patch_size, kernel_size=kernel_size,
                            rank=rank, dense_depth=dense_depth, mean=mean, seed=seed)
        self.depth, self.width, self.num_classes, self.in_chans = depth, width, num_classes, in_chans
        self.image_size, self.patch_size = hw, patch_size
        grid = (hw[0] // patch_size, hw[1] // patch_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        with torch.random.fork_rng(enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.stem = BROLinear(in_chans * patch_size ** 2, width)
            self.blocks = nn.ModuleList(BROBlock(width, grid, kernel_size, rank) for _ in range(depth))
            self.pool = L2Pool()
            self.dense = nn.ModuleList(BROLinear(width, width, rank) for _ in range(dense_depth))
            self.act = MinMax(dim=-1)
            self.head = NormalizedLinear(width, num_classes)
        self.validate_inputs = True

    @torch.no_grad()
    def lipschitz_factors(self) -> dict[str, float]:
        """Sound bounds of the stem, the product over blocks and the product over dense layers."""
        blocks = dense = 1.0
        for b in self.blocks:
            blocks *= b.conv.norm_bound()
        for layer in self.dense:
            dense *= layer.norm_bound()
        return {"stem": self.stem.norm_bound(), "blocks": blocks, "dense": dense}

