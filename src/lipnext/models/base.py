"""The interface every certifiable lipnext model follows.

A model is a trunk f = forward_features(x) with a sound Lipschitz bound L
(``lipschitz_bound()``) followed by a linear head z = forward_head(f) = W f + b whose
effective weight W is ``head_weight()``. Certification (``lipnext.certify``) needs
nothing else, so any architecture with this interface can be certified and verified.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["CertifiableModel", "check_images", "default_patch_size", "resolve_geometry", "resolve_mean"]


def default_patch_size(image_size: int) -> int:
    """4 for CIFAR-sized inputs, 16 for ImageNet-sized ones, smaller for tiny images."""
    if image_size >= 128:
        return 16
    if image_size >= 32:
        return 4
    return max(1, image_size // 4)


def resolve_geometry(image_size: int | Sequence[int],
                     patch_size: int | None) -> tuple[tuple[int, int], int]:
    """(H, W) and the patch size (default_patch_size if None), checked: it must divide both sides."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size must be an int or (H, W), got {image_size}")
    patch_size = patch_size or default_patch_size(min(hw))
    if hw[0] % patch_size or hw[1] % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide the image size {hw}")
    return hw, patch_size


def resolve_mean(mean: Sequence[float] | None, in_chans: int) -> list[float]:
    """The per-channel mean subtracted inside the model (0.5 per channel by default)."""
    mean = [float(m) for m in mean] if mean is not None else [0.5] * in_chans
    if len(mean) != in_chans:
        raise ValueError(f"mean has {len(mean)} entries but the input has {in_chans} channels")
    return mean


def check_images(x: torch.Tensor, in_chans: int, image_size: tuple[int, int]) -> None:
    """Raise a clear error unless x is a float (B, in_chans, H, W) batch of finite pixels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected float pixels in [0, 1], got dtype {x.dtype}; "
                        "convert uint8 images with x.float() / 255")
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (B, {in_chans}, {image_size[0]}, {image_size[1]}), "
                         f"got shape {tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)"
                         if x.dim() == 3 else
                         f"expected images of shape (B, {in_chans}, {image_size[0]}, {image_size[1]}), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        hint = " (channels-last input? use x.permute(0, 3, 1, 2))" if x.shape[-1] == in_chans else ""
        raise ValueError(f"the model expects {in_chans} input channels, got {x.shape[1]} "
                         f"in shape {tuple(x.shape)}{hint}")
    if tuple(x.shape[-2:]) != tuple(image_size):
        raise ValueError(f"the model was built for {image_size[0]}x{image_size[1]} images, got "
                         f"{x.shape[-2]}x{x.shape[-1]}; resize the inputs or create the model with "
                         f"image_size={x.shape[-2]}")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
        raise ValueError("the input contains NaN or Inf values")


class CertifiableModel(nn.Module):
    """Base class: trunk with a sound Lipschitz bound + linear head; config round-trips."""

    arch: str = ""
    num_classes: int
    in_chans: int
    image_size: tuple[int, int]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """Logits from features; float64 features give float64 logits (for certify)."""
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def lipschitz_factors(self) -> dict[str, float]:
        """Sound upper bounds of the trunk's successive parts, measured from the weights."""
        raise NotImplementedError

    def lipschitz_bound(self) -> float:
        """Sound upper bound on the L2 Lipschitz constant of forward_features: the product
        of ``lipschitz_factors()``."""
        return math.prod(self.lipschitz_factors().values())

    def head_weight(self) -> torch.Tensor:
        """The effective (K, C) weight W of the linear head z = W f + b (normalised rows)."""
        return self.head.normalized_weight()

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-serialisable) that rebuild this model."""
        return dict(self._config)
