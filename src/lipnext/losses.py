"""Certified training losses (docs/CORE.md, Loss and recipe).

With logits z, label y, trunk bound L and head rows w_i, K_i = L ||w_y - w_i||_2.

* EMMA (LiResNet): rho_i = clip((z_y - z_i) / max(eps K_i, 1e-8), 0.01, 1) without
  gradient, loss = CE(z_i - z_y + rho_i eps K_i; true class at 0).
* Certified margin loss: CE(z_i + eps K_i for i != y), i.e. EMMA with rho = 1.
* Cross-entropy: CE(z).

Gradients flow through z and through K (the head rows); L is a measured constant.
Each loss takes a temperature T (default 1): the cross-entropy is applied to T times
its logits, which sharpens the softmax for inputs of small norm (e.g. 8x8 digits,
where 1-Lipschitz logits span only a few units) and leaves certificates unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pairwise_lipschitz", "emma_loss", "margin_loss", "cross_entropy", "LOSSES",
           "eps_schedule"]


def pairwise_lipschitz(head_weight: torch.Tensor, y: torch.Tensor, lipschitz: float) -> torch.Tensor:
    """K (N, K): K_i = L ||w_y - w_i||_2 for each example's label y (0 at i = y)."""
    diff = head_weight[y][:, None, :] - head_weight[None, :, :]        # (N, K, C)
    return lipschitz * torch.sqrt(diff.square().sum(-1) + 1e-12) * (1 - F.one_hot(y, head_weight.shape[0]))


def emma_loss(logits: torch.Tensor, y: torch.Tensor, head_weight: torch.Tensor,
              lipschitz: float, eps: float, temperature: float = 1.0) -> torch.Tensor:
    """EMMA: CE of z_i - z_y + rho_i eps K_i, rho_i = clip(gap_i / (eps K_i), 0.01, 1) detached."""
    z = logits.float()
    k = pairwise_lipschitz(head_weight.float(), y, lipschitz)
    zy = z.gather(1, y[:, None])
    with torch.no_grad():
        rho = ((zy - z) / (eps * k).clamp_min(1e-8)).clamp(0.01, 1.0)
    shifted = z - zy + rho * eps * k
    shifted = shifted.scatter(1, y[:, None], 0.0)
    return F.cross_entropy(temperature * shifted, y)


def margin_loss(logits: torch.Tensor, y: torch.Tensor, head_weight: torch.Tensor,
                lipschitz: float, eps: float, temperature: float = 1.0) -> torch.Tensor:
    """Lipschitz-margin CE: every other logit raised by its pairwise bound eps K_i."""
    z = logits.float()
    return F.cross_entropy(temperature * (z + eps * pairwise_lipschitz(head_weight.float(), y, lipschitz)), y)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, head_weight: torch.Tensor,
                  lipschitz: float, eps: float, temperature: float = 1.0) -> torch.Tensor:
    """Plain cross-entropy (same signature as the certified losses; eps unused)."""
    return F.cross_entropy(temperature * logits.float(), y)


LOSSES = {"emma": emma_loss, "margin": margin_loss, "ce": cross_entropy}


def eps_schedule(progress: float, eps: float, start: float = 0.1, end: float = 3.0,
                 ramp: float = 0.5) -> float:
    """Training eps: linear from start*eps to end*eps over the first ``ramp`` of training."""
    if not 0 <= progress <= 1:
        raise ValueError(f"progress must lie in [0, 1], got {progress}")
    t = 1.0 if ramp <= 0 else min(progress / ramp, 1.0)
    return eps * (start + (end - start) * t)
