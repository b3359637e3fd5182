"""The LipNeXt block as one autograd function: fewer passes over the tokens in eager mode.

    Z = beta_abs(S(U R^T) W + b),  U = X + p,  W = R M^T   (rows are tokens)

Forward: one GEMM, the shift S applied in place to its output (``ops.shift.shift_``: only
the moved channels are copied, no split/roll/cat), ``addmm`` for the bias, beta-Abs in place on the GEMM's output (its
signs kept). Backward by hand, the same GEMMs as autograd's:

    G = dZ * sign        (first k = beta C channels; 1 elsewhere)
    db = sum G,  dW = S(Y1)^T G,  dY2 = G W^T,  dY1 = S^T dY2 (in place),
    dR = dW M + dY1^T U,  dM = dW^T R,  dU = dY1 R.

With ``fuse=False`` (N <= C token rows) W is never formed: T = S(Y1) R, Z = beta_abs(T M^T + b),
dM = G^T T, dT = G M, dR = S(Y1)^T dT + dY1^T U, dY2 = dT R^T. S^T is S with every move
reversed (circular: S^-1).

Higher-order autograd and torch.func: under a torch.func transform (jvp, vjp, jacrev, vmap,
grad) ``lipnext_block`` is ``reference``, autograd's composition of plain ops; a backward
with ``create_graph=True`` (grad mode on inside it) differentiates ``reference`` again from
the saved inputs, so double backward gives autograd's values.

``lie=True`` returns the gradients in Lie form (``lipnext.nn.lie``), R^T dR and M^T dM, for
the products that G alone would cost: with P = R^T dW M (two C^3 products, as dW M and
dW^T R were), R^T dR = P + dU^T U and M^T dM = P^T fused; R^T dR = T^T dT + dU^T U and
M^T dM = dT^T T in token order (the same token GEMMs as dR and dM).
"""
from __future__ import annotations

import torch

from .beta_abs import beta_abs
from .lie_slice import lie_slice
from .shift import shift_, spatial_shift

__all__ = ["lipnext_block", "fuses", "reference"]


def fuses(x: torch.Tensor) -> bool:
    """Form R M^T for channels-last rows x (N x C)? Forward + backward cost 3 C^3 + 3 N C^2
    multiply-adds fused and 6 N C^2 not (a forward alone C^3 + N C^2 against 2 N C^2): iff N > C."""
    c = x.shape[-1]
    return x.numel() // c > c


def reference(u: torch.Tensor, r: torch.Tensor, m: torch.Tensor, bias: torch.Tensor, group: int,
              padding: str, k: int) -> torch.Tensor:
    """beta_abs(S(U R^T) R M^T + b) through autograd (plain ops, torch.func-compatible)."""
    return beta_abs(spatial_shift(u @ r.mT, group, padding) @ r @ m.mT + bias, k)


class _Block(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, r: torch.Tensor, m: torch.Tensor, bias: torch.Tensor,
                group: int, padding: str, k: int, fuse: bool, lie: bool) -> torch.Tensor:
        c = u.shape[-1]
        y2 = shift_((u.reshape(-1, c) @ r.mT).view(u.shape), group, padding)
        rows = y2.view(-1, c)
        if fuse:
            mix = r @ m.mT
            z = torch.addmm(bias, rows, mix)
        else:
            mix = rows @ r
            z = torch.addmm(bias, mix, m.mT)
        sign = z[:, :k].sign()
        z[:, :k].abs_()
        ctx.save_for_backward(u, r, m, bias, y2, mix, sign)
        ctx.shift = (group, padding)
        ctx.fuse, ctx.lie, ctx.k = fuse, lie, k
        return z.view(u.shape)

    @staticmethod
    def backward(ctx, dz: torch.Tensor):
        if torch.is_grad_enabled():                    # create_graph: autograd's composition, again
            return _Block._differentiable_backward(ctx, dz)
        u, r, m, _, y2, mix, sign = ctx.saved_tensors
        need_u, need_r, need_m, need_b = ctx.needs_input_grad[:4]
        c = u.shape[-1]
        g = dz.reshape(-1, c)
        if sign.shape[1]:                              # G = dZ * sign on the first k channels
            g = g.clone()
            g[:, :sign.shape[1]].mul_(sign)
        rows = y2.view(-1, c)
        db = g.sum(0) if need_b else None
        lie = ctx.lie
        if ctx.fuse:                                   # mix = W = R M^T
            dw = rows.mT @ g if need_r or need_m else None
            dy2 = g @ mix.mT
            if lie and (need_r or need_m):             # P = R^T dW M: R^T dR = P + ..., M^T dM = P^T
                dr = r.mT @ (dw @ m)
                dm = dr.mT if need_m else None
            else:
                dr = dw @ m if need_r else None
                dm = dw.mT @ r if need_m else None
        else:                                          # mix = T = S(Y1) R
            dt = g @ m
            if lie:                                    # M^T dM = dT^T T, R^T dR = T^T dT + ...
                dm = dt.mT @ mix if need_m else None
                dr = mix.mT @ dt if need_r else None
            else:
                dm = g.mT @ mix if need_m else None
                dr = rows.mT @ dt if need_r else None
            dy2 = dt @ r.mT
        dy1 = shift_(dy2.view(u.shape), *ctx.shift, adjoint=True).view(-1, c)
        du = dy1 @ r if need_u or (lie and need_r) else None
        if need_r:                                     # + dY1^T U, or + dU^T U in Lie form
            dr = dr + (du if lie else dy1).mT @ u.reshape(-1, c)
        return (du.view(u.shape) if need_u else None), (dr if need_r else None), dm, db, \
            None, None, None, None, None

    @staticmethod
    def _differentiable_backward(ctx, dz: torch.Tensor):
        """The gradients of ``reference`` at the saved inputs, with their own graph (in Lie form
        R and M enter through ``lie_slice``, so every order of gradient into them is X^T G)."""
        u, r, m, bias = ctx.saved_tensors[:4]
        needs = ctx.needs_input_grad[:4]
        inputs = [t for t, need in zip((u, r, m, bias), needs) if need]
        mix = (lie_slice(r), lie_slice(m)) if ctx.lie else (r, m)
        z = reference(u, *mix, bias, *ctx.shift, ctx.k)
        got = iter(torch.autograd.grad(z, inputs, dz, create_graph=True))
        return (*(next(got) if need else None for need in needs), None, None, None, None, None)


def lipnext_block(u: torch.Tensor, r: torch.Tensor, m: torch.Tensor, bias: torch.Tensor, group: int,
                  padding: str, k: int, fuse: bool | None = None, lie: bool = False) -> torch.Tensor:
    """beta_abs(S(U R^T) R M^T + b) on channels-last U (..., h, w, C), beta-Abs on the first k
    channels; ``fuse`` forms R M^T (default: iff the N token rows exceed C); ``lie``: the
    gradients of R and M come as R^T dR and M^T dM."""
    if torch._C._are_functorch_transforms_active():
        return reference(u, r, m, bias, group, padding, k)
    if fuse is None:
        fuse = fuses(u)
    u4 = u.contiguous().view(-1, *u.shape[-3:])        # any leading dims as one batch dim
    return _Block.apply(u4, r, m, bias, group, padding, k, fuse, lie).view(u.shape)
