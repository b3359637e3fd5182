"""Gradients in Lie form: X^T G instead of G in the ``.grad`` of an orthogonal weight X.

The manifold optimizer needs A = skew(X^T G), not G (docs/CORE.md, Optimizer). A layer whose
backward already has the factors of X^T G can deliver it at no extra product (the one-function
LipNeXt block: R^T dR = T^T dT + dU^T U, M^T dM = dT^T T in token order), which saves the
optimizer's X^T G, one C x C product per matrix per step. Elsewhere ``lie_slice`` turns
autograd's G into X^T G (the product moves from the optimizer to the backward).

    use_lie_gradients(model)      every module with a ``lie_gradients`` switch delivers X^T G
                                  and marks its orthogonal weights (``has_lie_gradient``)
    lie_slice(X, rows, cols)      X[:rows, :cols] whose backward gives X^T G_full, G_full the
                                  slice's gradient zero-padded to X's shape (cost n rows cols)

X^T G is linear in G, so summing it over micro-batches, ranks (DDP's reduce, FSDP's
reduce-scatter) or accumulation steps gives X^T of the sum; ||X^T G||_F = ||G||_F for
orthogonal X, so gradient clipping is unchanged (to the drift of X). While the switch is on,
every use of the weight must go through its module's forward.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .orthogonal import is_orthogonal

__all__ = ["has_lie_gradient", "lie_slice", "mark_lie_gradient", "use_lie_gradients"]


def mark_lie_gradient(p: Tensor, enabled: bool = True) -> Tensor:
    """Mark ``p.grad`` as holding X^T G (the optimizer then skips that product)."""
    p._lipnext_lie_gradient = enabled
    return p


def has_lie_gradient(p: Tensor) -> bool:
    """True if the ``.grad`` of ``p`` holds X^T G rather than G."""
    return getattr(p, "_lipnext_lie_gradient", False)


def use_lie_gradients(model: nn.Module, enabled: bool = True) -> int:
    """Switch every module with a ``lie_gradients`` attribute to (or back from) Lie-form
    gradients and mark its own orthogonal weights; returns how many weights were marked."""
    count = 0
    for module in model.modules():
        if not hasattr(module, "lie_gradients"):
            continue
        module.lie_gradients = enabled
        for p in module.parameters(recurse=False):
            if is_orthogonal(p):
                mark_lie_gradient(p, enabled)
                count += 1
    return count


class _LieSlice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rows: int, cols: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.cut = rows, cols
        return x[:rows, :cols]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        x, = ctx.saved_tensors
        rows, cols = ctx.cut
        pulled = x[:rows].mT @ g                  # X^T G_full: only its first cols columns are nonzero
        if cols == x.shape[1]:
            return pulled, None, None
        out = x.new_zeros(x.shape)
        out[:, :cols] = pulled
        return out, None, None


def lie_slice(x: Tensor, rows: int | None = None, cols: int | None = None) -> Tensor:
    """X[:rows, :cols] (all of X by default) whose gradient into X is X^T G_full."""
    n, m = x.shape
    return _LieSlice.apply(x, n if rows is None else rows, m if cols is None else cols)
