"""Activations of the LipNeXt block (channels last), each 1-Lipschitz, and their registry.

beta-Abs: |x| on the first ``beta * C`` channels, identity on the rest. At beta = 1/2 it
equals MinMax up to an orthogonal change of basis: with u = (a + b)/sqrt 2,
v = (a - b)/sqrt 2, (max(a,b), min(a,b)) = Q (u, |v|) for a fixed orthogonal Q.
``make_activation`` builds the one a model names: ``beta_abs``, ``minmax`` (MinMax on
channel halves, norm-preserving), ``identity`` (a control: the network is then linear), or
one added with ``register_activation`` (docs/EXTENDING.md, Adding an activation). Each
owns its certificate: ``lipschitz_bound()`` and ``rounding_steps(name)`` (|.| is exact).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..ops.beta_abs import beta_abs
from ..rounding import Step, exact
from .minmax import MinMax

__all__ = ["BetaAbs", "activation_names", "make_activation", "register_activation"]


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

    def lipschitz_bound(self) -> float:
        """1: |.| and the identity are 1-Lipschitz per coordinate."""
        return 1.0

    def rounding_steps(self, name: str) -> list[Step]:
        """|.| and copies: exact in floating point."""
        return [exact(self.forward, name)]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, beta={self.beta}"


def _minmax(channels: int, beta: float) -> nn.Module:
    if channels % 2:
        raise ValueError(f"activation 'minmax' pairs channel halves and needs an even width, got {channels}")
    return MinMax(dim=-1)


#: name -> factory(channels, beta): the activations a LipNeXt config can name
_REGISTRY: dict[str, Callable[[int, float], nn.Module]] = {
    "beta_abs": BetaAbs, "minmax": _minmax, "identity": lambda channels, beta: nn.Identity()}


def register_activation(name: str, factory: Callable[[int, float], nn.Module]) -> None:
    """Make ``activation=name`` build ``factory(channels, beta)``: a module on channels-last
    tokens with its own ``lipschitz_bound()`` and ``rounding_steps(name)``."""
    if name in _REGISTRY:
        raise ValueError(f"activation {name!r} is registered already")
    _REGISTRY[name] = factory


def activation_names() -> tuple[str, ...]:
    """The registered activation names."""
    return tuple(_REGISTRY)


def make_activation(name: str, channels: int, beta: float = 0.5) -> nn.Module:
    """The 1-Lipschitz activation ``name`` on channels-last tokens of ``channels`` channels."""
    if name not in _REGISTRY:
        raise ValueError(f"activation must be one of {', '.join(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name](channels, beta)
