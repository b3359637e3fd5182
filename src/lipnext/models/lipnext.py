"""LipNeXt: orthogonal channel mixing around parameter-free spatial shifts.

Block (docs/CORE.md, Model), tokens X channels-last:

    Z = beta_abs(M R^T S(R (X + p)) + b)

with R, M orthogonal, S the circular spatial shift, p a positional encoding. In row
form (tokens are rows) this is ((X + p) R^T) -> S -> (. R M^T) + b: two GEMMs over the
N = B*h*w token rows plus one C x C product R M^T when N > C, else three token GEMMs
((. R) then (. M^T)), whichever costs less (``channel_mix``).
Trunk: stem -> blocks -> L2 pooling, with Lipschitz bound
L = s_in * ||W_stem|| * prod_blocks ||R||^2 ||M|| (measured, docs/CORE.md, Certificates).

Ablation switches (constructor options, saved in the config): ``pos_encoding`` ``block``
(one p per block), ``shared`` (one p for all blocks) or ``none``; ``padding`` of S
``circular`` or ``zero`` (||S|| <= 1); ``activation`` ``beta_abs``, ``minmax`` or
``identity``. Each is a translation or has Lipschitz constant <= 1, so the bound above
holds for every choice.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..bounds import spectral_norm_bound
from ..ops.lipnext_block import lipnext_block
from ..nn import (L2Pool, NormalizedLinear, OrthogonalParameter, OrthogonalPatchStem,
                  PositionalEncoding, SpatialShift, random_orthogonal)
from ..nn.activation import BetaAbs, make_activation
from ..nn.stem import SharedPositionalEncoding
from .base import CertifiableModel, check_images, resolve_geometry, resolve_mean

__all__ = ["LipNeXt", "LipNeXtBlock", "POS_ENCODINGS"]

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

    #: torch.compile the block (fusing shift, beta-Abs, bias and positional add around
    #: the GEMMs): None = on CUDA only, True = everywhere, False = never. A block that
    #: fails to compile warns once and stays eager.
    compiled: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wanted = x.is_cuda if self.compiled is None else self.compiled
        if torch.compiler.is_compiling():
            return block_forward(self, x)      # inside a compiled model: traced as is
        if _COMPILE["broken"] or not wanted:
            return self._eager(x)
        try:
            return _compiled_block_forward()(self, x)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run eager
            _COMPILE["broken"] = True
            warnings.warn(f"torch.compile of LipNeXtBlock failed ({type(err).__name__}: {err}); "
                          "running eager", RuntimeWarning, stacklevel=2)
            return self._eager(x)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        """The one-function block (``ops.lipnext_block``) where it applies: beta-Abs, no autocast."""
        if not isinstance(self.act, BetaAbs) or torch.is_autocast_enabled(x.device.type):
            return block_forward(self, x)
        r = self.R.to(x.dtype)
        return lipnext_block(self.pos(x), r, self.M.to(x.dtype), self.bias.to(x.dtype),
                             self.shift.group, self.shift.padding, self.act.num_abs)


def channel_mix(y: torch.Tensor, r: torch.Tensor, m: torch.Tensor,
                fuse: bool | None = None) -> torch.Tensor:
    """Rows y R M^T, as y (R M^T) (``fuse``) or as (y R) M^T.

    With N = y.numel() / C token rows, forward + backward take 3 C^3 + 3 N C^2
    multiply-adds fused and 6 N C^2 unfused, so ``fuse=None`` fuses iff N > C (the same
    rule as for a forward alone: C^3 + N C^2 against 2 N C^2).
    """
    c = y.shape[-1]
    if fuse is None:
        fuse = y.numel() // c > c
    return y @ (r @ m.mT) if fuse else (y @ r) @ m.mT


def block_forward(block: LipNeXtBlock, x: torch.Tensor) -> torch.Tensor:
    """The eager block: act(S((X + p) R^T) R M^T + b) in rows (``channel_mix`` picks the order)."""
    r = block.R.to(x.dtype)
    y = block.shift(block.pos(x) @ r.mT)
    return block.act(channel_mix(y, r, block.M.to(x.dtype)) + block.bias.to(x.dtype))


@functools.cache
def _compiled_block_forward() -> Callable[[LipNeXtBlock, torch.Tensor], torch.Tensor]:
    return torch.compile(block_forward)


_COMPILE = {"broken": False}


class LipNeXt(CertifiableModel):
    """LipNeXt classifier on raw pixels in [0, 1] of shape (B, in_chans, H, W)."""

    arch = "lipnext"

    def __init__(self, depth: int = 8, width: int = 128, num_classes: int = 10, in_chans: int = 3,
                 image_size: int | Sequence[int] = 32, patch_size: int | None = None,
                 alpha: float = 1 / 8, beta: float = 0.5, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, seed: int | None = None,
                 pos_encoding: str = "block", padding: str = "circular", activation: str = "beta_abs"):
        super().__init__()
        hw, patch_size = resolve_geometry(image_size, patch_size)
        if depth < 1 or width < 1 or num_classes < 2:
            raise ValueError(f"need depth >= 1, width >= 1, num_classes >= 2; "
                             f"got {depth}, {width}, {num_classes}")
        if pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {', '.join(POS_ENCODINGS)}, got {pos_encoding!r}")
        mean = resolve_mean(mean, in_chans)
        self._config = dict(depth=depth, width=width, num_classes=num_classes, in_chans=in_chans,
                            image_size=list(hw), patch_size=patch_size, alpha=alpha, beta=beta,
                            mean=mean,
                            std=None if std is None else [float(s) for s in std], seed=seed,
                            pos_encoding=pos_encoding, padding=padding, activation=activation)
        self.depth, self.width, self.num_classes, self.in_chans = depth, width, num_classes, in_chans
        self.image_size, self.patch_size = hw, patch_size
        grid = (hw[0] // patch_size, hw[1] // patch_size)
        with torch.random.fork_rng(enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.stem = OrthogonalPatchStem(in_chans, width, patch_size, mean, std)
            pos: PositionalEncoding | None | str = "block"
            if pos_encoding == "shared":
                pos = self.pos = PositionalEncoding(grid)   # one p, owned here, used by every block
            elif pos_encoding == "none":
                pos = None
            self.blocks = nn.ModuleList(LipNeXtBlock(width, grid, alpha, beta, pos, padding, activation)
                                        for _ in range(depth))
            self.pool = L2Pool()
            self.head = NormalizedLinear(width, num_classes)
        self.validate_inputs = True

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled trunk features (B, width)."""
        if self.validate_inputs:
            check_images(x, self.in_chans, self.image_size)
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.pool(x)

    def orthogonal_stacks(self) -> dict[str, torch.Tensor]:
        """All R and all M matrices stacked, (depth, C, C) each."""
        return {"R": torch.stack([b.R.detach() for b in self.blocks]),
                "M": torch.stack([b.M.detach() for b in self.blocks])}

    @torch.no_grad()
    def lipschitz_factors(self) -> dict[str, float]:
        """Measured spectral-norm bounds: input scale, stem, and the product over blocks."""
        st = self.orthogonal_stacks()
        r, m = spectral_norm_bound(st["R"]), spectral_norm_bound(st["M"])
        return {"input": self.stem.input_scale(),
                "stem": float(spectral_norm_bound(self.stem.matrix())),
                "blocks": float(torch.prod(r * r * m))}

