"""EMMA, the certified margin loss and CE on hand-computed cases; the eps schedule."""
from __future__ import annotations

import math

import pytest
import torch

from lipnext.losses import (LOSSES, cross_entropy, emma_loss, eps_schedule, margin_loss,
                            pairwise_lipschitz)

# three classes, head rows w0 = (1, 0), w1 = (0, 1), w2 = (-1, 0): ||w0-w1|| = sqrt2, ||w0-w2|| = 2
W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
Z = torch.tensor([[2.0, 1.0, 0.0]])
Y = torch.tensor([0])


def test_pairwise_lipschitz():
    k = pairwise_lipschitz(W, torch.tensor([0, 1]), 2.0)
    torch.testing.assert_close(k, torch.tensor([[0.0, 2 * math.sqrt(2), 4.0],
                                                [2 * math.sqrt(2), 0.0, 2 * math.sqrt(2)]]))


def test_emma_value_rho_clipped_at_one():
    # eps = 0.5, L = 1: eps K = (0, 0.7071, 1); gaps (0, 1, 2) -> rho = 1 for both others
    # shifted = (0, -1 + 0.7071, -2 + 1)
    loss = emma_loss(Z, Y, W, 1.0, 0.5)
    expect = math.log(1 + math.exp(-1 + 0.5 * math.sqrt(2)) + math.exp(-1.0))
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    # with rho = 1 everywhere EMMA is the certified margin loss
    assert margin_loss(Z, Y, W, 1.0, 0.5).item() == pytest.approx(expect, rel=1e-6)


def test_temperature_scales_the_cross_entropy_logits():
    # rho is unchanged by T (a ratio of gaps); the loss is CE of T * shifted
    t = 3.0
    expect = math.log(1 + math.exp(t * (-1 + 0.5 * math.sqrt(2))) + math.exp(-t))
    assert emma_loss(Z, Y, W, 1.0, 0.5, temperature=t).item() == pytest.approx(expect, rel=1e-6)
    assert margin_loss(Z, Y, W, 1.0, 0.5, temperature=t).item() == pytest.approx(expect, rel=1e-6)


def test_emma_value_rho_inside_and_at_lower_clip():
    # eps = 2: eps K = (0, 2.83, 4); rho = (1/2.83, 2/4) -> the shift cancels the gap: log 3
    assert emma_loss(Z, Y, W, 1.0, 2.0).item() == pytest.approx(math.log(3), rel=1e-6)
    # margin loss does not cancel: CE of (0, 1 - 2 + 2.83 - ..., ) = z_i - z_y + eps K_i
    m = math.log(1 + math.exp(-1 + 2 * math.sqrt(2)) + math.exp(-2 + 4))
    assert margin_loss(Z, Y, W, 1.0, 2.0).item() == pytest.approx(m, rel=1e-6)
    # misclassified (negative gap): rho clipped at 0.01
    z = torch.tensor([[0.0, 1.0, 0.5]])
    s1, s2 = 1.0 + 0.01 * 0.5 * math.sqrt(2), 0.5 + 0.01 * 0.5 * 2
    expect = math.log(1 + math.exp(s1) + math.exp(s2))
    assert emma_loss(z, Y, W, 1.0, 0.5).item() == pytest.approx(expect, rel=1e-6)


def test_emma_gradient_through_logits_and_head():
    z = Z.clone().requires_grad_(True)
    w = W.clone().requires_grad_(True)
    L, eps = 1.5, 0.5
    loss = emma_loss(z, Y, w, L, eps)
    loss.backward()
    k = torch.tensor([0.0, L * math.sqrt(2), 2 * L])
    gap = torch.tensor([0.0, 1.0, 2.0])
    rho = (gap / (eps * k).clamp_min(1e-8)).clamp(0.01, 1.0)      # (., 1/1.06 -> 0.94, 1)
    s = torch.tensor([0.0, -1.0, -2.0]) + rho * eps * k
    s[0] = 0
    p = torch.softmax(s, 0)
    # rho has no gradient: dL/dz_i = p_i (i != y), dL/dz_y = -sum_{i != y} p_i
    torch.testing.assert_close(z.grad[0], torch.tensor([-(p[1] + p[2]), p[1], p[2]]))
    # through K_i = L ||w_y - w_i||: dL/dw_y = sum_i p_i rho_i eps L u_i, dL/dw_i = -p_i rho_i eps L u_i
    u = torch.stack([W[0] - W[i] for i in range(3)])
    u[1:] /= u[1:].norm(dim=1, keepdim=True)
    c = p * rho * eps * L
    gw = torch.stack([(c[1:, None] * u[1:]).sum(0), -c[1] * u[1], -c[2] * u[2]])
    torch.testing.assert_close(w.grad, gw)


def test_emma_batch_mean_and_bf16_logits():
    z = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 1])
    both = emma_loss(z, y, W, 1.0, 0.5)
    single = [emma_loss(z[i:i + 1], y[i:i + 1], W, 1.0, 0.5) for i in range(2)]
    assert both.item() == pytest.approx((single[0] + single[1]).item() / 2, rel=1e-6)
    assert emma_loss(z.bfloat16(), y, W, 1.0, 0.5).dtype == torch.float32


def test_cross_entropy_and_registry():
    assert cross_entropy(Z, Y, W, 1.0, 0.5).item() == pytest.approx(
        math.log(1 + math.exp(-1) + math.exp(-2)), rel=1e-6)
    assert set(LOSSES) == {"emma", "margin", "ce"}
    # at eps -> 0 every certified loss is plain cross-entropy
    for name in ("emma", "margin"):
        assert LOSSES[name](Z, Y, W, 1.0, 1e-9).item() == pytest.approx(
            cross_entropy(Z, Y, W, 1.0, 0.0).item(), rel=1e-6)


def test_eps_schedule_ramp():
    eps = 36 / 255
    assert eps_schedule(0.0, eps) == pytest.approx(0.1 * eps)
    assert eps_schedule(0.25, eps) == pytest.approx((0.1 + 2.9 * 0.5) * eps)
    assert eps_schedule(0.5, eps) == pytest.approx(3.0 * eps)
    assert eps_schedule(0.9, eps) == pytest.approx(3.0 * eps)
    assert eps_schedule(0.5, eps, end=2.0, ramp=1.0) == pytest.approx(1.05 * eps)  # ImageNet: 2x
    assert eps_schedule(0.3, eps, ramp=0.0) == pytest.approx(3.0 * eps)
    with pytest.raises(ValueError, match="progress"):
        eps_schedule(1.5, eps)
