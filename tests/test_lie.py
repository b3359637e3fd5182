"""Lie-form gradients (lipnext.nn.lie): X^T G from the backward, and the optimizer that uses it."""
import pytest
import torch

from lipnext.models import create_model
from lipnext.models.lipnext import LipNeXtBlock
from lipnext.nn import (OrthogonalPatchStem, has_lie_gradient, lie_form_gradients, lie_slice,
                        random_orthogonal, use_lie_gradients)
from lipnext.optim import build_optimizer
from lipnext.optim.functional import pull_back


def _grads(module, x):
    module.zero_grad()
    module(x).square().sum().backward()
    return {k: p.grad.clone() for k, p in module.named_parameters()}


def _assert_lie_form(module, x, names):
    """With the switch on, each named weight's grad is X^T (its Euclidean grad); others unchanged."""
    euclid = _grads(module, x)
    assert use_lie_gradients(module) == len(names)
    lie = _grads(module, x)
    for name, p in module.named_parameters():
        expected = p.detach().mT @ euclid[name] if name in names else euclid[name]
        torch.testing.assert_close(lie[name], expected, rtol=0, atol=1e-11, msg=name)
    use_lie_gradients(module, False)
    for name, g in _grads(module, x).items():
        torch.testing.assert_close(g, euclid[name], rtol=0, atol=1e-11, msg=name)


@pytest.mark.parametrize("batch", [1, 4])          # 64 token rows (token order), 256 (fused)
@pytest.mark.parametrize("padding", ["circular", "zero"])
def test_one_function_block_gives_lie_gradients(batch, padding):
    torch.manual_seed(0)
    block = LipNeXtBlock(64, (8, 8), padding=padding).double()
    _assert_lie_form(block, torch.randn(batch, 8, 8, 64, dtype=torch.float64), {"R", "M"})


@pytest.mark.parametrize("activation", ["minmax", "identity"])
def test_autograd_block_gives_lie_gradients(activation):
    """Activations the one-function block does not cover go through autograd and lie_slice."""
    torch.manual_seed(1)
    block = LipNeXtBlock(32, (4, 4), activation=activation).double()
    _assert_lie_form(block, torch.randn(2, 4, 4, 32, dtype=torch.float64), {"R", "M"})


def test_stem_gives_lie_gradient_of_its_square_matrix():
    torch.manual_seed(2)
    stem = OrthogonalPatchStem(3, 64, 4, [0.5, 0.5, 0.5]).double()
    _assert_lie_form(stem, torch.rand(2, 3, 16, 16, dtype=torch.float64), {"weight"})


def test_lie_slice_of_a_wide_block_is_q_transpose_times_the_padded_gradient():
    q = random_orthogonal(10, dtype=torch.float64).requires_grad_()
    g = torch.randn(4, 7, dtype=torch.float64)
    (lie_slice(q, 4, 7) * g).sum().backward()
    padded = torch.zeros(10, 10, dtype=torch.float64)
    padded[:4, :7] = g
    torch.testing.assert_close(q.grad, q.detach().mT @ padded, rtol=0, atol=1e-14)


def test_use_lie_gradients_marks_only_the_weights_of_modules_that_deliver_it():
    model = create_model("lipnext_l4w64", image_size=16)
    assert use_lie_gradients(model) == 1 + 2 * 4        # the stem's Q, each block's R and M
    marked = {n for n, p in model.named_parameters() if has_lie_gradient(p)}
    assert marked == {"stem.weight"} | {f"blocks.{i}.{w}" for i in range(4) for w in "RM"}
    assert all(b.lie_gradients for b in model.blocks)
    use_lie_gradients(model, False)
    assert not any(has_lie_gradient(p) for p in model.parameters())


def test_pull_back_only_multiplies_the_euclidean_rows():
    x = torch.stack([random_orthogonal(6, dtype=torch.float64) for _ in range(3)])
    g = torch.randn(3, 6, 6, dtype=torch.float64)
    out = pull_back(x, g, [True, False, True])
    assert torch.equal(out[0], g[0]) and torch.equal(out[2], g[2])
    torch.testing.assert_close(out[1], x[1].mT @ g[1], rtol=0, atol=1e-14)
    torch.testing.assert_close(pull_back(x, g, [False] * 3), x.mT @ g, rtol=0, atol=1e-14)
    assert pull_back(x, g, [True] * 3) is g


def _train(lie: bool, steps: int = 6) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    model = create_model("lipnext_l4w64", image_size=16).double()
    opt = build_optimizer(model, lr=1e-2, precision="fp64")
    x, y = torch.rand(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (4,))
    for _ in range(steps):
        opt.zero_grad()
        with lie_form_gradients(model, lie):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_with_lie_gradients_follows_the_euclidean_path():
    """Lie-form gradients (the engine's opt-in) change which products run, not the trajectory
    (float64, gradient clipping on: ||X^T G||_F = ||G||_F), through a Lookahead sync."""
    start = _train(True, steps=0)
    a, b = _train(True), _train(False)
    assert (a["blocks.0.R"] - start["blocks.0.R"]).abs().max() > 1e-3       # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-10, msg=k)
