"""Spatial shift of channels-last tokens (B, h, w, C): four channel groups of size g moved
by one position up, down, left and right, the rest unchanged. ``circular`` wraps around
(a permutation of the coordinates); ``zero`` drops what leaves the grid and lets zeros in
(a coordinate projection followed by a permutation). S is a list of slice copies
out[dst] = x[src] into a fresh tensor (``shift_copies``), whose adjoint S^T reverses each
copy. ``shift_`` applies S or S^T in place, copying only the moved channels: the form
``ops.lipnext_block`` uses in its forward and its hand-written backward. Under
torch.compile S is ``functional`` (rolls and one concatenation), which the compiler fuses."""
from __future__ import annotations

import functools

import torch

from .registry import kernel_op

__all__ = ["PADDINGS", "apply_copies", "functional", "reference", "shift_", "shift_copies",
           "spatial_shift"]

Index = tuple[slice, ...]

PADDINGS = ("circular", "zero")


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


@functools.cache
def _moves(shape: tuple[int, ...], group: int, padding: str) -> tuple[tuple[tuple[int, ...], int, int, int, int], ...]:
    """The moves of ``shift_copies`` as (size, offset of dst in x, of src in the buffer, of src
    in x, of dst in the buffer) for contiguous x (B, h, w, C) and buffer (B, h, w, 4g)."""
    b, h, w, c = shape
    xs, ms = (h * w * c, w * c, c, 1), (h * w * 4 * group, w * 4 * group, 4 * group, 1)

    def place(index: Index) -> tuple[tuple[int, ...], int, int]:
        spans = [sl.indices(n)[:2] for sl, n in zip(index, shape)]
        return (tuple(hi - lo for lo, hi in spans), sum(lo * st for (lo, _), st in zip(spans, xs)),
                sum(lo * st for (lo, _), st in zip(spans, ms)))

    moves = []
    for dst, src in shift_copies(h, w, c, group, padding)[1:]:   # [0] is the kept channels
        (size, dst_x, dst_m), (_, src_x, src_m) = place(dst), place(src)
        moves.append((size, dst_x, src_m, src_x, dst_m))
    return tuple(moves)


def shift_(x: torch.Tensor, group: int, padding: str, adjoint: bool = False) -> torch.Tensor:
    """S(x) (``adjoint``: S^T(x)) in place on contiguous channels-last x (B, h, w, C): the kept
    channels 4g: stay where they are, the 4g moved ones are copied once into a buffer and back
    into their new places (half the bytes of ``apply_copies`` into a fresh tensor at g = C/8),
    each copy between two precomputed strided views."""
    if group == 0:
        return x
    if not x.is_contiguous():
        raise ValueError("shift_ needs a contiguous (B, h, w, C) tensor")
    moved = x[..., :4 * group].clone(memory_format=torch.contiguous_format)
    if padding != "circular":                     # zero padding: the let-in entries stay 0
        x[..., :4 * group].zero_()
    xs, ms, base = x.stride(), moved.stride(), x.storage_offset()
    for size, dst_x, src_m, src_x, dst_m in _moves(tuple(x.shape), group, padding):
        if adjoint:                               # S^T: x[src] = moved[dst]
            dst_x, src_m = src_x, dst_m
        x.as_strided(size, xs, base + dst_x).copy_(moved.as_strided(size, ms, src_m))
    return x


def _moved(x: torch.Tensor, step: int, dim: int, padding: str) -> torch.Tensor:
    """out[i] = x[i - step] along dim (step +-1): a roll, or with a zero row let in."""
    n = x.shape[dim]
    if padding == "circular":
        return torch.roll(x, step, dims=dim)
    if n == 1:
        return torch.zeros_like(x)
    kept = x.narrow(dim, 0, n - 1) if step > 0 else x.narrow(dim, 1, n - 1)
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([zero, kept] if step > 0 else [kept, zero], dim)


def functional(x: torch.Tensor, group: int, padding: str = "circular") -> torch.Tensor:
    """S as one expression (rolls and a concatenation, no in-place writes): the form that
    torch.compile fuses into one pass (the slice copies of ``reference`` trace into one
    full-size scatter per copy). Equal to ``reference``, element for element."""
    if group == 0:
        return x
    moved = [_moved(x[..., k * group:(k + 1) * group], step, dim, padding)
             for k, (step, dim) in enumerate(((-1, -3), (1, -3), (-1, -2), (1, -2)))]
    return torch.cat([*moved, x[..., 4 * group:]], -1)


def reference(x: torch.Tensor, group: int, padding: str = "circular") -> torch.Tensor:
    """Move four channel groups of size ``group`` by +-1 along h and w (any leading dims);
    inside torch.compile, ``functional``."""
    if torch.compiler.is_compiling():
        return functional(x, group, padding)
    if group == 0:
        return x
    h, w, c = x.shape[-3:]
    x4 = x.reshape(-1, h, w, c)
    return apply_copies(x4, shift_copies(h, w, c, group, padding), False,
                        padding == "circular").view(x.shape)


spatial_shift = kernel_op("shift", reference)
