"""The optimizer's step reads nothing from the device (issue 23, item 4): FastExp's plans come
from the optimizer state (``optim.plans``), refreshed every ``PLAN_EVERY`` steps.

How the reads are counted without a GPU: the step runs with every parameter, gradient and state
tensor on the meta device, which holds shapes but no data, while the step counts stay CPU scalars
as they would on a GPU. Under ``HostReads`` (a TorchDispatchMode) every operation that needs a
device tensor's values on the host is counted and answered with a stand-in value: ``.item()``,
``float()``, ``bool()`` (aten._local_scalar_dense), ``.tolist()``/``.cpu()`` (a copy from the
device to the CPU), ``nonzero`` (a data-dependent shape), and, since PyTorch waits for the GPU
after a blocking copy in either direction, every CPU -> device copy without ``non_blocking``.
On a GPU each of those is a synchronisation that drains the stream."""
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lipnext.nn import OrthogonalParameter, mark_lie_gradient, random_orthogonal
from lipnext.ops.border_exp import expm_unsynced
from lipnext.ops.exp import exp_theta, fast_expm1, plan_limit
from lipnext.optim import ManifoldAdam
from lipnext.optim.plans import PLAN_EVERY, PLAN_STATE

aten = torch.ops.aten
_DATA_DEPENDENT = (aten.nonzero.default, aten.masked_select.default, aten._unique2.default)


class HostReads(TorchDispatchMode):
    """Counts the reads of meta ("device") data on the host, and the blocking CPU -> device
    copies; answers each read with ones (or an empty index) so that the step runs on."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if func is aten._local_scalar_dense.default and first.is_meta:
            self.reads.append("item")
            return True if first.dtype == torch.bool else 1
        if func in _DATA_DEPENDENT and first.is_meta:
            self.reads.append(func.overloadpacket.__name__)
            return torch.zeros((0, first.dim()), dtype=torch.int64, device="meta")
        if func is aten._to_copy.default and "device" in kwargs:
            to = torch.device(kwargs["device"]).type
            if first.is_meta and to == "cpu":
                self.reads.append("to_cpu")
                return torch.ones(first.shape, dtype=kwargs.get("dtype") or first.dtype)
            if first.device.type == "cpu" and to == "meta" and not kwargs.get("non_blocking"):
                self.reads.append("blocking_h2d")
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if dst.device.type == "cpu" and src.is_meta:
                self.reads.append("copy_to_cpu")
                return dst.fill_(1)
            if dst.is_meta and src.device.type == "cpu" and not (args[2:] or [kwargs.get("non_blocking")])[0]:
                self.reads.append("blocking_h2d")
        return func(*args, **kwargs)


def test_host_reads_counts_what_a_gpu_would_wait_for():
    a = torch.empty(4, 4, device="meta")
    with HostReads() as mode:
        bool(a.sum() > 0), a.tolist(), a.nonzero(), torch.ones(3).to("meta")
        torch.ones(3).to("meta", non_blocking=True)
    assert mode.reads == ["item", "to_cpu", "nonzero", "blocking_h2d"]


def test_the_optimizer_step_reads_the_device_only_at_plan_refreshes():
    """NAdam + Lookahead (k = 5) on orthogonal matrices in Lie form and an ordinary weight: no
    read at all on a step, except each plan's refresh (its 1st, 21st, ... step or Lookahead
    rotation), which reads theta and the border widths once for the chunk. Before, every step
    read the plans' norms, the border test, the Lookahead mask and the coefficients (8 reads)."""
    xs = [mark_lie_gradient(OrthogonalParameter(torch.empty(16, 16, device="meta"))) for _ in range(3)]
    w = nn.Parameter(torch.empty(16, 16, device="meta"))
    opt = ManifoldAdam([dict(params=xs), dict(params=[w], orthogonal=False)], lr=1e-3, nesterov=True,
                       lookahead_k=5)
    reads = {}
    for step in range(1, 2 * PLAN_EVERY + 2):
        for p in [*xs, w]:
            p.grad = torch.empty(16, 16, device="meta")
        with HostReads() as mode:
            opt.step()
        reads[step] = mode.reads
    refreshes = {1, PLAN_EVERY + 1, 2 * PLAN_EVERY + 1, 5}     # steps 1, 21, 41; the first rotation by S
    assert {s for s, r in reads.items() if r} == refreshes, reads
    assert all(len(reads[s]) <= 3 for s in refreshes), reads


def _skew(n: int, norm: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = a - a.T
    return a * (norm / torch.linalg.matrix_norm(a, ord=2))


def test_a_fixed_plan_is_exact_within_its_limit_and_scales_what_exceeds_it():
    """FastExp with a plan fixed on the host: within u where theta <= the plan's limit L; a
    matrix beyond it is rotated by exp(g A), g = L / theta, as accurately, and counted."""
    a = torch.stack([_skew(32, 0.05, 0), _skew(32, 1.5, 1)]).float()
    plan = (6, 0)
    limit = plan_limit(plan, 2.0 ** -24)
    theta = exp_theta(a)
    assert theta[0] < limit < theta[1]
    clipped = torch.zeros((), dtype=torch.int64)
    w = fast_expm1(a, skew=True, plan=plan, clipped=clipped)
    g = torch.tensor([1.0, limit / float(theta[1])], dtype=torch.float64)
    want = torch.linalg.matrix_exp(g.view(-1, 1, 1) * a.double()) - torch.eye(32, dtype=torch.float64)
    assert (w.double() - want).abs().max() < 1e-6
    assert int(clipped) == 1


def test_planned_steps_follow_the_per_step_plans():
    """plan_every = 20 against planning each rotation from its own matrix (plan_every = 0): the
    same trajectory up to rounding, and no rotation scaled by the guard."""
    def run(every: int) -> tuple[list[torch.Tensor], ManifoldAdam]:
        torch.manual_seed(0)
        xs = [OrthogonalParameter(random_orthogonal(24)) for _ in range(3)]
        targets = [random_orthogonal(24) for _ in xs]
        opt = ManifoldAdam(xs, lr=0.02, nesterov=True, lookahead_k=5, plan_every=every)
        for t in range(45):
            for g in opt.param_groups:
                g["lr"] = 0.02 * min(1.0, (t + 1) / 10)       # a warm-up: the plans follow the lr
            opt.zero_grad()
            sum(((x - y) ** 2).sum() for x, y in zip(xs, targets)).backward()
            opt.step()
        return [x.detach().clone() for x in xs], opt

    planned, opt = run(PLAN_EVERY)
    per_step, _ = run(0)
    assert opt.clipped_rotations() == 0
    assert max((a - b).abs().max().item() for a, b in zip(planned, per_step)) < 1e-5
    rates = torch.stack([opt.state[p][PLAN_STATE] for p in opt.param_groups[0]["params"]])
    assert (rates[:, [0, 2]] > 0).all() and (rates[:, [1, 3]] == -1).all()    # dense matrices


def test_lr_zero_leaves_the_plan_unknown_until_a_step_moves():
    x = OrthogonalParameter(random_orthogonal(8))
    opt = ManifoldAdam([x], lr=0.0)
    x.grad = torch.randn(8, 8)
    opt.step()
    assert opt.state[x][PLAN_STATE][0] == -1                   # refreshed again at the next step
    opt.param_groups[0]["lr"] = 1e-3
    opt.step()
    assert opt.state[x][PLAN_STATE][0] > 0


@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.5, 4.0, 60.0])
def test_the_border_paths_exponential_needs_no_host_read(scale):
    """``expm_unsynced`` (the border update's 4k x 4k exponential off the CPU, where
    torch.linalg.matrix_exp reads its norms to the host) against matrix_exp, float64."""
    m = torch.randn(3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * scale / 5
    want = torch.linalg.matrix_exp(m)
    got = expm_unsynced(m)
    assert ((got - want).abs().amax() / want.abs().amax()).item() < 1e-13
    assert expm_unsynced(torch.full((1, 4, 4), 2.0 ** 30, dtype=torch.float64)).isnan().all()
    assert math.isfinite(float(expm_unsynced(m).sum()))
