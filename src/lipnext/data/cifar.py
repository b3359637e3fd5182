"""CIFAR-10 / CIFAR-100 from their official python files (``cifar-10-batches-py``,
``cifar-100-python``).

The official files are pickles. They are read with a *restricted* unpickler that
resolves only the few globals a pickled dict of numpy arrays needs
(``numpy ... _reconstruct``, ``numpy.ndarray``, ``numpy.dtype``, ``_codecs.encode``);
any other global (the way a malicious pickle runs code) raises an error.
Official test files form the ``test`` split; ``val`` is carved from the training files.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np
import torch

from .base import ArrayDataset, check_labels, split_indices

__all__ = ["load_cifar", "restricted_load", "CIFAR10_MEAN", "CIFAR100_MEAN"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]()
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy "
                                     "arrays and builtin containers are allowed in CIFAR files")


def restricted_load(path: Path) -> dict:
    """Unpickle an official CIFAR file allowing only builtin containers and numpy arrays."""
    try:
        with open(path, "rb") as fh:
            obj = _RestrictedUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not an official CIFAR python file ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not an official CIFAR python file (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _find_folder(folder: Path, inner: str, marker: str) -> Path:
    for cand in (folder, folder / inner):
        if (cand / marker).is_file():
            return cand
    if not folder.exists():
        raise FileNotFoundError(f"no CIFAR folder at {folder}")
    raise FileNotFoundError(f"{folder} does not hold the official python version ({inner}/"
                            f"{marker} missing); download the 'python version' from "
                            "https://www.cs.toronto.edu/~kriz/cifar.html and extract it")


def _read(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = restricted_load(path)
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path} is not an official CIFAR python file (keys {sorted(d)})")
    x = np.asarray(d["data"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise ValueError(f"{path}: expected data uint8 (N, 3072), got {x.dtype} {x.shape}")
    y = check_labels(np.asarray(d[label_key]), num_classes, str(path))
    return x.reshape(-1, 3, 32, 32), y


def load_cifar(folder: str | Path, num_classes: int = 10, split: str = "train",
               val_fraction: float = 0.1) -> ArrayDataset:
    folder = Path(folder)
    if num_classes == 10:
        root = _find_folder(folder, "cifar-10-batches-py", "batches.meta")
        train_files = [root / f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, meta_file, names_key = [root / "test_batch"], "labels", "batches.meta", "label_names"
        mean = CIFAR10_MEAN
    elif num_classes == 100:
        root = _find_folder(folder, "cifar-100-python", "meta")
        train_files, test_files = [root / "train"], [root / "test"]
        label_key, meta_file, names_key, mean = "fine_labels", "meta", "fine_label_names", CIFAR100_MEAN
    else:
        raise ValueError(f"CIFAR has 10 or 100 classes, got {num_classes}")
    files = test_files if split == "test" else train_files
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"missing official CIFAR file {f}")
    parts = [_read(f, label_key, num_classes) for f in files]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    names = restricted_load(root / meta_file).get(names_key)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names] if names else None
    ds = ArrayDataset(x, y, num_classes, mean, classes, name=f"cifar{num_classes}:{folder}", split=split)
    return ds if split == "test" else ds.subset(split_indices(len(ds), split, 0, val_fraction), split)
