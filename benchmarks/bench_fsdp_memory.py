"""Per-rank memory of FSDP training state against one unsharded process, measured in one run.

    python benchmarks/bench_fsdp_memory.py [--model lipnext_l16w512] [--worlds 2 4]
        [--batch 8] [--threads 1] [--json out.json]

Each configuration runs one training step (CPU, gloo; W processes started with
torch.multiprocessing) and counts the bytes each rank keeps between steps: the weights, the
gradients (before they are freed) and the optimizer state (ManifoldAdam unsharded;
ShardedManifoldAdam's row shards, owned whole matrices and their state under FSDP). Storage
shared by several tensors is counted once. It also checks that the sharded step gives the
unsharded weights.
"""
from __future__ import annotations

import argparse
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lipnext.engine.distributed import full_state_dict, shard_model
from lipnext.models import create_model
from lipnext.optim import ShardedManifoldAdam, build_optimizer


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (DTensors count their local part)."""
    seen = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def optimizer_tensors(opt) -> list[torch.Tensor]:
    """The state tensors (ShardedManifoldAdam keeps them in its inner ManifoldAdam)."""
    inner = opt.inner if isinstance(opt, ShardedManifoldAdam) else opt
    return [t for st in inner.state.values() for t in st.values() if isinstance(t, torch.Tensor)]


def one_step(model_name: str, batch: int, world: int, rank: int) -> dict:
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


def worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        queue.put((rank, one_step(args.model, args.batch, world, rank)))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lipnext_l16w512")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if any(args.batch % w for w in args.worlds):
        ap.error("--batch must be divisible by every --worlds entry")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    base = one_step(args.model, args.batch, 0, 0)
    total = {k: base[k] for k in ("weights_bytes", "grad_bytes", "optimizer_bytes")}
    rows = [dict(strategy="none", world=1, rank=0, **total)]
    ctx = mp.get_context("spawn")
    for world in args.worlds:
        queue = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(r, world, port, args, queue))
                 for port in [free_port()] for r in range(world)]
        for p in procs:
            p.start()
        results = dict(queue.get() for _ in procs)
        for p in procs:
            p.join()
        diff = max(abs(results[0]["weights"][k] - base["weights"][k]).max()
                   for k in base["weights"])
        for r in range(world):
            rows.append(dict(strategy="fsdp", world=world, rank=r, max_weight_diff=diff,
                             **{k: results[r][k] for k in total}))
    print(f"{args.model}, batch {args.batch}, one step; MiB per rank (ratio to the unsharded process)")
    print(f"{'strategy':>8} {'W':>2} {'rank':>4} {'weights':>16} {'gradients':>16} "
          f"{'optimizer':>16} {'all':>16}  max |dW|")
    for row in rows:
        cells = [row[k] for k in total] + [sum(row[k] for k in total)]
        refs = list(total.values()) + [sum(total.values())]
        text = " ".join(f"{c / 2**20:9.2f} ({c / ref:.2f})" for c, ref in zip(cells, refs))
        print(f"{row['strategy']:>8} {row['world']:>2} {row['rank']:>4} {text}  "
              f"{row.get('max_weight_diff', 0.0):.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
