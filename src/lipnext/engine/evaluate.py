"""Certify a whole dataset split: in memory (``tensors()``) or streamed through a DataLoader."""
from __future__ import annotations

import torch

from ..certify import Certificate, certify

__all__ = ["certify_dataset"]


def certify_dataset(model, ds, rule: str = "pairwise", batch_size: int = 512, limit: int | None = None,
                    num_workers: int = 0) -> Certificate:
    """Certificates of the first ``limit`` (or all) images of ``ds``; L measured once."""
    if not getattr(ds, "streaming", False):
        x, y = ds.tensors()
        if limit:
            x, y = x[:limit], y[:limit]
        return certify(model, x, y, rule=rule, batch_size=batch_size)
    n = min(len(ds), limit) if limit else len(ds)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=batch_size,
                                         num_workers=num_workers)
    lip = model.lipschitz_bound()
    return Certificate.cat([certify(model, xb.float() / 255.0, yb, rule=rule, batch_size=batch_size,
                                    lipschitz=lip) for xb, yb in loader])
