"""LipNeXt: orthogonal channel mixing around parameter-free spatial shifts.

Block (docs/CORE.md, Model), tokens X channels-last:

    Z = beta_abs(M R^T S(R (X + p)) + b)

with R, M orthogonal, S the circular spatial shift, p a positional encoding. In row
form (tokens are rows) this is ((X + p) R^T) -> S -> (. R M^T) + b: two GEMMs over the
N = B*h*w token rows plus one C x C product R M^T when N > C, else three token GEMMs
((. R) then (. M^T)), whichever costs less (``channel_mix``).
Trunk: stem -> blocks -> L2 pooling, with Lipschitz bound
L = s_in * ||W_stem|| * prod_blocks ||R||^2 ||M|| (measured, docs/CORE.md, Certificates);
each layer writes its own float64 steps next to its forward (``rounding_steps``), and
``rounding_program`` assembles them (``lipnext.program``).

Ablation switches (constructor options, saved in the config): ``pos_encoding`` ``block``
(one p per block), ``shared`` (one p for all blocks) or ``none``; ``padding`` of S
``circular`` or ``zero`` (||S|| <= 1); ``activation`` ``beta_abs``, ``minmax`` or
``identity`` (or one added by ``register_activation``). Each declares its own bound,
which the block's bound multiplies in (1 for the built-in ones).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..bounds import spectral_norm_bound
from ..ops.lipnext_block import fuses, lipnext_block
from ..nn import (L2Pool, NormalizedLinear, OrthogonalParameter, OrthogonalPatchStem,
                  PositionalEncoding, SpatialShift, random_orthogonal)
from ..nn.activation import BetaAbs, activation_names, make_activation
from ..nn.lie import lie_slice
from ..nn.stem import SharedPositionalEncoding
from ..program import lipschitz_of, steps_of
from ..rounding import Step, linear, linear_chain, translate
from .base import CertifiableConfig, CertifiableModel, check_images
from .registry import register_arch, register_sizes

__all__ = ["COMPILE_MODES", "LipNeXt", "LipNeXtBlock", "LipNeXtConfig", "POS_ENCODINGS", "compile_mode",
           "compiles", "set_compile"]

POS_ENCODINGS = ("block", "shared", "none")


class LipNeXtBlock(nn.Module):
    """Z = beta_abs(M R^T S(R (X + p)) + b) on channels-last tokens."""

    def __init__(self, width: int, grid: tuple[int, int], alpha: float = 1 / 8, beta: float = 0.5,
                 pos: PositionalEncoding | None | str = "block", padding: str = "circular",
                 activation: str = "beta_abs"):
        """``pos``: "block" (its own p), a shared ``PositionalEncoding`` (p of another
        module), or None (no p: X + p becomes X)."""
        super().__init__()
        if isinstance(pos, PositionalEncoding):
            self.pos = SharedPositionalEncoding(pos)
        elif pos == "block":
            self.pos = PositionalEncoding(grid)
        elif pos is None:
            self.pos = nn.Identity()
        else:
            raise ValueError(f"pos must be 'block', a PositionalEncoding or None, got {pos!r}")
        self.R = OrthogonalParameter(random_orthogonal(width))
        self.M = OrthogonalParameter(random_orthogonal(width))
        self.shift = SpatialShift(width, alpha, padding)
        self.bias = nn.Parameter(torch.zeros(width))
        self.act = make_activation(activation, width, beta)

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        """bound(R)^2 bound(M) times the bounds of p, S and the activation (1 for the built-in ones)."""
        r, m = spectral_norm_bound(torch.stack([self.R, self.M])).tolist()
        return (r * r * m * lipschitz_of(self.pos, "pos") * lipschitz_of(self.shift, "shift")
                * lipschitz_of(self.act, "act"))

    @torch.no_grad()
    def rounding_steps(self, name: str) -> list[Step]:
        """+ p, GEMM by R^T, S, one GEMM by R M^T (formed once in float64, its rounding in the
        step's bound), + b, the activation."""
        r = self.R.detach().to(torch.float64)
        r_lip, m_lip = spectral_norm_bound(torch.stack([self.R, self.M])).tolist()
        return [*steps_of(self.pos, f"{name}.pos"), linear(r, f"{name}.R", lip=r_lip),
                *steps_of(self.shift, f"{name}.shift"),
                linear_chain(r.mT, self.M, f"{name}.RM^T", lip=r_lip * m_lip),
                translate(self.bias, f"{name}.bias"), *steps_of(self.act, f"{name}.act")]

    #: deliver R^T dR and M^T dM as the gradients of R and M (``lipnext.nn.lie``; switched on
    #: by ``build_optimizer`` through ``use_lie_gradients``): the optimizer then skips X^T G.
    lie_gradients: bool = False

    #: torch.compile the block (fusing shift, beta-Abs, bias and positional add around the
    #: GEMMs): "auto" (on CUDA), True or False; ``set_compile`` sets it on a whole model.
    compile_mode: bool | str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return block_forward(self, x)      # inside a compiled caller: traced as is
        if torch._C._are_functorch_transforms_active():
            return block_forward(self, x, lie=False)   # torch.func: autograd's composition only
        if compiles(self.compile_mode, x.device):
            try:
                return _compiled_block_forward()(self, x)
            except torch._dynamo.exc.TorchDynamoException as err:   # the compiler itself, nothing else
                raise RuntimeError(f"torch.compile of the LipNeXt block failed ({type(err).__name__}: "
                                   f"{err}); run it eagerly with train.compile=false (in Python: "
                                   "lipnext.models.set_compile(model, False))") from err
        return self._eager(x)

    def _mixing(self, lie: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """R and M for autograd's paths: through ``lie_slice`` when gradients go in Lie form."""
        if lie:
            return lie_slice(self.R), lie_slice(self.M)
        return self.R, self.M

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        """The one-function block (``ops.lipnext_block``) where it applies: beta-Abs, no autocast."""
        if not isinstance(self.act, BetaAbs) or torch.is_autocast_enabled(x.device.type):
            return block_forward(self, x)
        return lipnext_block(self.pos(x), self.R.to(x.dtype), self.M.to(x.dtype),
                             self.bias.to(x.dtype), self.shift.group, self.shift.padding,
                             self.act.num_abs, lie=self.lie_gradients)


def channel_mix(y: torch.Tensor, r: torch.Tensor, m: torch.Tensor,
                fuse: bool | None = None) -> torch.Tensor:
    """Rows y R M^T, as y (R M^T) (``fuse``) or as (y R) M^T; ``fuse=None``: the cheaper
    one for these rows (``ops.lipnext_block.fuses``: iff the N token rows exceed C); under
    ``torch.export`` always fused (no branch on the batch size; R M^T is a constant of the graph)."""
    if fuse is None:
        fuse = torch.compiler.is_exporting() or fuses(y)
    return y @ (r @ m.mT) if fuse else (y @ r) @ m.mT


def block_forward(block: LipNeXtBlock, x: torch.Tensor, lie: bool | None = None) -> torch.Tensor:
    """The block through autograd: act(S((X + p) R^T) R M^T + b) in rows (``channel_mix`` picks
    the order); R and M as ``LipNeXtBlock._mixing`` gives them (``lie``: the block's switch
    unless given)."""
    r, m = block._mixing(block.lie_gradients if lie is None else lie)
    r = r.to(x.dtype)
    y = block.shift(block.pos(x) @ r.mT)
    return block.act(channel_mix(y, r, m.to(x.dtype)) + block.bias.to(x.dtype))


COMPILE_MODES = ("auto", True, False)


def compiles(mode: bool | str, device: torch.device) -> bool:
    """Whether a block with ``compile_mode`` ``mode`` runs compiled on ``device``: auto = on CUDA."""
    return device.type == "cuda" if mode == "auto" else bool(mode)


def compile_mode(mode: bool | str) -> bool | str:
    """``"auto"``, True or False, from those or the strings of ``train.compile``."""
    if isinstance(mode, str) and mode.lower() in ("true", "false", "auto"):
        mode = {"true": True, "false": False, "auto": "auto"}[mode.lower()]
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be auto, true or false, got {mode!r}")
    return mode


def set_compile(model: nn.Module, mode: bool | str) -> nn.Module:
    """Set ``compile_mode`` (``"auto"``, True or False, or the strings of ``train.compile``) on
    every LipNeXt block of ``model``; returns the model."""
    mode = compile_mode(mode)
    for module in model.modules():
        if isinstance(module, LipNeXtBlock):
            module.compile_mode = mode
    return model


@functools.cache
def _compiled_block_forward() -> Callable[[LipNeXtBlock, torch.Tensor], torch.Tensor]:
    return torch.compile(block_forward)


@dataclass(kw_only=True)
class LipNeXtConfig(CertifiableConfig):
    """LipNeXt's options: ``depth`` blocks of ``width`` channels, the shift's ``alpha``,
    beta-Abs's ``beta``, an optional ``std`` division, and the ablation switches."""

    depth: int = 8
    width: int = 128
    alpha: float = 1 / 8
    beta: float = 0.5
    std: Sequence[float] | None = None
    pos_encoding: str = "block"
    padding: str = "circular"
    activation: str = "beta_abs"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth < 1 or self.width < 1:
            raise ValueError(f"need depth >= 1 and width >= 1; got {self.depth}, {self.width}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {', '.join(POS_ENCODINGS)}, "
                             f"got {self.pos_encoding!r}")
        if self.activation not in activation_names():
            raise ValueError(f"activation must be one of {', '.join(activation_names())}, got "
                             f"{self.activation!r} (an activation of your own: register_activation, "
                             "and --import its module on the command line)")
        self.std = None if self.std is None else [float(v) for v in self.std]


@register_arch
class LipNeXt(CertifiableModel):
    """LipNeXt classifier on raw pixels in [0, 1] of shape (B, in_chans, H, W)."""

    arch = "lipnext"
    config_class = LipNeXtConfig

    def build(self, c: LipNeXtConfig) -> None:
        self.stem = OrthogonalPatchStem(c.in_chans, c.width, c.patch_size, c.mean, c.std)
        pos: PositionalEncoding | None | str = "block"
        if c.pos_encoding == "shared":
            pos = self.pos = PositionalEncoding(c.grid)   # one p, owned here, used by every block
        elif c.pos_encoding == "none":
            pos = None
        self.blocks = nn.ModuleList(LipNeXtBlock(c.width, c.grid, c.alpha, c.beta, pos, c.padding,
                                                 c.activation) for _ in range(c.depth))
        self.pool = L2Pool()
        self.head = NormalizedLinear(c.width, c.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled trunk features (B, width)."""
        if self.validate_inputs:
            check_images(x, self.in_chans, self.image_size)
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.pool(x)

    @torch.no_grad()
    def lipschitz_factors(self) -> dict[str, float]:
        """Measured bounds: the input scale max |1/std|, ||W_stem||, prod_blocks ||R||^2 ||M|| and the pool's 1."""
        w = self.stem.weight[: self.stem.width, : self.stem.patch_dim]
        return {"input": self.stem.input_scale(), "stem": float(spectral_norm_bound(w)),
                "blocks": math.prod(lipschitz_of(b, f"blocks.{i}") for i, b in enumerate(self.blocks)),
                "pool": lipschitz_of(self.pool, "pool")}

    @torch.no_grad()
    def rounding_program(self) -> list[Step]:
        """forward_features as float64 steps: the stem's, each block's, the pool's."""
        return [*steps_of(self.stem, "stem"),
                *(s for i, b in enumerate(self.blocks) for s in steps_of(b, f"blocks.{i}")),
                *steps_of(self.pool, "pool")]


def _trunk_params(depth: int, width: int) -> str:
    """2 width^2 depth trunk parameters (docs/CORE.md, Model), in millions."""
    n = 2 * width ** 2 * depth
    return f"trunk params {n / 1e6:,.{0 if n >= 1e7 else 2}f}M"


_SIZES = {  # name: (depth, width, note)
    "lipnext_l4w64": (4, 64, "tiny, for tests"),
    "lipnext_l8w128": (8, 128, "small, for the CPU"),
    "lipnext_l12w256": (12, 256, "small, for the CPU"),
    "lipnext_l16w512": (16, 512, "medium"),
    "lipnext_l32w1024": (32, 1024, "paper, CIFAR-10"),
    "lipnext_l32w2048": (32, 2048, "paper, CIFAR-10/100, Tiny-ImageNet"),
    "lipnext_l32w4096": (32, 4096, "paper, ImageNet 1B"),
    "lipnext_2b": (32, 5792, "paper, ImageNet 2B"),
}
register_sizes("lipnext", "LipNeXt", {name: (d, w, f"{_trunk_params(d, w)}; {note}")
                                      for name, (d, w, note) in _SIZES.items()})
