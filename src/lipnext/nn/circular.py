"""Circular (wrap-around) convolution, its adjoint, and the power-iteration estimate of
||I + conv_W||_2 that LiResNet normalises with during training.

conv_W(x) is the cross-correlation of x, padded circularly by k // 2 on each side, with
the odd kernel W (C_out, C_in, k, k); its adjoint is the convolution with the flipped,
transposed kernel. Power iteration gives a LOWER estimate of a spectral norm: a
certificate uses ``lipnext.bounds.residual_conv_norm_bound`` instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["circular_conv2d", "circular_conv2d_adjoint", "power_iteration_residual_conv"]


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
