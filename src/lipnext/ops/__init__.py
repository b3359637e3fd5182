"""The hot operations, each a reference implementation in plain torch with a run-time slot
for a fused or Triton kernel per device type (see ``registry``)."""
from .beta_abs import beta_abs
from .l2_pool import l2_pool
from .patchify import patchify
from .registry import OPS, kernel_for, reference_only, register_kernel, unregister_kernel
from .shift import spatial_shift

__all__ = ["OPS", "beta_abs", "kernel_for", "l2_pool", "patchify", "reference_only",
           "register_kernel", "spatial_shift", "unregister_kernel"]
