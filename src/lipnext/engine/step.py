"""One optimisation step, the only one in lipnext (the budget race runs the trainer):

    L = lipschitz_bound(model) when due (rank 0, broadcast); loss = loss_fn(forward(x), y,
    W_head, L, eps, T) (bf16 autocast if asked); backward; clip the global gradient norm;
    loss and norm finite on every rank, else no update; optimizer.step() at lr.

``lie_gradients`` (``optim.lie_gradients``, on by default): the step's own forward and
backward deliver X^T G for the orthogonal weights of the layers that can
(``lipnext.nn.lie_form_gradients``), one product per matrix less in the optimizer; the
switch is off again when the step returns and the gradients are released, so outside the
step ``.grad`` holds what autograd computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..models.base import CertifiableModel
from ..nn.lie import lie_form_gradients
from .distributed import DistInfo, all_true, clip_gradients, lipschitz_bound

__all__ = ["TrainStep", "LossHook"]

LossHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class TrainStep:
    """``step(t, x, y, lr, eps, lipschitz)`` -> metrics, or None (no update) when the loss or
    the gradient was not finite. ``lipschitz=None`` measures the bound first."""

    forward: Callable[[torch.Tensor], torch.Tensor]   # the model as trained (DDP, FSDP, compiled)
    model: CertifiableModel
    optimizer: Any
    loss_fn: Callable[..., torch.Tensor]
    info: DistInfo
    device: torch.device
    bf16: bool = False
    grad_clip: float = math.inf        # max global gradient norm
    temperature: float = 1.0
    loss_hook: LossHook | None = None  # (step, loss) -> loss, a test hook
    lie_gradients: bool = True         # the step's gradients in Lie form (module doc)

    def __call__(self, step: int, x: torch.Tensor, y: torch.Tensor, lr: float, eps: float,
                 lipschitz: float | None) -> dict[str, float] | None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if lipschitz is None:
            lipschitz = lipschitz_bound(self.model, self.info, self.device)
        with lie_form_gradients(self.model, self.lie_gradients):
            try:
                return self._update(step, x, y, lr, eps, lipschitz)
            finally:
                self.optimizer.zero_grad(set_to_none=True)

    def _update(self, step: int, x: torch.Tensor, y: torch.Tensor, lr: float, eps: float,
                lipschitz: float) -> dict[str, float] | None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.forward(x)
        loss = self.loss_fn(logits.float(), y, self.model.head_weight(), lipschitz, eps, self.temperature)
        if self.loss_hook is not None:
            loss = self.loss_hook(step, loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = clip_gradients(self.model, self.optimizer, self.grad_clip)   # global norm, every rank
        stats = torch.stack([loss.detach().float(), (logits.argmax(1) == y).float().sum(),
                             gnorm.detach().float().to(loss.device)])
        world = self.info.world_size if dist.is_initialized() else 1
        if dist.is_initialized():
            dist.all_reduce(stats)
            stats[0] /= world
        if not all_true(bool(torch.isfinite(stats).all()), self.info, self.device):
            return None
        self.optimizer.step()
        return {"loss": stats[0].item(), "train_acc": stats[1].item() / (len(y) * world),
                "grad_norm": stats[2].item() / world, "lr": lr, "eps": eps, "lipschitz": lipschitz}
