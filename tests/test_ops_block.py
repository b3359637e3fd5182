"""ops.lipnext_block, the one-function eager block: equal to the reference block in value and
gradient, in both channel-mix orders, for every padding and beta; the GEMM count is autograd's."""
import pytest
import torch

import lipnext.models.lipnext as lipnext_module
from lipnext.models.lipnext import LipNeXtBlock, block_forward
from lipnext.nn.shift import spatial_shift
from lipnext.ops.lipnext_block import lipnext_block


def make_block(width=16, grid=(4, 5), padding="circular", beta=0.5, activation="beta_abs", seed=0):
    torch.manual_seed(seed)
    block = LipNeXtBlock(width, grid, beta=beta, padding=padding, activation=activation).double()
    with torch.no_grad():
        block.pos.pos.normal_()
        block.bias.normal_()
    return block


@pytest.mark.parametrize("padding", ["circular", "zero"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 3])
def test_block_equals_the_reference_in_value_and_gradient(padding, beta, batch):
    block = make_block(padding=padding, beta=beta)
    x = torch.randn(batch, 4, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(batch, 4, 5, 16, dtype=torch.float64)
    params = [x, block.R, block.M, block.bias, block.pos.pos]
    ref = block_forward(block, x)
    ref_grads = torch.autograd.grad((ref * w).sum(), params)
    u = block.pos(x)
    for fuse in (True, False):
        out = lipnext_block(u, block.R, block.M, block.bias, block.shift.group, padding,
                            block.act.num_abs, fuse)
        grads = torch.autograd.grad((out * w).sum(), params, retain_graph=True)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("grid", [(1, 1), (1, 3), (2, 2)])
@pytest.mark.parametrize("padding", ["circular", "zero"])
def test_gradcheck_on_small_grids(grid, padding):
    """Grids of one row or column (the shift's wrap is the row itself, or nothing)."""
    torch.manual_seed(3)
    c = 8
    u = torch.randn(2, *grid, c, dtype=torch.float64, requires_grad=True)
    r, m = (torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0].requires_grad_() for _ in "rm")
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    out = lipnext_block(u, r, m, b, 1, padding, 4)
    ref = spatial_shift(u @ r.mT, 1, padding) @ (r @ m.mT) + b
    torch.testing.assert_close(out, torch.cat([ref[..., :4].abs(), ref[..., 4:]], -1), rtol=0, atol=1e-13)
    for fuse in (True, False):
        assert torch.autograd.gradcheck(lambda *a: lipnext_block(*a, 1, padding, 4, fuse), (u, r, m, b))


def test_frozen_weights_get_no_gradient_and_the_input_gradient_is_right():
    block = make_block()
    block.requires_grad_(False)
    x = torch.randn(2, 4, 5, 16, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(block(x).sum(), x)
    (g_ref,) = torch.autograd.grad(block_forward(block, x).sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
    assert all(p.grad is None for p in block.parameters())


def test_the_block_uses_it_for_beta_abs_and_the_reference_otherwise(monkeypatch):
    calls = []
    real = lipnext_module.lipnext_block
    monkeypatch.setattr(lipnext_module, "lipnext_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1, 4, 5, 16, dtype=torch.float64)
    make_block()(x)
    assert calls == [1]
    make_block(activation="minmax")(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        make_block()(x.float())
    assert calls == [1]
