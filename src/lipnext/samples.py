"""Per-image certificates as a file: one row per image of the split, in its order.

    index, label, prediction, margin, radius

``index`` is the image's position in the split (0 = its first image), ``margin`` is
z_y - max_{j != y} z_j of the float64 twin at the label, and ``radius`` the proven float64
certificate (0 where the prediction is wrong or tied). A ``.csv`` file (a header line,
floats written exactly) or a ``.npz`` file (one array per column).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .certify import Certificate
from .io import atomic_write

__all__ = ["COLUMNS", "per_sample", "write_per_sample", "read_per_sample", "SUFFIXES"]

COLUMNS = ("index", "label", "prediction", "margin", "radius")
SUFFIXES = (".csv", ".npz")


def _suffix(path: Path) -> str:
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"per-sample file {path}: name it .csv or .npz")
    return path.suffix.lower()


def per_sample(cert: Certificate) -> dict[str, np.ndarray]:
    """The columns of ``cert`` (which must carry its labels, as ``lipnext.certify`` gives it)."""
    if cert.labels is None:
        raise ValueError("this certificate does not carry its labels; certify with lipnext.certify "
                         "or lipnext.certify.Certifier")
    return {"index": np.arange(len(cert), dtype=np.int64), "label": cert.labels.numpy().astype(np.int64),
            "prediction": cert.predictions.numpy().astype(np.int64),
            "margin": cert.margin.double().numpy(), "radius": cert.radius.double().numpy()}


def write_per_sample(cert: Certificate, path: str | Path) -> Path:
    """Write the columns of ``cert`` to ``path`` (.csv or .npz), atomically."""
    path = Path(path)
    suffix, cols = _suffix(path), per_sample(cert)
    if suffix == ".npz":
        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **cols)
    else:
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(COLUMNS)
                w.writerows(zip(*(cols[k].tolist() for k in COLUMNS)))
    return atomic_write(path, write)


def read_per_sample(path: str | Path) -> dict[str, np.ndarray]:
    """The columns of a file written by :func:`write_per_sample`."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"no per-sample file at {path}")
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in COLUMNS if k not in f.files]
            if missing:
                raise ValueError(f"{path} is not a per-sample file: no {', '.join(missing)}")
            return {k: f[k] for k in COLUMNS}
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or tuple(rows[0]) != COLUMNS:
        raise ValueError(f"{path} is not a per-sample file: its header is not {','.join(COLUMNS)}")
    cols = list(zip(*rows[1:])) or [()] * len(COLUMNS)
    return {k: np.array(v, dtype=np.int64 if k in ("index", "label", "prediction") else np.float64)
            for k, v in zip(COLUMNS, cols)}
