"""1-Lipschitz building blocks: LipNeXt's and the baselines' layers.

A layer that is not an isometry (or a translation, or a 1-Lipschitz activation) has a
``lipschitz_bound()``: a sound upper bound of its L2 Lipschitz constant, measured from the
weights as they are (``lipnext.bounds``).
"""
from .activation import BetaAbs
from .bro import BROConv2d, BROLinear, block_reflector
from .cholesky import CholeskyLinear, cholesky_orthogonal
from .circular import circular_conv2d, circular_conv2d_adjoint, power_iteration_residual_conv
from .head import NormalizedLinear
from .lie import has_lie_gradient, lie_form_gradients, lie_slice, mark_lie_gradient, use_lie_gradients
from .minmax import MinMax
from .orthogonal import OrthogonalParameter, is_orthogonal, orthogonality_error, random_orthogonal
from .pool import L2Pool
from .shift import SpatialShift, spatial_shift
from .stem import OrthogonalPatchStem, PositionalEncoding

__all__ = [
    "BROConv2d", "BROLinear", "BetaAbs", "CholeskyLinear", "L2Pool", "MinMax", "NormalizedLinear",
    "OrthogonalParameter", "OrthogonalPatchStem", "PositionalEncoding", "SpatialShift",
    "block_reflector", "cholesky_orthogonal", "circular_conv2d", "circular_conv2d_adjoint",
    "has_lie_gradient", "is_orthogonal", "lie_form_gradients", "lie_slice", "mark_lie_gradient", "orthogonality_error",
    "power_iteration_residual_conv", "random_orthogonal", "spatial_shift", "use_lie_gradients",
]
