"""Sound upper bounds on matrix norms, computed from the weights as they are, by proof.

Every bound here holds for the exact real-number matrix stored in the tensor, for every
finite matrix at every scale (subnormal to the float64 maximum), with its own float64
arithmetic rounded upward (u = 2^-53, gamma_n = n u / (1 - n u); docs/RELIABILITY.md,
Spectral norms):

* **Scaling.** W is first multiplied by the power of two 2^s that puts max |W_ij| in [1, 2)
  (``scale_pow2``): exact, except entries that fall below 2^-1022 when s < 0, each moved by
  at most 2^-1074. Every bound is computed on W_s = 2^s W and multiplied back by 2^-s, so
  no Gram entry, sum or square ever under- or overflows in a way that matters.
* **Gram bound** (``spectral_norm_bound``). G = W_s^T W_s (the smaller side, k x k, inner
  length n) is computed as Ĝ with |Ĝ - G| <= gamma_n |W_s|^T |W_s| + n TINY entrywise (any
  summation order, with or without FMA; no Strassen-like GEMM), so
  ||Ĝ - G||_2 <= gamma_n ||W_s||_F^2 + k n TINY. For any matrix A, ||A||_2 <= 1 + ||A - I||_F
  and ||A||_2 <= sqrt(||A||_1 ||A||_inf), hence

      sigma_max(W_s)^2 = ||G||_2 <= min(1 + ||Ĝ - I||_F, sqrt(||Ĝ||_1 ||Ĝ||_inf)) + ||Ĝ - G||_2.

  The first term is 1 + O(drift) for a nearly orthogonal W; the second is exact for a
  rank-one Gram and never cancels (the diagonal of Ĝ enters it as is, never as
  fl(fl(Ĝ - I) + I)). Ĝ - I is formed entrywise (relative error u). TINY = 2^-1021 is the
  absolute error that one float64 operation can suffer from underflow (2^-1075 under
  gradual underflow; below 2^-1022 under flush-to-zero of a result or an input).
* ``abs_norm_bound``: || |A| ||_2 <= sqrt(||A||_1 ||A||_inf), the same way.
* ``operator_norm_bound``: LAPACK's float64 SVD, sigma_max (1 + SLACK) + TINY, for matrices
  that are not near-isometries (BRO matrices and spectra, LiResNet's residual operators).
  It rests on LAPACK's backward-stable SVD (|sigma^ - sigma| <= p(n) u sigma_max), an
  assumption stated in docs/RELIABILITY.md, not a proof.

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

import math

import torch

__all__ = ["spectral_norm_bound", "operator_norm_bound", "circular_conv_spectrum", "residual_kernel",
           "residual_conv_norm_bound", "pairwise_distances", "distance_upper", "gamma",
           "abs_norm_bound", "abs_norms", "scale_pow2", "round_up", "SLACK", "TINY", "U64"]

U64 = 2.0 ** -53
TINY = 2.0 ** -1021   # absolute error of one float64 operation through underflow (module doc)
_CHUNK = 2 ** 22      # float64 entries of one block of differences (32 MiB)
# Relative slack added to a float64 singular value: LAPACK's SVD returns each sigma
# with error at most p(n) u sigma_max (p a modest polynomial, u = 2^-53), and the
# float64 FFT of a kernel perturbs K_hat(f) by at most ~log2(n1 n2) u ||K||_F
# <= log2(n1 n2) u sqrt(C n1 n2) sigma_max; for C <= 10^4 and grids up to 64 x 64 both
# stay below 1e-11 sigma_max, so 1e-9 is a wide margin.
SLACK = 1e-9


def gamma(n: int, u: float = U64) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of a length-n float sum or dot product."""
    if n * u >= 0.5:
        raise ValueError(f"gamma_{n} is undefined for unit roundoff {u} (n u >= 1/2)")
    return n * u / (1 - n * u)


def round_up(x: torch.Tensor, rel: float) -> torch.Tensor:
    """An upper bound of q >= 0 from a computed x = q (1 + d), |d| <= rel <= 1/4, x >= 0:
    x (1 + 2 rel + 4 u) + TINY (the product's own rounding, and an x in the subnormal range)."""
    return x * (1.0 + 2.0 * rel + 4.0 * U64) + TINY


def scale_pow2(w: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_s, s): W_s = 2^s W with max |W_s| in [1, 2) over ``dims`` (s = 0 for an all-zero W).

    Multiplying by a power of two is exact unless an entry leaves the normal range; the
    factor is applied in steps of at most 2^1000 towards [1, 2), so the largest entry never
    overflows and only entries below 2^-1022 of W_s (when s < 0) are rounded."""
    amax = w.abs().amax(dim=dims, keepdim=True)
    _, e = torch.frexp(amax)                  # amax = m 2^e, m in [0.5, 1)
    s = torch.where(amax > 0, 1 - e, torch.zeros_like(e)).to(torch.float64)
    return _times_pow2(w, s), s


def _times_pow2(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x 2^s (s integral), in factors of at most 2^1000 (|s| <= 1076 + 1024 needs at most 3)."""
    if bool((s.abs() <= 1000).all()):         # one exact factor (the usual case)
        return x * torch.pow(2.0, s).to(x.dtype)
    out, left = x, s
    for _ in range(3):
        part = left.clamp(-1000, 1000)
        out = out * torch.pow(2.0, part).to(out.dtype)
        left = left - part
    return out


def spectral_norm_bound(w: torch.Tensor) -> torch.Tensor:
    """Upper bound on sigma_max(W) by proof (module doc), batched over leading dims; float64.
    inf for a matrix with a non-finite entry."""
    w64 = w.detach().to(torch.float64)
    m, n = w64.shape[-2], w64.shape[-1]
    inner, k = max(m, n), min(m, n)
    ws, s = _gram_scale(w64, k)
    g = ws.mT @ ws if m >= n else ws @ ws.mT
    # ||Ĝ - G||_2 <= gamma_n ||W_s||_F^2 + k n TINY (the computed sum of squares, doubled, covers
    # its own rounding and that of this product)
    gram_err = 2 * gamma(inner) * ws.square().sum(dim=(-2, -1)) + k * inner * TINY
    # ||Ĝ||_2 <= 1 + ||Ĝ - I||_F (squares that underflow: k sqrt(TINY)) and <= sqrt(||Ĝ||_1 ||Ĝ||_inf)
    near_identity = 1.0 + torch.linalg.matrix_norm(g - torch.eye(k, dtype=torch.float64, device=g.device),
                                                   ord="fro") + k * math.sqrt(TINY)
    a = g.abs()
    gershgorin = torch.sqrt(a.sum(-1).amax(-1)) * torch.sqrt(a.sum(-2).amax(-1))
    # relative errors of the computed terms: Frobenius gamma_{k^2+2} (+ u for Ĝ - I, u for 1 +),
    # the sums gamma_k, two square roots and a product 3u, the additions and the final square root 3u
    rel = gamma(k * k + 2) + gamma(k) + 8 * U64
    lam = torch.minimum(near_identity, gershgorin) + gram_err
    # the scaling moved each entry by <= 2^-1074 (in W_s's units): sigma grows by <= sqrt(mn) 2^-1074
    sigma_s = round_up(torch.sqrt(lam), rel) + math.sqrt(m * n) * 2.0 ** -1074
    sigma = round_up(scale_pow2_back(sigma_s, s), U64)
    return torch.nan_to_num(sigma, nan=math.inf)        # a non-finite entry makes the Gram NaN or inf


def _gram_scale(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_s, s): W_s = 2^s W with the root-mean-square of its k singular values near 1 (so that a
    nearly orthogonal W keeps a Gram near I). Any power of two is exact in range; a W whose norm
    is far from 1 goes through ``scale_pow2`` first (no overflow, module doc)."""
    rms = torch.linalg.matrix_norm(w, ord="fro", keepdim=True) / math.sqrt(k)
    if not bool(((rms > 2.0 ** -400) & (rms < 2.0 ** 400)).all()):
        w, s0 = scale_pow2(w)
        rms = torch.linalg.matrix_norm(w, ord="fro", keepdim=True) / math.sqrt(k)
    else:
        s0 = torch.zeros_like(rms)
    t = torch.where(rms > 0, torch.round(-torch.log2(rms)), torch.zeros_like(rms))
    return _times_pow2(w, t), (s0 + t)[..., 0, 0]


def scale_pow2_back(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x 2^-s (the inverse of ``scale_pow2``), in steps of at most 2^1000."""
    return _times_pow2(x, -s)


def abs_norms(a: torch.Tensor) -> tuple[float, float, float]:
    """For a (batch of) real or complex matrix, upper bounds of (|| |A| ||_2, max |A_ij|,
    max_i ||a_i||_2): sqrt(||A||_1 ||A||_inf), the largest entry, the largest row norm, computed
    in float64 (on 2^s |A| when max |A_ij| is outside [2^-400, 2^400]) and rounded up; inf if A
    has a non-finite entry."""
    a = a.detach()
    m = (a.to(torch.complex128) if a.is_complex() else a.to(torch.float64)).abs()  # |z|: error <= 2u
    if m.numel() == 0:
        return 0.0, 0.0, 0.0
    amax = m.max().item()
    if not math.isfinite(amax):
        return math.inf, math.inf, math.inf
    s = torch.zeros((), dtype=torch.float64, device=m.device)
    if amax > 0 and not 2.0 ** -400 <= amax <= 2.0 ** 400:
        m, s = scale_pow2(m, dims=tuple(range(m.dim())))
        s = s.reshape(())
    # sums of non-negative terms (|z| adds 2u), a product, square roots: relative error <= rel;
    # squares below 2^-1022 lose TINY each: sqrt(n TINY) of a row norm
    rel = gamma(max(m.shape[-2], m.shape[-1])) + 8 * U64
    norm = torch.sqrt(m.sum(-2).amax() * m.sum(-1).amax())
    row = torch.sqrt(m.square().sum(-1).amax()) + math.sqrt(m.shape[-1] * TINY)
    back = scale_pow2_back(round_up(torch.stack([norm, row]), rel), s)
    return float(round_up(back[0], U64)), amax, float(round_up(back[1], U64))


def abs_norm_bound(a: torch.Tensor) -> float:
    """Upper bound of || |A| ||_2 <= sqrt(||A||_1 ||A||_inf) (``abs_norms``)."""
    return abs_norms(a)[0]


def operator_norm_bound(mats: torch.Tensor) -> float:
    """Upper bound on max over a batch of sigma_max(A), from float64 (complex128) SVDs of 2^s A,
    with LAPACK's error covered by SLACK (module doc); inf for a non-finite entry."""
    a = mats.detach()
    a = a.to(torch.complex128) if a.is_complex() else a.to(torch.float64)
    if not bool(torch.isfinite(torch.view_as_real(a) if a.is_complex() else a).all()):
        return math.inf
    scaled, s = scale_pow2(a, dims=tuple(range(a.dim())))
    sigma = torch.linalg.svdvals(scaled).amax()
    return float(round_up(scale_pow2_back(sigma * (1.0 + SLACK), s.reshape(())), U64))


def pairwise_distances(w: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """||w_i - w_j||_2 for i in ``rows`` (default all) and every j: (len(rows), K) float64.

    Direct differences in float64, in blocks of rows; relative error <= gamma_{C+2}
    (difference, squares and sum, square root), so 0 only for identical rows."""
    w64 = w.detach().to(torch.float64)
    idx = torch.arange(w64.shape[0], device=w64.device) if rows is None else rows.to(w64.device)
    step = max(1, _CHUNK // max(1, w64.numel()))
    out = [(w64[idx[i:i + step], None, :] - w64[None]).square().sum(-1).sqrt()
           for i in range(0, idx.numel(), step)]
    return torch.cat(out) if out else w64.new_zeros(0, w64.shape[0])


def distance_upper(dist: torch.Tensor, dim: int) -> torch.Tensor:
    """An upper bound of the exact distances from ``pairwise_distances`` of rows of length dim
    (squares that underflow lose at most dim TINY of a sum: sqrt(dim TINY) of a distance)."""
    return dist * (1 + gamma(dim + 3)) + math.sqrt(dim * TINY)


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
