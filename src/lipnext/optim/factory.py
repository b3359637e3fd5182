"""build_optimizer: the ManifoldAdam of the training recipe (NAdam + Lookahead, docs/CORE.md, Loss and recipe).

Parameter groups:
- orthogonal: every ``OrthogonalParameter`` (lr x ``orthogonal_lr_scale``, no weight decay);
- decay: the other parameters with >= 2 dims (e.g. the head weight), ``weight_decay``;
- no_decay: 1-D parameters (biases, ...) and the parameters of ``PositionalEncoding``
  modules, weight decay 0.
Frozen parameters (requires_grad=False) and empty groups are left out. The model is not
changed: ``.grad`` holds what autograd computes. The optimizer also takes gradients in Lie form
(X^T G, marked by ``lipnext.nn.lie``), which the training engine opts into for its own steps
(``TrainStep``, ``optim.lie_gradients``).
A model sharded by FSDP (``fully_shard``: DTensor parameters) gets the same groups in a
``ShardedManifoldAdam``;
a model whose orthogonal weights DDP was told to leave out of its buckets
(``lipnext.engine.distributed.wrap_model`` with ``dist.strategy=ddp``) gets a
``DDPManifoldAdam``, which reduces them to their owners instead.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor

from ..nn.orthogonal import is_orthogonal
from ..nn.stem import PositionalEncoding
from .ddp import DDPManifoldAdam
from .manifold_adam import ManifoldAdam
from .sharded import ShardedManifoldAdam

#: where DDP reads the names of the parameters it leaves out of its buckets
DDP_IGNORED = "_ddp_params_and_buffers_to_ignore"

__all__ = ["build_optimizer"]


def build_optimizer(model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                    weight_decay: float = 0.0, nesterov: bool = True,
                    orthogonal_lr_scale: float = 0.5, lookahead_k: int = 5,
                    lookahead_alpha: float = 0.5, update: str = "fast_exp", precision: str = "auto",
                    chunk_size: int | None = None
                    ) -> ManifoldAdam | DDPManifoldAdam | ShardedManifoldAdam:
    """ManifoldAdam over ``model.parameters()`` split into orthogonal / decay / no_decay groups."""
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
    options = dict(lr=lr, betas=betas, weight_decay=weight_decay, nesterov=nesterov,
                   orthogonal_lr_scale=orthogonal_lr_scale, lookahead_k=lookahead_k,
                   lookahead_alpha=lookahead_alpha, update=update, precision=precision,
                   chunk_size=chunk_size)
    if any(isinstance(p, DTensor) for g in groups for p in g["params"]):
        return ShardedManifoldAdam(groups, **options)
    ignored = set(getattr(model, DDP_IGNORED, ()))
    if any(name in ignored for name, p in model.named_parameters() if is_orthogonal(p)):
        return DDPManifoldAdam(groups, **options)
    return ManifoldAdam(groups, **options)
