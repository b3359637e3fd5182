"""Exact spectral norms of circular convolutions (Sedghi, Gupta, Long, ICLR 2019) and
the power-iteration estimate LiResNet uses for training.

A circular (wrap-around) convolution with kernel K (C_out, C_in, k, k) on an n1 x n2 grid
is block-diagonalised by the 2-D DFT: its singular values are those of the C_out x C_in
matrices

    K_hat(f) = sum_{a,b} K[:, :, a, b] exp(-2 pi i (f1 a / n1 + f2 b / n2)),

one per frequency f, so ||conv||_2 = max_f sigma_max(K_hat(f)). Taking the kernel's
offset from the centre into account only multiplies K_hat(f) by a unit scalar, which
leaves the singular values unchanged. Frequencies f and -f have conjugate matrices, so
the half spectrum of ``rfft2`` suffices.

Power iteration gives a LOWER estimate of a spectral norm: use it to normalise weights
during training, never as a certificate. Certificates use ``operator_norm_bound``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["circular_conv_spectrum", "operator_norm_bound", "circular_conv2d",
           "circular_conv2d_adjoint", "residual_kernel", "residual_conv_norm_bound",
           "power_iteration_residual_conv"]

# Relative slack added to a float64 singular value: LAPACK's SVD returns each sigma
# with error at most p(n) u sigma_max (p a modest polynomial, u = 2^-53), and the
# float64 FFT of a kernel perturbs K_hat(f) by at most ~log2(n1 n2) u ||K||_F
# <= log2(n1 n2) u sqrt(C n1 n2) sigma_max; for C <= 10^4 and grids up to 64 x 64 both
# stay below 1e-11 sigma_max, so 1e-9 is a wide margin.
SLACK = 1e-9


def circular_conv_spectrum(kernel: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """K_hat(f) for the half spectrum: complex128 (n1, n2 // 2 + 1, C_out, C_in)."""
    c_out, c_in, k1, k2 = kernel.shape
    if k1 > grid[0] or k2 > grid[1]:
        raise ValueError(f"kernel {k1}x{k2} is larger than the {grid[0]}x{grid[1]} grid")
    k64 = kernel.detach().to(torch.float64)
    spec = torch.fft.rfft2(k64, s=grid)                   # (C_out, C_in, n1, n2//2+1)
    return spec.permute(2, 3, 0, 1)


def operator_norm_bound(mats: torch.Tensor) -> float:
    """Sound upper bound on max over a batch of sigma_max(A), from float64 SVDs + slack."""
    a = mats.detach()
    a = a.to(torch.complex128) if a.is_complex() else a.to(torch.float64)
    sigma = torch.linalg.svdvals(a).amax().item()
    return sigma * (1.0 + SLACK)


def residual_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The kernel of x + conv_W(x): W with the identity added to its centre tap."""
    c, k1, k2 = weight.shape[0], weight.shape[-2], weight.shape[-1]
    eye = torch.zeros_like(weight)
    eye[:, :, k1 // 2, k2 // 2] = torch.eye(c, dtype=weight.dtype, device=weight.device)
    return weight + eye


def residual_conv_norm_bound(weight: torch.Tensor, grid: tuple[int, int]) -> float:
    """Sound bound on ||I + conv_W||_2 for a square circular convolution W (C, C, k, k)."""
    return operator_norm_bound(circular_conv_spectrum(residual_kernel(weight.detach().double()), grid))


def circular_conv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Convolution with wrap-around padding (odd kernel, output the size of the input)."""
    p1, p2 = weight.shape[-2] // 2, weight.shape[-1] // 2
    return F.conv2d(F.pad(x, (p2, p2, p1, p1), mode="circular"), weight)


def circular_conv2d_adjoint(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``circular_conv2d``: the flipped, transposed kernel."""
    return circular_conv2d(y, weight.transpose(0, 1).flip(-2, -1))


def power_iteration_residual_conv(weight: torch.Tensor, u: torch.Tensor, n_iter: int = 1,
                                  restart_noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """n_iter steps of power iteration on A = I + conv_W from u (1, C, n1, n2).

    Returns (sigma, u_new): u_new is the next unit iterate (no gradient) and
    sigma = ||A u_new|| is differentiable in W. sigma <= ||A||_2 always (a Rayleigh-type
    LOWER estimate).

    ``restart_noise`` adds a random vector of that relative norm to u first. A circular
    convolution maps each Fourier frequency to itself, and floating point preserves
    exact translation symmetry, so an iterate that has lost all energy at the frequency
    of the top singular value (e.g. one that became spatially constant while another
    frequency dominated) would never recover it; the noise re-seeds every frequency.
    """
    w = weight.detach()
    with torch.no_grad():
        if restart_noise:
            u = u + restart_noise * torch.randn_like(u) / u.numel() ** 0.5
            u = u / u.norm().clamp_min(1e-12)
        for _ in range(n_iter):
            v = u + circular_conv2d(u, w)
            u = v + circular_conv2d_adjoint(v, w)
            u = u / u.norm().clamp_min(1e-12)
    sigma = (u + circular_conv2d(u, weight)).norm()
    return sigma, u
