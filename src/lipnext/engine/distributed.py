"""One command for one CPU, one GPU or many: torch.distributed set up from torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); a single process otherwise.

Strategies: ``none`` (one process), ``ddp`` (DistributedDataParallel: replicated weights,
all-reduced gradients), ``fsdp`` (FSDP2 ``fully_shard`` on each block, then on the whole
model: each rank stores 1/W of the rows of every weight and gradient; weights are gathered
block by block for the forward and backward passes; the optimizer is
``ShardedManifoldAdam``, which gathers each orthogonal matrix on one owner rank).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
    set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from ..nn.orthogonal import is_orthogonal, mark_orthogonal

__all__ = ["DistInfo", "setup", "teardown", "wrap_model", "barrier", "resolve_device", "shard_model",
           "is_sharded", "unsharded", "full_state_dict", "load_full_state_dict"]


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
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy == "none" and world > 1:
        raise ValueError(f"launched with WORLD_SIZE={world} but dist.strategy=none; use ddp or fsdp")
    dev = resolve_device(device, local)
    if strategy in ("ddp", "fsdp") and not dist.is_initialized():
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
    """The module to call for training: DDP around ``model``, or ``model`` sharded in place."""
    if info.strategy == "fsdp":
        return shard_model(model, device)
    if info.strategy != "ddp":
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 in place: ``fully_shard`` each of ``model.blocks`` (if any), then the model.

    fully_shard swaps every parameter for a DTensor parameter, which loses the
    ``OrthogonalParameter`` class; the orthogonal ones are marked again by name.
    """
    orthogonal = {name for name, p in model.named_parameters() if is_orthogonal(p)}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name, p in model.named_parameters():
        if name in orthogonal:
            mark_orthogonal(p)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def unsharded(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every parameter whole on every rank inside the block (collective; a no-op unsharded).

    For code that reads weights outside ``forward``, such as ``lipschitz_bound()``.
    """
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()


def full_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """The unsharded state dict: ``model.state_dict()``, or under FSDP (collective) gathered
    tensor by tensor to rank 0's CPU (other ranks get an empty dict)."""
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict (every rank holds it; under FSDP each keeps its rows)."""
    if is_sharded(model):
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        model.load_state_dict(state, strict=True)


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
