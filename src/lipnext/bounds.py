"""Sound upper bounds on spectral norms, computed from the weights as they are.

For a matrix W with smaller-side Gram matrix G (W^T W or W W^T) and E = G - I:

    sigma_max(W)^2 = lambda_max(G) <= min(1 + ||E||_F, max_i sum_j |G_ij|)

(the Frobenius norm bounds the spectral norm of E; the second term is Gershgorin's
disc bound), so the bound is sound for any W and equals 1 + O(drift) for a nearly
orthogonal one. G is formed in float64; the
rounding error of that product, at most gamma_n ||W||_F^2 with gamma_n = n u/(1 - n u),
is added on top, so the bound holds for the exact real-number matrix stored in W.

A circular (wrap-around) convolution with kernel K (C_out, C_in, k, k) on an n1 x n2 grid
is block-diagonalised by the 2-D DFT (Sedghi, Gupta, Long, ICLR 2019): its singular values
are those of the C_out x C_in matrices

    K_hat(f) = sum_{a,b} K[:, :, a, b] exp(-2 pi i (f1 a / n1 + f2 b / n2)),

one per frequency f, so ||conv||_2 = max_f sigma_max(K_hat(f)) (``operator_norm_bound`` of
``circular_conv_spectrum``). The kernel's offset from the centre only multiplies K_hat(f)
by a unit scalar, and f, -f have conjugate matrices, so the half spectrum of ``rfft2``
suffices. (Power iteration, ``lipnext.nn.circular``, gives only a LOWER estimate.)

``pairwise_distances`` gives ||w_i - w_j||_2 from the differences themselves (never the
Gram form ||a||^2 + ||b||^2 - 2 a.b, which cancels catastrophically for close rows: it
returns 0 for rows one float32 ulp apart); ``distance_upper`` rounds them up soundly.
"""
from __future__ import annotations

import torch

__all__ = ["spectral_norm_bound", "operator_norm_bound", "circular_conv_spectrum", "residual_kernel",
           "residual_conv_norm_bound", "gram_error", "pairwise_distances", "distance_upper", "gamma",
           "abs_norm_bound", "SLACK"]

_U64 = 2.0 ** -53
_CHUNK = 2 ** 22  # float64 entries of one block of differences (32 MiB)
# Relative slack added to a float64 singular value: LAPACK's SVD returns each sigma
# with error at most p(n) u sigma_max (p a modest polynomial, u = 2^-53), and the
# float64 FFT of a kernel perturbs K_hat(f) by at most ~log2(n1 n2) u ||K||_F
# <= log2(n1 n2) u sqrt(C n1 n2) sigma_max; for C <= 10^4 and grids up to 64 x 64 both
# stay below 1e-11 sigma_max, so 1e-9 is a wide margin.
SLACK = 1e-9


def gamma(n: int, u: float = _U64) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of a length-n float sum or dot product."""
    if n * u >= 0.5:
        raise ValueError(f"gamma_{n} is undefined for unit roundoff {u} (n u >= 1/2)")
    return n * u / (1 - n * u)


def pairwise_distances(w: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """||w_i - w_j||_2 for i in ``rows`` (default all) and every j: (len(rows), K) float64.

    Direct differences in float64, in blocks of rows; relative error <= gamma_{C+2}
    (difference, squares and sum, square root), so 0 only for identical rows.
    """
    w64 = w.detach().to(torch.float64)
    idx = torch.arange(w64.shape[0], device=w64.device) if rows is None else rows.to(w64.device)
    step = max(1, _CHUNK // max(1, w64.numel()))
    out = [(w64[idx[i:i + step], None, :] - w64[None]).square().sum(-1).sqrt()
           for i in range(0, idx.numel(), step)]
    return torch.cat(out) if out else w64.new_zeros(0, w64.shape[0])


def distance_upper(dist: torch.Tensor, dim: int) -> torch.Tensor:
    """An upper bound of the exact distances from ``pairwise_distances`` of rows of length dim."""
    return dist * (1 + gamma(dim + 3))


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


def abs_norm_bound(a: torch.Tensor) -> float:
    """Upper bound of || |A| ||_2 for a (batch of) real or complex matrix: sqrt(||A||_1 ||A||_inf),
    computed in float64 and rounded up (1 + 1e-6)."""
    m = a.abs().to(torch.float64)
    return (m.sum(-2).amax().item() * m.sum(-1).amax().item()) ** 0.5 * (1.0 + 1e-6)


def operator_norm_bound(mats: torch.Tensor) -> float:
    """Sound upper bound on max over a batch of sigma_max(A), from float64 SVDs + slack."""
    a = mats.detach()
    a = a.to(torch.complex128) if a.is_complex() else a.to(torch.float64)
    sigma = torch.linalg.svdvals(a).amax().item()
    return sigma * (1.0 + SLACK)


def circular_conv_spectrum(kernel: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """K_hat(f) for the half spectrum: complex128 (n1, n2 // 2 + 1, C_out, C_in)."""
    c_out, c_in, k1, k2 = kernel.shape
    if k1 > grid[0] or k2 > grid[1]:
        raise ValueError(f"kernel {k1}x{k2} is larger than the {grid[0]}x{grid[1]} grid")
    k64 = kernel.detach().to(torch.float64)
    spec = torch.fft.rfft2(k64, s=grid)                   # (C_out, C_in, n1, n2//2+1)
    return spec.permute(2, 3, 0, 1)


def residual_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The kernel of x + conv_W(x): W with the identity added to its centre tap."""
    c, k1, k2 = weight.shape[0], weight.shape[-2], weight.shape[-1]
    eye = torch.zeros_like(weight)
    eye[:, :, k1 // 2, k2 // 2] = torch.eye(c, dtype=weight.dtype, device=weight.device)
    return weight + eye


def residual_conv_norm_bound(weight: torch.Tensor, grid: tuple[int, int]) -> float:
    """Sound bound on ||I + conv_W||_2 for a square circular convolution W (C, C, k, k)."""
    return operator_norm_bound(circular_conv_spectrum(residual_kernel(weight.detach().double()), grid))
