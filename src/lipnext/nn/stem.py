"""Orthogonal patch stem and the positional encoding.

The stem cuts x (B, C_in, H, W) into non-overlapping p x p patches (a permutation,
so an isometry) and maps each patch vector (d = C_in p^2) to C channels with
W = Q[:C, :d], the top-left block of a square orthogonal Q (n = max(C, d)):
orthonormal columns when C >= d (an isometry), orthonormal rows otherwise
(||W||_2 = 1). The dataset mean is subtracted first (a translation, Lipschitz 1);
an optional division by the std multiplies the bound by max |1 / std| (std > 0, checked at
construction and whenever the buffer is loaded).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..bounds import spectral_norm_bound
from ..ops.patchify import patchify
from ..program import lipschitz_of, steps_of
from ..rounding import Step, exact, linear, scale, translate
from .lie import lie_slice
from .orthogonal import OrthogonalParameter, random_orthogonal

__all__ = ["OrthogonalPatchStem", "PositionalEncoding", "SharedPositionalEncoding"]


class OrthogonalPatchStem(nn.Module):
    """x -> patches(x - mean) @ W^T, tokens channels-last (B, H/p, W/p, C)."""

    def __init__(self, in_chans: int, width: int, patch_size: int,
                 mean: Sequence[float], std: Sequence[float] | None = None):
        super().__init__()
        if len(mean) != in_chans:
            raise ValueError(f"mean has {len(mean)} entries but the input has {in_chans} channels")
        if std is not None and (len(std) != in_chans or not all(0 < v < float("inf") for v in std)):
            raise ValueError(f"std must have {in_chans} positive, finite entries, got {list(std)}")
        self.in_chans, self.width, self.patch_size = in_chans, width, patch_size
        self.patch_dim = in_chans * patch_size * patch_size
        self.weight = OrthogonalParameter(random_orthogonal(max(width, self.patch_dim)))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", None if std is None else
                             1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    #: deliver Q^T G as the gradient of Q (``lipnext.nn.lie``): n C d multiply-adds here
    #: instead of the optimizer's n^3
    lie_gradients: bool = False

    def matrix(self) -> torch.Tensor:
        """W = Q[:C, :d], the linear map applied to each patch vector (its gradient into Q is
        Q^T G when ``lie_gradients``)."""
        if self.lie_gradients:
            return lie_slice(self.weight, self.width, self.patch_dim)
        return self.weight[: self.width, : self.patch_dim]

    def input_scale(self) -> float:
        """Lipschitz constant of the normalisation: 1, or max |1/std| if dividing by std."""
        return 1.0 if self.inv_std is None else float(self.inv_std.abs().max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - self.mean.to(x.dtype)
        if self.inv_std is not None:
            x = x * self.inv_std.to(x.dtype)
        return patchify(x, self.patch_size) @ self.matrix().to(x.dtype).mT

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        """max |1/std| ||W||_2 (the mean is a translation, patchify a permutation)."""
        return self.input_scale() * float(spectral_norm_bound(self.weight[: self.width, : self.patch_dim]))

    @torch.no_grad()
    def rounding_steps(self, name: str) -> list[Step]:
        """x - mean, [x / std], patchify, the GEMM by W."""
        w = self.weight[: self.width, : self.patch_dim]
        steps = [translate(-self.mean, f"{name}.mean")]
        if self.inv_std is not None:
            steps.append(scale(self.inv_std, name=f"{name}.inv_std"))
        p = self.patch_size
        return steps + [exact(lambda h: patchify(h, p), f"{name}.patchify"),
                        linear(w, name, lip=float(spectral_norm_bound(w)))]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Refuse a loaded 1/std that is not positive and finite (it would break the bound)."""
        inv = state_dict.get(prefix + "inv_std")
        if inv is not None and not bool(((inv > 0) & torch.isfinite(inv)).all()):
            raise ValueError(f"{prefix}inv_std must be positive and finite (1/std of the input "
                             f"normalisation), got {inv.flatten().tolist()}: the file is damaged or "
                             "was not written by lipnext")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PositionalEncoding(nn.Module):
    """A learnable p of shape (h, w, 1), added to every channel: X + p 1^T (a translation)."""

    def __init__(self, grid: tuple[int, int]):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(grid[0], grid[1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos.to(x.dtype)

    def lipschitz_bound(self) -> float:
        """1: a translation."""
        return 1.0

    def rounding_steps(self, name: str) -> list[Step]:
        """One addition per entry."""
        return [translate(self.pos, name)]


class SharedPositionalEncoding(nn.Module):
    """X + p with the p of another ``PositionalEncoding`` (one p for all blocks).

    The owner is held outside the module tree, so its parameter is registered, saved and
    optimised once, by the module that owns it."""

    def __init__(self, owner: PositionalEncoding):
        super().__init__()
        self._owner = (owner,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._owner[0](x)

    def lipschitz_bound(self) -> float:
        """The owner's."""
        return lipschitz_of(self._owner[0], "pos")

    def rounding_steps(self, name: str) -> list[Step]:
        """The owner's steps (its path in the model is ``pos``)."""
        return [dataclasses.replace(s, name=f"{name}:{s.name}") for s in steps_of(self._owner[0], "pos")]
