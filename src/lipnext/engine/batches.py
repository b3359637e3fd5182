"""The training batches as a pure function of (seed, step): resumable and identical for
any number of processes.

Epoch e uses the permutation of the real training images drawn from seed (seed, e);
step t of the epoch takes its next ``b_real`` indices (the last partial batch is dropped).
With generated images mixed in at fraction f, each global batch also holds
``b_gen = round(f B)`` generated images drawn uniformly from seed (seed, t). Rank r of W
takes rows [r B/W, (r+1) B/W) of the global batch; augmentation parameters are drawn
for the whole global batch from seed (seed, t) and sliced the same way; the real rows
come first, so RandAugment (real images only) knows its rows by their index.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np
import torch

__all__ = ["BatchPlan", "step_generator", "additional_data"]


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream)."""
    return torch.Generator().manual_seed(_seed(seed, step, stream))


@dataclass
class BatchPlan:
    n_real: int
    batch_size: int            # global batch
    seed: int
    n_generated: int = 0
    generated_fraction: float = 0.0
    world_size: int = 1
    rank: int = 0

    def __post_init__(self):
        if self.batch_size % self.world_size:
            raise ValueError(f"train.batch_size={self.batch_size} must be divisible by the number "
                             f"of processes ({self.world_size})")
        self.b_gen = int(round(self.generated_fraction * self.batch_size)) if self.n_generated else 0
        self.b_real = self.batch_size - self.b_gen
        if self.n_real < self.b_real:
            raise ValueError(f"the training split has {self.n_real} images, fewer than one batch of "
                             f"{self.b_real}; lower train.batch_size")

    @property
    def steps_per_epoch(self) -> int:
        return self.n_real // self.b_real

    def global_indices(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(real indices, generated indices) of the global batch at ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.n_real, generator=torch.Generator().manual_seed(_seed(self.seed, epoch, 1)))
        real = perm[i * self.b_real:(i + 1) * self.b_real]
        gen = (torch.randint(0, self.n_generated, (self.b_gen,), generator=step_generator(self.seed, step, 2))
               if self.b_gen else torch.zeros(0, dtype=torch.long))
        return real, gen

    def local_rows(self) -> slice:
        """This rank's rows of the global batch."""
        per = self.batch_size // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)


def additional_data(plan: BatchPlan, generator: str | None) -> dict | None:
    """What a run's results record of its generated images: ``{"generator": spec, "images": N,
    "real_to_generated": "1:3"}`` (the per-batch counts b_real:b_gen in lowest terms), or
    None when no generated image is mixed in."""
    if not plan.b_gen:
        return None
    g = math.gcd(plan.b_real, plan.b_gen)
    return {"generator": generator, "images": plan.n_generated,
            "real_to_generated": f"{plan.b_real // g}:{plan.b_gen // g}"}
