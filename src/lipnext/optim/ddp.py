"""DDPManifoldAdam: ManifoldAdam under DDP with owner-sharded orthogonal updates.

Ordinary parameters keep plain DDP: their gradients are all-reduced in DDP's buckets and
every rank runs their (elementwise, cheap) Adam step. The orthogonal matrices are left out of
DDP's buckets (``lipnext.engine.distributed.wrap_model`` tells DDP to ignore them), and for
each X with owner o (``assign_owners``):

    G_o = (1/W) sum_r G_r           dist.reduce to the owner only (the other ranks drop G)
    X <- X exp(U) on the owner      ``lipnext.optim.functional``; the state lives there only
    X -> every rank                 dist.broadcast from the owner

A reduce and a broadcast move (W - 1)/W of the matrix per rank each in bandwidth-optimal
(ring/tree) algorithms: together exactly what DDP's all-reduce of G, 2 (W - 1)/W, would move;
the manifold work per rank falls as 1/W. ``clip_grad_norm_`` reduces first, so the global
norm counts each orthogonal gradient once (on its owner) and equals one process's.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .owners import OwnerShardedOptimizer

__all__ = ["DDPManifoldAdam"]


class DDPManifoldAdam(OwnerShardedOptimizer):
    """ManifoldAdam's groups and keyword arguments; orthogonal X updated by their owners."""

    def __init__(self, param_groups: list[dict[str, Any]],
                 process_group: dist.ProcessGroup | None = None, **defaults: Any):
        if not dist.is_initialized():
            raise ValueError("DDPManifoldAdam needs torch.distributed; use ManifoldAdam otherwise")
        group = process_group if process_group is not None else dist.group.WORLD
        super().__init__(param_groups, group, dist.get_rank(group), dist.get_world_size(group))
        for g in self.groups:
            for p in g["params"]:
                if not g["orthogonal"] or self.owner[id(p)] == self.rank:
                    self.local[id(p)] = p
        self._build_inner(defaults)
        self._sync_orthogonal()       # the owners' X everywhere (only owners need initialise X)
        self._reduced = False

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Each orthogonal gradient summed on its owner and divided by W; dropped elsewhere."""
        if self._reduced:
            return
        works = [(p, owner, dist.reduce(p.grad, op=dist.ReduceOp.SUM, group=self.group,
                                        group_dst=owner, async_op=True))
                 for p, owner in self.orthogonal() if p.grad is not None]
        for p, owner, work in works:
            work.wait()
            if owner == self.rank:
                p.grad.div_(self.world)
            else:
                p.grad = None
        self._reduced = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """torch.nn.utils.clip_grad_norm_ over the whole model's gradients (collective)."""
        self.reduce_gradients()
        ordinary = [p.grad for g in self.groups if not g["orthogonal"] for p in g["params"]
                    if p.grad is not None]
        owned = [p.grad for p, _ in self.orthogonal() if p.grad is not None]
        squares = torch.zeros(2, dtype=torch.float32, device=self._device)
        for i, grads in enumerate((ordinary, owned)):
            if grads:
                squares[i] = torch.stack([torch.linalg.vector_norm(t).float() for t in grads]).square().sum()
        dist.all_reduce(squares[1:], group=self.group)          # each owned gradient once
        total = squares.sum().sqrt()
        if math.isfinite(max_norm):
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(ordinary + owned, coef)
        return total

    @torch.no_grad()
    def step(self) -> None:
        """Reduce (if ``clip_grad_norm_`` did not), update, broadcast (collective)."""
        self.reduce_gradients()
        self.inner.step()
        self._sync_orthogonal()
        self._reduced = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._reduced = False

    def _sync_orthogonal(self) -> None:
        works = [dist.broadcast(p.detach(), group=self.group, group_src=owner, async_op=True)
                 for p, owner in self.orthogonal()]
        for work in works:
            work.wait()
