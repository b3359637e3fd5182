"""Owner-sharded manifold optimizers: each orthogonal matrix is updated by one owner rank.

The Riemannian gradient X^T G and the update X <- X exp(U) need a whole matrix, so data
parallelism cannot split one; it can split the stack. ``assign_owners`` gives every
orthogonal X an owner (its O(n^3) work balanced over the ranks); the owner alone runs the
manifold step on X (``lipnext.optim.functional``) and alone holds X's optimizer state
(moments, Lookahead's X_slow and S). ``OwnerShardedOptimizer`` is the part the DDP and FSDP
drivers share: an inner ManifoldAdam over what this rank updates, retraction by owner, and
``state_dict`` in ManifoldAdam's unsharded layout (same parameter indices), so a checkpoint
moves between ``none``, ``ddp`` and ``fsdp``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .manifold_adam import _MOMENTS, _SCALARS, ManifoldAdam
from .plans import PLAN_STATE, new_plan_state

__all__ = ["OwnerShardedOptimizer", "assign_owners"]


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """Owner rank of each n x n matrix (``sizes`` = the n's): largest first to the rank with
    the least n^3 work so far (ties: lowest rank); equal sizes give k mod W."""
    load = [0] * world
    owners = [0] * len(sizes)
    for k in sorted(range(len(sizes)), key=lambda k: -sizes[k]):
        owners[k] = min(range(world), key=lambda r: (load[r], r))
        load[owners[k]] += sizes[k] ** 3
    return owners


class OwnerShardedOptimizer:
    """The shared part of the owner-sharded drivers (see the module docstring).

    Subclasses set ``self.local[id(p)]`` (the tensor the inner optimizer updates for ``p``,
    absent where this rank holds no state of ``p``) before calling ``_build_inner`` and
    implement ``step`` and ``_sync_orthogonal`` (owners' X -> every rank).
    """

    def __init__(self, param_groups: list[dict[str, Any]], group: dist.ProcessGroup | None,
                 rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world
        self.groups = [dict(g, params=list(g["params"])) for g in param_groups]
        orthogonal = [p for g in self.groups if g["orthogonal"] for p in g["params"]]
        self.owner = dict(zip(map(id, orthogonal), assign_owners([p.shape[0] for p in orthogonal],
                                                                 world)))
        self.local: dict[int, Tensor] = {}

    def _build_inner(self, defaults: dict[str, Any]) -> None:
        inner_groups = [{**{k: v for k, v in g.items() if k != "params"},
                         "params": [self.local[id(p)] for p in g["params"] if id(p) in self.local]}
                        for g in self.groups]
        self.inner = ManifoldAdam(inner_groups, **defaults)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's groups (set ``lr`` here, as with any torch optimizer)."""
        return self.inner.param_groups

    def orthogonal(self) -> list[tuple[Tensor, int]]:
        """(X, owner rank) of every orthogonal matrix, in parameter order."""
        return [(p, self.owner[id(p)]) for g in self.groups if g["orthogonal"] for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @property
    def _device(self) -> torch.device:
        return self.groups[0]["params"][0].device

    @torch.no_grad()
    def retract(self, method: str = "auto") -> float:
        """Polar-retract X and X_slow on their owners (collective); the largest drift of all."""
        self._pull_orthogonal()
        drift = torch.tensor([self.inner.retract(method)], dtype=torch.float64, device=self._device)
        self._sync_orthogonal()
        dist.all_reduce(drift, op=dist.ReduceOp.MAX, group=self.group)
        return drift.item()

    def _pull_orthogonal(self) -> None:
        """Make the owners' ``local`` X current (FSDP gathers the rows; DDP has them)."""

    def _sync_orthogonal(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ unsharded state layout
    def _ordinary_state(self, p: Tensor, st: dict[str, Tensor]) -> dict[str, Tensor]:
        """The whole state of an ordinary parameter from this rank's (collective under FSDP)."""
        return {n: t.clone() if n in _SCALARS else t.cpu() for n, t in st.items()}

    def _local_state(self, p: Tensor, st: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's part of an ordinary parameter's whole state."""
        return st

    def state_dict(self) -> dict[str, Any]:
        """ManifoldAdam.state_dict() of the unsharded model, on every rank (collective)."""
        state: dict[int, dict[str, Tensor]] = {}
        index = 0
        for g, inner_g in zip(self.groups, self.inner.param_groups):
            for p in g["params"]:
                if g["orthogonal"]:
                    st = self._gather_orthogonal(p, inner_g)
                else:
                    st = self._ordinary_state(p, self.inner.state.get(self.local[id(p)], {}))
                if st:
                    state[index] = st
                index += 1
        groups, start = [], 0
        for g, inner_g in zip(self.groups, self.inner.param_groups):
            groups.append({**{k: v for k, v in inner_g.items() if k != "params"},
                           "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        return {"state": state, "param_groups": groups}

    def _gather_orthogonal(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        owner = self.owner[id(p)]
        st = self.inner.state.get(self.local[id(p)], {}) if owner == self.rank else {}
        has = torch.tensor([float(bool(st))], device=self._device)
        dist.broadcast(has, group=self.group, group_src=owner)
        if not has.item():
            return {}
        out = {}
        look = ("slow", "lookahead_sum") if group["lookahead_k"] else ()
        for name in _SCALARS + (PLAN_STATE,) + _MOMENTS + look:
            if name in _SCALARS or name == PLAN_STATE:       # CPU scalars; a plan saved before plans existed: none
                default = new_plan_state() if name == PLAN_STATE else torch.zeros(())
                t = st.get(name, default).to(self._device)
            else:
                dtype = torch.promote_types(p.dtype, torch.float32)
                t = st[name] if st else torch.empty(p.shape, dtype=dtype, device=self._device)
            t = t.clone()
            dist.broadcast(t, group=self.group, group_src=owner)
            out[name] = t.cpu()
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
                if id(p) not in self.local:
                    continue
                if st:
                    inner_state[inner_index] = st if g["orthogonal"] else self._local_state(p, st)
                ids.append(inner_index)
                inner_index += 1
            inner_groups.append({**{k: v for k, v in sg.items() if k != "params"}, "params": ids})
        self.inner.load_state_dict({"state": inner_state, "param_groups": inner_groups})
