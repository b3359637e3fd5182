"""Training on the orthogonal manifold: FastExp, polar retraction, ManifoldAdam (docs/CORE.md, Optimizer)."""
from .factory import build_optimizer
from .exp_update import exp_update
from .fast_exp import exp_plan, fast_exp, fast_expm1
from .manifold_adam import ManifoldAdam, lie_gradient
from .polar import polar_retract, retract_model
from .sharded import ShardedManifoldAdam

__all__ = [
    "ManifoldAdam", "ShardedManifoldAdam", "build_optimizer", "exp_plan", "exp_update", "fast_exp",
    "fast_expm1", "lie_gradient", "polar_retract", "retract_model",
]
