"""Per-image predictions with their certificates (``lipnext predict``).

For each image: the class, the probabilities (softmax of the float32 logits), the certified
radius and the time. The class is the float64 twin's prediction, which is what the
certificate covers; the radius is the proven float64 certificate of that class
(``lipnext.certify.Certifier``; 0 when the top two logits tie). Images are certified in
batches; an image's time is its batch's wall time (forward pass and certificate) divided by
the batch's size.

Inputs (``load_inputs``): image files (PNG, JPEG, ...; Pillow, extra ``imagenet``), folders
of them (sorted, not recursive), and ``.npz`` files with ``x`` uint8 (N, H, W, C) (and
optionally ``y``, then each row has the label, and ``classes``, the class names).
Pixels are divided by 255; an image of another size than the model's is refused unless
``resize`` (bilinear).
"""
from __future__ import annotations

import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.images import IMAGE_SUFFIXES

__all__ = ["Inputs", "load_inputs", "predict", "run_images"]


@dataclass
class Inputs:
    """Images x float32 (N, C, H, W) in [0, 1], a name per image, labels (-1: unknown), class names."""

    x: torch.Tensor
    names: list[str]
    labels: torch.Tensor
    classes: list[str] | None = None


def _image(path: Path, in_chans: int, size: tuple[int, int], resize: bool) -> np.ndarray:
    from .extras import require

    Image = require("PIL.Image", "reading image files")
    try:
        with Image.open(path) as im:
            im = im.convert("L" if in_chans == 1 else "RGB")
            if im.size != (size[1], size[0]):
                if not resize:
                    raise ValueError(f"{path} is {im.size[1]}x{im.size[0]}, the model takes {size[0]}x{size[1]} "
                                     "images: resize it, or pass --resize")
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.array(im, dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"cannot decode image {path}: {e}") from None
    return a[:, :, None] if a.ndim == 2 else a


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files:
                raise ValueError(f"{path} has no array 'x' (images (N, H, W, C) uint8)")
            return f["x"], (f["y"] if "y" in f.files else None), \
                ([str(c) for c in f["classes"]] if "classes" in f.files else None)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz file ({e})") from None


def load_inputs(paths: list[str | Path], in_chans: int, image_size: tuple[int, int],
                resize: bool = False) -> Inputs:
    """Images from files, folders and .npz files (module doc), in the order given."""
    from .data.base import hwc_to_tensor

    chunks, names, labels, classes = [], [], [], None
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"{p} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        elif p.suffix.lower() == ".npz" and p.is_file():
            x, y, classes = _npz(p)
            t = hwc_to_tensor(x, str(p))
            if tuple(t.shape[1:]) != (in_chans, *image_size):
                raise ValueError(f"{p} holds images of shape {tuple(t.shape[1:])} (C, H, W); the model "
                                 f"takes {(in_chans, *image_size)}")
            chunks.append(t)
            names += [f"{p.name}[{i}]" for i in range(t.shape[0])]
            labels += [int(v) for v in y] if y is not None else [-1] * t.shape[0]
            continue
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"no image, folder or .npz at {p}")
        for f in files:
            chunks.append(hwc_to_tensor(_image(f, in_chans, image_size, resize)[None], str(f)))
            names.append(str(f))
            labels.append(-1)
    if not chunks:
        raise ValueError("no input images given")
    return Inputs(torch.cat(chunks).float() / 255.0, names, torch.tensor(labels, dtype=torch.long), classes)


@torch.no_grad()
def predict(model, inputs: Inputs, batch_size: int = 64) -> list[dict[str, Any]]:
    """One dict per image (module doc): input, class, probabilities, certified_radius, margin, time_ms
    (and label, correct when the label is known)."""
    from .certify import Certifier
    from .modes import evaluating

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    rows = []
    with evaluating(model):
        certifier = Certifier(model)
        for i in range(0, inputs.x.shape[0], batch_size):
            t0 = time.perf_counter()
            x = inputs.x[i:i + batch_size].to(device)
            probs = torch.softmax(model(x).float(), dim=1).cpu()
            cert = certifier(x, probs.argmax(1))
            moved = cert.predictions != cert.labels          # the twin's class is another one: certify that
            if moved.any():
                cert.radius[moved] = certifier(x[moved.to(device)], cert.predictions[moved]).radius
            ms = 1000 * (time.perf_counter() - t0) / x.shape[0]
            for k in range(x.shape[0]):
                j, c = i + k, int(cert.predictions[k])
                row = {"input": inputs.names[j], "class": c,
                       "class_name": inputs.classes[c] if inputs.classes and c < len(inputs.classes) else None,
                       "probabilities": [round(float(v), 6) for v in probs[k]],
                       "certified_radius": float(cert.radius[k]), "time_ms": round(ms, 3)}
                if int(inputs.labels[j]) >= 0:
                    row.update(label=int(inputs.labels[j]), correct=c == int(inputs.labels[j]))
                rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A text table of ``predict``'s rows: input, class, p(class), radius (and x 255), ms."""
    width = min(max(len(r["input"]) for r in rows), 48)
    lines = [f"{'input':<{width}}  class  p(class)  certified radius (x255)      ms"]
    for r in rows:
        name = r["input"] if len(r["input"]) <= width else "..." + r["input"][-width + 3:]
        cls = f"{r['class']}" + (f" {r['class_name']}" if r["class_name"] else "")
        rad = r["certified_radius"]
        radius = f"{rad:.4f} ({255 * rad:.1f})" if math.isfinite(rad) else "inf"
        label = "" if "label" not in r else f"  label {r['label']}{'' if r['correct'] else ' WRONG'}"
        lines.append(f"{name:<{width}}  {cls:<5}  {r['probabilities'][r['class']]:8.4f}  {radius:>23}  "
                     f"{r['time_ms']:6.2f}{label}")
    return "\n".join(lines)


def run_images(location: str | Path, n: int, split: str = "test") -> torch.Tensor | None:
    """The first ``n`` images of a run folder's ``split`` (the data its config.yaml names),
    or None without a config or when that data is not on this machine."""
    import yaml

    from .config import config_from_dict, dataset_options
    from .data import get_dataset

    cfg_path = Path(location) / "config.yaml"
    if not cfg_path.is_file():
        return None
    cfg = config_from_dict(yaml.safe_load(cfg_path.read_text()))
    try:
        ds = get_dataset(cfg.data.name, split, **dataset_options(cfg))
    except FileNotFoundError:
        return None
    return ds.probe(n)[0]
