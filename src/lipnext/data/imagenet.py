"""ImageNet from the standard class folders ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``,
streamed from disk (a torch Dataset for a DataLoader), decoded with Pillow (optional extra).

Each image: shorter side resized to 8/7 of ``image_size``, centre crop ``image_size``
(224 by default), uint8. ``batches`` decodes them in ``num_workers`` DataLoader processes
(ahead of the consumer); random crop and flip happen later on the device.
The official ``val`` folder is our ``test`` split (decision); ``val`` is a seeded
``val_fraction`` of the training images.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .base import Batch, split_indices, unit_pixels
from .images import IMAGE_SUFFIXES, decode_image

__all__ = ["ImageFolderStream", "IMAGENET_MEAN"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)


class ImageFolderStream(torch.utils.data.Dataset):
    """Class-folder images decoded on access: item i -> (uint8 (3, S, S), label)."""

    streaming = True
    in_chans = 3

    def __init__(self, folder: str | Path, split: str = "train", image_size: int = 224,
                 val_fraction: float = 0.01, num_workers: int = 0):
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"no ImageNet folder at {root}")
        train = root / "train"
        if not train.is_dir():
            raise FileNotFoundError(f"{root} has no train/ folder of class folders "
                                    "(expected train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)")
        self.classes = sorted(p.name for p in train.iterdir() if p.is_dir())
        if len(self.classes) < 2:
            raise ValueError(f"{train} must hold one folder per class, found {len(self.classes)}")
        sub = root / ("val" if split == "test" else "train")
        if not sub.is_dir():
            raise FileNotFoundError(f"missing {sub}")
        files, labels = [], []
        for i, c in enumerate(self.classes):
            d = sub / c
            if not d.is_dir():
                raise FileNotFoundError(f"missing class folder {d} (class folders of val/ must "
                                        "match train/; sort the official val images into them)")
            imgs = sorted(str(p) for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files += imgs
            labels += [i] * len(imgs)
        if split != "test":
            keep = split_indices(len(files), split, 0, val_fraction)
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        self.files, self.labels = files, torch.tensor(labels, dtype=torch.int64)
        self.num_classes, self.image_size = len(self.classes), (image_size, image_size)
        self.mean, self.split, self.name = IMAGENET_MEAN, split, f"imagenet:{folder}"
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = decode_image(self.files[i], self.image_size[0])
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), self.labels[i]

    def batches(self, indices: Iterable[torch.Tensor], device: torch.device) -> Iterator[Batch]:
        """One batch per index tensor, decoded by a DataLoader with ``num_workers`` processes
        (which read the index tensors ahead), as float32 in [0, 1] on ``device``."""
        device = torch.device(device)
        loader = torch.utils.data.DataLoader(self, batch_sampler=(i.tolist() for i in indices),
                                             num_workers=self.num_workers,
                                             pin_memory=device.type == "cuda")
        for x, y in loader:
            yield unit_pixels(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)

    def probe(self, n: int) -> Batch:
        items = [self[i] for i in range(min(n, len(self)))]
        return unit_pixels(torch.stack([x for x, _ in items])), torch.stack([y for _, y in items])

    def __repr__(self) -> str:
        return f"ImageFolderStream({self.name!r}, split={self.split!r}, n={len(self)}, classes={self.num_classes})"
