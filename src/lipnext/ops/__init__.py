"""The hot operations, each a reference implementation in plain torch with a run-time slot
for a fused or Triton kernel per device type (see ``registry``): the exponential of the
optimizer (``exp``: ``fast_expm1``), shift, patchify, L2 pool, beta-Abs. ``lipnext_block``
is the whole LipNeXt block as one autograd function (the eager path of ``LipNeXtBlock``)."""
from .beta_abs import beta_abs
from .exp import fast_expm1
from .l2_pool import l2_pool
from .lipnext_block import lipnext_block
from .patchify import patchify
from .registry import OPS, kernel_for, reference_only, register_kernel, unregister_kernel
from .shift import spatial_shift

__all__ = ["OPS", "beta_abs", "fast_expm1", "kernel_for", "l2_pool", "lipnext_block", "patchify",
           "reference_only", "register_kernel", "spatial_shift", "unregister_kernel"]
