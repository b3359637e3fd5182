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

from dataclasses import dataclass

import torch
from torch import nn

from ..nn import BROConv2d, BROLinear, MinMax
from ..program import lipschitz_of, steps_of
from ..rounding import Step, translate
from .conv_trunk import ConvTrunkConfig, ConvTrunkModel
from .registry import register_arch, register_sizes

__all__ = ["BRONet", "BRONetConfig", "BROBlock"]


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

    def lipschitz_bound(self) -> float:
        """bound(BROConv) times MinMax's (the bias is a translation)."""
        return lipschitz_of(self.conv, "conv") * lipschitz_of(self.act, "act")

    def rounding_steps(self, name: str) -> list[Step]:
        """The BRO convolution's steps, + b, MinMax."""
        return [*steps_of(self.conv, f"{name}.conv"), translate(self.bias, f"{name}.bias"),
                *steps_of(self.act, f"{name}.act")]


@dataclass(kw_only=True)
class BRONetConfig(ConvTrunkConfig):
    """The conv trunk's options with the BRO ``rank`` of V (default width // 2)."""

    rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rank = self.rank or self.width // 2


@register_arch
class BRONet(ConvTrunkModel):
    """BRONet-style classifier on raw pixels in [0, 1] of shape (B, in_chans, H, W)."""

    arch = "bronet"
    config_class = BRONetConfig

    dense_layer = BROLinear         # the stem: rank max(C_in p^2, width) // 2

    def make_block(self, c: BRONetConfig) -> nn.Module:
        return BROBlock(c.width, c.grid, c.kernel_size, c.rank)

    def make_dense(self, c: BRONetConfig) -> nn.Module:
        return BROLinear(c.width, c.width, c.rank)


# configurations paired with LipNeXt at equal parameter counts: l6w96 ~ lipnext_l8w128,
# l12w172 ~ lipnext_l12w256
register_sizes("bronet", "BRONet-style", {
    "bronet_l6w96": (6, 96, "0.26M params, pairs with lipnext_l8w128 (0.28M)"),
    "bronet_l12w128": (12, 128, "0.91M params"),
    "bronet_l12w172": (12, 172, "1.64M params, pairs with lipnext_l12w256 (1.64M)"),
    "bronet_l12w512": (12, 512, "14.4M params, BRONet-paper-scale width"),
})
