"""Where a result comes from: the software, the machine, the data, the split, the config.

``provenance(device, ...)`` gives the record that ``results.json`` (key ``"provenance"``) and
the run record ``run.json`` hold: ``lipnext_version``, ``git_commit`` (of the lipnext source
tree when it is a git checkout, else null), ``torch_version``, ``device``, ``data``
(:func:`data_record`), ``config_sha256`` (:func:`config_sha256`), ``wall_s``, ``cpu_s``,
``gpu_s`` (null on the CPU) and ``weights_sha256`` (:func:`lipnext.io.tensors_sha256` of the
weights). ``data_record`` says which images were which split: the data's sha256, the holdout,
the validation share, the sizes, a hash of the train / val / test index sets and the seed;
``split_overlap`` uses it to find test images that a run trained on.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["provenance", "data_record", "data_sha256", "config_sha256", "split_sets",
           "split_indices_sha256", "split_overlap", "record_data_spec", "git_commit", "device_name"]

FOLDER_CONTENTS_LIMIT = 2 << 30      # folders up to 2 GiB are hashed by content, larger ones by listing


def git_commit() -> str | None:
    """The commit of the lipnext source tree (with ``+dirty`` when it has changes), or None
    when lipnext is not run from a git checkout (an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no",
                                "--", "."], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):       # no git on this machine
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_name(device: Any) -> str:
    """'cpu', or 'cuda:0 (NVIDIA H100 80GB HBM3)'."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def config_sha256(cfg: Any) -> str:
    """sha256 of the config as canonical JSON (sorted keys), without ``resume`` and
    ``overwrite``: they say how a run was started, not what it computes."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(cfg) if not isinstance(cfg, dict) else dict(cfg)
    for key in ("resume", "overwrite"):
        d.pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path, h: Any = None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _data_files(kind: str, folder: Path) -> list[Path]:
    """The files a folder dataset's loader reads (not whatever else the folder holds)."""
    def under(*parts: Path) -> list[Path]:
        return [f for part in parts if part.exists() for f in ([part] if part.is_file() else part.rglob("*"))
                if f.is_file()]

    if kind in ("cifar10", "cifar100"):
        inner, marker = (("cifar-10-batches-py", "batches.meta") if kind == "cifar10"
                         else ("cifar-100-python", "meta"))
        root = folder if (folder / marker).is_file() else folder / inner
        names = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if kind == "cifar10"
                 else ["train", "test"])
        return under(*(root / n for n in [*names, marker]))
    if kind == "tiny-imagenet":
        root = folder if (folder / "wnids.txt").is_file() else folder / "tiny-imagenet-200"
        return under(*(root / n for n in ("wnids.txt", "words.txt", "train", "val")))
    return under(folder / "train", folder / "val")                 # imagenet


def data_sha256(spec: str) -> tuple[str | None, str | None]:
    """(sha256, what it covers) of a dataset spec's data: a file's bytes (``"file"``); the files
    a folder dataset reads (CIFAR's batches; the train and val trees of Tiny-ImageNet and
    ImageNet), each its relative path and bytes in sorted order (``"contents"``, up to 2 GiB)
    or its relative path and size (``"listing"``, larger data: ImageNet); the built-in
    digits' arrays (``"arrays"``). (None, None) when the data is missing."""
    from .data import parse_spec

    kind, path = parse_spec(spec)
    if kind == "digits":
        from .data.digits import load_digits
        x, y = load_digits()
        h = hashlib.sha256(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
        return h.hexdigest(), "arrays"
    p = Path(path)
    if p.is_file():
        return _file_sha256(p), "file"
    if not p.is_dir():
        return None, None
    files = sorted(_data_files(kind, p))
    sizes = [f.stat().st_size for f in files]
    h = hashlib.sha256()
    by_content = sum(sizes) <= FOLDER_CONTENTS_LIMIT
    for f, size in zip(files, sizes):
        h.update(f"{f.relative_to(p).as_posix()}\0{size}\0".encode())
        if by_content:
            h.update(bytes.fromhex(_file_sha256(f)))
    return h.hexdigest(), "contents" if by_content else "listing"


def split_sets(pool: int, holdout: int | None, val_fraction: float,
               test_pool: int | None = None) -> dict[str, np.ndarray]:
    """The train / val / test index sets of the split rule (``lipnext.data.split_indices``): with
    a ``holdout`` (digits, npz), all three index one pool of ``pool`` images; without one
    (official test files), train and val index the ``pool`` training images and test the
    ``test_pool`` images of the test files. An empty split is an empty array."""
    from .data import split_indices

    out = {}
    for split in ("train", "val", "test"):
        if split == "test" and holdout is None:
            out[split] = np.arange(test_pool or 0)
            continue
        try:
            out[split] = split_indices(pool, split, holdout or 0, val_fraction)
        except ValueError:                       # an empty val or test split
            out[split] = np.arange(0)
    return out


def split_indices_sha256(sets: dict[str, np.ndarray]) -> str:
    """sha256 of ``{"train": [...], "val": [...], "test": [...]}`` as canonical JSON."""
    return hashlib.sha256(json.dumps({k: [int(i) for i in v] for k, v in sorted(sets.items())},
                                     separators=(",", ":")).encode()).hexdigest()


def data_record(spec: str, run_dir: str | os.PathLike, holdout: int | None, val_fraction: float,
                seed: int, pool: int, test_pool: int | None = None) -> dict[str, Any]:
    """The data section of a run record. ``path`` is stored relative to the run folder when the
    spec gave a relative path (the run folder and the data then move together), else absolute;
    ``path_kind`` says which (null for the built-in digits). ``holdout`` and ``val_fraction`` are
    the effective ones (defaults filled in); ``holdout`` is null for data with official test files."""
    from .data import parse_spec

    kind, path = parse_spec(spec)
    if path:
        kind_of_path = "absolute" if os.path.isabs(path) else "relative"
        stored = path if kind_of_path == "absolute" else os.path.relpath(os.path.abspath(path),
                                                                          os.path.abspath(run_dir))
    else:
        kind_of_path, stored = None, None
    sha, covers = data_sha256(spec)
    sets = split_sets(pool, holdout, val_fraction, test_pool)
    return {"spec": spec, "kind": kind, "path": stored, "path_kind": kind_of_path, "sha256": sha,
            "sha256_of": covers, "holdout": holdout, "val_fraction": val_fraction,
            "pool": pool, "test_pool": test_pool, "sizes": {k: len(v) for k, v in sets.items()},
            "split_indices_sha256": split_indices_sha256(sets), "seed": seed}


def record_data_spec(data: dict[str, Any], run_dir: str | os.PathLike) -> str:
    """The dataset spec of a run record's data, its path resolved against the run folder."""
    if data.get("path") is None:
        return data["spec"]
    path = data["path"] if data["path_kind"] == "absolute" else os.path.normpath(
        os.path.join(run_dir, data["path"]))
    return f"{data['kind']}:{path}"


def split_overlap(data: dict[str, Any], split: str, holdout: int | None, val_fraction: float) -> int:
    """How many images of ``split`` (cut with ``holdout`` and ``val_fraction`` from the same
    data) are among the images the recorded run trained on."""
    run = split_sets(data["pool"], data["holdout"], data["val_fraction"], data.get("test_pool"))
    if split_indices_sha256(run) != data["split_indices_sha256"]:
        raise ValueError("the run's recorded split does not follow this lipnext's split rule "
                         "(its index hash differs); certify with this lipnext's own split at your "
                         "own risk: give --data SPEC explicitly")
    mine = split_sets(data["pool"], holdout, val_fraction, data.get("test_pool"))
    if split == "test" and holdout is None:        # the official test files: their own pool
        return 0
    return int(np.intersect1d(mine[split], run["train"]).size)


def provenance(device: Any, data: dict[str, Any] | None = None, config: Any = None,
               wall_s: float | None = None, cpu_s: float | None = None, gpu_s: float | None = None,
               weights_sha256: str | None = None) -> dict[str, Any]:
    """The provenance record (see the module docstring); ``config`` is a Config (hashed)."""
    import torch

    from . import __version__

    return {"lipnext_version": __version__, "git_commit": git_commit(), "torch_version": torch.__version__,
            "device": device_name(device), "data": data,
            "config_sha256": config_sha256(config) if config is not None else None,
            "wall_s": None if wall_s is None else round(wall_s, 1),
            "cpu_s": None if cpu_s is None else round(cpu_s, 1),
            "gpu_s": None if gpu_s is None else round(gpu_s, 1), "weights_sha256": weights_sha256}
