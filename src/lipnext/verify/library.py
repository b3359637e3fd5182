"""Attacks from a maintained library (torchattacks), used by ``verify`` when it is installed.

* APGD-L2 (Croce & Hein 2020, the attack of AutoAttack) with the cross-entropy and the DLR
  loss, at a fixed L2 radius; step size adapted by the algorithm, restarts.
* FAB-L2 (Croce & Hein 2020), a minimum-norm attack: it returns the closest adversarial
  example it finds (searched within a radius beyond the image box's diameter).

torchattacks works in the image box [0, 1] only. It declares torchvision as a dependency,
which would replace a CPU build of torch with a CUDA one; neither APGD nor FAB imports it,
so install it without dependencies: ``pip install --no-deps torchattacks`` (the extra
``attacks``; docs/RELIABILITY.md). Without it ``verify`` falls back to the hand-written
PGD and DDN alone.
"""
from __future__ import annotations

import math

import torch

__all__ = ["library_available", "apgd_attack", "fab_attack"]


def library_available() -> bool:
    """True when torchattacks can be imported."""
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        return False
    return True


class _Float32(torch.nn.Module):
    """The model on float32 inputs (torchattacks passes what it is given)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float())


def _norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1)


def apgd_attack(model, x: torch.Tensor, y: torch.Tensor, eps: float, loss: str = "ce",
                steps: int = 100, restarts: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_adv, success): torchattacks APGD-L2 with loss "ce" or "dlr" within ||x_adv - x|| <= eps."""
    import torchattacks
    atk = torchattacks.APGD(_Float32(model), norm="L2", eps=float(eps), steps=steps,
                            n_restarts=restarts, seed=seed, loss=loss)
    x_adv = atk(x.float().clamp(0, 1), y)
    with torch.no_grad():
        success = (model(x_adv).argmax(1) != y) & (_norm(x_adv - x) <= eps * (1 + 1e-6))
    return x_adv, success


def fab_attack(model, x: torch.Tensor, y: torch.Tensor, steps: int = 100, restarts: int = 1,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_adv, dist): torchattacks FAB-L2; dist = inf where nothing adversarial was found."""
    import torchattacks
    num_classes = int(model.num_classes)
    far = 2 * math.sqrt(x.shape[1:].numel())   # beyond the diameter of the box: no radius limit
    atk = torchattacks.FAB(_Float32(model), norm="L2", eps=far, steps=steps, n_restarts=restarts,
                           seed=seed, n_classes=num_classes)
    x_adv = atk(x.float().clamp(0, 1), y)
    with torch.no_grad():
        adv = model(x_adv).argmax(1) != y
    dist = torch.where(adv, _norm(x_adv - x), torch.full_like(adv, math.inf, dtype=torch.float32))
    return x_adv, dist
