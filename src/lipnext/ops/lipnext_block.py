"""The LipNeXt block as one autograd function: fewer passes over the tokens in eager mode.

    Z = beta_abs(S(U R^T) W + b),  U = X + p,  W = R M^T   (rows are tokens)

Forward: one GEMM, the shift S written once into a fresh buffer by slice copies (no
split/roll/cat), ``addmm`` for the bias, beta-Abs in place on the GEMM's output (its
signs kept). Backward by hand, the same GEMMs as autograd's:

    G = dZ * sign        (first k = beta C channels; 1 elsewhere)
    db = sum G,  dW = S(Y1)^T G,  dY2 = G W^T,  dY1 = S^T dY2,
    dR = dW M + dY1^T U,  dM = dW^T R,  dU = dY1 R.

With ``fuse=False`` (N <= C token rows) W is never formed: T = S(Y1) R, Z = beta_abs(T M^T + b),
dM = G^T T, dT = G M, dR = S(Y1)^T dT + dY1^T U, dY2 = dT R^T. S^T is S with every move
reversed (circular: S^-1). Double backward is not supported (the loss needs none).
"""
from __future__ import annotations

import functools

import torch

__all__ = ["lipnext_block", "fuses", "shift_copies", "apply_copies"]

Index = tuple[slice, ...]


def fuses(x: torch.Tensor) -> bool:
    """Form R M^T for channels-last rows x (N x C)? Forward + backward cost 3 C^3 + 3 N C^2
    multiply-adds fused and 6 N C^2 not (a forward alone C^3 + N C^2 against 2 N C^2): iff N > C."""
    c = x.shape[-1]
    return x.numel() // c > c


@functools.cache
def shift_copies(h: int, w: int, c: int, g: int, padding: str) -> tuple[tuple[Index, Index], ...]:
    """(destination, source) index pairs over (B, h, w, C) such that out[dst] = x[src] is S(x).

    Groups of g channels: up (out[i] = x[i+1] along h), down (x[i-1]), left (x[j+1] along
    w), right (x[j-1]); the other C - 4g channels stay. Circular padding adds the wrapped
    row or column; zero padding leaves it out (those entries are 0)."""
    full = slice(None)
    pairs: list[tuple[Index, Index]] = [((full, full, full, slice(4 * g, c)),) * 2]
    for k, (step, axis) in enumerate(((-1, 1), (1, 1), (-1, 2), (1, 2))):
        n = (h, w)[axis - 1]
        ch = slice(k * g, (k + 1) * g)
        if step > 0:     # out[i] = x[i - 1]; wraps out[0] = x[n - 1]
            moves = [(slice(1, n), slice(0, n - 1)), (slice(0, 1), slice(n - 1, n))]
        else:            # out[i] = x[i + 1]; wraps out[n - 1] = x[0]
            moves = [(slice(0, n - 1), slice(1, n)), (slice(n - 1, n), slice(0, 1))]
        if n == 1:       # a single row: circular S leaves it, zero padding clears it
            moves = [(slice(0, 1), slice(0, 1))] if padding == "circular" else []
        elif padding == "zero":
            moves = moves[:1]
        for dst, src in moves:
            d, s = [full, full, full, ch], [full, full, full, ch]
            d[axis], s[axis] = dst, src
            pairs.append((tuple(d), tuple(s)))
    return tuple(pairs)


def apply_copies(x: torch.Tensor, pairs: tuple[tuple[Index, Index], ...], adjoint: bool,
                 covering: bool) -> torch.Tensor:
    """out[dst] = x[src] for every pair (its adjoint: out[src] = x[dst]); zeros where no pair
    writes unless ``covering`` (every entry written exactly once, as for circular S)."""
    out = torch.empty_like(x) if covering else torch.zeros_like(x)
    for dst, src in pairs:
        if adjoint:
            dst, src = src, dst
        out[dst] = x[src]
    return out


class _Block(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, r: torch.Tensor, m: torch.Tensor, bias: torch.Tensor,
                group: int, padding: str, k: int, fuse: bool) -> torch.Tensor:
        _, h, w, c = u.shape
        pairs = shift_copies(h, w, c, group, padding)
        covering = padding == "circular"
        y2 = apply_copies((u.reshape(-1, c) @ r.mT).view(u.shape), pairs, False, covering)
        rows = y2.view(-1, c)
        if fuse:
            mix = r @ m.mT
            z = torch.addmm(bias, rows, mix)
        else:
            mix = rows @ r
            z = torch.addmm(bias, mix, m.mT)
        sign = z[:, :k].sign()
        z[:, :k].abs_()
        ctx.save_for_backward(u, r, m, y2, mix, sign)
        ctx.shift = (pairs, covering)
        ctx.fuse = fuse
        return z.view(u.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz: torch.Tensor):
        u, r, m, y2, mix, sign = ctx.saved_tensors
        need_u, need_r, need_m, need_b = ctx.needs_input_grad[:4]
        c = u.shape[-1]
        g = dz.reshape(-1, c)
        if sign.shape[1]:                              # G = dZ * sign on the first k channels
            g = g.clone()
            g[:, :sign.shape[1]].mul_(sign)
        rows = y2.view(-1, c)
        db = g.sum(0) if need_b else None
        if ctx.fuse:                                   # mix = W = R M^T
            dw = rows.mT @ g if need_r or need_m else None
            dy2 = g @ mix.mT
            dr = dw @ m if need_r else None
            dm = dw.mT @ r if need_m else None
        else:                                          # mix = T = S(Y1) R
            dm = g.mT @ mix if need_m else None
            dt = g @ m
            dr = rows.mT @ dt if need_r else None
            dy2 = dt @ r.mT
        pairs, covering = ctx.shift
        dy1 = apply_copies(dy2.view(u.shape), pairs, True, covering).view(-1, c)
        if need_r:
            dr = dr + dy1.mT @ u.reshape(-1, c)
        du = (dy1 @ r).view(u.shape) if need_u else None
        return du, dr, dm, db, None, None, None, None


def lipnext_block(u: torch.Tensor, r: torch.Tensor, m: torch.Tensor, bias: torch.Tensor, group: int,
                  padding: str, k: int, fuse: bool | None = None) -> torch.Tensor:
    """beta_abs(S(U R^T) R M^T + b) on channels-last U (..., h, w, C), beta-Abs on the first k
    channels; ``fuse`` forms R M^T (default: iff the N token rows exceed C)."""
    if fuse is None:
        fuse = fuses(u)
    u4 = u.contiguous().view(-1, *u.shape[-3:])        # any leading dims as one batch dim
    return _Block.apply(u4, r, m, bias, group, padding, k, fuse).view(u.shape)
