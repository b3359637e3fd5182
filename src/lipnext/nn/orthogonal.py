"""Orthogonal weights stored as plain tensors, marked for the manifold optimizer.

An orthogonal weight X (n x n, X^T X = I) is an ordinary ``nn.Parameter`` of the
subclass :class:`OrthogonalParameter`; nothing is re-parameterised. The manifold
optimizer (``lipnext.optim``) recognises the subclass and keeps X on O(n).

Large models: inside ``deferred_orthogonal()`` every ``random_orthogonal`` is an
uninitialised tensor on the meta device; ``init_orthogonal_`` then draws each orthogonal
weight in place on the training device (no float64 QR on the CPU of every rank).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["OrthogonalParameter", "deferred_orthogonal", "init_orthogonal_", "is_orthogonal",
           "mark_orthogonal", "random_orthogonal", "orthogonality_error"]

_DEFERRED = [False]


class OrthogonalParameter(nn.Parameter):
    """A square ``nn.Parameter`` that the manifold optimizer keeps orthogonal."""

    def __new__(cls, data: torch.Tensor, requires_grad: bool = True):
        if data.dim() != 2 or data.shape[0] != data.shape[1]:
            raise ValueError(f"an orthogonal weight must be square, got shape {tuple(data.shape)}")
        return super().__new__(cls, data, requires_grad)

    def __repr__(self) -> str:
        return "Orthogonal" + super().__repr__()


def is_orthogonal(p: torch.Tensor) -> bool:
    """True for weights the manifold optimizer keeps on O(n)."""
    return isinstance(p, OrthogonalParameter) or getattr(p, "_lipnext_orthogonal", False)


def mark_orthogonal(p: torch.Tensor) -> torch.Tensor:
    """Mark ``p`` as orthogonal without its class (FSDP swaps in DTensor parameters)."""
    p._lipnext_orthogonal = True
    return p


def random_orthogonal(n: int, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A Haar-distributed orthogonal n x n matrix: Q from the QR of a Gaussian, signs fixed.

    Inside ``deferred_orthogonal()``: an uninitialised n x n tensor on the meta device."""
    if _DEFERRED[0]:
        return torch.empty(n, n, dtype=dtype, device="meta")
    device = generator.device if generator is not None else torch.device("cpu")
    g = torch.randn(n, n, generator=generator, dtype=torch.float64, device=device)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(dtype).contiguous()


@contextmanager
def deferred_orthogonal() -> Iterator[None]:
    """Build modules whose ``random_orthogonal`` weights are left on the meta device."""
    _DEFERRED[0] = True
    try:
        yield
    finally:
        _DEFERRED[0] = False


def _seed(seed: int, k: int) -> int:
    """A 63-bit generator seed for the k-th orthogonal weight of a model seeded ``seed``."""
    return (seed * 0x9E3779B97F4A7C15 + k * 0xBF58476D1CE4E5B9 + 1) % 2**63


@torch.no_grad()
def init_orthogonal_(module: nn.Module, seed: int, device: torch.device | str,
                     select: Callable[[int], bool] = lambda k: True) -> nn.Module:
    """Materialise the meta ``OrthogonalParameter`` s of ``module`` on ``device`` in place.

    The k-th orthogonal weight (``parameters()`` order) becomes ``random_orthogonal`` drawn by a
    generator on ``device`` seeded from (seed, k): deterministic for a seed and a device type.
    Where ``select(k)`` is False it is left uninitialised (``torch.empty``), for a rank that
    receives it from the rank that owns it.
    """
    device = torch.device(device)
    k = 0
    for mod in module.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if not is_orthogonal(p):
                continue
            if p.is_meta:
                if select(k):
                    gen = torch.Generator(device).manual_seed(_seed(seed, k))
                    data = random_orthogonal(p.shape[0], gen, p.dtype)
                else:
                    data = torch.empty(p.shape, dtype=p.dtype, device=device)
                setattr(mod, name, OrthogonalParameter(data, p.requires_grad))
            k += 1
    return module


def orthogonality_error(x: torch.Tensor) -> float:
    """max_ij |X^T X - I|_ij, computed in float64."""
    x64 = x.detach().to(torch.float64)
    eye = torch.eye(x64.shape[-1], dtype=torch.float64, device=x64.device)
    return (x64.mT @ x64 - eye).abs().max().item()
