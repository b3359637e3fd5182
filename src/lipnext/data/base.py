"""In-memory image datasets and the train / val / test split rule shared by all of them.

Every dataset is a :class:`BatchSource`: it reports ``num_classes``, ``in_chans``,
``image_size`` (H, W), ``mean`` (per-channel, in [0, 1] pixel units), ``classes`` (names or
None) and its length, and gives its examples as x float32 (N, C, H, W) in [0, 1], y int64:
``batches(indices, device)`` one batch per index tensor, ``probe(n)`` the first n.
In-memory datasets also give ``tensors()`` (all of them).

Split rule (decision): a dataset without an official test split holds out its last
``holdout`` images as ``test``; the validation split (for monitoring and model
selection, never the test split) is a fixed, seeded ``val_fraction`` of what remains.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..options import SPLITS

__all__ = ["ArrayDataset", "BatchSource", "SPLITS", "split_indices", "check_labels", "check_split",
           "unit_pixels"]

VAL_SEED = 0  # the validation carve-out never depends on the training seed


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


def check_labels(y: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    """Integer labels in [0, num_classes), else a clear error naming the file."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{source}: labels must be a 1-D array, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integers, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{source}: labels must lie in [0, {num_classes - 1}] for "
                         f"{num_classes} classes, got range [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def split_indices(n: int, split: str, holdout: int = 0, val_fraction: float = 0.1) -> np.ndarray:
    """Indices of ``split`` among n examples: test = the last ``holdout``; val = a seeded
    ``val_fraction`` of the rest; train = the remainder (each sorted)."""
    check_split(split)
    if not 0 <= holdout < n:
        raise ValueError(f"holdout must lie in [0, {n - 1}] for {n} images, got {holdout}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    rest = n - holdout
    if split == "test":
        if holdout == 0:
            raise ValueError("this dataset has no test split: set holdout=N to hold out its "
                             "last N images (data.holdout in a config, --holdout for certify and verify)")
        return np.arange(rest, n)
    perm = np.random.default_rng(VAL_SEED).permutation(rest)
    n_val = int(round(val_fraction * rest))
    if split == "val":
        if n_val == 0:
            raise ValueError("the validation split is empty: set val_fraction > 0 (data.val_fraction in a "
                             "config, --val-fraction for certify and verify)")
        return np.sort(perm[:n_val])
    return np.sort(perm[n_val:])


Batch = tuple[torch.Tensor, torch.Tensor]


class BatchSource(Protocol):
    """What training and certification read from a dataset, in memory or streamed from disk
    (``streaming``); also ``num_classes``, ``in_chans``, ``image_size``, ``mean``, ``len()``."""

    streaming: bool

    def batches(self, indices: Iterable[torch.Tensor], device: torch.device) -> Iterator[Batch]:
        """(x, y) of the examples of each index tensor, in order, on ``device``."""

    def probe(self, n: int) -> Batch:
        """(x, y) of the first n examples (fewer if the dataset is smaller), on the CPU."""


def unit_pixels(x: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1]: uint8 0..255 divided by 255, float images as they are."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


@dataclass
class ArrayDataset:
    """Images held in memory: ``x`` uint8 (N, C, H, W) in 0..255 or float32 in [0, 1]."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    classes: Sequence[str] | None = None
    name: str = ""
    split: str = "train"

    _on_device: dict[torch.device, Batch] = field(default_factory=dict, init=False, repr=False,
                                                  compare=False)

    streaming = False

    def __post_init__(self):
        if self.x.dim() != 4 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.name}: expected images (N, C, H, W) and N labels, got "
                             f"{tuple(self.x.shape)} and {tuple(self.y.shape)}")
        if len(self.mean) != self.in_chans:
            raise ValueError(f"{self.name}: mean has {len(self.mean)} entries for "
                             f"{self.in_chans} channels")
        if self.x.is_floating_point() and self.x.numel():
            from ..models.base import check_pixel_range
            check_pixel_range(*(float(v) for v in torch.aminmax(self.x)))

    @property
    def in_chans(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x.shape[2]), int(self.x.shape[3])

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x float32 (N, C, H, W) in [0, 1], y int64 (N,)."""
        return unit_pixels(self.x), self.y.long()

    def batches(self, indices: Iterable[torch.Tensor], device: torch.device) -> Iterator[Batch]:
        """``x[i]``, ``y[i]`` for each index tensor i, sliced on ``device`` from a copy of the
        whole dataset moved there once (airbench style: no loader, no host-device traffic)."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = self.x.to(device), self.y.long().to(device)
        x, y = self._on_device[device]
        for idx in indices:
            idx = idx.to(device)
            yield unit_pixels(x[idx]), y[idx]

    def probe(self, n: int) -> Batch:
        return unit_pixels(self.x[:n]), self.y[:n].long()

    def subset(self, index: np.ndarray, split: str) -> "ArrayDataset":
        idx = torch.as_tensor(index, dtype=torch.long)
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes, self.mean,
                            self.classes, self.name, split)

    def __repr__(self) -> str:
        return (f"ArrayDataset({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.num_classes}, shape={(self.in_chans, *self.image_size)})")


def hwc_to_tensor(x: np.ndarray, source: str) -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 tensor (N, C, H, W), with a clear error otherwise."""
    if x.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8 0..255, got dtype {x.dtype}")
    if x.ndim == 3:                       # grey (N, H, W)
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{source}: images must have shape (N, H, W, C) with C in 1, 3 "
                         f"(channels last), got {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def channel_mean(x: torch.Tensor) -> tuple[float, ...]:
    """Per-channel mean in [0, 1] pixel units of uint8 or float images (N, C, H, W)."""
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    m = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, x.shape[0], 4096):
        m += x[i:i + 4096].double().sum(dim=(0, 2, 3))
    return tuple(round(float(v), 4) for v in m / (max(x.shape[0], 1) * x.shape[2] * x.shape[3] * scale))
