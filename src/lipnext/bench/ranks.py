"""Benchmarks over W local processes: one process per rank (spawned, gloo, on this machine),
and the bytes a set of tensors keeps."""
from __future__ import annotations

import queue as queue_module
import socket
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.multiprocessing as mp

__all__ = ["free_port", "run_ranks", "storage_bytes"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, worker: Callable[..., None], *args: Any) -> dict[int, Any]:
    """Start ``worker(rank, world, port, *args, queue)`` in ``world`` spawned processes; each
    puts ``(rank, result)`` on the queue. Returns {rank: result} once all have ended; a rank
    that dies without a result ends the others and raises (its traceback is on stderr)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < world:
            try:
                rank, result = queue.get(timeout=1.0)
                results[rank] = result
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} of {world} exited with code "
                                       f"{procs[dead[0]].exitcode} before reporting") from None
    finally:
        for p in procs:
            if len(results) < world:
                p.terminate()
            p.join()
    return results


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (DTensors count their local part)."""
    seen = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())
