"""The trunk shared by the convolutional baselines (LiResNet-style, BRONet-style).

x -> patchify(x - mean) -> stem (dense, 1-Lipschitz) -> conv blocks (channels first)
-> L2 pooling -> dense layers with MinMax -> head; each layer's bound is its
``lipschitz_bound()`` (the mean, MinMax and pooling are 1-Lipschitz), so

    L = bound(stem) * prod_blocks bound(block) * prod_dense bound(dense).

A subclass names its dense layer class (``dense_layer``, for the stem and the dense
layers) and builds a block (``make_block``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..nn import L2Pool, MinMax, NormalizedLinear
from ..ops import patchify
from ..program import steps_of
from ..rounding import Step, exact, translate
from .base import CertifiableConfig, CertifiableModel, check_images

__all__ = ["ConvTrunkConfig", "ConvTrunkModel"]


@dataclass(kw_only=True)
class ConvTrunkConfig(CertifiableConfig):
    """``depth`` conv blocks of ``width`` channels (even: MinMax pairs them), a
    ``kernel_size`` x ``kernel_size`` kernel, ``dense_depth`` dense layers."""

    depth: int = 12
    width: int = 128
    kernel_size: int = 3
    dense_depth: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth < 0 or self.dense_depth < 0 or self.width < 2 or self.width % 2:
            raise ValueError(f"need depth >= 0, dense_depth >= 0 and an even width >= 2; "
                             f"got {self.depth}, {self.dense_depth}, {self.width}")


class ConvTrunkModel(CertifiableModel):
    """Builds ``mean``, ``stem``, ``blocks``, ``pool``, ``dense``, ``act``, ``head`` in that order."""

    dense_layer: ClassVar[type[nn.Module]]   # dense_layer(in_features, out_features), 1-Lipschitz

    def make_stem(self, c: ConvTrunkConfig) -> nn.Module:
        """The dense stem, C_in p^2 -> width."""
        return self.dense_layer(c.in_chans * c.patch_size ** 2, c.width)

    def make_block(self, c: ConvTrunkConfig) -> nn.Module:
        """One conv block on (B, width, h, w)."""
        raise NotImplementedError

    def make_dense(self, c: ConvTrunkConfig) -> nn.Module:
        """One dense layer, width -> width."""
        return self.dense_layer(c.width, c.width)

    def build(self, c: ConvTrunkConfig) -> None:
        self.register_buffer("mean", torch.tensor(c.mean).view(1, -1, 1, 1))
        self.stem = self.make_stem(c)
        self.blocks = nn.ModuleList(self.make_block(c) for _ in range(c.depth))
        self.pool = L2Pool()
        self.dense = nn.ModuleList(self.make_dense(c) for _ in range(c.dense_depth))
        self.act = MinMax(dim=-1)
        self.head = NormalizedLinear(c.width, c.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk features (B, width)."""
        if self.validate_inputs:
            check_images(x, self.in_chans, self.image_size)
        x = self.stem(patchify(x - self.mean.to(x.dtype), self.patch_size)).permute(0, 3, 1, 2)
        for block in self.blocks:
            x = block(x)
        f = self.pool(x.permute(0, 2, 3, 1))
        for layer in self.dense:
            f = self.act(layer(f))
        return f

    @torch.no_grad()
    def rounding_program(self) -> list[Step]:
        """forward_features as float64 steps: mean, patchify, the stem's, each block's (channels
        first), the pool's, then each dense layer's and the activation's."""
        p = self.patch_size
        steps = [translate(-self.mean, "mean"), exact(lambda h: patchify(h, p), "patchify"),
                 *steps_of(self.stem, "stem"), exact(lambda h: h.permute(0, 3, 1, 2), "channels_first")]
        for i, block in enumerate(self.blocks):
            steps += steps_of(block, f"blocks.{i}")
        steps += [exact(lambda h: h.permute(0, 2, 3, 1), "channels_last"), *steps_of(self.pool, "pool")]
        for i, layer in enumerate(self.dense):
            steps += [*steps_of(layer, f"dense.{i}"), *steps_of(self.act, "act")]
        return steps
