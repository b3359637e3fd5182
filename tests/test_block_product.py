"""LipNeXtBlock: the two orders of the channel mix agree; the cheaper one is chosen; compiled = eager;
one compile switch that swallows nothing but the compiler's own failures."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lipnext.models.lipnext import LipNeXtBlock, block_forward, channel_mix, set_compile
from lipnext.nn import random_orthogonal


def make_block(width=12, grid=(4, 4), seed=0):
    torch.manual_seed(seed)
    block = LipNeXtBlock(width, grid).double()
    with torch.no_grad():
        block.pos.pos.normal_()
        block.bias.normal_()
    return block


def test_fused_and_token_orders_agree_in_value_and_gradient():
    torch.manual_seed(1)
    r = random_orthogonal(16, dtype=torch.float64).requires_grad_()
    m = random_orthogonal(16, dtype=torch.float64).requires_grad_()
    y = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 16, dtype=torch.float64)
    results = []
    for fuse in (True, False):
        out = channel_mix(y, r, m, fuse)
        grads = torch.autograd.grad((out * w).sum(), (y, r, m))
        results.append((out, grads))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-13)
    torch.testing.assert_close(o1, y @ r @ m.mT, rtol=0, atol=1e-13)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def matmul_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


@pytest.mark.parametrize("batch,fused", [(1, False), (2, True)])
def test_the_cheaper_order_is_chosen(batch, fused):
    """C = 24 channels, 4 x 4 grid: N = 16 B token rows; fuse iff N > C (B = 2)."""
    c, n = 24, 16 * batch
    block = make_block(c)
    x = torch.randn(batch, 4, 4, c, dtype=torch.float64)
    flops = matmul_flops(lambda: block_forward(block, x))
    fused_flops = 2 * (c ** 3 + 2 * n * c * c)
    token_flops = 2 * 3 * n * c * c
    assert flops == (fused_flops if fused else token_flops)
    assert flops == min(fused_flops, token_flops)


@pytest.mark.parametrize("batch", [1, 3])
def test_block_output_and_gradients_do_not_depend_on_the_order(monkeypatch, batch):
    import lipnext.models.lipnext as lipnext_module
    block = make_block()
    x = torch.randn(batch, 4, 4, 12, dtype=torch.float64, requires_grad=True)
    runs = []
    for fuse in (True, False):
        monkeypatch.setattr(lipnext_module, "channel_mix",
                            lambda y, r, m, fuse_=None, f=fuse: channel_mix(y, r, m, f))
        out = block_forward(block, x)
        params = [x, block.R, block.M, block.bias, block.pos.pos]
        runs.append((out, torch.autograd.grad(out.square().sum(), params)))
    (o1, g1), (o2, g2) = runs
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_eager_by_default_on_cpu(monkeypatch):
    import lipnext.models.lipnext as lipnext_module

    def refuse():
        raise AssertionError("compiled on CPU without being asked")
    monkeypatch.setattr(lipnext_module, "_compiled_block_forward", refuse)
    block = make_block()
    block(torch.randn(1, 4, 4, 12, dtype=torch.float64))


def test_a_compiler_failure_is_reported_with_the_switch_and_nothing_else_is_caught(monkeypatch):
    """Only the compiler's own exceptions become an error naming train.compile=false; an
    out-of-memory error or checkpointing's stop signal passes through untouched, and no
    process-global 'broken' state remains (the next call compiles again)."""
    import torch._dynamo.exc as dynamo_exc
    import torch.utils.checkpoint as checkpoint

    import lipnext.models.lipnext as lipnext_module
    calls = []

    def failing(err):
        def run(*args):
            calls.append(err)
            raise err
        return run
    block = set_compile(make_block(), True)
    x = torch.randn(1, 4, 4, 12, dtype=torch.float64)
    monkeypatch.setattr(lipnext_module, "_compiled_block_forward",
                        lambda: failing(dynamo_exc.InternalTorchDynamoError("no compiler here")))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="train.compile=false") as info:
            block(x)
        assert isinstance(info.value.__cause__, dynamo_exc.TorchDynamoException)
    assert len(calls) == 2                                 # tried again: no global fallback
    for err in (torch.OutOfMemoryError("CUDA out of memory"), checkpoint._StopRecomputationError()):
        monkeypatch.setattr(lipnext_module, "_compiled_block_forward", lambda e=err: failing(e))
        with pytest.raises(type(err)) as info:
            block(x)
        assert info.value is err


@pytest.mark.slow
def test_compiled_block_equals_eager():
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    torch.manual_seed(2)
    blocks = [set_compile(LipNeXtBlock(16, (4, 4)), True) for _ in range(2)]
    for b in blocks:
        with torch.no_grad():
            b.pos.pos.normal_()
            b.bias.normal_()
    x = torch.randn(2, 4, 4, 16, requires_grad=True)
    outs = []
    for run in (lambda b, h: b(h), block_forward):
        h = x
        for b in blocks:
            h = run(b, h)
        grads = torch.autograd.grad(h.square().sum(), [x] + [p for b in blocks for p in b.parameters()])
        outs.append((h, grads))
    assert dynamo_utils.counters["stats"]["unique_graphs"] >= 1
    (o1, g1), (o2, g2) = outs
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_block_gives_the_one_function_blocks_lie_gradients():
    """With Lie-form gradients the compiled block (autograd through lie_slice) and the eager
    one-function block (R^T dR, M^T dM from its own backward) agree."""
    from lipnext.nn import use_lie_gradients
    torch._dynamo.reset()
    torch.manual_seed(3)
    block = LipNeXtBlock(16, (4, 4))
    assert use_lie_gradients(block) == 2
    x = torch.randn(2, 4, 4, 16)
    grads = []
    for compiled in (True, False):
        set_compile(block, compiled)
        block.zero_grad()
        block(x).square().sum().backward()
        grads.append([block.R.grad.clone(), block.M.grad.clone()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch,fuse", [(1, False), (2, True)])
def test_the_one_function_block_costs_what_autograd_costs(batch, fuse):
    """N = 16 B rows, C = 24: fused 3 C^3 + 6 N C^2, token order 9 N C^2 (multiply-adds)."""
    c, n = 24, 16 * batch
    block = make_block(c)
    x = torch.randn(batch, 4, 4, c, dtype=torch.float64, requires_grad=True)
    total = matmul_flops(lambda: block(x).sum().backward())
    assert total == 2 * (3 * c ** 3 + 6 * n * c * c if fuse else 9 * n * c * c)
    assert total == matmul_flops(lambda: block_forward(block, x).sum().backward())
