"""Certify a whole dataset split: in memory (``tensors()``) or streamed through a DataLoader."""
from __future__ import annotations

import torch

from ..certify import Certificate, certify, standard_numerics
from ..rounding import float64_twin

__all__ = ["certify_dataset"]


def certify_dataset(model, ds, rule: str = "pairwise", batch_size: int = 512, limit: int | None = None,
                    num_workers: int = 0) -> Certificate:
    """Certificates of the first ``limit`` (or all) images of ``ds``; L and the float64 twin built once."""
    if not getattr(ds, "streaming", False):
        x, y = ds.tensors()
        if limit:
            x, y = x[:limit], y[:limit]
        return certify(model, x, y, rule=rule, batch_size=batch_size)
    n = min(len(ds), limit) if limit else len(ds)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=batch_size,
                                         num_workers=num_workers)
    with standard_numerics(model):
        lip = model.lipschitz_bound()
    twin = float64_twin(model)   # built once for all batches, freed on return
    return Certificate.cat([certify(model, xb.float() / 255.0, yb, rule=rule, batch_size=batch_size,
                                    lipschitz=lip, twin=twin) for xb, yb in loader])
