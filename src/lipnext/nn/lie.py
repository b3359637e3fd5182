"""Gradients in Lie form: X^T G instead of G in the ``.grad`` of an orthogonal weight X.

The manifold optimizer needs A = skew(X^T G), not G (docs/CORE.md, Optimizer). A layer whose
backward already has the factors of X^T G can deliver it at no extra product (the one-function
LipNeXt block: R^T dR = T^T dT + dU^T U, M^T dM = dT^T T in token order), which saves the
optimizer's X^T G, one C x C product per matrix per step. Elsewhere ``lie_slice`` turns
autograd's G into X^T G (the product moves from the optimizer to the backward).

    use_lie_gradients(model)      every module with a ``lie_gradients`` switch delivers X^T G
                                  and marks its orthogonal weights (``has_lie_gradient``)
    lie_form_gradients(model)     the same for the length of a ``with`` block, then back: how the
                                  training engine opts in (``TrainStep``), so that ``.grad`` holds
                                  G everywhere else
    lie_slice(X, rows, cols)      X[:rows, :cols] whose backward gives X^T G_full, G_full the
                                  slice's gradient zero-padded to X's shape (cost n rows cols)

Under torch.func transforms ``lie_slice`` is plain slicing (autograd's G), and its backward is
differentiable (double backward).

X^T G is linear in G, so summing it over micro-batches, ranks (DDP's reduce, FSDP's
reduce-scatter) or accumulation steps gives X^T of the sum; ||X^T G||_F = ||G||_F for
orthogonal X, so gradient clipping is unchanged (to the drift of X). While the switch is on,
every use of the weight must go through its module's forward.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from ..ops.lie_slice import lie_slice
from .orthogonal import is_orthogonal

__all__ = ["has_lie_gradient", "lie_form_gradients", "lie_slice", "mark_lie_gradient", "use_lie_gradients"]


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


@contextmanager
def lie_form_gradients(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """``use_lie_gradients(model, enabled)`` inside the block; each module's switch and each
    weight's mark come back on exit (also on an exception)."""
    modules = [m for m in model.modules() if hasattr(m, "lie_gradients")]
    before = [(m, m.lie_gradients, [(p, has_lie_gradient(p)) for p in m.parameters(recurse=False)])
              for m in modules]
    use_lie_gradients(model, enabled)
    try:
        yield model
    finally:
        for m, switch, marks in before:
            m.lie_gradients = switch
            for p, mark in marks:
                mark_lie_gradient(p, mark)
