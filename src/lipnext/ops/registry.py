"""Run-time kernel slots for the hot operations.

Each operation has a reference implementation in plain torch (any device, autograd) and
may have kernels registered per device type (``"cuda"``, ``"cpu"``, ...), e.g. a fused or
Triton kernel. A call dispatches on the device type of its first argument: the kernel
registered for that device type when kernels are enabled, the reference otherwise. A
kernel takes the reference's arguments and must compute the same function (with its
gradient, if it is used in training).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["OPS", "kernel_op", "register_kernel", "unregister_kernel", "kernel_for", "reference_only"]

F = TypeVar("F", bound=Callable[..., torch.Tensor])

OPS: dict[str, Callable[..., torch.Tensor]] = {}            # op name -> reference
_KERNELS: dict[str, dict[str, Callable[..., torch.Tensor]]] = {}
_ENABLED = [True]


def kernel_op(name: str, reference: F) -> F:
    """The dispatching function of op ``name``, whose reference implementation is ``reference``."""
    if name in OPS:
        raise ValueError(f"op {name!r} is defined twice")
    OPS[name] = reference
    kernels = _KERNELS[name] = {}

    @functools.wraps(reference)
    def call(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kernels and _ENABLED[0]:          # no device look-up while none is registered
            return kernels.get(x.device.type, reference)(x, *args, **kwargs)
        return reference(x, *args, **kwargs)
    return call  # type: ignore[return-value]


def _check(op: str) -> None:
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; the ops are {', '.join(sorted(OPS))}")


def register_kernel(op: str, device_type: str, fn: Callable[..., torch.Tensor]) -> None:
    """Use ``fn`` for op ``op`` on tensors of ``device_type`` (replacing any earlier kernel)."""
    _check(op)
    try:
        dev = torch.device(device_type)
    except RuntimeError:
        dev = None
    if dev is None or dev.index is not None:
        raise ValueError(f"device_type must be a device type such as 'cuda' or 'cpu', got {device_type!r}")
    _KERNELS[op][device_type] = fn


def unregister_kernel(op: str, device_type: str) -> None:
    """Go back to the reference for op ``op`` on ``device_type``."""
    _check(op)
    _KERNELS[op].pop(device_type, None)


def kernel_for(op: str, device_type: str) -> Callable[..., torch.Tensor]:
    """What a call of ``op`` on ``device_type`` runs: its kernel, or the reference."""
    _check(op)
    kernel = _KERNELS[op].get(device_type) if _ENABLED[0] else None
    return kernel or OPS[op]


@contextmanager
def reference_only() -> Iterator[None]:
    """Inside, every op runs its reference implementation (kernels stay registered)."""
    before = _ENABLED[0]
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = before
