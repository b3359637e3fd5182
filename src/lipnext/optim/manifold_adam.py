"""ManifoldAdam: Adam/NAdam whose orthogonal weights stay on O(n) through the exponential map.

For an orthogonal X with Euclidean gradient G, at step t (docs/CORE.md, Optimizer):

    A = (X^T G - G^T X) / 2                                  Riemannian gradient, skew
        (X^T G taken as it is from .grad where the layer delivers it: ``lipnext.nn.lie``)
    m <- b1 m + (1 - b1) A,   v <- b2 v + (1 - b2) A * A       elementwise moments
    D = (c_m m + c_g A) / (sqrt(v / (1 - b2^t)) + eps)         skew (m, A skew; v symmetric)
        Adam:  c_m = 1 / (1 - b1^t),  c_g = 0
        NAdam: c_m = mu_{t+1} / (1 - mu_1...mu_{t+1}),  c_g = (1 - mu_t) / (1 - mu_1...mu_t),
               mu_t = b1 (1 - 0.5 * 0.96^(t * momentum_decay))   (as torch.optim.NAdam)
    U = -lr_eff (D + wd_o (X - X^T) / 2),  lr_eff = lr * orthogonal_lr_scale
    X <- X @ FastExp(U)          (``update``: fast_exp | exact | cayley, see ``fast_exp.exp_update``)

wd_o (``orthogonal_weight_decay``, 0 by default) is a decoupled pull towards the identity
(the Riemannian gradient of ||X - I||^2 / 2): ||X||_F is constant on O(n), so shrinking X
has no meaning there. Other parameters take the same Adam/NAdam step on G with decoupled
(AdamW) weight decay p <- (1 - lr wd) p.

Lookahead (``lookahead_k`` = K > 0): orthogonal X keep a slow copy X_slow and S, the sum of
the steps U since the last sync; every K steps X_slow <- X_slow @ FastExp(alpha S), X <- X_slow,
S <- 0 (on those steps X @ FastExp(U) is not computed: it would be discarded). Ordinary
parameters: slow <- slow + alpha (fast - slow), fast <- slow.

``update`` picks how X exp(U) is computed (``fast_exp``, ``exact``, ``cayley``) and
``precision`` its arithmetic (``auto`` = TF32 on CUDA else fp32, ``fp32``, ``fp64``, ``tf32``, ``bf16``), both passed to
``exp_update``; the arithmetic lives in ``lipnext.optim.functional``, shared with the
distributed drivers. With ``fast_exp``, each rotation's plan is fixed on the host from the
matrix's state (``optim.plans``, refreshed every ``plan_every`` steps): a step reads nothing
from the device (the step counts and coefficients are CPU scalars, as in torch.optim, sent
with non-blocking copies). ``plan_every=0`` plans every rotation from its own matrix instead
(host reads each step).

Batching: same-shaped orthogonal weights of a group are updated as one stack. Their state
tensors (per parameter, torch.optim layout: ``step``, ``mu_product``, ``exp_avg``,
``exp_avg_sq`` and, with Lookahead, ``slow`` and ``lookahead_sum``) are views into stacked
buffers, so a step moves no state; after ``load_state_dict`` the buffers are rebuilt. A stack
is updated ``chunk_size`` matrices at a time, so the step's temporaries are those of a chunk,
not of the stack; the result does not depend on it. ``chunk_size=None`` (default) takes as
many matrices as fit ``CHUNK_BYTES`` per temporary (``auto_chunk``): 512 MiB on a GPU (8 at
C = 4096, 3 at C = 5792), 8 MiB on a CPU, where the step's ~15 elementwise passes then run
from cache and its temporaries stay below glibc's mmap threshold (a fresh 36 MB tensor costs
~20 ms of page faults on first touch; at C = 1024, 2 matrices instead of a stack of 9 made
the step ~20 % faster on a 2-core CPU, docs/BENCHMARKS.md).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..nn.lie import has_lie_gradient
from ..nn.orthogonal import is_orthogonal
from ..ops.host import to_device
from ..ops.precision import PRECISIONS
from . import functional as F
from .exp_update import METHODS as EXP_METHODS
from .functional import lie_gradient, skew
from .plans import PLAN_EVERY, PLAN_STATE, Planner, new_plan_state
from .polar import group_by_shape, retract_

__all__ = ["CHUNK_BYTES", "ManifoldAdam", "auto_chunk", "lie_gradient", "skew"]

_SCALARS = ("step", "mu_product")  # float32 CPU scalars per parameter, as in torch.optim
_MOMENTS = ("exp_avg", "exp_avg_sq")
_OPTIONS = {"update": "fast_exp", "precision": "auto"}  # groups saved before these existed
#: bytes per temporary of one chunk of the orthogonal step (``auto_chunk``), by device type
CHUNK_BYTES = {"cpu": 8 << 20, "other": 512 << 20}


def auto_chunk(p: Tensor, dtype: torch.dtype) -> int:
    """Matrices per chunk for ``chunk_size=None``: as many as fit ``CHUNK_BYTES`` (at least 1)."""
    budget = CHUNK_BYTES.get(p.device.type, CHUNK_BYTES["other"])
    return max(1, budget // (p.numel() * dtype.itemsize))


def _coefficients(step: Tensor, mu_product: Tensor,
                  group: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    return F.adam_coefficients(step, mu_product, group["betas"], group["momentum_decay"],
                               group["nesterov"])


class ManifoldAdam(Optimizer):
    """Adam/NAdam with orthogonal weights updated on O(n) (see the module docstring).

    A group is orthogonal if it has ``orthogonal=True`` or, without that key, if all its
    parameters are ``OrthogonalParameter``. Orthogonal groups use ``lr * orthogonal_lr_scale``
    and ``orthogonal_weight_decay`` (``weight_decay`` applies to the other groups only).
    ``nesterov=True`` is NAdam (``momentum_decay`` as in torch.optim.NAdam).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, nesterov: bool = False,
                 orthogonal_lr_scale: float = 0.5, orthogonal_weight_decay: float = 0.0,
                 lookahead_k: int = 0, lookahead_alpha: float = 0.5,
                 momentum_decay: float = 4e-3, update: str = "fast_exp",
                 precision: str = "auto", chunk_size: int | None = None,
                 plan_every: int = PLAN_EVERY):
        if lr < 0 or eps < 0 or orthogonal_lr_scale < 0 or momentum_decay < 0:
            raise ValueError("lr, eps, orthogonal_lr_scale and momentum_decay must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if weight_decay < 0 or orthogonal_weight_decay < 0:
            raise ValueError("weight decays must be >= 0")
        if not isinstance(lookahead_k, int) or lookahead_k < 0:
            raise ValueError(f"lookahead_k must be an int >= 0 (0 disables), got {lookahead_k!r}")
        if not 0 < lookahead_alpha <= 1:
            raise ValueError(f"lookahead_alpha must lie in (0, 1], got {lookahead_alpha}")
        if update not in EXP_METHODS:
            raise ValueError(f"update must be one of {', '.join(EXP_METHODS)}, got {update!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be an int >= 1 or None (by bytes: auto_chunk), got {chunk_size!r}")
        if not isinstance(plan_every, int) or plan_every < 0:
            raise ValueError(f"plan_every must be an int >= 0 (0: plan from each matrix, every step), "
                             f"got {plan_every!r}")
        self.chunk_size, self.plan_every = chunk_size, plan_every
        self._clipped: dict[torch.device, Tensor] = {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        nesterov=nesterov, momentum_decay=momentum_decay,
                        orthogonal_lr_scale=orthogonal_lr_scale,
                        orthogonal_weight_decay=orthogonal_weight_decay,
                        lookahead_k=lookahead_k, lookahead_alpha=lookahead_alpha,
                        update=update, precision=precision)
        # (group index, shape, dtype, device) -> (ids of the stacked params, stacked buffers,
        # the rows handed out as state tensors, their data pointers)
        self._stacks: dict[tuple, tuple[tuple[int, ...], dict[str, Tensor], list[Tensor], list[int]]] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        marked = [is_orthogonal(p) for p in group["params"]]
        try:
            if "orthogonal" not in group:
                if any(marked) and not all(marked):
                    raise ValueError(
                        "a param group mixes OrthogonalParameter and ordinary parameters; "
                        "put them in separate groups or set orthogonal=True/False on the group")
                group["orthogonal"] = bool(marked) and all(marked)
            if group["orthogonal"] and any(p.dim() != 2 or p.shape[0] != p.shape[1]
                                           for p in group["params"]):
                raise ValueError("an orthogonal param group may only hold square matrices")
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _OPTIONS.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)   # calls __setstate__: fills options saved state lacks
        self._stacks.clear()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One optimisation step; parameters whose grad is None are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                self._init_state(p, group)
            if group["orthogonal"]:
                for batch in group_by_shape(params):
                    self._orthogonal_step(index, batch, group)
            elif params:
                self._euclidean_step(index, params, group)
        return loss

    @torch.no_grad()
    def retract(self, method: str = "auto") -> float:
        """Polar-retract the orthogonal weights and their Lookahead slow copies in place.

        Returns the largest drift max|X^T X - I| before the retraction.
        """
        params = [p for g in self.param_groups if g["orthogonal"] for p in g["params"]]
        slows = [self.state[p]["slow"] for p in params if "slow" in self.state.get(p, {})]
        return retract_(params + slows, method)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        dtype = torch.promote_types(p.dtype, torch.float32) if group["orthogonal"] else p.dtype
        if not state:
            state["step"] = torch.tensor(0.0)
            state["mu_product"] = torch.tensor(1.0)
            for name in _MOMENTS:
                state[name] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        if group["orthogonal"] and PLAN_STATE not in state:
            state[PLAN_STATE] = new_plan_state()
        if group["lookahead_k"] and "slow" not in state:
            state["slow"] = p.detach().to(dtype, copy=True)
            if group["orthogonal"]:
                state["lookahead_sum"] = torch.zeros_like(state["slow"])

    def _stacked(self, key: tuple, params: list[Tensor], names: tuple[str, ...],
                 dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Buffers (one per name) whose rows are the params' state tensors; rebuilt if stale:
        a state tensor that is not the row handed out (or no longer at its memory) re-stacks."""
        ids = tuple(map(id, params))
        cached = self._stacks.get(key)
        if cached is not None and cached[0] == ids and set(cached[1]) == set(names):
            current = [self.state[p].get(n) for n in cached[1] for p in params]
            if (all(t is row for t, row in zip(current, cached[2]))
                    and [t.data_ptr() for t in current] == cached[3]):
                return cached[1]
        bufs = {}
        for n in names:
            to = dict(dtype=torch.float32, device="cpu") if n in _SCALARS + (PLAN_STATE,) else \
                dict(dtype=dtype, device=params[0].device)
            bufs[n] = torch.stack([self.state[p][n].to(**to) for p in params])
            for p, row in zip(params, bufs[n].unbind(0)):
                self.state[p][n] = row
        rows = [self.state[p][n] for n in bufs for p in params]
        self._stacks[key] = (ids, bufs, rows, [t.data_ptr() for t in rows])
        return bufs

    def _orthogonal_step(self, index: int, params: list[Tensor], group: dict[str, Any]) -> None:
        k = group["lookahead_k"]
        dtype = torch.promote_types(params[0].dtype, torch.float32)
        names = _SCALARS + _MOMENTS + (PLAN_STATE,) + (("slow", "lookahead_sum") if k else ())
        key = (index, tuple(params[0].shape), params[0].dtype, params[0].device)
        s = self._stacked(key, params, names, dtype)
        coefficients = _coefficients(s["step"], s["mu_product"], group)
        due = F.lookahead_due(s["step"], k) if k else None
        rotation = dict(method=group["update"], precision=group["precision"])
        size = self.chunk_size or auto_chunk(params[0], dtype)
        for i in range(0, len(params), size):
            chunk, rows = params[i:i + size], slice(i, i + size)
            x = torch.stack(chunk).to(dtype)
            g = torch.stack([p.grad for p in chunk]).to(dtype)
            xtg = F.pull_back(x, g, [has_lie_gradient(p) for p in chunk])
            del g
            c_m, c_g, bc2 = (to_device(c[rows], x.device, dtype).view(-1, 1, 1) for c in coefficients)
            lr = group["lr"] * group["orthogonal_lr_scale"]
            u = F.manifold_step_direction(
                x, xtg, s["exp_avg"][rows], s["exp_avg_sq"][rows], c_m, c_g, bc2,
                lr=lr, betas=group["betas"], eps=group["eps"],
                weight_decay=group["orthogonal_weight_decay"])
            del xtg
            lookahead = (s["slow"][rows], s["lookahead_sum"][rows], due[rows]) if k else ()
            planner = None
            if self.plan_every and group["update"] == "fast_exp":
                planner = Planner(s[PLAN_STATE][rows], s["step"][rows], lr, group["precision"],
                                  lookahead_k=k, alpha=group["lookahead_alpha"], every=self.plan_every,
                                  clipped=self._counter(x.device))
            x = F.orthogonal_update(x, u, *lookahead, alpha=group["lookahead_alpha"], planner=planner,
                                    **rotation)
            torch._foreach_copy_(chunk, list(x.unbind(0)))

    def _counter(self, device: torch.device) -> Tensor:
        if device not in self._clipped:
            self._clipped[device] = torch.zeros((), dtype=torch.int64, device=device)
        return self._clipped[device]

    def clipped_rotations(self) -> int:
        """How many rotations FastExp's guard has scaled down since the optimizer was made (a
        matrix whose step outgrew its plan between two refreshes: ``optim.plans``); reads the
        device."""
        return int(sum(int(c) for c in self._clipped.values()))

    def _euclidean_step(self, index: int, params: list[Tensor], group: dict[str, Any]) -> None:
        s = self._stacked((index,), params, _SCALARS)
        c_m, c_g, bc2 = _coefficients(s["step"], s["mu_product"], group)
        F.adam_foreach_(params, [p.grad for p in params],
                        [self.state[p]["exp_avg"] for p in params],
                        [self.state[p]["exp_avg_sq"] for p in params], c_m, c_g, bc2,
                        lr=group["lr"], betas=group["betas"], eps=group["eps"],
                        weight_decay=group["weight_decay"], nesterov=group["nesterov"])
        if group["lookahead_k"]:
            fast = [params[i] for i in F.lookahead_due(s["step"], group["lookahead_k"]).nonzero()
                    .squeeze(1).tolist()]
            F.lookahead_euclidean_(fast, [self.state[p]["slow"] for p in fast],
                                   group["lookahead_alpha"])
