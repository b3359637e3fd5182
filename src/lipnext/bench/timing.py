"""Timing and memory helpers shared by the benchmarks.

Peak memory on a GPU is ``torch.cuda.max_memory_allocated`` (bytes held by tensors).
On a CPU there is no allocator counter (and tracemalloc does not see torch's
allocations): each measurement runs in a fresh process, first takes one training step
of a batch-of-2 copy of the model (so the code pages and one-off buffers of every kernel
are already resident), then reports the peak resident set size (``getrusage``
ru_maxrss) minus the resident set size just before the measured model is built: the
extra process memory at the peak (weights, gradients, optimizer state, activations and
allocator slack), what a user would see grow in ``top``.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable

import torch

from ..engine import distributed

__all__ = ["resolve_device", "synchronize", "time_calls", "interleaved_calls", "rss_bytes",
           "peak_rss_bytes", "peak_tflops", "median", "BF16_PEAK_TFLOPS", "PEAK_TFLOPS"]

# Dense peaks (TFLOP/s, without sparsity) from the vendors' datasheets, matched against
# torch.cuda.get_device_name (first match in order); MFU is reported only for these or --peak-tflops.
BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,     # SXM
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}
PEAK_TFLOPS = {
    "bf16": BF16_PEAK_TFLOPS,
    "tf32": {"H100 PCIe": 378.0, "H100 NVL": 418.0, "H100": 494.7, "H200": 494.7, "GH200": 494.7,
             "A100": 156.0, "L40S": 183.0, "L4": 60.0},
    "fp32": {"H100 PCIe": 51.2, "H100 NVL": 60.0, "H100": 66.9, "H200": 66.9, "GH200": 66.9,
             "A100": 19.5, "L40S": 91.6, "L4": 30.3},
}


def resolve_device(name: str = "auto") -> torch.device:
    """``engine.distributed.resolve_device`` ('auto': the GPU if there is one), with the error
    in the words of the benchmarks' ``--device`` option."""
    try:
        return distributed.resolve_device(name)
    except ValueError:
        raise ValueError(f"--device {name} was asked for but no CUDA GPU is available; "
                         "use --device cpu or auto") from None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of ``steps`` calls of fn after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def interleaved_calls(fns: dict[str, Callable[[], object]], repeats: int,
                      device: torch.device = torch.device("cpu")) -> dict[str, list[float]]:
    """Seconds of each fn, called in turn (A B A B ...) after one warm-up call each, so that
    all see the same machine load."""
    for fn in fns.values():
        fn()
    synchronize(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[k].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_tflops(device: torch.device, override: float | None = None, kind: str = "bf16") -> float | None:
    """The dense ``kind`` (bf16, tf32, fp32) peak of ``device`` in TFLOP/s, if known (or given)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS[kind].items():
        if key in name:
            return value
    return None
