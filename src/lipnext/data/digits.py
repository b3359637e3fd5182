"""scikit-learn's digits: 1,797 real 8x8 grey images of the digits 0-9 (built in)."""
from __future__ import annotations

import torch

from .base import ArrayDataset, split_indices

__all__ = ["load_digits", "digits_dataset", "DIGITS_MEAN", "DIGITS_HOLDOUT"]

DIGITS_MEAN = (0.3049,)
DIGITS_HOLDOUT = 360  # default test split: the last 360 images (20%)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """x (1797, 1, 8, 8) float32 in [0, 1] (grey levels 0..16 / 16), y (1797,) int64."""
    from ..extras import require

    d = require("sklearn.datasets", "the digits dataset").load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


def digits_dataset(split: str = "train", holdout: int | None = None,
                   val_fraction: float = 0.1) -> ArrayDataset:
    """The digits as a split dataset: test = the last ``holdout`` images (default 360)."""
    x, y = load_digits()
    holdout = DIGITS_HOLDOUT if holdout is None else holdout
    ds = ArrayDataset(x, y, 10, DIGITS_MEAN, [str(i) for i in range(10)], name="digits")
    return ds.subset(split_indices(len(ds), split, holdout, val_fraction), split)
