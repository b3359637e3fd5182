"""A small stand-in for a generated-image set, synthesised from real training images.

The paper's recipe mixes images from a diffusion model into every batch
(``data.generated``). lipnext ships no such set; this module builds a small one by a
seeded, documented procedure, so the mixing can be exercised end to end (tests,
examples/generated_mixtures.py):

    image j has class k_j = j mod K (a balanced set);
    a_j, b_j = two distinct training images of class k_j, drawn uniformly;
    lambda_j ~ U[0.3, 0.7];   x_j = round(255 (lambda_j a_j + (1 - lambda_j) b_j)).

All draws come from ``numpy.random.default_rng(seed)``. The images look like their class,
but no generative model made them: they test the machinery, not the paper's gains.
Give it the **train** split only, so no val or test image leaks into training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write
from .base import ArrayDataset

__all__ = ["class_mixtures", "save_generated"]

LAMBDA = (0.3, 0.7)


def class_mixtures(ds: ArrayDataset, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n mixtures of same-class images of ``ds`` (module docstring): x uint8 (n, H, W, C),
    y int64 (n,), and the (n, 2) indices into ``ds`` of the two images of each mixture."""
    if ds.split != "train":
        raise ValueError(f"synthesise generated images from the train split only, got the {ds.split} split")
    x, y = ds.tensors()
    y = y.numpy()
    members = [np.flatnonzero(y == k) for k in range(ds.num_classes)]
    if any(len(m) < 2 for m in members):
        raise ValueError(f"{ds.name}: every class needs at least 2 training images to mix")
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % ds.num_classes
    pairs = np.stack([rng.choice(members[k], size=2, replace=False) for k in labels])
    lam = torch.from_numpy(rng.uniform(*LAMBDA, size=n)).float().view(-1, 1, 1, 1)
    a, b = x[torch.from_numpy(pairs[:, 0])], x[torch.from_numpy(pairs[:, 1])]
    mixed = (255.0 * (lam * a + (1 - lam) * b)).round().clamp(0, 255).to(torch.uint8)
    return mixed.permute(0, 2, 3, 1).numpy(), labels.astype(np.int64), pairs


def save_generated(path: str | Path, x: np.ndarray, y: np.ndarray, classes=None) -> Path:
    """Write x (N, H, W, C) uint8, y (N,) as an npz that ``data.generated=npz:<path>`` reads (atomic)."""
    arrays = {"x": x, "y": y, **({"classes": np.asarray(classes, dtype=str)} if classes else {})}

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    return atomic_write(path, write)
