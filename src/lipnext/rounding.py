"""The float64 step arithmetic: one operation's rounding bound, and its propagation over a ball.

A certified layer describes its forward pass as float64 :class:`Step` s (``lipnext.program``
assembles a model's program from its layers). A step is one mathematical operation
h -> g(h) with a sound Lipschitz bound ``lip`` and an a-priori rounding bound: for any
computed input h^ of one example (of per-example shape ``shape``),

    ||fl(g(h^)) - g(h^)||_2 <= kin ||h^||_2 + kc,     (kin, kc) = step.error(shape),

valid while ||h^|| <= ``max_in`` (no intermediate value of the step can overflow: every
bound keeps a factor 2^23 below the float64 maximum). kc carries the absolute errors of
underflow: TINY = 2^-1021 per affected operation (gradual underflow or flush-to-zero).
docs/RELIABILITY.md, Floating point, derives each constructor's bound.

``propagate`` runs the steps and bounds the error of the computed value against the exact
real-number function at the same input, for x and for every x' of the ball ||x' - x|| <= r:
with E_l = a_l + b_l r, L_l = prod of the ``lip`` of steps 1..l, and
||h^_{l-1}(x')|| <= ||h^_{l-1}(x)|| + L_{l-1} r + 2 E_{l-1} on the ball,

    a_l = lip_l a_{l-1} + kin_l (||h^_{l-1}(x)|| + 2 a_{l-1}) + kc_l
    b_l = lip_l b_{l-1} + kin_l (L_{l-1} + 2 b_{l-1}),          a_0 = b_0 = 0,

and ``reach``, the largest r for which every step's input stays below its ``max_in`` on the
whole ball (0 when x itself leaves float64's range): a certificate never exceeds it.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .bounds import (TINY, U64, abs_norm_bound, abs_norms, gamma, round_up, scale_pow2, scale_pow2_back,
                     spectral_norm_bound)
from .ops.registry import reference_only

__all__ = ["Step", "Propagation", "propagate", "program_lipschitz", "norm_upper", "linear", "linear_chain",
           "translate", "scale", "exact",
           "l2_pool", "residual_conv", "bro_conv", "U64", "UP", "TINY", "OMEGA", "FFT_CONSTANT"]

# Multiplies a norm or a bound computed in float64 from at most 9e9 non-negative terms
# (relative error gamma_m <= 1e-6), making it an upper bound.
UP = 1.0 + 1e-6
# Inputs whose every intermediate value stays below OMEGA cannot overflow float64 (max ~2^1024),
# with a factor 2^23 to spare for the rounding of the bounds themselves.
OMEGA = 2.0 ** 1000
# The normwise error of one float64 FFT of N points is taken as <= FFT_CONSTANT u (log2 N + 1)
# ||x||: radix-2 Cooley-Tukey gives about 5 u per level (Higham, Accuracy and Stability,
# Thm 24.2); mixed-radix and Bluestein FFTs have larger but still modest constants.
# An assumption about the FFT library, measured on the CPU (docs/RELIABILITY.md), not proven.
FFT_CONSTANT = 64.0

Error = Callable[[tuple[int, ...]], tuple[float, float]]


@dataclass(frozen=True)
class Step:
    """One float64 operation g = fn(h): Lip(g) <= lip; rounding <= kin ||h|| + kc with
    (kin, kc) = error(per-example input shape), while ||h|| <= max_in."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    lip: float
    error: Error
    max_in: float = OMEGA


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _cached(error: Error) -> Error:
    """``error`` remembered per shape (a program sees the same shapes batch after batch)."""
    return functools.lru_cache(maxsize=8)(error)


def linear(a: torch.Tensor, name: str = "linear", lip: float | None = None) -> Step:
    """h -> h A^T over the last dim (a GEMM, inner length n, m outputs), any summation order:
    |fl - exact| <= gamma_n |h| |A|^T entrywise, plus per output n TINY (1 + max|A|) of underflow
    and 2^-1022 sum_k |h_k| for weights flushed to zero. ``lip`` (default the Gram bound of A)."""
    a64 = a.detach().to(torch.float64)
    m, n = a64.shape[-2], a64.shape[-1]
    lip = float(spectral_norm_bound(a64)) if lip is None else float(lip)
    abs_norm, amax, row = abs_norms(a64)
    kin = gamma(n) * abs_norm + math.sqrt(m * n) * 2.0 ** -1022
    per_out = n * TINY * (1.0 + amax)

    def error(shape: tuple[int, ...]) -> tuple[float, float]:
        return kin, math.sqrt(_numel(shape) // n * m) * per_out

    return Step(name, lambda h: h @ a64.mT, lip, _cached(error), OMEGA / row if row > 0 else math.inf)


def linear_chain(first: torch.Tensor, second: torch.Tensor, name: str, lip: float) -> Step:
    """h -> (h A1^T) A2^T, computed as one GEMM h P^T with P = fl(A2 A1) formed once in float64
    (inner length k): |P - A2 A1| <= gamma_k |A2| |A1| + k TINY entrywise, so the error is at most
    gamma_n |h| |P|^T + gamma_k |h| |A1|^T |A2|^T + the GEMM's underflow, and
    || |A1|^T |A2|^T ||_2 <= || |A1| ||_2 || |A2| ||_2. ``lip`` bounds ||A2 A1||_2."""
    a1, a2 = first.detach().to(torch.float64), second.detach().to(torch.float64)
    p = a2 @ a1
    (m, n), k = p.shape, a1.shape[0]
    p_abs, amax, row = abs_norms(p)
    kin = (gamma(n) * p_abs + gamma(k) * abs_norm_bound(a1) * abs_norm_bound(a2)
           + math.sqrt(m * n) * (k + 1) * TINY + math.sqrt(m * n) * 2.0 ** -1022)
    per_out = n * TINY * (1.0 + amax)

    def error(shape: tuple[int, ...]) -> tuple[float, float]:
        return kin, math.sqrt(_numel(shape) // n * m) * per_out

    return Step(name, lambda h: h @ p.mT, float(lip), _cached(error), OMEGA / row if row > 0 else math.inf)


def translate(c: torch.Tensor, name: str = "translate") -> Step:
    """h -> h + c (c broadcast to h): |fl - exact| <= u |h + c| <= u (|h| + |c|), plus TINY per
    entry (a sum flushed to zero)."""
    c64 = c.detach().to(torch.float64)
    c_sq = round_up(c64.square().sum(), gamma(max(c64.numel(), 1))).item()
    c_max = c64.abs().max().item() if c64.numel() else 0.0

    def error(shape: tuple[int, ...]) -> tuple[float, float]:
        numel = _numel(shape)
        c_norm = math.sqrt(c_sq * numel / max(c64.numel(), 1)) * (1 + 4 * U64)   # c repeated over h
        return U64, U64 * c_norm + math.sqrt(numel) * TINY

    return Step(name, lambda h: h + c64, 1.0, _cached(error), max(OMEGA - c_max, 0.0))


def scale(s: torch.Tensor | float, divide: bool = False, name: str = "scale") -> Step:
    """h -> h * s (or h / s), s broadcast: one rounding each, |fl - exact| <= u |exact|, plus TINY
    (1 + factor) per entry; Lip = max|s| (or 1 / min|s|)."""
    s64 = torch.as_tensor(s, dtype=torch.float64).detach()
    factor = ((1.0 / s64.abs().amin().item()) * (1 + 4 * U64)) if divide else s64.abs().amax().item()
    fn = (lambda h: h / s64) if divide else (lambda h: h * s64)

    def error(shape: tuple[int, ...]) -> tuple[float, float]:
        return U64 * factor, math.sqrt(_numel(shape)) * TINY * (1.0 + factor)

    return Step(name, fn, factor, _cached(error), OMEGA / factor if factor > 0 else math.inf)


def exact(fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> Step:
    """A 1-Lipschitz operation computed without arithmetic (permutation, |.|, max/min, sorting,
    reshape), so no input overflows it; TINY per entry covers inputs below 2^-1022 read as
    zero (denormals-are-zero)."""
    return Step(name, fn, 1.0, _cached(lambda shape: (0.0, math.sqrt(_numel(shape)) * TINY)), math.inf)


def l2_pool(eps: float = 1e-12, name: str = "pool") -> Step:
    """(h, w, C) -> sqrt(sum_pos h^2 + eps) per channel, P = h w positions: squares, sum, eps,
    sqrt give relative error <= gamma_{P+3}; ||pool(h)|| <= ||h|| + sqrt(C eps); squares that
    underflow lose P TINY of a sum, which the sqrt (slope <= 1 / (2 sqrt(eps))) scales."""

    def error(shape: tuple[int, ...]) -> tuple[float, float]:
        positions, channels = _numel(shape[:-1]), shape[-1]
        g = gamma(positions + 3)
        return g, (g * math.sqrt(channels * eps) + math.sqrt(channels) * positions * TINY
                   / (2 * math.sqrt(eps))) * (1 + 4 * U64)

    return Step(name, lambda h: torch.sqrt(h.square().sum(dim=(-3, -2)) + eps), 1.0, _cached(error),
                math.sqrt(OMEGA) / 2)


def _circular_conv_by_shifts(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Circular cross-correlation (the model's ``circular_conv2d``) as k^2 GEMMs over channels."""
    k1, k2 = w.shape[-2:]
    p1, p2 = k1 // 2, k2 // 2
    out = torch.zeros(x.shape[0], w.shape[0], *x.shape[-2:], dtype=x.dtype, device=x.device)
    for a in range(k1):
        for b in range(k2):
            shifted = torch.roll(x, shifts=(p1 - a, p2 - b), dims=(-2, -1))
            out = out + torch.einsum("oc,bchw->bohw", w[:, :, a, b], shifted)
    return out


def residual_conv(weight: torch.Tensor, lip: float, name: str = "residual_conv") -> Step:
    """h -> h + conv_W(h) (circular): the conv is one sum of C k^2 products per output
    (gamma_{Ck^2} |W| * |h|, and || |W| * |h| || <= sigma(sum_ab |W_ab|) ||h||), then one
    addition; C k^2 + 1 operations per output may underflow."""
    w64 = weight.detach().to(torch.float64)
    terms = w64.shape[1] * w64.shape[2] * w64.shape[3]
    s_abs = abs_norm_bound(w64.abs().sum(dim=(-2, -1)))
    g = gamma(terms)
    kin = g * s_abs + U64 * (1 + s_abs) * (1 + g)
    per_out = (terms + 1) * TINY * (1.0 + w64.abs().max().item())
    fro = round_up(torch.linalg.vector_norm(w64), gamma(w64.numel() + 1)).item()

    def error(shape: tuple[int, ...]) -> tuple[float, float]:
        return kin, math.sqrt(_numel(shape)) * per_out

    return Step(name, lambda h: h + _circular_conv_by_shifts(h, w64), float(lip), _cached(error), OMEGA / (1 + fro))


def bro_conv(spectrum: torch.Tensor, grid: tuple[int, int], lip: float, name: str = "bro_conv") -> Step:
    """h -> irfft2(W(f) rfft2(h)) (orthonormal FFTs, W(f) per frequency, complex).

    Rounding <= 4 (c_F (1 + G) + gamma_{C+2} F) ||h|| with c_F the FFT bound
    (``FFT_CONSTANT``), G = max_f ||W(f)||_2 (= ``lip``) and F = max_f ||W(f)||_F; underflow
    TINY (1 + F) per operation on each output's path (2 FFTs of log2 N levels, C products)."""
    spec = spectrum.detach().to(torch.complex128)
    n = grid[0] * grid[1]
    levels = math.log2(max(n, 2)) + 1
    c_f = FFT_CONSTANT * U64 * levels
    fro = torch.linalg.matrix_norm(spec, ord="fro").amax().item() * (1 + gamma(spec.shape[-1] ** 2 + 2)) * 2
    kin = 4 * (c_f * (1 + lip) + gamma(spec.shape[-1] + 2) * fro)
    per_out = (8 * levels + 2 * spec.shape[-1] + 4) * TINY * (1.0 + fro)

    def fn(h: torch.Tensor) -> torch.Tensor:
        hf = torch.fft.rfft2(h, norm="ortho")
        return torch.fft.irfft2(torch.einsum("hwoc,bchw->bohw", spec, hf), s=grid, norm="ortho")

    def error(shape: tuple[int, ...]) -> tuple[float, float]:
        return kin, math.sqrt(_numel(shape)) * per_out

    return Step(name, fn, float(lip), _cached(error), OMEGA / (n * (1 + fro)))


def norm_upper(h: torch.Tensor) -> torch.Tensor:
    """Per example (first dim), an upper bound of ||h_i||_2 at every scale: sqrt(sum h^2) with its
    relative error gamma_{n+1}, plus sqrt(n TINY) for squares that underflow (each loses <= TINY);
    an example whose sum overflows is computed again on 2^s h_i (max entry in [1, 2))."""
    flat = h.reshape(h.shape[0], _numel(tuple(h.shape[1:])))
    n = flat.shape[1]
    if n == 0:
        return flat.new_zeros(flat.shape[0])
    norm = round_up(torch.linalg.vector_norm(flat, dim=1), gamma(n + 1)) + math.sqrt(n * TINY)
    big = torch.isinf(norm)
    if bool(big.any()):
        hs, s = scale_pow2(flat[big], dims=(1,))
        scaled = round_up(torch.linalg.vector_norm(hs, dim=1), gamma(n + 1))
        norm[big] = round_up(scale_pow2_back(scaled, s[:, 0]), U64)
    return norm


@dataclass
class Propagation:
    """A program run on a batch: float64 features; ||f^(x') - f(x')|| <= a + b r on the ball of
    radius r <= reach (a and reach per example, b the same for all); lip = the product of the
    steps' bounds, rounded up."""

    features: torch.Tensor
    a: torch.Tensor
    b: float
    lip: float
    reach: torch.Tensor


def program_lipschitz(steps: list[Step]) -> tuple[float, float]:
    """(product of the steps' ``lip`` as computed, an upper bound of the exact product)."""
    lip = 1.0
    for step in steps:
        lip *= step.lip
    tol = gamma(4 * len(steps) + 4)
    return lip, lip * (1 + 2 * tol + 4 * U64)


def propagate(steps: list[Step], x: torch.Tensor) -> Propagation:
    """Run ``steps`` on x in float64 and bound the error on the whole ball (module doc).

    The norms are computed as sqrt(sum h^2) and rounded up inside the recurrences (factor
    1 + 2 gamma_{n+1} + 4u, plus sqrt(n TINY) for squares that underflow); a norm that overflows
    is inf, which makes the reach 0 (the ball leaves float64's range). b and L do not depend on
    the example: they are floats. The reach is min over the steps of
    (max_in - ||h^_{l-1}(x)|| - 2 a_{l-1}) / (L_{l-1} + 2 b_{l-1})."""
    h = x.to(torch.float64)
    a = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
    b, lip = 0.0, 1.0
    # ||h^_{l-1}|| + 2 a_{l-1} per checked step, written into one buffer (small tensors kept alive
    # between the steps' large temporaries fragment the CPU heap and cost page faults)
    seen = torch.empty(len(steps), h.shape[0], dtype=torch.float64, device=h.device)
    room = []
    with reference_only():                   # the arithmetic the rounding bounds describe
        for step in steps:
            shape = tuple(h.shape[1:])
            n = _numel(shape)
            kin, kc = step.error(shape)
            if kin == 0 and step.max_in == math.inf:     # no rounding relative to ||h||, no overflow
                a = a * step.lip + kc
            else:
                c_rel, c_abs = 1 + 2 * gamma(n + 1) + 4 * U64, TINY + math.sqrt(n * TINY)
                norm = torch.linalg.vector_norm(h.reshape(h.shape[0], n), dim=1)
                torch.add(norm * c_rel + c_abs, a, alpha=2, out=seen[len(room)])
                room.append((step.max_in, lip + 2 * b))
                a = a * (step.lip + 2 * kin) + norm * (kin * c_rel) + (kin * c_abs + kc)
                b = step.lip * b + kin * (lip + 2 * b)
            lip *= step.lip
            h = step.fn(h)
    reach = torch.full_like(a, math.inf)
    if room:
        max_in, slope = (torch.tensor(v, dtype=torch.float64, device=a.device)[:, None] for v in zip(*room))
        left = (max_in - seen[:len(room)]) * (1 - 1e-6)
        reach = torch.nan_to_num(torch.where(left > 0, left / slope, 0.0).amin(0), nan=0.0)
    ops = gamma(8 * len(steps) + 8)
    return Propagation(h, round_up(a, ops), float(round_up(torch.tensor(b), ops)),
                       program_lipschitz(steps)[1], reach)
