"""Temporary modes of a module: evaluation mode, frozen parameters, standard numerics."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

__all__ = ["evaluating", "frozen", "standard_numerics"]


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


@contextmanager
def standard_numerics(model: nn.Module) -> Iterator[None]:
    """No autocast (on the model's device and the CPU) and float32 as the default dtype."""
    param = next(model.parameters(), None)
    kinds = {"cpu", param.device.type if param is not None else "cpu"}
    old = torch.get_default_dtype()
    with ExitStack() as stack:
        for kind in sorted(kinds):
            stack.enter_context(torch.autocast(kind, enabled=False))
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(old)
