"""Decoding image files (JPEG, PNG) with Pillow, an optional extra: ``pip install 'lipnext[imagenet]'``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["decode_image", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def _pil():
    from ..extras import require

    return require("PIL.Image", "decoding image folders")


def decode_image(path: str | Path, size: int | None = None, resize: int | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3). With ``size``: shorter side resized to ``resize`` (default
    size * 8/7), then the centre ``size`` x ``size`` crop."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None:
                short = resize or round(size * 8 / 7)
                w, h = im.size
                scale = short / min(w, h)
                im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                               Image.BILINEAR)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"cannot decode image {path}: {e}") from None
