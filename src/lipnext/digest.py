"""One digest of a set of named tensors, for files (``lipnext.io``) and for a model's state
(``lipnext.program``: a float64 twin remembers the weights it was built from)."""
from __future__ import annotations

import hashlib

import torch

__all__ = ["tensors_sha256"]


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The sha256 hex digest of a set of named tensors, independent of the file format.

    Recipe: for each name in sorted order, feed ``name``, ``str(dtype)`` (e.g. ``torch.float32``)
    and the shape as comma-separated sizes (``"3,8,8"``; ``""`` for a scalar), each followed by
    a NUL byte, then the tensor's raw bytes (contiguous, on the CPU, in the machine's byte
    order: little-endian, as safetensors stores them)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        for part in (name, str(t.dtype), ",".join(str(s) for s in t.shape)):
            h.update(part.encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
