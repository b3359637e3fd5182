"""Certify a whole dataset split, batch by batch from its ``batches`` (in memory or streamed)."""
from __future__ import annotations

import torch

from ..certify import Certificate, Certifier
from ..data import BatchSource
from ..modes import evaluating

__all__ = ["certify_dataset"]


def certify_dataset(model, ds: BatchSource, rule: str = "pairwise", batch_size: int = 512,
                    limit: int | None = None) -> Certificate:
    """Certificates of the first ``limit`` (or all) images of ``ds``; the checked program (the
    float64 twin and L) is built once for all batches (``Certifier``) and freed on return."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n = min(len(ds), limit) if limit else len(ds)
    chunks = list(torch.arange(n).split(batch_size)) or [torch.arange(0)]
    with evaluating(model):
        certifier = Certifier(model, rule)
        certs = [certifier(x, y) for x, y in ds.batches(chunks, torch.device("cpu"))]
    return Certificate.cat(certs)
