"""ShardedManifoldAdam: ManifoldAdam over FSDP2 parameters (DTensors sharded by rows).

Ordinary parameters: Adam/NAdam, weight decay and Lookahead act elementwise, so each rank runs
them on its own rows (``p.to_local()``) and keeps the state of those rows only.

Orthogonal X (n x n): the Riemannian gradient X^T G and the update X <- X exp(U) need the whole
matrix. Each X has an owner rank (``assign_owners``). Every step the rows of X and of its
(already reduce-scattered) gradient G are gathered to the owner only (``dist.gather``); the
owner runs ManifoldAdam's step on its whole matrices, whose state (moments, Lookahead's X_slow
and S) lives on that rank only, and sends each rank its rows of the new X back
(``dist.scatter``). Per matrix each non-owner sends 2 n^2/W and receives n^2/W elements; the
arithmetic is ManifoldAdam's, so the result is the unsharded one.

``state_dict()`` is collective and returns ManifoldAdam's unsharded layout (same parameter
indices), so a checkpoint moves between ``none``, ``ddp`` and ``fsdp``; ``load_state_dict``
takes that layout on every rank and keeps each rank's part.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..nn.lie import has_lie_gradient, mark_lie_gradient
from ..nn.orthogonal import OrthogonalParameter
from .manifold_adam import _SCALARS
from .owners import OwnerShardedOptimizer

__all__ = ["ShardedManifoldAdam", "gather_rows", "shard_rows"]

_EMPTY = torch.empty(0)


def shard_rows(n: int, world: int) -> int:
    """Rows per rank of an n-row FSDP2 shard (torch.chunk: ceil(n/W), the last fewer)."""
    return math.ceil(n / world)


def gather_rows(local: Tensor, n: int, owner: int, group: dist.ProcessGroup, rank: int,
                world: int) -> Callable[[], Tensor | None]:
    """Start gathering the row shards ``local`` of an n-row FSDP2 tensor to ``owner`` only
    (``dist.gather``, collective); the returned function waits for it and gives the whole
    tensor on the owner, None elsewhere."""
    buf = local.new_zeros((shard_rows(n, world), *local.shape[1:]))
    buf[: len(local)] = local
    bufs = [torch.empty_like(buf) for _ in range(world)] if owner == rank else None
    work = dist.gather(buf, bufs, group=group, group_dst=owner, async_op=True)

    def whole(_sent: Tensor = buf) -> Tensor | None:        # the send buffer lives until then
        work.wait()
        return None if bufs is None else torch.cat(bufs)[:n]
    return whole


def _local_rows(full: Tensor, p: DTensor) -> Tensor:
    """This rank's rows of ``full``, laid out as ``p`` is sharded (no communication)."""
    local = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return local.to_local()


class ShardedManifoldAdam(OwnerShardedOptimizer):
    """ManifoldAdam for FSDP2 models (see the module docstring).

    ``param_groups`` are ManifoldAdam's (DTensor parameters, ``orthogonal`` set on each group);
    keyword arguments are ManifoldAdam's. The process group is each parameter's 1-D mesh.
    """

    def __init__(self, param_groups: list[dict[str, Any]], **defaults: Any):
        params = [p for g in param_groups for p in g["params"]]
        meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
        if len(meshes) != 1 or len(params) != sum(isinstance(p, DTensor) for p in params):
            raise ValueError("ShardedManifoldAdam needs every parameter sharded by FSDP "
                             "(fully_shard) over one device mesh; use ManifoldAdam otherwise")
        mesh = meshes.pop()
        if mesh.ndim != 1:
            raise ValueError(f"ShardedManifoldAdam supports a 1-D device mesh, got {mesh.ndim}-D")
        super().__init__(param_groups, mesh.get_group(), mesh.get_local_rank(), mesh.size())
        for g in self.groups:
            for p in g["params"]:
                if not g["orthogonal"]:
                    self.local[id(p)] = nn.Parameter(p.to_local().detach())
                elif self.owner[id(p)] == self.rank:
                    self.local[id(p)] = OrthogonalParameter(torch.empty(p.shape, dtype=p.dtype, device=p.device))
        self._build_inner(defaults)
        self._release()

    def _release(self) -> None:
        """Drop the owners' whole copies of X and G (filled only during step and retract)."""
        for p, owner in self.orthogonal():
            if owner == self.rank:
                self.local[id(p)].data = _EMPTY.to(p.device, p.dtype)
        for proxy in self.local.values():
            proxy.grad = None

    def _pull(self, with_grad: bool) -> None:
        """Point the proxies at the current rows, and gather each X (and G) to its owner."""
        pending = []
        for g in self.groups:
            for p in g["params"]:
                grad = p.grad if with_grad else None
                if not g["orthogonal"]:
                    self.local[id(p)].data = p.to_local()
                    self.local[id(p)].grad = grad.to_local() if grad is not None else None
                    continue
                owner = self.owner[id(p)]
                if owner == self.rank:       # the gradient's form as the step delivers it now
                    mark_lie_gradient(self.local[id(p)], has_lie_gradient(p))
                gather = dict(n=p.shape[0], owner=owner, group=self.group, rank=self.rank, world=self.world)
                pending.append((p, "data", gather_rows(p.to_local(), **gather)))
                if grad is not None:
                    pending.append((p, "grad", gather_rows(grad.to_local(), **gather)))
        for p, what, whole in pending:
            full = whole()
            if full is not None:
                setattr(self.local[id(p)], what, full)

    def _pull_orthogonal(self) -> None:
        self._pull(with_grad=False)

    def _sync_orthogonal(self) -> None:
        """Each owner sends every rank its rows of the new X (dist.scatter)."""
        pending = []
        for p, owner in self.orthogonal():
            rows = shard_rows(p.shape[0], self.world)
            buf = torch.empty((rows, *p.shape[1:]), dtype=p.dtype, device=p.device)
            parts = None
            if owner == self.rank:
                x = self.local[id(p)].data
                x = torch.cat([x, x.new_zeros((rows * self.world - len(x), *x.shape[1:]))])
                parts = list(x.split(rows))
            pending.append((p, buf, dist.scatter(buf, parts, group=self.group, group_src=owner,
                                                 async_op=True)))
        for p, buf, work in pending:
            work.wait()
            local = p.to_local()
            local.copy_(buf[: len(local)])
        self._release()

    @torch.no_grad()
    def step(self) -> None:
        """One ManifoldAdam step on every rank (collective)."""
        self._pull(with_grad=True)
        self.inner.step()
        self._sync_orthogonal()

    def _ordinary_state(self, p: Tensor, st: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, t in st.items():
            if name in _SCALARS:
                out[name] = t.clone()
            else:
                full = DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape,
                                          stride=p.stride())
                out[name] = full.full_tensor().cpu()
        return out

    def _local_state(self, p: Tensor, st: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: (t if n in _SCALARS else _local_rows(t, p)) for n, t in st.items()}
