"""Certify a whole dataset split, batch by batch from its ``batches`` (in memory or streamed)."""
from __future__ import annotations

import torch

from ..certify import Certificate, certify
from ..data import BatchSource
from ..rounding import float64_twin

__all__ = ["certify_dataset"]


def certify_dataset(model, ds: BatchSource, rule: str = "pairwise", batch_size: int = 512,
                    limit: int | None = None) -> Certificate:
    """Certificates of the first ``limit`` (or all) images of ``ds``; L (measured on the first
    batch) and the float64 twin are built once for all batches."""
    n = min(len(ds), limit) if limit else len(ds)
    chunks = list(torch.arange(n).split(batch_size)) or [torch.arange(0)]
    twin = float64_twin(model)   # freed on return
    certs: list[Certificate] = []
    for x, y in ds.batches(chunks, torch.device("cpu")):
        certs.append(certify(model, x, y, rule=rule, batch_size=batch_size, twin=twin,
                             lipschitz=certs[0].lipschitz if certs else None))
    return Certificate.cat(certs)
