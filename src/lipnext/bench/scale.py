"""Scale benchmark of the manifold optimizer on its real code path, per rank, W = 1, 2, 4, 8.

1. Full width (measured on this CPU, then extrapolated per block): one ManifoldAdam step of an
   orthogonal C x C matrix with the paper's recipe (NAdam, lr 1e-3 x 0.5, Lookahead k = 5), at
   its second step, gradients in Lie form (X^T G, as LipNeXt's layers deliver them), under a
   FLOP counter (torch.utils.flop_counter; matrix_exp counted as its degree-18 Pade: 6 + s
   GEMMs) and a live-storage tracker (peak temporaries above the persistent weights, gradients
   and state). A Lookahead sync step (one per k) rotates X_slow by a cycle's S instead of X by
   U: that difference is counted once and divided by k. A model of depth L has 2L + 1 such
   matrices (R, M per block, the stem); ranks own ceil((2L + 1)/W) of them.
2. Scaling (measured, gloo, one thread per rank): DDPManifoldAdam's step at C = --scaling-width
   with --scaling-matrices matrices; each rank's process time, and the bytes each collective
   moves per rank (bandwidth-optimal volume: (W-1)/W n for reduce, broadcast, gather, scatter;
   2 (W-1)/W n for all-reduce).
3. Computed from those counts: optimizer time per step on an H100 SXM (peak fp32 67 TFLOP/s,
   TF32 495, bf16 989 dense; NVLink 450 GB/s per direction; no overlap), and the plans.
"""
from __future__ import annotations

import json
import math
import os
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..io import atomic_write
from ..nn import OrthogonalParameter, mark_lie_gradient
from ..optim import DDPManifoldAdam, ManifoldAdam
from ..optim import functional as F
from .ranks import run_ranks, storage_bytes

__all__ = ["full_width", "plan", "run_scale", "scaling"]

PEAK = {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12}     # H100 SXM dense FLOP/s
NVLINK = 450e9                                              # bytes/s per direction
GPU_BYTES = 80e9
LOOKAHEAD_K = 5


def _matrix_exp_flops(a_shape, out_shape=None, **kwargs) -> int:
    """torch.linalg.matrix_exp: degree-18 Pade, 6 GEMMs plus the squarings (s = 2 assumed)."""
    n = a_shape[-1]
    return (6 + 2) * 2 * n**3 * math.prod(a_shape[:-2])


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created inside the mode and still alive (temporaries)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.now = self.peak = 0
        self.known: set[int] = set()

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                ptr = s.data_ptr()
                if ptr in self.known or s.nbytes() == 0:
                    continue
                entry = self.live.setdefault(ptr, [s.nbytes(), 0])
                if entry[1] == 0:
                    self.now += entry[0]
                    self.peak = max(self.peak, self.now)
                entry[1] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def _counted(fn: Callable[[], object]) -> int:
    """FLOPs of fn() by torch's counter (matrix_exp as its Pade, ``_matrix_exp_flops``)."""
    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten.linalg_matrix_exp: _matrix_exp_flops})
    with counter:
        fn()
    return counter.get_total_flops()


def full_width(c: int, chunk: int) -> dict:
    """Counted FLOPs and measured bytes of one ManifoldAdam step on ``chunk`` C x C matrices.

    The gradients come in Lie form (X^T G, as LipNeXt's layers deliver them: ``lipnext.nn.lie``).
    Per step: the second step, counted, plus 1/k of what a sync step costs more: the rotation
    X_slow exp(alpha S) of a cycle's S instead of the step's own X exp(U)."""
    g = torch.Generator().manual_seed(c)
    xs = [mark_lie_gradient(OrthogonalParameter(torch.eye(c) * torch.sign(torch.randn(c, generator=g))))
          for _ in range(chunk)]
    opt = ManifoldAdam(xs, lr=1e-3, nesterov=True, lookahead_k=LOOKAHEAD_K, chunk_size=chunk)
    for step in range(2):
        for x in xs:
            x.grad = torch.randn(c, c, generator=g) * 1e-3
        if step == 0:
            opt.step()
            first_sum = opt.state[xs[0]]["lookahead_sum"].clone()
    persistent = [*xs, *(x.grad for x in xs), *(t for st in opt.state.values() for t in st.values())]
    tracker = LiveBytes()
    tracker.known = {t.untyped_storage().data_ptr() for t in persistent}
    t0 = time.perf_counter()
    with tracker:
        step_flops = _counted(opt.step)
    seconds = time.perf_counter() - t0
    st = opt.state[xs[0]]
    u = st["lookahead_sum"] - first_sum                      # this step's U
    rotation = _counted(lambda: F.exp_update(xs[0].detach()[None], u[None], skew=True))
    sync = _counted(lambda: F.exp_update(st["slow"][None], 0.5 * st["lookahead_sum"][None] * LOOKAHEAD_K / 2,
                                         skew=True))         # a cycle's S
    u_norm = torch.linalg.matrix_norm(u).item()
    params = chunk * c * c
    return {"C": c, "chunk": chunk,
            "flops_per_matrix": step_flops / chunk + (sync - rotation) / LOOKAHEAD_K,
            "persistent_bytes_per_param": storage_bytes(persistent) / params,
            "temporary_bytes_per_chunk_param": tracker.peak / params, "cpu_seconds": seconds,
            "norm_U": u_norm}


def _count_collectives(counter: dict, world: int) -> None:
    """Wrap the collectives the drivers call: add each call's per-rank volume to ``counter``."""
    for name, factor in (("reduce", 1), ("broadcast", 1), ("gather", 1), ("scatter", 1),
                         ("all_reduce", 2)):
        real = getattr(dist, name)

        def wrapped(tensor, *args, _real=real, _factor=factor, _name=name, **kwargs):
            n = tensor.numel() * tensor.element_size()
            if _name in ("gather", "scatter"):
                n *= world
            counter["bytes"] += _factor * (world - 1) / world * n
            return _real(tensor, *args, **kwargs)
        setattr(dist, name, wrapped)


def scaling_worker(rank: int, world: int, port: int, c: int, n: int, chunk_size: int, steps: int,
                   queue) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        xs = [OrthogonalParameter(torch.linalg.qr(torch.randn(c, c, generator=g))[0]) for _ in range(n)]
        grads = [torch.randn(c, c, generator=g) * 1e-3 for _ in range(n)]
        counter = {"bytes": 0.0}
        kwargs = dict(lr=1e-3, nesterov=True, lookahead_k=LOOKAHEAD_K, chunk_size=chunk_size)
        if world > 1:
            opt = DDPManifoldAdam([dict(params=xs, orthogonal=True)], **kwargs)
            _count_collectives(counter, world)
        else:
            opt = ManifoldAdam(xs, **kwargs)
        times = []
        for _ in range(steps):
            for x, gr in zip(xs, grads):
                x.grad = gr.clone()
            counter["bytes"] = 0.0
            t0 = time.process_time()
            opt.step()
            times.append(time.process_time() - t0)
        queue.put((rank, {"process_s": sorted(times)[len(times) // 2], "spread_s": max(times) - min(times),
                          "bytes": counter["bytes"], "x0": xs[0].detach().numpy().copy()}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def scaling(width: int, matrices: int, chunk_size: int, steps: int, worlds: Sequence[int]) -> list[dict]:
    """DDPManifoldAdam's step at W = 1 and each of ``worlds``: process time and bytes per rank."""
    rows = []
    for world in [1, *worlds]:
        res = run_ranks(world, scaling_worker, width, matrices, chunk_size, steps)
        rows.append({"W": world, "ranks": res})
    base = rows[0]["ranks"][0]
    for row in rows:
        row["max_process_s"] = max(r["process_s"] for r in row["ranks"].values())
        row["ratio"] = row["max_process_s"] / rows[0]["max_process_s"]
        row["max_weight_diff"] = float(max(abs(r["x0"] - base["x0"]).max() for r in row["ranks"].values()))
    for row in rows:
        for r in row["ranks"].values():
            del r["x0"]
    return rows


def plan(model: str, depth: int, fw: dict, world: int, strategy: str, precision: str) -> dict:
    """Per-rank counts of one optimizer step of ``model`` at ``world`` ranks (computed)."""
    c = fw["C"]
    mats = 2 * depth + 1
    params = mats * c * c
    owned = math.ceil(mats / world) if strategy != "replicated" else mats
    flops = owned * fw["flops_per_matrix"]
    n_bytes = params * 4
    if strategy == "fsdp":
        comm = 3 * n_bytes * (world - 1) / world**2
    else:                       # replicated: all-reduce; ddp-owner: reduce + broadcast
        comm = 2 * n_bytes * (world - 1) / world
    chunk_temp = fw["temporary_bytes_per_chunk_param"] * fw["chunk"] * c * c
    if strategy == "fsdp":      # weight, grad, moments, slow, S sharded; owner gathers X and G
        persistent = 24 * params / world
        temp = chunk_temp + 8 * owned * c * c
    elif strategy == "ddp":     # weights and local gradients replicated; state on the owner
        persistent = 8 * params + 16 * owned * c * c
        temp = chunk_temp
    else:
        persistent, temp = 24 * params, chunk_temp
    seconds = flops / PEAK[precision] + comm / NVLINK
    return {"model": model, "W": world, "strategy": strategy, "precision": precision,
            "flops": flops, "comm_bytes": comm, "persistent_B_per_param": persistent / params, "temp_B_per_param": temp / params,
            "peak_GB": (persistent + temp) / 1e9, "seconds": seconds}


def run_scale(widths: Sequence[int] = (4096, 5792), chunk_size: int = 8, measure_chunk: int = 1,
              scaling_width: int = 1024, scaling_matrices: int = 8, worlds: Sequence[int] = (2, 4),
              steps: int = 3, threads: int = 2, json_path: str | Path | None = None,
              log: Callable[[str], None] = lambda s: print(s, flush=True)) -> None:
    """The three parts of the module docstring, each printed by ``log`` as it is known."""
    torch.set_num_threads(threads)
    log(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs (shared, noisy)")

    rows = scaling(scaling_width, scaling_matrices, chunk_size, steps, worlds)
    log(f"\nmeasured: DDPManifoldAdam step, C = {scaling_width}, {scaling_matrices} matrices, "
        f"one thread per rank, median of {steps} (process time)")
    log(f"{'W':>2} {'max rank s':>10} {'ratio':>6} {'bytes/rank':>11} {'max|dX|':>8}  per rank s (spread)")
    for row in rows:
        per = " ".join(f"{r['process_s']:.2f}({r['spread_s']:.2f})" for r in row["ranks"].values())
        log(f"{row['W']:>2} {row['max_process_s']:10.2f} {row['ratio']:6.2f} "
            f"{row['ranks'][0]['bytes'] / 1e6:9.1f}MB {row['max_weight_diff']:8.1e}  {per}")

    fws = [full_width(c, measure_chunk) for c in widths]
    for fw in fws:
        log(f"\nmeasured: C = {fw['C']}, one step of {fw['chunk']} matrix: {fw['cpu_seconds']:.1f} s on "
            f"this CPU, ||U||_F = {fw['norm_U']:.2f}; counted {fw['flops_per_matrix'] / 1e12:.2f} "
            f"TFLOP per matrix (sync/k incl.), persistent {fw['persistent_bytes_per_param']:.1f} B/param, "
            f"temporaries {fw['temporary_bytes_per_chunk_param']:.1f} B per chunk param")
    models = {4096: ("lipnext_l32w4096 (1B)", 32), 5792: ("lipnext_2b", 32)}
    plans = []
    log("\ncomputed per rank, one optimizer step (chunk_size "
        f"{chunk_size}; H100 time = FLOPs / peak + bytes / NVLink)")
    log(f"{'model':>22} {'strategy':>10} {'W':>2} {'TFLOP':>7} {'comm GB':>8} {'persist B/p':>11} "
        f"{'temp B/p':>8} {'peak GB':>8} {'fp32 s':>7} {'tf32 s':>7} {'bf16 s':>7}")
    for fw in fws:
        fw = dict(fw, chunk=chunk_size)
        name, depth = models.get(fw["C"], (f"C{fw['C']}", 32))
        for strategy in ("replicated", "ddp", "fsdp"):
            for world in (1, 2, 4, 8):
                if strategy != "replicated" and world == 1:
                    continue
                ps = {prec: plan(name, depth, fw, world, strategy, prec) for prec in PEAK}
                p = ps["fp32"]
                plans.append({**p, **{f"seconds_{k}": v["seconds"] for k, v in ps.items()}})
                log(f"{name:>22} {strategy:>10} {world:>2} {p['flops'] / 1e12:7.2f} "
                    f"{p['comm_bytes'] / 1e9:8.2f} {p['persistent_B_per_param']:11.1f} "
                    f"{p['temp_B_per_param']:8.2f} {p['peak_GB']:8.1f} "
                    + " ".join(f"{ps[k]['seconds']:7.3f}" for k in PEAK))
    if json_path:
        payload = json.dumps({"scaling": rows, "full_width": fws, "plans": plans}, indent=1)
        atomic_write(json_path, lambda p: Path(p).write_text(payload))
