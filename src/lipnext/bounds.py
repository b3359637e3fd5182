"""Sound upper bounds on spectral norms, computed from the weights as they are.

For a matrix W with smaller-side Gram matrix G (W^T W or W W^T) and E = G - I:

    sigma_max(W)^2 = lambda_max(G) <= min(1 + ||E||_F, max_i sum_j |G_ij|)

(the Frobenius norm bounds the spectral norm of E; the second term is Gershgorin's
disc bound), so the bound is sound for any W and equals 1 + O(drift) for a nearly
orthogonal one. G is formed in float64; the
rounding error of that product, at most gamma_n ||W||_F^2 with gamma_n = n u/(1 - n u),
is added on top, so the bound holds for the exact real-number matrix stored in W.
"""
from __future__ import annotations

import torch

__all__ = ["spectral_norm_bound", "gram_error"]

_U64 = 2.0 ** -53


def gram_error(w: torch.Tensor) -> torch.Tensor:
    """E = G - I for the smaller-side Gram matrix G of (a batch of) W, in float64."""
    w64 = w.detach().to(torch.float64)
    g = w64.mT @ w64 if w64.shape[-2] >= w64.shape[-1] else w64 @ w64.mT
    return g - torch.eye(g.shape[-1], dtype=torch.float64, device=g.device)


def spectral_norm_bound(w: torch.Tensor) -> torch.Tensor:
    """Upper bound on sigma_max(W) (batched over leading dims), float64 tensor."""
    e = gram_error(w)
    n = max(w.shape[-2], w.shape[-1])
    rounding = (n * _U64 / (1 - n * _U64)) * w.detach().to(torch.float64).square().sum(dim=(-2, -1))
    fro = 1.0 + torch.linalg.matrix_norm(e, ord="fro")
    gershgorin = (e + torch.eye(e.shape[-1], dtype=e.dtype, device=e.device)).abs().sum(-1).amax(-1)
    lam = torch.minimum(fro, gershgorin) + rounding
    return torch.sqrt(lam.clamp_min(0.0))
