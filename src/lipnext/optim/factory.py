"""build_optimizer: the ManifoldAdam of the training recipe (NAdam + Lookahead, docs/CORE.md, Loss and recipe).

Parameter groups:
- orthogonal: every ``OrthogonalParameter`` (lr x ``orthogonal_lr_scale``, no weight decay);
- decay: the other parameters with >= 2 dims (e.g. the head weight), ``weight_decay``;
- no_decay: 1-D parameters (biases, ...) and the parameters of ``PositionalEncoding``
  modules, weight decay 0.
Frozen parameters (requires_grad=False) and empty groups are left out. A model sharded by
FSDP (``fully_shard``: DTensor parameters) gets the same groups in a ``ShardedManifoldAdam``.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor

from ..nn.orthogonal import is_orthogonal
from ..nn.stem import PositionalEncoding
from .manifold_adam import ManifoldAdam
from .sharded import ShardedManifoldAdam

__all__ = ["build_optimizer"]


def build_optimizer(model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                    weight_decay: float = 0.0, nesterov: bool = True,
                    orthogonal_lr_scale: float = 0.5, lookahead_k: int = 5,
                    lookahead_alpha: float = 0.5, update: str = "fast_exp") -> ManifoldAdam | ShardedManifoldAdam:
    """ManifoldAdam over ``model.parameters()`` split into orthogonal / decay / no_decay groups;
    ``update`` picks the rotation of the orthogonal step (fast_exp | exact | cayley)."""
    positional = {id(p) for m in model.modules() if isinstance(m, PositionalEncoding)
                  for p in m.parameters()}
    orthogonal, decay, no_decay = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if is_orthogonal(p):
            orthogonal.append(p)
        elif p.dim() >= 2 and id(p) not in positional:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [dict(params=orthogonal, orthogonal=True),
              dict(params=decay, orthogonal=False),
              dict(params=no_decay, orthogonal=False, weight_decay=0.0)]
    groups = [g for g in groups if g["params"]]
    sharded = any(isinstance(p, DTensor) for g in groups for p in g["params"])
    cls = ShardedManifoldAdam if sharded else ManifoldAdam
    return cls(groups, lr=lr, betas=betas, weight_decay=weight_decay, nesterov=nesterov,
               orthogonal_lr_scale=orthogonal_lr_scale, lookahead_k=lookahead_k,
               lookahead_alpha=lookahead_alpha, update=update)
