"""Temporary modes of a module: evaluation mode, frozen parameters."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["evaluating", "frozen"]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; the previous training mode comes back on exit, also on an
    exception (only the top module's flag is remembered, as ``model.train(mode)`` sets all)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """No parameter requires a gradient inside the block; each parameter's flag comes back on
    exit, also on an exception."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
