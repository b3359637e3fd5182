"""The hot operations: references against the nn modules' mathematics, the kernel slots
(a registered kernel runs on its device type and only there, the reference elsewhere and
under ``reference_only``), and the temporary module modes."""
import pytest
import torch
from torch import nn

import lipnext
from lipnext import ops
from lipnext.nn.activation import BetaAbs
from lipnext.modes import evaluating, frozen
from lipnext.nn.pool import L2Pool
from lipnext.nn.shift import SpatialShift
from lipnext.ops import registry


@pytest.fixture
def fake_kernel():
    """A kernel for l2_pool on the meta device type that records its calls."""
    calls = []

    def kernel(x):
        calls.append(x.device.type)
        return torch.full(x.shape[:1] + x.shape[-1:], 7.0, device=x.device)
    ops.register_kernel("l2_pool", "meta", kernel)
    ops.register_kernel("l2_pool", "cpu", kernel)
    yield calls
    ops.unregister_kernel("l2_pool", "meta")
    ops.unregister_kernel("l2_pool", "cpu")


def _shifted(x, step, dim, padding):
    """out[i] = x[i - step] along dim: torch.roll, with the wrapped row zeroed for zero padding."""
    out = torch.roll(x, step, dims=dim)
    if padding == "zero":
        out.narrow(dim, 0 if step > 0 else x.shape[dim] - 1, 1).zero_()
    return out


@pytest.mark.parametrize("grid", [(1, 1), (1, 3), (2, 2), (4, 6)])
@pytest.mark.parametrize("padding", ["circular", "zero"])
def test_the_shift_moves_each_group_on_every_grid(grid, padding):
    """S against torch.roll, group by group, also on grids of one row or column."""
    x = torch.randn(2, *grid, 11, dtype=torch.float64)                # g = 2, 3 channels at rest
    s = ops.spatial_shift(x, 2, padding)
    for k, (step, dim) in enumerate(((-1, 1), (1, 1), (-1, 2), (1, 2))):
        grp = slice(2 * k, 2 * k + 2)
        assert torch.equal(s[..., grp], _shifted(x[..., grp], step, dim, padding))
    assert torch.equal(s[..., 8:], x[..., 8:])
    assert torch.equal(ops.shift.functional(x, 2, padding), s)         # the form torch.compile sees
    y = torch.randn_like(x)                                             # S^T = the reversed copies
    adj = ops.shift.apply_copies(y, ops.shift.shift_copies(*grid, 11, 2, padding), True,
                                 padding == "circular")
    torch.testing.assert_close((s * y).sum(), (x * adj).sum(), rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("group", [0, 1, 3])                           # 4g = 0, 4 or all 12 channels
@pytest.mark.parametrize("grid", [(1, 3), (3, 4)])
@pytest.mark.parametrize("padding", ["circular", "zero"])
def test_the_in_place_shift_is_s_and_its_adjoint(group, grid, padding):
    """shift_ writes S(x) into x itself; with ``adjoint`` S^T, by <S x, y> = <x, S^T y>."""
    x, y = torch.randn(2, 2, *grid, 12, dtype=torch.float64).unbind(0)
    s = ops.spatial_shift(x, group, padding)
    z = x.clone()
    assert ops.shift.shift_(z, group, padding) is z and torch.equal(z, s)
    adj = ops.shift.shift_(y.clone(), group, padding, adjoint=True)
    torch.testing.assert_close((s * y).sum(), (x * adj).sum(), rtol=1e-12, atol=1e-12)

def test_references_compute_the_operations():
    x = torch.randn(2, 4, 6, 16)
    assert torch.equal(ops.spatial_shift(x, 0), x)
    s = ops.spatial_shift(x, 2)
    assert torch.equal(s[:, :, :, :2], torch.roll(x[..., :2], -1, dims=1))     # up
    assert torch.equal(s[:, :, :, 6:8], torch.roll(x[..., 6:8], 1, dims=2))    # right
    assert torch.equal(s[..., 8:], x[..., 8:])
    z = ops.spatial_shift(x, 2, "zero")
    assert torch.equal(z[:, -1, :, :2], torch.zeros(2, 6, 2))                  # up: last row empty
    img = torch.arange(2 * 3 * 4 * 4.0).view(2, 3, 4, 4)
    p = ops.patchify(img, 2)
    assert p.shape == (2, 2, 2, 12) and torch.equal(p[1, 0, 1], img[1, :, 0:2, 2:4].reshape(-1))
    torch.testing.assert_close(ops.l2_pool(x), (x.square().sum(dim=(1, 2)) + 1e-12).sqrt())
    assert ops.l2_pool(x.bfloat16()).dtype == torch.bfloat16
    b = ops.beta_abs(x, 5)
    assert torch.equal(b[..., :5], x[..., :5].abs()) and torch.equal(b[..., 5:], x[..., 5:])
    assert torch.equal(ops.beta_abs(x, 16), x.abs()) and ops.beta_abs(x, 0) is x


def test_modules_run_the_ops():
    x = torch.randn(2, 4, 4, 16)
    assert torch.equal(SpatialShift(16, 1 / 8)(x), ops.spatial_shift(x, 2))
    assert torch.equal(BetaAbs(16, 0.25)(x), ops.beta_abs(x, 4))
    assert torch.equal(L2Pool()(x), ops.l2_pool(x))
    assert lipnext.nn.spatial_shift is ops.spatial_shift


def test_a_registered_kernel_runs_on_its_device_only(fake_kernel):
    ops.unregister_kernel("l2_pool", "cpu")
    x = torch.randn(3, 2, 2, 5)
    out = L2Pool()(x.to("meta"))                       # meta: the kernel
    assert fake_kernel == ["meta"] and out.device.type == "meta"
    torch.testing.assert_close(L2Pool()(x), (x.square().sum(dim=(1, 2)) + 1e-12).sqrt())
    assert fake_kernel == ["meta"]                     # cpu: the reference, not the kernel
    assert ops.kernel_for("l2_pool", "cpu") is registry.OPS["l2_pool"]


def test_the_kernels_result_comes_back_and_reference_only_bypasses_it(fake_kernel):
    x = torch.randn(3, 2, 2, 5)
    assert torch.equal(L2Pool()(x), torch.full((3, 5), 7.0)) and fake_kernel == ["cpu"]
    with ops.reference_only():
        ref = L2Pool()(x)
    assert fake_kernel == ["cpu"] and torch.allclose(ref, (x.square().sum(dim=(1, 2)) + 1e-12).sqrt())
    assert torch.equal(L2Pool()(x), torch.full((3, 5), 7.0))      # kernels back after the block


def test_certification_uses_the_references(fake_kernel):
    """The float64 twin runs the reference arithmetic that the rounding bounds describe."""
    m = lipnext.create_model("lipnext_l4w64", num_classes=4, in_chans=1, image_size=8, patch_size=2,
                             seed=0).eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 4, (4,))
    ops.register_kernel("patchify", "cpu", lambda x, p: torch.zeros(()))  # would break the twin
    try:
        cert = lipnext.certify(m, x, y)
    finally:
        ops.unregister_kernel("patchify", "cpu")
    with ops.reference_only():
        assert torch.equal(lipnext.certify(m, x, y).radius, cert.radius)


def test_registry_user_errors():
    with pytest.raises(KeyError, match="unknown op 'conv'"):
        ops.register_kernel("conv", "cuda", lambda x: x)
    with pytest.raises(ValueError, match="device type such as 'cuda'"):
        ops.register_kernel("shift", "cuda:0", lambda x: x)
    with pytest.raises(ValueError, match="device type"):
        ops.register_kernel("shift", "gpu", lambda x: x)
    with pytest.raises(KeyError, match="unknown op 'conv'"):
        ops.kernel_for("conv", "cpu")
    with pytest.raises(ValueError, match="defined twice"):
        registry.kernel_op("shift", lambda x: x)


def test_evaluating_restores_the_mode_also_on_an_exception():
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    with evaluating(m):
        assert not m.training and not m[1].training
    assert m.training and m[1].training
    m.eval()
    with evaluating(m):
        pass
    assert not m.training
    m.train()
    with pytest.raises(RuntimeError), evaluating(m):
        raise RuntimeError
    assert m.training and m[1].training


def test_frozen_restores_each_flag_also_on_an_exception():
    m = nn.Linear(2, 2)
    m.bias.requires_grad_(False)
    with pytest.raises(RuntimeError), frozen(m):
        assert not any(p.requires_grad for p in m.parameters())
        raise RuntimeError
    assert m.weight.requires_grad and not m.bias.requires_grad
