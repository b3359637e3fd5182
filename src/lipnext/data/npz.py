"""Any ``.npz`` with ``x`` uint8 (N, H, W, C) and ``y`` int (N,), e.g. cifar10-subset.npz.

Optional arrays: ``classes`` (names, a string array). Loaded with ``allow_pickle=False``.
There is no official test split: ``holdout=N`` makes the last N images the test split.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .base import ArrayDataset, channel_mean, check_labels, hwc_to_tensor, split_indices

__all__ = ["load_npz"]


def load_npz(path: str | Path, split: str = "train", holdout: int = 0, val_fraction: float = 0.1,
             num_classes: int | None = None) -> ArrayDataset:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .npz file at {path}")
    if not zipfile.is_zipfile(path):      # np.load would try it as a pickle or a raw .npy
        raise ValueError(f"{path} is not a valid .npz file (not a zip archive); expected numpy.savez "
                         "output with arrays x (N, H, W, C) uint8 and y (N,) int")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k in ("x", "y", "classes")}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        why = "an array holds Python objects, which lipnext never unpickles" if "pickle" in str(e) else e
        raise ValueError(f"{path} is not a readable .npz file ({why}); expected numpy.savez "
                         "output with arrays x (N, H, W, C) uint8 and y (N,) int") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise ValueError(f"{path} has no array {key!r}; expected x (N, H, W, C) uint8 "
                             "and y (N,) int")
    x = hwc_to_tensor(arrays["x"], str(path))
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    if num_classes is None:
        num_classes = len(classes) if classes else int(arrays["y"].max()) + 1 if arrays["y"].size else 0
    if num_classes < 2:
        raise ValueError(f"{path}: need at least 2 classes, got {num_classes}")
    y = check_labels(arrays["y"], num_classes, str(path))
    if len(y) != x.shape[0]:
        raise ValueError(f"{path}: {x.shape[0]} images but {len(y)} labels")
    import torch
    full = ArrayDataset(x, torch.from_numpy(y), num_classes, channel_mean(x[:max(len(y) - holdout, 0)]),
                        classes, name=f"npz:{path}")          # the mean of the training part
    return full.subset(split_indices(len(full), split, holdout, val_fraction), split)
