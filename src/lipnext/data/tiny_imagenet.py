"""Tiny-ImageNet (200 classes, 64x64) from its official folder layout ``tiny-imagenet-200``:

    wnids.txt, words.txt (optional)
    train/<wnid>/images/*.JPEG
    val/images/*.JPEG and val/val_annotations.txt (file <tab> wnid <tab> box)

The official ``test`` images carry no labels, so (decision) the official ``val`` folder is
our ``test`` split and ``val`` is carved from the training images. Decoding needs Pillow.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import ArrayDataset, split_indices
from .images import IMAGE_SUFFIXES, decode_image

__all__ = ["load_tiny_imagenet", "TINY_IMAGENET_MEAN"]

TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)


def _root(folder: Path) -> Path:
    for cand in (folder, folder / "tiny-imagenet-200"):
        if (cand / "wnids.txt").is_file():
            return cand
    if not folder.exists():
        raise FileNotFoundError(f"no Tiny-ImageNet folder at {folder}")
    raise FileNotFoundError(f"{folder} is not the official Tiny-ImageNet layout (wnids.txt missing); "
                            "extract tiny-imagenet-200.zip and point to that folder")


def _class_names(root: Path, wnids: list[str]) -> list[str]:
    words = root / "words.txt"
    if not words.is_file():
        return wnids
    table = dict(line.rstrip("\n").split("\t", 1) for line in words.read_text().splitlines() if "\t" in line)
    return [table.get(w, w) for w in wnids]


def load_tiny_imagenet(folder: str | Path, split: str = "train", val_fraction: float = 0.1) -> ArrayDataset:
    root = _root(Path(folder))
    wnids = [w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    files: list[Path] = []
    labels: list[int] = []
    if split == "test":
        ann = root / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise FileNotFoundError(f"missing {ann} (official validation labels)")
        for line in ann.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[1] not in index:
                raise ValueError(f"{ann}: class {parts[1]!r} of {parts[0]} is not in wnids.txt")
            files.append(root / "val" / "images" / parts[0])
            labels.append(index[parts[1]])
    else:
        for w in wnids:
            d = root / "train" / w / "images"
            if not d.is_dir():
                raise FileNotFoundError(f"missing training folder {d}")
            imgs = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files += imgs
            labels += [index[w]] * len(imgs)
    if not files:
        raise ValueError(f"no images found for split {split!r} under {root}")
    x = torch.from_numpy(np.stack([decode_image(f) for f in files]).transpose(0, 3, 1, 2).copy())
    ds = ArrayDataset(x, torch.tensor(labels, dtype=torch.int64), len(wnids), TINY_IMAGENET_MEAN,
                      _class_names(root, wnids), name=f"tiny-imagenet:{folder}", split=split)
    return ds if split == "test" else ds.subset(split_indices(len(ds), split, 0, val_fraction), split)
