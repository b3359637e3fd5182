"""A-priori bound of the float64 rounding error of a trunk, on a whole L2 ball.

Certification runs the trunk in float64 as a *program*: a list of :class:`Step` s, each
one mathematical operation h -> g(h) with a sound Lipschitz bound ``lip`` and an
a-priori rounding bound, for any computed input h^:

    ||fl(g(h^)) - g(h^)||_2 <= kin ||h^||_2 + kc          (per example)

(docs/RELIABILITY.md, Floating point, derives each one). With E_l a bound of the error
||h^_l - h_l|| of the computed value after step l (against the exact real-number trunk at
the same input), and L_l = prod of the ``lip`` of steps 1..l,

    E_l <= lip_l E_{l-1} + kin_l ||h^_{l-1}|| + kc_l.

For every x' of the ball ||x' - x|| <= r the input norm is bounded by its value at x:
||h^_{l-1}(x')|| <= ||h^_{l-1}(x)|| + L_{l-1} r + 2 E_{l-1}, so E_l = a_l + b_l r is
affine in r (``propagate``), and holds at x and at every x' of the ball. A program
depends on the architecture: ``trunk_program`` has LipNeXt, LiResNet and BRONet; any
other model may supply ``rounding_program()`` built from the step constructors here.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .bounds import abs_norm_bound, gamma, residual_conv_norm_bound, spectral_norm_bound
from .nn.modes import evaluating
from .ops.patchify import patchify
from .ops.registry import reference_only

__all__ = ["Step", "Float64Twin", "float64_twin", "float64_twin_or_none", "trunk_program", "propagate",
           "linear", "translate", "scale", "exact", "l2_pool", "residual_conv", "bro_conv", "U64",
           "UP", "FFT_CONSTANT"]

U64 = 2.0 ** -53
# Multiplies every norm and every bound computed in float64 from nonnegative terms: such a
# quantity of m <= 9e9 terms has relative error <= gamma_m <= 1e-6, so UP makes it an upper bound.
UP = 1.0 + 1e-6
# The normwise error of one float64 FFT of N points is taken as <= FFT_CONSTANT u (log2 N + 1)
# ||x||: radix-2 Cooley-Tukey gives about 5 u per level (Higham, Accuracy and Stability,
# Thm 24.2); mixed-radix and Bluestein FFTs have larger but still modest constants.
FFT_CONSTANT = 64.0


@dataclass
class Step:
    """One trunk operation: g = fn(h) in float64, Lip(g) <= lip, rounding <= kin ||h|| + kc."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    lip: float
    kin: float = 0.0
    kc: float = 0.0


def linear(a: torch.Tensor, name: str = "linear") -> Step:
    """h -> h A^T over the last dim (a GEMM): |fl - exact| <= gamma_n |h| |A|^T entrywise."""
    a64 = a.detach().to(torch.float64)
    n = a64.shape[-1]
    return Step(name, lambda h: h @ a64.mT, float(spectral_norm_bound(a64)) * UP,
                kin=gamma(n) * abs_norm_bound(a64))


def translate(c: torch.Tensor, numel: int, name: str = "translate") -> Step:
    """h -> h + c (c broadcast to ``numel`` entries per example): |fl - exact| <= u (|h| + |c|)."""
    c64 = c.detach().to(torch.float64)
    c_norm = math.sqrt(c64.square().sum().item() * numel / max(c64.numel(), 1)) * UP
    return Step(name, lambda h: h + c64, 1.0, kin=U64, kc=U64 * c_norm)


def scale(s: torch.Tensor | float, divide: bool = False, name: str = "scale") -> Step:
    """h -> h * s (or h / s), s broadcast: one rounding each, |fl - exact| <= u |exact|."""
    s64 = torch.as_tensor(s, dtype=torch.float64).detach()
    factor = (1.0 / s64.abs().amin().item()) if divide else s64.abs().amax().item()
    factor *= UP
    fn = (lambda h: h / s64) if divide else (lambda h: h * s64)
    return Step(name, fn, factor, kin=U64 * factor)


def exact(fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> Step:
    """A 1-Lipschitz operation computed without rounding (permutation, |.|, max/min, reshape)."""
    return Step(name, fn, 1.0)


def l2_pool(positions: int, channels: int, eps: float = 1e-12) -> Step:
    """(B, h, w, C) -> sqrt(sum_pos h^2 + eps): squares, sum, eps, sqrt give relative error
    <= gamma_{P+3}; ||pool(h)|| <= ||h|| + sqrt(C eps)."""
    g = gamma(positions + 3)
    return Step("pool", lambda h: torch.sqrt(h.square().sum(dim=(-3, -2)) + eps), 1.0,
                kin=g, kc=g * math.sqrt(channels * eps) * UP)


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


def residual_conv(weight: torch.Tensor, lip: float) -> Step:
    """h -> h + conv_W(h) (circular): the conv is one sum of C k^2 products per output
    (gamma_{Ck^2} |W| * |h|, and || |W| * |h| || <= sigma(sum_ab |W_ab|) ||h||), then one addition."""
    w64 = weight.detach().to(torch.float64)
    s_abs = abs_norm_bound(w64.abs().sum(dim=(-2, -1)))
    g = gamma(w64.shape[1] * w64.shape[2] * w64.shape[3])
    kin = g * s_abs + U64 * (1 + s_abs) * (1 + g)
    return Step("residual_conv", lambda h: h + _circular_conv_by_shifts(h, w64), lip * UP, kin=kin)


def bro_conv(spectrum: torch.Tensor, grid: tuple[int, int], lip: float) -> Step:
    """h -> irfft2(W(f) rfft2(h)) (orthonormal FFTs, W(f) per frequency, complex).

    Rounding <= 4 (c_F (1 + G) + gamma_{C+2} F) ||h|| with c_F the FFT bound
    (``FFT_CONSTANT``), G = max_f ||W(f)||_2 (= ``lip``) and F = max_f ||W(f)||_F.
    """
    spec = spectrum.detach().to(torch.complex128)
    n = grid[0] * grid[1]
    c_f = FFT_CONSTANT * U64 * (math.log2(max(n, 2)) + 1)
    fro = torch.linalg.matrix_norm(spec, ord="fro").amax().item() * UP
    kin = 4 * (c_f * (1 + lip) + gamma(spec.shape[-1] + 2) * fro)

    def fn(h: torch.Tensor) -> torch.Tensor:
        hf = torch.fft.rfft2(h, norm="ortho")
        return torch.fft.irfft2(torch.einsum("hwoc,bchw->bohw", spec, hf), s=grid, norm="ortho")

    return Step("bro_conv", fn, lip * UP, kin=kin)


def _positional(enc: nn.Module) -> torch.Tensor | None:
    """The p that a block's positional encoding adds: its own, the shared one, or None."""
    from .nn.stem import PositionalEncoding, SharedPositionalEncoding
    if isinstance(enc, SharedPositionalEncoding):
        enc = enc._owner[0]
    return enc.pos if isinstance(enc, PositionalEncoding) else None


def _lipnext_program(m) -> list[Step]:
    stem = m.stem
    hw, p, c = m.image_size, m.patch_size, m.cfg.width
    tokens = (hw[0] // p) * (hw[1] // p)
    steps = [translate(-stem.mean, m.in_chans * hw[0] * hw[1], "stem.mean")]
    if stem.inv_std is not None:
        steps.append(scale(stem.inv_std, name="stem.inv_std"))
    steps += [exact(lambda x: patchify(x, p), "patchify"), linear(stem.matrix(), "stem")]
    for i, blk in enumerate(m.blocks):
        r = blk.R.detach().to(torch.float64)   # one float64 copy for R and its transpose (a view)
        pos = _positional(blk.pos)
        steps += [translate(pos, tokens * c, f"blocks.{i}.pos")] if pos is not None else []
        steps += [linear(r, f"blocks.{i}.R"), exact(blk.shift, f"blocks.{i}.shift"),
                  linear(r.mT, f"blocks.{i}.R^T"), linear(blk.M, f"blocks.{i}.M"),
                  translate(blk.bias, tokens * c, f"blocks.{i}.bias"),
                  exact(blk.act, f"blocks.{i}.act")]
    return steps + [l2_pool(tokens, c)]


def _conv_trunk_program(m, block_steps: Callable[[int, nn.Module], list[Step]]) -> list[Step]:
    hw, p, c = m.image_size, m.patch_size, m.cfg.width
    tokens = (hw[0] // p) * (hw[1] // p)
    steps = [translate(-m.mean, m.in_chans * hw[0] * hw[1], "mean"),
             exact(lambda x: patchify(x, p), "patchify"), linear(m.stem.matrix(), "stem")]
    if m.stem.bias is not None:
        steps.append(translate(m.stem.bias, tokens * c, "stem.bias"))
    steps.append(exact(lambda x: x.permute(0, 3, 1, 2), "channels_first"))
    for i, blk in enumerate(m.blocks):
        steps += block_steps(i, blk)
    steps += [exact(lambda x: x.permute(0, 2, 3, 1), "channels_last"), l2_pool(tokens, c)]
    for i, layer in enumerate(m.dense):
        steps.append(linear(layer.matrix(), f"dense.{i}"))
        if layer.bias is not None:
            steps.append(translate(layer.bias, layer.out_features, f"dense.{i}.bias"))
        steps.append(exact(m.act, f"dense.{i}.act"))
    return steps


def _liresnet_block(i: int, blk) -> list[Step]:
    numel = blk.width * blk.grid[0] * blk.grid[1]
    return [residual_conv(blk.weight, residual_conv_norm_bound(blk.weight, blk.grid)),
            scale(blk.sigma, divide=True, name=f"blocks.{i}.1/s"),
            translate(blk.bias, numel, f"blocks.{i}.bias"), exact(blk.act, f"blocks.{i}.act")]


def _bronet_block(i: int, blk) -> list[Step]:
    conv = blk.conv
    numel = conv.channels * conv.grid[0] * conv.grid[1]
    return [bro_conv(conv.spectrum(), conv.grid, conv.lipschitz_bound()),
            translate(blk.bias, numel, f"blocks.{i}.bias"), exact(blk.act, f"blocks.{i}.act")]


@torch.no_grad()
def trunk_program(model) -> list[Step]:
    """The float64 program of ``model.forward_features`` (model in eval mode)."""
    from .models.bronet import BRONet
    from .models.liresnet import LiResNet
    from .models.lipnext import LipNeXt
    if hasattr(model, "rounding_program"):
        return list(model.rounding_program())
    if isinstance(model, LipNeXt):
        return _lipnext_program(model)
    if isinstance(model, LiResNet):
        return _conv_trunk_program(model, _liresnet_block)
    if isinstance(model, BRONet):
        return _conv_trunk_program(model, _bronet_block)
    raise TypeError(f"no float64 rounding program for {type(model).__name__}: give the model a "
                    "rounding_program() method (a list of lipnext.rounding steps), or certify with "
                    "rounding_guard=False for the exact-arithmetic formula (not sound under rounding)")


def propagate(steps: list[Step], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(features, a, b, L): float64 features of x and the error bound a + b r per example,
    valid at x and at every x' with ||x' - x|| <= r; L the product of the steps' bounds."""
    h = x.to(torch.float64)
    n = h.shape[0]
    a = torch.zeros(n, dtype=torch.float64, device=h.device)
    b = torch.zeros_like(a)
    lip = 1.0
    with reference_only():                   # the arithmetic the rounding bounds describe
        for step in steps:
            norm = h.flatten(1).norm(dim=1) * UP
            a, b = (step.lip * a + step.kin * (norm + 2 * a) + step.kc,
                    step.lip * b + step.kin * (lip + 2 * b))
            lip *= step.lip
            h = step.fn(h)
    return h, a * UP, b * UP, lip


class Float64Twin(nn.Module):
    """The model's trunk and head in float64, as certification computes them."""

    def __init__(self, model):
        super().__init__()
        self.steps = trunk_program(model)
        self.weight = model.head_weight().detach().to(torch.float64)
        zero = torch.zeros(1, self.weight.shape[1], dtype=torch.float64, device=self.weight.device)
        self.bias = model.forward_head(zero).detach().to(torch.float64)[0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float64)
        with reference_only():               # the arithmetic the rounding bounds describe
            for step in self.steps:
                h = step.fn(h)
        return h

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.weight.mT + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@torch.no_grad()
def float64_twin(model) -> Float64Twin:
    """The float64 twin of ``model`` (eval mode, autocast off): the predictions it computes
    are the ones a certificate of ``lipnext.certify`` covers, with the exact model's."""
    from .certify import standard_numerics
    with evaluating(model), standard_numerics(model):
        return Float64Twin(model)


def float64_twin_or_none(model) -> Float64Twin | None:
    """``float64_twin(model)``, or None for a model without a float64 rounding program."""
    try:
        return float64_twin(model)
    except TypeError:
        return None
