"""1-Lipschitz building blocks of LipNeXt."""
from .activation import BetaAbs
from .head import NormalizedLinear
from .orthogonal import OrthogonalParameter, is_orthogonal, orthogonality_error, random_orthogonal
from .pool import L2Pool
from .shift import SpatialShift, spatial_shift
from .stem import OrthogonalPatchStem, PositionalEncoding

__all__ = [
    "BetaAbs", "L2Pool", "NormalizedLinear", "OrthogonalParameter", "OrthogonalPatchStem",
    "PositionalEncoding", "SpatialShift", "is_orthogonal", "orthogonality_error",
    "random_orthogonal", "spatial_shift",
]
