"""The ablation switches: positional encoding, shift padding, activation, orthogonal update,
retraction. Each changes the model or optimizer as described and keeps the bound sound."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lipnext
from lipnext.certify import UnsoundClaim
from lipnext.io import load_model, save_model
from lipnext.nn import SpatialShift, spatial_shift
from lipnext.nn.activation import BetaAbs, make_activation
from lipnext.nn.minmax import MinMax
from lipnext.nn.stem import PositionalEncoding, SharedPositionalEncoding
from lipnext.optim import ManifoldAdam, build_optimizer
from lipnext.optim.exp_update import METHODS, exp_update
from lipnext.rounding import scale as scale_step
from lipnext.verify import empirical_lipschitz


def tiny(**kw) -> lipnext.models.LipNeXt:
    return lipnext.create_model("lipnext_l4w64", num_classes=10, in_chans=1, image_size=8,
                                patch_size=2, depth=2, width=16, seed=0, **kw)


def shift_reference(x: torch.Tensor, g: int, padding: str) -> torch.Tensor:
    """Loop form: out[i, j, c] = x[i', j', c] with (i', j') the source position, or 0 off the grid."""
    b, h, w, c = x.shape
    out = torch.zeros_like(x)
    moves = [(1, 0)] * g + [(-1, 0)] * g + [(0, 1)] * g + [(0, -1)] * g + [(0, 0)] * (c - 4 * g)
    for ch, (di, dj) in enumerate(moves):   # up takes from i + 1, down from i - 1, ...
        for i in range(h):
            for j in range(w):
                si, sj = i + di, j + dj
                if padding == "circular":
                    out[:, i, j, ch] = x[:, si % h, sj % w, ch]
                elif 0 <= si < h and 0 <= sj < w:
                    out[:, i, j, ch] = x[:, si, sj, ch]
    return out


def shift_matrix(h: int, w: int, c: int, g: int, padding: str) -> torch.Tensor:
    n = h * w * c
    basis = torch.eye(n, dtype=torch.float64).view(n, h, w, c)
    return spatial_shift(basis, g, padding).reshape(n, n).T


# ------------------------------------------------------------------ shift padding
@pytest.mark.parametrize("padding", ["circular", "zero"])
@pytest.mark.parametrize("hw", [(3, 4), (1, 5), (4, 4)])
def test_shift_matches_loop_reference(padding, hw):
    x = torch.randn(2, *hw, 11)
    assert torch.equal(spatial_shift(x, 2, padding), shift_reference(x, 2, padding))


def test_zero_padded_shift_is_a_partial_isometry():
    h, w, c, g = 3, 4, 8, 1
    s_circ, s_zero = shift_matrix(h, w, c, g, "circular"), shift_matrix(h, w, c, g, "zero")
    sv_circ, sv_zero = torch.linalg.svdvals(s_circ), torch.linalg.svdvals(s_zero)
    assert torch.allclose(sv_circ, torch.ones_like(sv_circ))           # a permutation
    # singular values are exactly 0 or 1 (S^T S is a coordinate projection): norm <= 1
    assert torch.equal(s_zero.T @ s_zero, torch.diag(torch.diag(s_zero.T @ s_zero)))
    assert set(torch.diag(s_zero.T @ s_zero).tolist()) == {0.0, 1.0}
    assert sv_zero.max() <= 1 + 1e-12
    # each moved group drops one line of the grid: 2 groups x w + 2 groups x h entries
    assert int((sv_zero < 0.5).sum()) == g * (2 * w + 2 * h)
    x = torch.randn(100, h, w, c)
    n_in = x.flatten(1).norm(dim=1)
    assert torch.all(spatial_shift(x, g, "zero").flatten(1).norm(dim=1) <= n_in * (1 + 1e-6))
    assert torch.all(spatial_shift(x, g, "zero").flatten(1).norm(dim=1) < n_in)  # entries dropped


def test_shift_padding_option():
    assert SpatialShift(16, 1 / 8, "zero").padding == "zero"
    with pytest.raises(ValueError, match="padding must be one of circular, zero"):
        SpatialShift(16, 1 / 8, "reflect")
    circ, zero = tiny(), tiny(padding="zero")
    assert all(b.shift.padding == "zero" for b in zero.blocks)
    zero.load_state_dict(circ.state_dict())        # same weights, other padding
    x = torch.rand(4, 1, 8, 8)
    assert not torch.allclose(circ(x), zero(x))


# ------------------------------------------------------------------ activation
def test_minmax_channels_last_is_sorting_and_1_lipschitz():
    act = make_activation("minmax", 8)
    assert isinstance(act, MinMax) and act.dim == -1
    x = torch.randn(5, 3, 3, 8, dtype=torch.float64)
    y = act(x)
    a, b = x[..., :4], x[..., 4:]
    assert torch.equal(y, torch.cat([torch.maximum(a, b), torch.minimum(a, b)], -1))
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))                 # norm-preserving
    x2 = x + 0.3 * torch.randn_like(x)
    assert torch.all((act(x) - act(x2)).norm(dim=-1) <= (x - x2).norm(dim=-1) * (1 + 1e-12))
    # close pairs across the kink (a = b): still 1-Lipschitz
    z = torch.randn(1000, 2, dtype=torch.float64)
    z[:, 1] = z[:, 0] + 1e-3 * torch.randn(1000, dtype=torch.float64)
    z2 = z + 1e-3 * torch.randn_like(z)
    assert torch.all((act(z) - act(z2)).norm(dim=-1) <= (z - z2).norm(dim=-1) * (1 + 1e-12))
    with pytest.raises(ValueError, match="even width"):
        make_activation("minmax", 7)


def test_activation_option():
    x = torch.rand(4, 1, 8, 8)
    assert all(isinstance(b.act, BetaAbs) for b in tiny().blocks)
    assert all(isinstance(b.act, MinMax) for b in tiny(activation="minmax").blocks)
    lin = tiny(activation="identity")
    assert all(isinstance(b.act, nn.Identity) for b in lin.blocks)
    # with the identity every block is affine: block(a u + (1 - a) v) = a block(u) + (1 - a) block(v)
    blk = lin.blocks[0]
    nn.init.normal_(blk.bias)
    u, v = torch.randn(2, 4, 4, 16, dtype=torch.float64).unbind(0)
    blk = blk.double()
    assert torch.allclose(blk(0.3 * u + 0.7 * v), 0.3 * blk(u) + 0.7 * blk(v))
    nl = tiny().blocks[0].double()
    nn.init.normal_(nl.bias)
    assert not torch.allclose(nl(0.3 * u + 0.7 * v), 0.3 * nl(u) + 0.7 * nl(v))
    with pytest.raises(ValueError, match="activation must be one of"):
        tiny(activation="relu")
    outs = [tiny(activation=a)(x) for a in ("beta_abs", "minmax", "identity")]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


# ------------------------------------------------------------------ positional encoding
def test_pos_encoding_options():
    per_block, shared, none = tiny(), tiny(pos_encoding="shared"), tiny(pos_encoding="none")
    pe = lambda m: [mod for mod in m.modules() if isinstance(mod, PositionalEncoding)]  # noqa: E731
    assert len(pe(per_block)) == 2 and len(pe(shared)) == 1 and len(pe(none)) == 0
    assert all(isinstance(b.pos, nn.Identity) for b in none.blocks)
    assert all(isinstance(b.pos, SharedPositionalEncoding) for b in shared.blocks)
    n = sum(p.numel() for p in per_block.parameters())
    grid = 4 * 4
    assert sum(p.numel() for p in shared.parameters()) == n - grid
    assert sum(p.numel() for p in none.parameters()) == n - 2 * grid
    # one p, used by every block: X + p
    with torch.no_grad():
        shared.pos.pos.copy_(torch.randn(4, 4, 1))
    x = torch.randn(3, 4, 4, 16)
    for b in shared.blocks:
        assert torch.equal(b.pos(x), x + shared.pos.pos)
    assert [k for k in shared.state_dict() if k.endswith("pos")] == ["pos.pos"]
    with pytest.raises(ValueError, match="pos_encoding must be one of"):
        tiny(pos_encoding="off")


def test_shared_pos_encoding_trains_and_round_trips(tmp_path):
    m = tiny(pos_encoding="shared")
    opt = build_optimizer(m, lr=1e-2, lookahead_k=0)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    before = m.pos.pos.detach().clone()
    nn.functional.cross_entropy(m(x), y).backward()
    assert m.pos.pos.grad is not None and m.pos.pos.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(m.pos.pos, before)
    save_model(m, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.config()["pos_encoding"] == "shared"
    assert torch.equal(back(x), m(x))


def test_switches_are_recorded_in_the_saved_config(tmp_path):
    m = tiny(pos_encoding="none", padding="zero", activation="minmax")
    save_model(m, tmp_path / "m")
    cfg = load_model(tmp_path / "m").config()
    assert (cfg["pos_encoding"], cfg["padding"], cfg["activation"]) == ("none", "zero", "minmax")


# ------------------------------------------------------------------ bounds stay sound
SWITCHES = [dict(), dict(pos_encoding="shared"), dict(pos_encoding="none"), dict(padding="zero"),
            dict(activation="minmax"), dict(activation="identity"),
            dict(pos_encoding="none", padding="zero", activation="minmax")]


def _randomize(m: nn.Module) -> nn.Module:
    """Nonzero biases and positional encodings (zeros at initialisation)."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or name.endswith("pos"):
                p.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("kw", SWITCHES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_no_pair_breaks_the_bound(kw):
    m = _randomize(tiny(**kw))
    x = torch.rand(8, 1, 8, 8)
    res = empirical_lipschitz(m, x, steps=40, restarts=2, rtol=1e-9)
    assert res.passed, res.summary
    assert res.details["empirical"] > 0.2 * res.details["claimed"]   # the search does climb


def test_the_search_catches_a_broken_activation():
    """Control: an activation of Lipschitz constant 1.5 that declares 1 is caught by the same
    search, and certify refuses the claim (its float64 step multiplies by 1.5)."""
    m = _randomize(tiny(activation="identity"))
    for b in m.blocks:
        b.act = _Scale(1.5)
    res = empirical_lipschitz(m, torch.rand(8, 1, 8, 8), steps=40, restarts=2, rtol=1e-9)
    assert not res.passed
    with pytest.raises(UnsoundClaim, match="below"):
        lipnext.certify(m, torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))


class _Scale(nn.Module):
    """x -> c x, whose declared bound (1) ignores c."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c * x

    def lipschitz_bound(self) -> float:
        return 1.0

    def rounding_steps(self, name: str) -> list:
        return [scale_step(self.c, name=name)]


# ------------------------------------------------------------------ orthogonal update
def _skew(n: int, scale: float, batch: int = 3) -> torch.Tensor:
    a = torch.randn(batch, n, n, dtype=torch.float64)
    return scale * (a - a.mT) / 2


def cayley(u: torch.Tensor) -> torch.Tensor:
    """The Cayley rotation (I - U/2)^{-1} (I + U/2), as exp_update computes it from X = I."""
    return exp_update(torch.eye(u.shape[-1], dtype=u.dtype).expand_as(u).contiguous(), u,
                      method="cayley", precision="fp64")


def test_cayley_is_orthogonal_and_close_to_exp():
    eye = torch.eye(12, dtype=torch.float64)
    for scale in (1e-3, 1e-2, 0.5, 3.0):
        q = cayley(_skew(12, scale))
        assert torch.allclose(q.mT @ q, eye.expand_as(q), atol=1e-12)
    # Cayley = exp + O(||U||^3): the error shrinks ~8x when U halves
    u = _skew(12, 0.02)
    e1 = (cayley(u) - torch.linalg.matrix_exp(u)).norm()
    e2 = (cayley(u / 2) - torch.linalg.matrix_exp(u / 2)).norm()
    assert 6 < float(e1 / e2) < 10


@pytest.mark.parametrize("update", ["fast_exp", "exact", "cayley"])
def test_manifold_adam_update_options_stay_orthogonal(update):
    torch.manual_seed(0)
    x = lipnext.nn.OrthogonalParameter(lipnext.nn.random_orthogonal(16))
    opt = ManifoldAdam([x], lr=0.05, update=update, lookahead_k=2)
    target = torch.randn(16, 16)
    for _ in range(6):
        loss = ((x - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert opt.param_groups[0]["update"] == update
    assert torch.allclose(x.detach().double().T @ x.detach().double(), torch.eye(16, dtype=torch.float64),
                          atol=1e-5)


def test_update_options_give_different_steps():
    results = {}
    for update in METHODS:
        torch.manual_seed(0)
        x = lipnext.nn.OrthogonalParameter(lipnext.nn.random_orthogonal(16).double())
        opt = ManifoldAdam([x], lr=0.3, update=update)
        ((x - 1) ** 2).sum().backward()
        opt.step()
        results[update] = x.detach().clone()
    assert torch.allclose(results["fast_exp"], results["exact"], atol=1e-2)
    assert not torch.allclose(results["cayley"], results["exact"], atol=1e-6)
    with pytest.raises(ValueError, match="update must be one of"):
        ManifoldAdam([x], update="qr")


def test_config_reaches_optimizer_and_retraction_can_be_off(tmp_path):
    from lipnext.config import load_config
    from lipnext.engine import train
    from lipnext.engine.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    cfg = load_config(None, ["data.holdout=300", "model.kwargs={depth: 2, width: 16, patch_size: 2, "
                             "padding: zero, pos_encoding: shared, activation: minmax}",
                             "train.epochs=2", "train.batch_size=256", "train.progress=false",
                             "train.tensorboard=false", "train.eval_every=0", "optim.update=cayley",
                             "train.retraction=none", "optim.lookahead_k=0", f"run_dir={run}",
                             "train.stop_at_step=6"])
    assert train(cfg) == {"interrupted": True, "step": 6}
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert {g["update"] for g in state["optimizer"]["param_groups"]} == {"cayley"}
    assert "update: cayley" in (run / "config.yaml").read_text()
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r.get("kind") == "epoch"]
    assert epochs and all(r["orthogonality_drift"] is None for r in epochs)   # not retracted
    saved = json.loads(lipnext.io.read_metadata(latest_checkpoint(run) / "model.safetensors")["config"])
    assert (saved["padding"], saved["pos_encoding"], saved["activation"]) == ("zero", "shared", "minmax")
    with pytest.raises(ValueError, match="optim.update='expm'"):
        load_config(None, ["optim.update=expm"])
