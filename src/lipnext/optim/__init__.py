"""Training on the orthogonal manifold: FastExp, polar retraction, ManifoldAdam (docs/CORE.md, Optimizer)."""
from .factory import build_optimizer
from .fast_exp import TAYLOR_THRESHOLDS, fast_exp
from .manifold_adam import ManifoldAdam, lie_gradient
from .polar import polar_retract, retract_model
from .sharded import ShardedManifoldAdam

__all__ = [
    "TAYLOR_THRESHOLDS", "ManifoldAdam", "ShardedManifoldAdam", "build_optimizer", "fast_exp",
    "lie_gradient", "polar_retract", "retract_model",
]
