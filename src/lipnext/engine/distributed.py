"""One command for one CPU, one GPU or many: torch.distributed set up from torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); a single process otherwise.

Strategies: ``none`` (one process), ``ddp`` (DistributedDataParallel: replicated weights,
all-reduced gradients; the manifold optimizer sees whole matrices on every rank). ``fsdp``
is refused with an explanation (see docs/TRAINING.md): the manifold optimizer needs whole
orthogonal matrices (X^T G, X @ exp(U)), which sharded parameters do not provide.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "teardown", "wrap_model", "barrier", "resolve_device"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> if CUDA is available, else cpu."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available; use train.device=auto or cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup(strategy: str = "auto", backend: str = "auto", device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group that torchrun describes (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if strategy == "fsdp":
        raise ValueError("dist.strategy=fsdp is not supported: the manifold optimizer updates whole "
                         "orthogonal matrices (X^T G and X @ FastExp(U)), which FSDP shards; "
                         "use dist.strategy=ddp (see docs/TRAINING.md, 'Multi-GPU')")
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy == "none" and world > 1:
        raise ValueError(f"launched with WORLD_SIZE={world} but dist.strategy=none; use ddp")
    dev = resolve_device(device, local)
    if strategy == "ddp" and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ and world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, strategy), dev


def teardown(info: DistInfo, created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    if info.strategy != "ddp":
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def barrier(info: DistInfo) -> None:
    if dist.is_initialized():
        dist.barrier()


def all_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True iff ``flag`` holds on every rank."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() == 0)
