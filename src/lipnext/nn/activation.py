"""Activations of the LipNeXt block (channels last), each 1-Lipschitz.

beta-Abs: |x| on the first ``beta * C`` channels, identity on the rest. At beta = 1/2 it
equals MinMax up to an orthogonal change of basis: with u = (a + b)/sqrt 2,
v = (a - b)/sqrt 2, (max(a,b), min(a,b)) = Q (u, |v|) for a fixed orthogonal Q.
``make_activation`` builds the one a model names: ``beta_abs``, ``minmax`` (MinMax on
channel halves, norm-preserving) or ``identity`` (a control: the network is then linear).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.beta_abs import beta_abs
from .minmax import MinMax

__all__ = ["ACTIVATIONS", "BetaAbs", "make_activation"]

ACTIVATIONS = ("beta_abs", "minmax", "identity")


class BetaAbs(nn.Module):
    """y_c = |x_c| for c < beta*C, y_c = x_c otherwise (channels last)."""

    def __init__(self, channels: int, beta: float = 0.5):
        super().__init__()
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must lie in [0, 1], got {beta}")
        self.channels = channels
        self.beta = beta
        self.num_abs = int(round(beta * channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return beta_abs(x, self.num_abs)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, beta={self.beta}"


def make_activation(name: str, channels: int, beta: float = 0.5) -> nn.Module:
    """The 1-Lipschitz activation ``name`` on channels-last tokens of ``channels`` channels."""
    if name == "beta_abs":
        return BetaAbs(channels, beta)
    if name == "minmax":
        if channels % 2:
            raise ValueError(f"activation 'minmax' pairs channel halves and needs an even width, got {channels}")
        return MinMax(dim=-1)
    if name == "identity":
        return nn.Identity()
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
