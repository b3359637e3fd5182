"""What only a GPU can check (``gpu`` marker: skipped without CUDA; ``pytest -m gpu`` is a stage
of ``lipnext bench gpu``): TF32 and bf16 products on tensor cores, the optimizer's step without
a single host synchronisation (``torch.cuda.set_sync_debug_mode``), compiled blocks and the
bound on the device."""
import pytest
import torch
from torch import nn

from lipnext.bench.models import bench_model
from lipnext.models.lipnext import set_compile
from lipnext.nn import OrthogonalParameter, mark_lie_gradient, random_orthogonal
from lipnext.ops.precision import _cuda_fp32_precision, product
from lipnext.optim import ManifoldAdam, exp_update
from lipnext.optim.plans import PLAN_EVERY, Rotations

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _bound_ratio(name: str, n: int = 512) -> float:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, n, n, generator=g), torch.randn(1, n, n, generator=g)
    prec = product(name, CUDA)
    err = (prec.mm(a.to(CUDA), b.to(CUDA)).double().cpu() - a.double() @ b.double()).abs()
    return float((err / (prec.error_constant(n) * (a.double().abs() @ b.double().abs()))).max())


@pytest.mark.parametrize("name", ["fp32", "tf32", "bf16"])
def test_products_on_the_device_stay_within_their_bounds(name):
    assert _bound_ratio(name) <= 1.0


def test_tf32_is_really_used_inside_its_context_and_both_apis_agree():
    a = torch.randn(1, 512, 512, device=CUDA)
    with _cuda_fp32_precision(CUDA, "tf32"):
        assert torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() != "highest"
        tf32 = torch.bmm(a, a)
    with _cuda_fp32_precision(CUDA, "ieee"):
        assert not torch.backends.cuda.matmul.allow_tf32
        ieee = torch.bmm(a, a)
    exact = (a.double() @ a.double()).float()
    assert (tf32 - exact).abs().max() > 10 * (ieee - exact).abs().max()     # tensor cores, 10-bit operands


def test_the_optimizer_step_does_not_synchronise():
    """After the first steps (the plans' refresh), a NAdam + Lookahead step with orthogonal and
    ordinary parameters waits for the GPU nowhere: set_sync_debug_mode("error") raises at any
    synchronisation (.item(), a device-to-host copy, a blocking host-to-device copy)."""
    xs = [mark_lie_gradient(OrthogonalParameter(random_orthogonal(256).to(CUDA))) for _ in range(4)]
    w = nn.Parameter(torch.randn(256, 10, device=CUDA))
    opt = ManifoldAdam([dict(params=xs), dict(params=[w], orthogonal=False)], lr=1e-3, nesterov=True,
                       lookahead_k=5)
    grads = [torch.randn(256, 256, device=CUDA) * 1e-3 for _ in xs] + [torch.randn(256, 10, device=CUDA)]
    for step in range(1, PLAN_EVERY):
        for p, g in zip([*xs, w], grads):
            p.grad = g.clone()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step > 5 else "default")   # 1 and 5 refresh
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert opt.clipped_rotations() == 0


def test_the_border_update_does_not_synchronise():
    n, k = 256, 16
    u = torch.zeros(1, n, n, device=CUDA)
    u[0, :, :k] = torch.randn(n, k, device=CUDA) * 1e-3
    u[0, :k, :k] = 0
    u = u - u.mT
    x = random_orthogonal(n).to(CUDA)[None]
    want = (x.double() @ torch.linalg.matrix_exp(u.double())).float()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = exp_update(x, u, skew=True, rotations=Rotations([("border", k)]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (got - want).abs().max() < 1e-6


@pytest.mark.parametrize("amp", [False, True])
def test_compiled_blocks_equal_eager_on_the_device(amp):
    model = bench_model("lipnext_l4w64", CUDA, image_size=32)
    x = torch.rand(16, 3, 32, 32, device=CUDA)
    outs = []
    for compiled in (False, True):
        set_compile(model, compiled)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            outs.append(model(x).float())
    assert (outs[0] - outs[1]).norm() <= (3e-2 if amp else 1e-5) * outs[0].norm()


def test_the_bound_on_the_device_is_the_cpus():
    model = bench_model("lipnext_l4w64", torch.device("cpu"), image_size=32)
    here = model.lipschitz_bound()
    there = model.to(CUDA).lipschitz_bound()
    assert abs(there - here) <= 1e-12 * here
