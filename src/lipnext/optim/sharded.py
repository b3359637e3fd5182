"""ShardedManifoldAdam: ManifoldAdam over FSDP2 parameters (DTensors sharded by rows).

Ordinary parameters: Adam/NAdam, weight decay and Lookahead act elementwise, so each rank runs
them on its own rows (``p.to_local()``) and keeps the state of those rows only.

Orthogonal X (n x n): the Riemannian gradient X^T G and the update X <- X @ FastExp(U) need
the whole matrix. Each X has an owner rank o(k) = k mod W (k counts the orthogonal weights in
order). Every step all ranks all-gather X and G; the owner runs ManifoldAdam's step on its
whole matrices, whose state (moments, Lookahead's X_slow and S) lives on that rank only, so
each rank holds about 1/W of it; the owner then broadcasts the new X and every rank keeps its
rows. The arithmetic is ManifoldAdam's, so the result is the unsharded one.

``state_dict()`` is collective and returns ManifoldAdam's unsharded layout (same parameter
indices), so a checkpoint moves between ``none``, ``ddp`` and ``fsdp``; ``load_state_dict``
takes that layout on every rank and keeps each rank's part.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..nn.orthogonal import OrthogonalParameter
from .manifold_adam import _MOMENTS, _SCALARS, ManifoldAdam

__all__ = ["ShardedManifoldAdam"]

_EMPTY = torch.empty(0)


def _local_rows(full: Tensor, p: DTensor) -> Tensor:
    """This rank's rows of ``full``, laid out as ``p`` is sharded (no communication)."""
    local = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return local.to_local()


class ShardedManifoldAdam:
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
        self.group = mesh.get_group()
        self.rank, self.world = mesh.get_local_rank(), mesh.size()
        self.groups = [dict(g, params=list(g["params"])) for g in param_groups]
        self.owner: dict[int, int] = {}                # id(orthogonal X) -> owner rank
        self.proxy: dict[int, nn.Parameter] = {}       # id(p) -> what the inner optimizer updates
        inner_groups = []
        for g in self.groups:
            proxies = []
            for p in g["params"]:
                if g["orthogonal"]:
                    self.owner[id(p)] = len(self.owner) % self.world
                    if self.owner[id(p)] != self.rank:
                        continue
                    proxy = OrthogonalParameter(torch.empty(p.shape, dtype=p.dtype, device=p.device))
                else:
                    proxy = nn.Parameter(p.to_local().detach())
                self.proxy[id(p)] = proxy
                proxies.append(proxy)
            inner_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": proxies})
        self.inner = ManifoldAdam(inner_groups, **defaults)
        self._release()

    def _release(self) -> None:
        """Drop the owners' whole copies of X and G (filled only during step and retract)."""
        for p, owner in self._orthogonal():
            if owner == self.rank:
                self.proxy[id(p)].data = _EMPTY.to(p.device, p.dtype)
        for proxy in self.proxy.values():
            proxy.grad = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's groups (set ``lr`` here, as with any torch optimizer)."""
        return self.inner.param_groups

    def _orthogonal(self) -> Iterator[tuple[DTensor, int]]:
        for g in self.groups:
            if g["orthogonal"]:
                yield from ((p, self.owner[id(p)]) for p in g["params"])

    def _pull(self, with_grad: bool) -> None:
        """Point proxies at the current values (and gradients): local rows, or gathered X."""
        for g in self.groups:
            for p in g["params"]:
                grad = p.grad if with_grad else None
                if g["orthogonal"]:
                    x = p.full_tensor()
                    full_grad = grad.full_tensor() if grad is not None else None
                    if self.owner[id(p)] == self.rank:
                        self.proxy[id(p)].data = x
                        self.proxy[id(p)].grad = full_grad
                else:
                    self.proxy[id(p)].data = p.to_local()
                    self.proxy[id(p)].grad = grad.to_local() if grad is not None else None

    def _push(self) -> None:
        """Broadcast each owner's X; every rank writes its rows into the sharded parameter."""
        for p, owner in self._orthogonal():
            x = self.proxy[id(p)].data if owner == self.rank else \
                torch.empty(p.shape, dtype=p.dtype, device=p.device)
            dist.broadcast(x, group=self.group, group_src=owner)
            p.to_local().copy_(_local_rows(x, p))
        self._release()

    @torch.no_grad()
    def step(self) -> None:
        """One ManifoldAdam step on every rank (collective)."""
        self._pull(with_grad=True)
        self.inner.step()
        self._push()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def retract(self, method: str = "svd") -> float:
        """Polar-retract X and X_slow on their owners (collective); the largest drift of all."""
        self._pull(with_grad=False)
        drift = torch.tensor([self.inner.retract(method)], dtype=torch.float64, device=self._device)
        self._push()
        dist.all_reduce(drift, op=dist.ReduceOp.MAX, group=self.group)
        return drift.item()

    @property
    def _device(self) -> torch.device:
        return self.groups[0]["params"][0].device

    # ------------------------------------------------------------ unsharded state layout
    def state_dict(self) -> dict[str, Any]:
        """ManifoldAdam.state_dict() of the unsharded model, on every rank (collective)."""
        state: dict[int, dict[str, Tensor]] = {}
        index = 0
        for g, inner_g in zip(self.groups, self.inner.param_groups):
            for p in g["params"]:
                if g["orthogonal"]:
                    st = self._gather_orthogonal(p, inner_g)
                else:
                    st = self._gather_rows(p)
                if st:
                    state[index] = st
                index += 1
        groups, start = [], 0
        for g, inner_g in zip(self.groups, self.inner.param_groups):
            groups.append({**{k: v for k, v in inner_g.items() if k != "params"},
                           "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        return {"state": state, "param_groups": groups}

    def _gather_orthogonal(self, p: DTensor, group: dict[str, Any]) -> dict[str, Tensor]:
        owner = self.owner[id(p)]
        st = self.inner.state.get(self.proxy[id(p)], {}) if owner == self.rank else {}
        has = torch.tensor([float(bool(st))], device=self._device)
        dist.broadcast(has, group=self.group, group_src=owner)
        if not has.item():
            return {}
        out = {}
        look = ("slow", "lookahead_sum") if group["lookahead_k"] else ()
        for name in _SCALARS + _MOMENTS + look:
            if name in _SCALARS:
                t = st[name].to(self._device) if st else torch.zeros((), device=self._device)
            else:
                dtype = torch.promote_types(p.dtype, torch.float32)
                t = st[name] if st else torch.empty(p.shape, dtype=dtype, device=self._device)
            t = t.clone()
            dist.broadcast(t, group=self.group, group_src=owner)
            out[name] = t.cpu()
        return out

    def _gather_rows(self, p: DTensor) -> dict[str, Tensor]:
        st = self.inner.state.get(self.proxy[id(p)], {})
        out = {}
        for name, t in st.items():
            if name in _SCALARS:
                out[name] = t.clone()
            else:
                full = DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape,
                                          stride=p.stride())
                out[name] = full.full_tensor().cpu()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ManifoldAdam's unsharded layout (as written by ``state_dict``) on every rank."""
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.groups]:
            raise ValueError("the optimizer state belongs to another model or parameter grouping "
                             f"({[len(g['params']) for g in saved]} parameters per group, this "
                             f"model has {[len(g['params']) for g in self.groups]})")
        inner_state: dict[int, dict[str, Any]] = {}
        inner_groups, index, inner_index = [], 0, 0
        for g, sg in zip(self.groups, saved):
            ids = []
            for p in g["params"]:
                st = state_dict["state"].get(index, state_dict["state"].get(str(index)))
                index += 1
                if id(p) not in self.proxy:
                    continue
                if st:
                    inner_state[inner_index] = st if g["orthogonal"] else {
                        n: (t if n in _SCALARS else _local_rows(t, p)) for n, t in st.items()}
                ids.append(inner_index)
                inner_index += 1
            inner_groups.append({**{k: v for k, v in sg.items() if k != "params"}, "params": ids})
        self.inner.load_state_dict({"state": inner_state, "param_groups": inner_groups})
