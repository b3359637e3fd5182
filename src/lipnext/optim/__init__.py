"""Training on the orthogonal manifold: FastExp, polar retraction, ManifoldAdam (docs/CORE.md, Optimizer)."""
from ..ops.exp import exp_plan, fast_exp, fast_expm1
from .ddp import DDPManifoldAdam
from .exp_update import exp_update
from .factory import build_optimizer
from .manifold_adam import ManifoldAdam, lie_gradient
from .owners import assign_owners
from .polar import polar_retract, retract_model
from .sharded import ShardedManifoldAdam

__all__ = [
    "DDPManifoldAdam", "ManifoldAdam", "ShardedManifoldAdam", "assign_owners", "build_optimizer",
    "exp_plan", "exp_update", "fast_exp", "fast_expm1", "lie_gradient", "polar_retract",
    "retract_model",
]
