"""A toy 1-Lipschitz MLP, the toy baseline's one model file: how a model joins lipnext.

    f = MinMax(W_k ... MinMax(W_1 flatten(x - mean) + b_1) ... + b_k),   z = W f + b

with orthogonal dense layers W_i (``layers.OrthogonalDense``) and a normalised head, so
L = prod_i ||W_i||_2 (MinMax and the mean are 1-Lipschitz). The base's ``lipschitz_factors`` multiplies the bounds of ``layers`` and ``act``, and its
``head_program`` is the head's ``affine_map()``. ``import toy_mlp.model``
registers the architecture ``toy_mlp`` and the named size ``toy_mlp_l2w64``; from then on
``lipnext.create_model``, ``lipnext.train``, ``certify``, ``verify``, ``save_model`` and
``load_model`` take it like any other model, and so does the command line with
``lipnext --import toy_mlp.model``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lipnext.models import (CertifiableConfig, CertifiableModel, check_images, register_arch,
                            register_sizes)
from lipnext.nn import MinMax, NormalizedLinear
from lipnext.program import steps_of
from lipnext.rounding import Step, exact, translate

from .layers import OrthogonalDense

__all__ = ["ToyMLP", "ToyMLPConfig"]


@dataclass(kw_only=True)
class ToyMLPConfig(CertifiableConfig):
    """``depth`` orthogonal dense layers of ``width`` (even: MinMax pairs the channels)."""

    depth: int = 2
    width: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth < 1 or self.width < 2 or self.width % 2:
            raise ValueError(f"need depth >= 1 and an even width >= 2, got {self.depth}, {self.width}")


@register_arch
class ToyMLP(CertifiableModel):
    """The toy MLP on raw pixels in [0, 1] of shape (B, in_chans, H, W)."""

    arch = "toy_mlp"
    config_class = ToyMLPConfig

    def build(self, c: ToyMLPConfig) -> None:
        pixels = c.in_chans * math.prod(c.image_size)
        self.register_buffer("mean", torch.tensor(c.mean).view(1, -1, 1, 1))
        self.layers = nn.ModuleList(OrthogonalDense(pixels if i == 0 else c.width, c.width)
                                    for i in range(c.depth))
        self.act = MinMax(dim=-1)
        self.head = NormalizedLinear(c.width, c.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.validate_inputs:
            check_images(x, self.in_chans, self.image_size)
        h = (x - self.mean.to(x.dtype)).flatten(1)
        for layer in self.layers:
            h = self.act(layer(h))
        return h

    def rounding_program(self) -> list[Step]:
        """forward_features as float64 steps (lipnext.rounding), assembled from the layers' own
        (lipnext.program.steps_of checks that each layer carries its certificate)."""
        steps = [translate(-self.mean, "mean"), exact(lambda h: h.flatten(1), "flatten")]
        for i, layer in enumerate(self.layers):
            steps += [*steps_of(layer, f"layers.{i}"), *steps_of(self.act, "act")]
        return steps


register_sizes("toy_mlp", "Toy MLP", {"toy_mlp_l2w64": (2, 64, "an example (docs/ARCHITECTURE.md)")})
