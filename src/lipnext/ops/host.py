"""Host-to-device copies that never wait for the device.

A plain ``tensor.to("cuda")`` of a CPU tensor synchronises the stream (PyTorch copies with
``cudaMemcpyAsync`` and then waits, so that the host memory may be reused at once): the host
stalls until every queued kernel has run. ``to_device`` copies from pinned memory with
``non_blocking=True`` instead (PyTorch's pinned allocator keeps the block until the copy has
run); on the CPU it is ``tensor.to(device)``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["index_on", "to_device"]


def to_device(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` (a CPU tensor) on ``device`` in ``dtype``, without a host synchronisation."""
    t = t if dtype is None else t.to(dtype)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def index_on(rows: Sequence[int], device: torch.device) -> Tensor:
    """The int64 index tensor of ``rows`` on ``device`` (``to_device``)."""
    return to_device(torch.tensor(list(rows), dtype=torch.int64), device)
