"""X exp(U) for a skew U zero outside its first k rows and columns (``ops.border_exp``)."""
import importlib

import pytest
import torch

from lipnext.models import create_model
from lipnext.nn import random_orthogonal
from lipnext.optim import build_optimizer, exp_update
from lipnext.ops.border_exp import MAX_BORDER, border_exp_update, border_widths
from lipnext.ops.precision import product

exp_update_module = importlib.import_module("lipnext.optim.exp_update")
plans_module = importlib.import_module("lipnext.optim.plans")


def border_skew(n, k, norm, batch=1, seed=0):
    """Skew float64 (batch, n, n), nonzero only in the first k rows and columns, ||U||_F = norm:
    the shape of the patch stem's step (its gradient lives in the first k columns)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.zeros(batch, n, n, dtype=torch.float64)
    c[:, :, :k] = torch.randn(batch, n, k, generator=g, dtype=torch.float64)
    u = c - c.mT
    return u * (norm / torch.linalg.matrix_norm(u))[:, None, None]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_border_width_is_the_smallest_zero_corner():
    n = 64
    u = torch.zeros(6, n, n)
    u[1, 2, 5], u[1, 5, 2] = 1.0, -1.0            # min(i, j) = 2: k = 3
    u[2, 3, 40], u[2, 40, 3] = 1.0, -1.0          # one entry at (3, 40): k = 4
    u[3] = border_skew(n, 4, 1.0)[0].float()
    u[4] = torch.randn(n, n)
    u[4] = u[4] - u[4].T                          # dense
    u[5, 10, 9], u[5, 9, 10] = 1.0, -1.0          # k = 10 > n / 16: not worth the border path
    assert border_widths(u) == [0, 3, 4, 4, None, None]
    u[1, 2, 0], u[1, 0, 2] = 1.0, -1.0            # (0, 2) and (2, 0) are in row / column 0
    assert border_widths(u[1:2]) == [3]
    assert int(n * MAX_BORDER) == 4
    assert border_widths(torch.zeros(2, 8, 8)) == [None, None]   # n / 16 < 1: never


@pytest.mark.parametrize("k", [1, 5, 16])
@pytest.mark.parametrize("norm", [1e-4, 0.3, 2.0, 4.0])
def test_border_update_is_x_exp_u(k, norm):
    n = 256
    u = border_skew(n, k, norm, batch=2, seed=k)
    x = torch.stack([random_orthogonal(n, dtype=torch.float64) for _ in range(2)])
    want = x @ torch.linalg.matrix_exp(u)
    assert border_widths(u) == [k, k]
    got = border_exp_update(x, u, k, product("fp64"))
    assert got.dtype == torch.float64 and max_err(got, want) < 1e-13
    got32 = border_exp_update(x.float(), u.float(), k, product("fp32"))
    assert got32.dtype == torch.float32 and max_err(got32, want) < 2e-7 + 2e-8 * norm


@pytest.mark.parametrize("name,u_op", [("tf32", 2.0 ** -11), ("bf16", 2.0 ** -15)])
def test_border_low_precision_error_scales_with_the_step(name, u_op):
    n = 128
    x = random_orthogonal(n)
    for norm in (1e-3, 1e-1):
        u = border_skew(n, 8, norm)
        want = x.double() @ torch.linalg.matrix_exp(u[0])
        err = max_err(exp_update(x, u[0].float(), precision=name, skew=True), want)
        assert err <= 3e-8 + 8 * u_op * norm


def test_exp_update_takes_the_border_path_only_where_it_holds(monkeypatch):
    n, k = 128, 6
    taken = []
    real = exp_update_module.border_exp_update
    monkeypatch.setattr(exp_update_module, "border_exp_update",
                        lambda x, u, k, prec: taken.append((len(x), k)) or real(x, u, k, prec))
    dense = torch.randn(n, n, dtype=torch.float64)
    u = torch.cat([border_skew(n, k, 0.5), (0.01 * (dense - dense.T))[None], border_skew(n, k, 0.1, seed=1)])
    x = torch.stack([random_orthogonal(n, dtype=torch.float64) for _ in range(3)])
    want = x @ torch.linalg.matrix_exp(u)
    got = exp_update(x.float(), u.float(), skew=True)
    assert taken == [(2, k)]                      # rows 0 and 2 together; row 1 dense
    assert max_err(got, want) < 2e-7
    taken.clear()
    exp_update(x.float(), u.float())              # not known to be skew: FastExp checks, no border
    exp_update(x.float(), u.float(), method="exact", skew=True)
    assert taken == []


def test_border_drift_stays_at_fp32_level_over_1000_steps():
    n, k = 128, 8
    for name in ("tf32", "fp32"):
        x = random_orthogonal(n)
        start = (x.double().T @ x.double() - torch.eye(n, dtype=torch.float64)).abs().max().item()
        for t in range(1000):
            u = border_skew(n, k, 3e-4 * n, seed=t)[0].float()
            x = exp_update(x, u, precision=name, skew=True)
        drift = (x.double().T @ x.double() - torch.eye(n, dtype=torch.float64)).abs().max().item()
        assert drift - start <= 1e-4, (name, drift)


def test_the_patch_stem_is_updated_by_the_border_path_as_by_the_dense_one(monkeypatch):
    """ManifoldAdam on a LipNeXt whose stem reads 16 of 256 columns (one input channel, 4 x 4
    patches): the stem's steps take the border path and land where the dense FastExp path
    does; with orthogonal weight decay the step is dense and the border path is not taken."""
    taken = []
    real = exp_update_module.border_exp_update

    def spy(x, u, k, prec):
        taken.append(k)
        return real(x, u, k, prec)

    monkeypatch.setattr(exp_update_module, "border_exp_update", spy)

    def train(border: bool, weight_decay: float = 0.0):
        torch.manual_seed(0)
        model = create_model("lipnext_l8w128", in_chans=1, image_size=32, width=256, depth=1)
        for module in (exp_update_module, plans_module):     # where the widths are read
            monkeypatch.setattr(module, "border_widths",
                                border_widths if border else (lambda u: [None] * len(u)))
        optimizer = build_optimizer(model, lr=1e-3, chunk_size=2)
        optimizer.param_groups[0]["orthogonal_weight_decay"] = weight_decay
        x, y = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
        for _ in range(6):                         # past one Lookahead sync (k = 5)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        return model.stem.weight.detach().clone()

    border, dense = train(True), train(False)
    assert taken == [16] * 6
    assert max_err(border, dense) < 1e-5
    taken.clear()
    train(True, weight_decay=0.1)
    assert taken == []
