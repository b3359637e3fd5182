"""Per-rank memory of FSDP training state against one unsharded process, measured in one run.

Each configuration runs one training step (CPU, gloo; W processes) and counts the bytes each
rank keeps between steps: the weights, the gradients (before they are freed) and the
optimizer state (ManifoldAdam unsharded; ShardedManifoldAdam's row shards, owned whole
matrices and their state under FSDP). Storage shared by several tensors is counted once. It
also checks that the sharded step gives the unsharded weights.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..engine.distributed import full_state_dict, shard_model
from ..io import atomic_write
from ..models import create_model
from ..optim import ShardedManifoldAdam, build_optimizer
from .ranks import run_ranks, storage_bytes

__all__ = ["one_step", "run_fsdp_memory"]

PARTS = ("weights_bytes", "grad_bytes", "optimizer_bytes")


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The state tensors (ShardedManifoldAdam keeps them in its inner ManifoldAdam)."""
    inner = opt.inner if isinstance(opt, ShardedManifoldAdam) else opt
    return [t for st in inner.state.values() for t in st.values() if isinstance(t, torch.Tensor)]


def one_step(model_name: str, batch: int, world: int, rank: int) -> dict[str, Any]:
    """One training step on this rank's rows of the batch (world 0: unsharded); the bytes kept."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, in_chans=3, image_size=32, seed=0)
    if world:
        shard_model(model, torch.device("cpu"))
    opt = build_optimizer(model, lr=1e-3)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    rows = slice(rank * batch // max(world, 1), (rank + 1) * batch // max(world, 1))
    F.cross_entropy(model(x[rows]), y[rows]).backward()
    grads = storage_bytes(p.grad for p in model.parameters())
    opt.step()
    weights = full_state_dict(model)
    return {"weights_bytes": storage_bytes(model.parameters()), "grad_bytes": grads,
            "optimizer_bytes": storage_bytes(optimizer_tensors(opt)),
            "weights": {k: v.numpy(force=True) for k, v in weights.items()} if rank == 0 else None}


def _worker(rank: int, world: int, port: int, model: str, batch: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        queue.put((rank, one_step(model, batch, world, rank)))
    finally:
        dist.destroy_process_group()


def memory_table(model: str, batch: int, rows: list[dict[str, Any]]) -> str:
    """MiB per rank and part, with the ratio to the unsharded process (the first row)."""
    total = {k: rows[0][k] for k in PARTS}
    lines = [f"{model}, batch {batch}, one step; MiB per rank (ratio to the unsharded process)",
             f"{'strategy':>8} {'W':>2} {'rank':>4} {'weights':>16} {'gradients':>16} "
             f"{'optimizer':>16} {'all':>16}  max |dW|"]
    for row in rows:
        cells = [row[k] for k in PARTS] + [sum(row[k] for k in PARTS)]
        refs = list(total.values()) + [sum(total.values())]
        text = " ".join(f"{c / 2**20:9.2f} ({c / ref:.2f})" for c, ref in zip(cells, refs))
        lines.append(f"{row['strategy']:>8} {row['world']:>2} {row['rank']:>4} {text}  "
                     f"{row.get('max_weight_diff', 0.0):.1e}")
    return "\n".join(lines) + "\n"


def run_fsdp_memory(model: str = "lipnext_l16w512", worlds: Sequence[int] = (2, 4), batch: int = 8,
                    threads: int = 1, json_path: str | Path | None = None) -> str:
    """The unsharded step in this process, then each FSDP world; return the table (and write JSON)."""
    if any(batch % w for w in worlds):
        raise ValueError(f"--batch {batch} must be divisible by every --worlds entry {list(worlds)}")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    base = one_step(model, batch, 0, 0)
    rows = [dict(strategy="none", world=1, rank=0, **{k: base[k] for k in PARTS})]
    for world in worlds:
        results = run_ranks(world, _worker, model, batch, threads)
        diff = float(max(abs(results[0]["weights"][k] - base["weights"][k]).max() for k in base["weights"]))
        rows += [dict(strategy="fsdp", world=world, rank=r, max_weight_diff=diff,
                      **{k: results[r][k] for k in PARTS}) for r in range(world)]
    if json_path:
        payload = json.dumps({"model": model, "batch": batch, "rows": rows}, indent=1)
        atomic_write(json_path, lambda p: Path(p).write_text(payload))
    return memory_table(model, batch, rows)
