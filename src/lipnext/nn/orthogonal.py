"""Orthogonal weights stored as plain tensors, marked for the manifold optimizer.

An orthogonal weight X (n x n, X^T X = I) is an ordinary ``nn.Parameter`` of the
subclass :class:`OrthogonalParameter`; nothing is re-parameterised. The manifold
optimizer (``lipnext.optim``) recognises the subclass and keeps X on O(n).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["OrthogonalParameter", "is_orthogonal", "mark_orthogonal", "random_orthogonal",
           "orthogonality_error"]


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
    """A Haar-distributed orthogonal n x n matrix: Q from the QR of a Gaussian, signs fixed."""
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(dtype).contiguous()


def orthogonality_error(x: torch.Tensor) -> float:
    """max_ij |X^T X - I|_ij, computed in float64."""
    x64 = x.detach().to(torch.float64)
    eye = torch.eye(x64.shape[-1], dtype=torch.float64, device=x64.device)
    return (x64.mT @ x64 - eye).abs().max().item()
