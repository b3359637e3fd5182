"""Training steps of a whole LipNeXt keep every orthogonal weight on the manifold."""
import torch
import torch.nn.functional as F

import lipnext
from lipnext.losses import emma_loss
from lipnext.nn import is_orthogonal, orthogonality_error
from lipnext.optim import build_optimizer


def test_orthogonality_and_learning_over_training_steps():
    torch.manual_seed(0)
    model = lipnext.create_model("lipnext_l4w64", num_classes=4, image_size=8, patch_size=2)
    opt = build_optimizer(model, lr=3e-3)
    r0 = model.blocks[0].R.detach().clone()
    x = torch.rand(64, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long() + 2 * (x[:, 2, :4].mean((1, 2)) > 0.5).long()
    losses = []
    for _ in range(60):
        loss = emma_loss(model(x), y, model.head_weight(), model.lipschitz_bound(), 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    orth = [p for p in model.parameters() if is_orthogonal(p)]
    assert len(orth) == 1 + 2 * 4  # stem + R, M per block
    before = max(orthogonality_error(p) for p in orth)
    assert 0 < before < 1e-4
    assert model.lipschitz_bound() < 1 + 1e-3
    opt.retract()
    after = max(orthogonality_error(p) for p in orth)
    assert after < 1e-6
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert (model.blocks[0].R - r0).abs().max() > 1e-3  # the orthogonal weights really moved
    assert F.cross_entropy(model(x), y).item() < 1.4
