"""Training on the orthogonal manifold: FastExp, polar retraction, ManifoldAdam (docs/CORE.md, Optimizer)."""
from .ddp import DDPManifoldAdam
from .factory import build_optimizer
from .fast_exp import TAYLOR_THRESHOLDS, exp_update, fast_exp
from .manifold_adam import ManifoldAdam, lie_gradient
from .polar import polar_retract, retract_model
from .owners import assign_owners
from .sharded import ShardedManifoldAdam

__all__ = [
    "TAYLOR_THRESHOLDS", "DDPManifoldAdam", "ManifoldAdam", "ShardedManifoldAdam", "assign_owners",
    "build_optimizer", "exp_update", "fast_exp", "lie_gradient", "polar_retract", "retract_model",
]
