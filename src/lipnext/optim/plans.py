"""The optimizer's rotation plans, chosen without reading the device every step.

How X exp(U) is computed depends on U: FastExp's order and squarings on ||U||_2 (``ops.exp``),
the O(n^2 k) border update on U's zero pattern (``ops.border_exp``). U lives on the device, so
planning from U itself reads it to the host: on a GPU every such read waits for the whole queue.

The optimizer's steps change slowly, and mostly with the learning rate, which the host knows.
So each orthogonal matrix keeps in its optimizer state (``PLAN_STATE``, four CPU floats, saved
with the checkpoint so that a resumed run plans as the first one did) its *rate* theta / lr
(-1: not known yet) and its border width (-1: dense) for its steps, and the same for its Lookahead rotations, as
seen at its last *refresh*: its 1st, (1 + every)-th, (1 + 2 every)-th, ... step (or Lookahead
rotation), where one host read gives theta (``ops.exp.exp_theta``) and the widths of the chunk.
In between, a matrix's plan is FastExp's plan for margin x rate x lr (host arithmetic), and
its border width is the one seen. Nothing is read; and FastExp's guard keeps every rotation
within u of its exponential: a matrix whose theta outgrew the plan's limit L is rotated by
exp(g U), g = L / theta < 1, and counted (``clipped``, on the device). A border width holds
by construction (the patch stem's Q: its step is zero outside the columns the layer reads).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.border_exp import border_widths
from ..ops.exp import exp_plan, exp_theta
from ..ops.precision import product

__all__ = ["PLAN_EVERY", "PLAN_MARGIN", "PLAN_STATE", "Planner", "Rotations", "new_plan_state"]

#: steps (and Lookahead rotations) between two refreshes of a matrix's plan
PLAN_EVERY = 20
#: the plan covers margin x the predicted theta
PLAN_MARGIN = 2.0
#: the optimizer-state entry: [step rate, step width, Lookahead rate, Lookahead width]
PLAN_STATE = "exp_plan"
_KINDS = {"step": 0, "sync": 2}


def new_plan_state() -> Tensor:
    """Nothing seen yet (rates -1: the first use refreshes)."""
    return torch.full((4,), -1.0)


@dataclass
class Rotations:
    """How ``exp_update`` rotates each row of a stack, fixed on the host: ("border", k) or
    ("fast_exp", (order, squarings)); ``clipped`` counts FastExp's guarded rotations."""
    keys: list[tuple[str, int | tuple[int, int]]]
    clipped: Tensor | None = None

    def rows(self, idx: Sequence[int]) -> "Rotations":
        return Rotations([self.keys[i] for i in idx], self.clipped)


class Planner:
    """The plans of one chunk's rotations (see the module docstring).

    ``state``: the chunk's (c, 4) rows of ``PLAN_STATE`` (updated in place at a refresh);
    ``steps``: the chunk's step counts, already advanced for this step; ``lr``: the orthogonal
    learning rate of this step; ``lookahead_k``, ``alpha``: Lookahead's (a rotation by alpha S
    has the scale alpha lr)."""

    def __init__(self, state: Tensor, steps: Tensor, lr: float, precision: str, *,
                 lookahead_k: int = 0, alpha: float = 0.5, every: int = PLAN_EVERY,
                 margin: float = PLAN_MARGIN, clipped: Tensor | None = None):
        self.state, self.steps, self.precision = state, steps, precision
        self.scale = {"step": lr, "sync": alpha * lr}
        self.uses = {"step": steps, "sync": steps // lookahead_k if lookahead_k else steps}
        self.every, self.margin, self.clipped = every, margin, clipped

    def __call__(self, kind: str, a: Tensor, rows: Sequence[int] | None = None) -> Rotations:
        """The rotations of ``a`` (the chunk's rows ``rows``, default all) for ``kind`` "step"
        (X exp(U)) or "sync" (X_slow exp(alpha S))."""
        col, scale = _KINDS[kind], self.scale[kind]
        rows = list(range(len(self.state))) if rows is None else list(rows)
        if self._due(kind, rows) or bool((self.state[rows, col] < 0).any()):
            self.state[rows, col:col + 2] = self._refresh(a, scale, self.precision)
        u = torch.finfo(product(self.precision, a.device).dtype).eps / 2
        keys: list[tuple[str, int | tuple[int, int]]] = []
        for rate, width in self.state[rows, col:col + 2].tolist():
            if width >= 0:
                keys.append(("border", int(width)))
            else:
                keys.append(("fast_exp", exp_plan(self.margin * rate * scale, u)))
        return Rotations(keys, self.clipped)

    def _due(self, kind: str, rows: list[int]) -> bool:
        uses = self.uses[kind][rows]
        return bool(((uses - 1) % self.every == 0).any())

    @staticmethod
    def _refresh(a: Tensor, scale: float, precision: str) -> Tensor:
        """(rate, width) of each matrix of ``a``, read from ``a`` itself (the refresh's host reads);
        a rate that cannot be known (theta or lr 0, or theta not finite) is -1: the next use
        refreshes again."""
        theta = exp_theta(a, precision).double().cpu()
        rate = theta / scale if scale > 0 else torch.zeros_like(theta)
        rate = torch.where((rate > 0) & rate.isfinite(), rate, -1.0)
        widths = torch.tensor([-1.0 if w is None else float(w) for w in border_widths(a)], dtype=torch.float64)
        return torch.stack([rate, widths], dim=1).float()
