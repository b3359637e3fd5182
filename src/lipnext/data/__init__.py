"""Datasets: ``get_dataset(spec, split, **opts)``.

Specs: ``digits`` (built in), ``npz:<file>`` or a bare ``<file>.npz``, ``cifar10:<folder>``,
``cifar100:<folder>``, ``tiny-imagenet:<folder>``, ``imagenet:<folder>`` (streamed).
Splits: ``train``, ``val`` (carved from the training part, for monitoring and model
selection) and ``test`` (official test files, or the last ``holdout`` images).
"""
from __future__ import annotations

import numbers

from .augment import Augment
from .base import SPLITS, ArrayDataset, BatchSource, check_split, split_indices
from .cifar import load_cifar
from .digits import load_digits, digits_dataset
from .imagenet import ImageFolderStream
from .npz import load_npz
from .tiny_imagenet import load_tiny_imagenet

__all__ = ["get_dataset", "parse_spec", "split_options", "ArrayDataset", "BatchSource", "ImageFolderStream", "Augment", "SPLITS",
           "load_digits", "split_indices", "DATASETS"]

DATASETS = ("digits", "npz", "cifar10", "cifar100", "tiny-imagenet", "imagenet")


def parse_spec(spec: str) -> tuple[str, str]:
    """'kind:path' -> (kind, path); a bare '*.npz' path is 'npz'."""
    spec = str(spec).strip()
    if spec == "digits":
        return "digits", ""
    kind, sep, path = spec.partition(":")
    if sep and kind in DATASETS and kind != "digits":
        if not path:
            raise ValueError(f"dataset spec {spec!r} needs a path after '{kind}:'")
        return kind, path
    if spec.endswith(".npz"):
        return "npz", spec
    raise ValueError(f"unknown dataset spec {spec!r}; use digits, npz:<file>, <file>.npz, "
                     "cifar10:<folder>, cifar100:<folder>, tiny-imagenet:<folder> or imagenet:<folder>")


def split_options(spec: str, holdout: int | None = None,
                  val_fraction: float | None = None) -> tuple[int | None, float]:
    """The (holdout, val_fraction) that ``get_dataset(spec, ..., holdout, val_fraction)`` uses,
    defaults filled in; holdout is None for data with official test files."""
    from .digits import DIGITS_HOLDOUT

    kind = parse_spec(spec)[0]
    h = (DIGITS_HOLDOUT if holdout is None else holdout) if kind == "digits" else \
        (holdout or 0) if kind == "npz" else None
    return h, val_fraction if val_fraction is not None else 0.01 if kind == "imagenet" else 0.1


def get_dataset(spec: str, split: str = "train", holdout: int | None = None,
                val_fraction: float | None = None, **opts):
    """The ``split`` of dataset ``spec``.

    Options: ``holdout`` (digits, npz: the last N images are the test split; digits
    defaults to 360, npz to 0 = no test split), ``val_fraction`` (share of the training
    part used as validation, default 0.1; 0.01 for ImageNet), ``num_classes`` (npz),
    ``image_size`` (ImageNet, default 224), ``num_workers`` (ImageNet: decoding processes, default 0).
    """
    check_split(split)
    kind, path = parse_spec(spec)
    if holdout is not None and (not isinstance(holdout, numbers.Integral) or holdout < 0):
        raise ValueError(f"holdout is the number of images held out as the test split: an "
                         f"integer >= 0, got {holdout!r}")
    if holdout and kind not in ("digits", "npz"):
        raise ValueError(f"{kind} has an official test split; holdout applies to digits and npz only "
                         "(leave data.holdout unset, or 0)")
    vf = {} if val_fraction is None else {"val_fraction": val_fraction}
    allowed = {"npz": {"num_classes"}, "imagenet": {"image_size", "num_workers"}}.get(kind, set())
    unknown = set(opts) - allowed
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)} for a {kind} dataset"
                        + (f"; allowed: {sorted(allowed)}" if allowed else ""))
    if kind == "digits":
        return digits_dataset(split, holdout, **vf)
    if kind == "npz":
        return load_npz(path, split, holdout or 0, **vf, **opts)
    if kind in ("cifar10", "cifar100"):
        return load_cifar(path, 10 if kind == "cifar10" else 100, split, **vf)
    if kind == "tiny-imagenet":
        return load_tiny_imagenet(path, split, **vf)
    return ImageFolderStream(path, split, **vf, **opts)
