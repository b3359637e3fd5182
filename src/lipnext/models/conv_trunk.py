"""The trunk shared by the convolutional baselines (LiResNet-style, BRONet-style).

x -> patchify(x - mean) -> stem (dense, 1-Lipschitz) -> conv blocks (channels first)
-> L2 pooling -> dense layers with MinMax; each part's bound is the subclass's
``lipschitz_factors()``.
"""
from __future__ import annotations

import torch

from ..nn.minmax import patchify
from .base import CertifiableModel, check_images

__all__ = ["ConvTrunkModel"]


class ConvTrunkModel(CertifiableModel):
    """Needs ``stem``, ``blocks``, ``pool``, ``dense``, ``act``, ``head``, ``mean``, ``patch_size``."""

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
