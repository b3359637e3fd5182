"""One command for one CPU, one GPU or many: torch.distributed set up from torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); a single process otherwise.

Strategies: ``none`` (one process), ``ddp`` (DistributedDataParallel over the ordinary
parameters, ``gradient_as_bucket_view=True``; the orthogonal matrices are left out of its
buckets and ``DDPManifoldAdam`` reduces each one's gradient to its owner rank, which updates
it and broadcasts it), ``fsdp`` (FSDP2 ``fully_shard`` on each block, then on the whole
model: each rank stores 1/W of the rows of every weight and gradient; weights are gathered
block by block for the forward and backward passes, in bf16 under bf16 training; the
optimizer is ``ShardedManifoldAdam``, which gathers each orthogonal matrix on its owner only).

``build_model`` allocates the orthogonal matrices on the meta device and initialises them on
the training device (only the owner's under ``ddp``), so a 2B model never runs 65 float64
QR factorisations of 5792 x 5792 on every rank's CPU.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..models import create_model
from ..models.base import CertifiableModel
from ..nn.lie import has_lie_gradient, mark_lie_gradient
from ..nn.orthogonal import deferred_orthogonal, init_orthogonal_, is_orthogonal, mark_orthogonal
from ..optim import assign_owners
from ..optim.sharded import gather_rows
from ..program import known_bounds, lipschitz_of

__all__ = ["DistInfo", "setup", "teardown", "wrap_model", "barrier", "resolve_device", "shard_model",
           "is_sharded", "full_state_dict", "load_full_state_dict", "build_model",
           "clip_gradients", "lipschitz_bound", "broadcast_float", "sum_float"]


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
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
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


def build_model(name: str, info: DistInfo, device: torch.device, seed: int,
                **kwargs: Any) -> CertifiableModel:
    """``create_model(name, seed=seed, **kwargs)`` on ``device``, its orthogonal matrices built on
    the meta device and initialised on ``device`` (``init_orthogonal_``, deterministic for the
    seed); under ``ddp`` each rank initialises only the matrices it owns (``DDPManifoldAdam``
    broadcasts them). A model with other random orthogonal factors, or whose constructor
    computes with one (BRO's initial taps), is built on the CPU."""
    try:
        with deferred_orthogonal():
            model = create_model(name, seed=seed, **kwargs)
    except NotImplementedError:          # "Cannot copy out of meta tensor": computed with one
        return create_model(name, seed=seed, **kwargs).to(device)
    if any(t.is_meta for t in [*model.buffers(), *model.parameters()] if not is_orthogonal(t)):
        return create_model(name, seed=seed, **kwargs).to(device)
    sizes = [p.shape[0] for p in model.parameters() if is_orthogonal(p)]
    owners = (assign_owners(sizes, info.world_size) if info.strategy == "ddp"
              else [info.rank] * len(sizes))
    init_orthogonal_(model, seed, device, select=lambda k: owners[k] == info.rank)
    return model.to(device)


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device,
               bf16: bool = False) -> torch.nn.Module:
    """The module to call for training: DDP around ``model``, or ``model`` sharded in place.

    Under DDP the orthogonal matrices are left out of DDP's buckets (``build_optimizer`` then
    picks ``DDPManifoldAdam``, which reduces their gradients to their owners): all-reducing
    them as well would move twice the bytes of reduce + broadcast, for no use on the ranks that
    do not update them."""
    if info.strategy == "fsdp":
        return shard_model(model, device, bf16)
    if info.strategy != "ddp":
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    orthogonal = [name for name, p in model.named_parameters() if is_orthogonal(p)]
    DDP._set_params_and_buffers_to_ignore_for_model(model, orthogonal)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               gradient_as_bucket_view=True)


def shard_model(model: torch.nn.Module, device: torch.device, bf16: bool = False) -> torch.nn.Module:
    """FSDP2 in place: ``fully_shard`` each of ``model.blocks`` (if any), then the model.

    ``bf16``: a ``MixedPrecisionPolicy`` gathers the parameters in bf16 for the forward and
    backward passes and reduce-scatters the gradients in fp32 (the fp32 shards stay the master
    weights). fully_shard swaps every parameter for a DTensor parameter, which loses the
    ``OrthogonalParameter`` class; the orthogonal ones (and those with Lie-form gradients,
    ``lipnext.nn.lie``) are marked again by name.
    """
    orthogonal = {name for name, p in model.named_parameters() if is_orthogonal(p)}
    lie = {name for name, p in model.named_parameters() if has_lie_gradient(p)}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # A LipNeXt block returns a view (ops.lipnext_block reshapes its output); FSDP2 warns in case
    # an in-place op follows, which would skip its pre-backward hook. None does: each block's
    # output goes to the next block's positional encoding (x + p) or to the pool, both out of
    # place (docs/TRAINING.md, FSDP). Only that warning, for that class, is silenced.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPLipNeXtBlock\) returned a view",
                            category=UserWarning)
    for name, p in model.named_parameters():
        if name in orthogonal:
            mark_orthogonal(p)
        mark_lie_gradient(p, name in lie)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


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


def clip_gradients(model: torch.nn.Module, optimizer: Any, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm``; return the norm before clipping (the same
    on every rank). ``DDPManifoldAdam`` clips itself (its orthogonal gradients live on their
    owners); FSDP's DTensor norm is made whole."""
    if hasattr(optimizer, "clip_grad_norm_"):
        return optimizer.clip_grad_norm_(max_norm)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return gnorm.full_tensor() if isinstance(gnorm, DTensor) else gnorm


def lipschitz_bound(model: CertifiableModel, info: DistInfo, device: torch.device) -> float:
    """``model.lipschitz_bound()`` on every rank (collective): computed on rank 0 and broadcast.

    Under FSDP no rank holds the whole model for it. Each block (an FSDP unit) is whole on its
    owner only (``assign_owners``: block k on rank k mod W), its fp32 row shards gathered there
    as ``ShardedManifoldAdam`` gathers X, and the owner computes the block's bound; the bounds
    are summed across ranks (each entry is one owner's), and rank 0 gathers the rest (stem,
    head, ...) and computes the model's bound with the blocks' given (``program.known_bounds``).
    The fp32 shards matter: FSDP's own ``unshard()`` gathers in the bf16 of its mixed-precision
    policy, and bf16-rounded orthogonal matrices have bounds of 1 + O(2^-8 sqrt(n)) each."""
    if not is_sharded(model):
        return broadcast_float(float(model.lipschitz_bound()) if info.is_main else 0.0, info, device)
    blocks = [b for b in getattr(model, "blocks", []) if isinstance(b, FSDPModule)]
    owners = assign_owners([1] * len(blocks), info.world_size)
    bounds = torch.zeros(len(blocks), dtype=torch.float64, device=device)
    for k, block in enumerate(blocks):
        full = _gather_params(block, owners[k], info)
        if owners[k] == info.rank:
            bounds[k] = lipschitz_of(_plain(block, full), f"blocks.{k}")
        del full
    dist.all_reduce(bounds)
    full = _gather_params(model, 0, info, skip={id(p) for b in blocks for p in b.parameters()})
    value = 0.0
    if info.is_main:
        plain = _plain(model, full)
        shells = [plain.get_submodule(name) for name, m in model.named_modules() if m in blocks]
        with known_bounds(dict(zip(shells, bounds.tolist()))):
            value = float(plain.lipschitz_bound())
    return broadcast_float(value, info, device)


def _gather_params(module: torch.nn.Module, owner: int, info: DistInfo,
                   skip: set[int] = frozenset()) -> dict[int, torch.Tensor]:
    """The FSDP-sharded parameters of ``module`` (but those in ``skip``) whole on ``owner``, from
    their row shards in their own dtype (collective): {id(parameter): tensor}, empty elsewhere."""
    params = [p for p in module.parameters() if isinstance(p, DTensor) and id(p) not in skip]
    pending = [gather_rows(p.to_local().detach(), p.shape[0], owner, dist.group.WORLD, info.rank,
                           info.world_size) for p in params]
    wholes = [(p, gather()) for p, gather in zip(params, pending)]
    return {id(p): full.view(p.shape) for p, full in wholes if full is not None}


def _plain(module: torch.nn.Module, full: dict[int, torch.Tensor],
           memo: dict[int, torch.nn.Module] | None = None) -> torch.nn.Module:
    """A shallow copy of ``module``'s tree for ``lipschitz_of``: FSDP-wrapped modules as their own
    class and without FSDP's hooks, the parameters found in ``full`` whole (the others as they
    are). The model itself is not touched."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if isinstance(module, FSDPModule):
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    copy = memo[id(module)] = cls.__new__(cls)
    copy.__dict__.update(module.__dict__)
    if isinstance(module, FSDPModule):
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                      "_forward_pre_hooks_with_kwargs"):
            setattr(copy, hooks, type(getattr(module, hooks))())
    copy._parameters = {name: p if p is None or id(p) not in full
                        else torch.nn.Parameter(full[id(p)], requires_grad=False)
                        for name, p in module._parameters.items()}
    copy._modules = {name: None if child is None else _plain(child, full, memo)
                     for name, child in module._modules.items()}
    return copy


def broadcast_float(value: float, info: DistInfo, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (collective; float64)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.item()


def sum_float(value: float, info: DistInfo, device: torch.device) -> float:
    """The sum of ``value`` over the ranks, on every rank (collective; float64)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()
