"""Training augmentation as tensor operations on the device (airbench style).

Random numbers are drawn on the CPU from an explicit generator for the *global* batch
(the same image gets the same crop whatever the number of processes, and a resumed
run draws the same numbers), then applied to the batch on its device, in this order:

* random crop with padding p: pad by p (``reflect`` or ``zeros``), crop back at an
  offset uniform in {0..2p}^2; generated images (the rows from ``n_real`` on) may use a
  smaller padding q (``generated_crop_padding``): an offset in {p-q..p+q}^2;
* horizontal flip with probability 1/2;
* RandAugment (option, off by default) on the real images only, each with probability
  ``randaugment_p`` (:mod:`lipnext.data.randaugment`);
* cutout k (option, 0 = off): a k x k square (clipped at the border) set to the dataset
  mean, which the mean-subtracting stem maps to 0.

The options' draws come after those of crop, flip and cutout, so turning one on leaves
the crops and flips of a run as they were.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .randaugment import RandAugment

__all__ = ["Augment"]


@dataclass
class Augment:
    crop_padding: int = 4
    pad_mode: str = "reflect"
    flip: bool = True
    cutout: int = 0
    randaugment: bool = False
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    randaugment_p: float = 0.5
    generated_crop_padding: int | None = None
    rand: RandAugment = field(init=False, repr=False)

    def __post_init__(self):
        if self.pad_mode not in ("reflect", "zeros"):
            raise ValueError(f"augment.pad_mode must be 'reflect' or 'zeros', got {self.pad_mode!r}")
        if self.crop_padding < 0 or self.cutout < 0:
            raise ValueError("augment.crop_padding and augment.cutout must be >= 0")
        q = self.generated_crop_padding
        if q is not None and not 0 <= q <= self.crop_padding:
            raise ValueError(f"augment.generated_crop_padding must lie in [0, augment.crop_padding="
                             f"{self.crop_padding}] (or null: the same padding), got {q}")
        self.rand = RandAugment(self.randaugment_ops, self.randaugment_magnitude, self.randaugment_p)

    def sample(self, n: int, image_size: tuple[int, int], generator: torch.Generator,
               n_real: int | None = None) -> dict[str, torch.Tensor]:
        """Random parameters for n images (CPU tensors): crop offsets, flips, cutout corners,
        RandAugment's draws. Rows from ``n_real`` on (default: none) are generated images:
        no RandAugment, and their own crop padding."""
        p, n_real = self.crop_padding, n if n_real is None else n_real
        params = {"crop": torch.randint(0, 2 * p + 1, (n, 2), generator=generator),
                  "flip": torch.rand(n, generator=generator) < 0.5}
        if self.cutout:
            params["cutout"] = torch.stack([torch.randint(-(self.cutout // 2), s - self.cutout // 2,
                                                          (n,), generator=generator)
                                            for s in image_size], dim=1)
        if self.randaugment:
            params.update(self.rand.sample(n, generator, n_real))
        q = self.generated_crop_padding
        if q is not None and q != p and n_real < n:
            params["crop"][n_real:] = p - q + torch.randint(0, 2 * q + 1, (n - n_real, 2), generator=generator)
        return params

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor],
              mean: Sequence[float] | None = None) -> torch.Tensor:
        """Augment x (B, C, H, W) with parameters from :meth:`sample` (rows for these B images)."""
        b, c, h, w = x.shape
        dev = x.device
        p = self.crop_padding
        if p:
            if self.pad_mode == "reflect" and p >= min(h, w):
                raise ValueError(f"reflect padding {p} needs images larger than {p} pixels")
            xp = F.pad(x, (p, p, p, p), mode="reflect" if self.pad_mode == "reflect" else "constant")
            off = params["crop"].to(dev)
            rows = (off[:, 0, None] + torch.arange(h, device=dev))[:, None, :, None]
            cols = (off[:, 1, None] + torch.arange(w, device=dev))[:, None, None, :]
            x = xp[torch.arange(b, device=dev)[:, None, None, None],
                   torch.arange(c, device=dev)[None, :, None, None], rows, cols]
        if self.flip:
            x = torch.where(params["flip"].to(dev)[:, None, None, None], x.flip(-1), x)
        if self.randaugment:
            x = self.rand.apply(x, params)
        if self.cutout:
            corner = params["cutout"].to(dev)
            r = torch.arange(h, device=dev)[None, :, None]
            q = torch.arange(w, device=dev)[None, None, :]
            inside = ((r >= corner[:, 0, None, None]) & (r < corner[:, 0, None, None] + self.cutout)
                      & (q >= corner[:, 1, None, None]) & (q < corner[:, 1, None, None] + self.cutout))
            fill = torch.tensor(mean if mean is not None else [0.0] * c, dtype=x.dtype, device=dev)
            x = torch.where(inside[:, None], fill[None, :, None, None], x)
        return x
