"""lipnext.verify: each check passes on a sound model and catches a deliberately broken one."""
import json
import math
import types

import pytest
import torch
from torch import nn

import lipnext
from lipnext import cli
from lipnext.certify import Float32EstimateWarning, UnsoundClaim, float32_estimate
from lipnext.data import load_digits
from lipnext.losses import emma_loss
from lipnext.nn import random_orthogonal
from lipnext.optim import build_optimizer, retract_model
from lipnext.program import float64_twin
from lipnext.rounding import exact, linear
from lipnext.verify import (Budget, attack_certified, certify_float64, ddn_attack, empirical_lipschitz,
                            head_check, orthogonality_check, pgd_attack, precision_check, verify_model)

FAST = Budget.fast()
EPS = (0.1, 0.3)




@pytest.fixture(scope="module")
def digits():
    x, y = load_digits()
    return x[:1400], y[:1400], x[1400:1496], y[1400:1496]


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """A lipnext_l4w64 trained 4 epochs on digits with EMMA (about 70% clean, 40% CRA@0.3)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    xtr, ytr, _, _ = digits
    m = lipnext.create_model("lipnext_l4w64", num_classes=10, in_chans=1, image_size=8, patch_size=2,
                             mean=[0.3], seed=0)
    opt = build_optimizer(m, lr=3e-3, lookahead_k=0)
    for _ in range(4):
        perm = torch.randperm(len(ytr))
        for i in range(0, len(ytr), 100):
            idx = perm[i:i + 100]
            loss = emma_loss(m(xtr[idx]), ytr[idx], m.head_weight(), m.lipschitz_bound(), 0.3)
            opt.zero_grad()
            loss.backward()
            opt.step()
    retract_model(m)
    return lipnext.save_model(m, tmp_path_factory.mktemp("tiny") / "model.safetensors")


def fresh(path):
    return lipnext.load_model(path).eval()


def claim(model, value):
    """Monkeypatch the claimed bound (nothing else changes)."""
    model.lipschitz_bound = types.MethodType(lambda self: value, model)
    return model


# ---------------------------------------------------------------- a sound model passes
def test_sound_model_passes_every_check(trained, digits):
    _, _, xt, yt = digits
    m = fresh(trained)
    rep = verify_model(m, xt, yt, eps=EPS, budget=FAST)
    assert rep.passed, rep.to_markdown()
    att = rep["attack"].details
    assert att["certified_points_attacked"] > 30 and att["counterexamples"] == 0
    for v in att["per_eps"].values():
        assert v["era"] >= v["cra"]          # the gap is reported and non-negative


def test_sound_model_passes_a_b_c(trained, digits):
    _, _, xt, yt = digits
    m = fresh(trained)
    assert orthogonality_check(m).passed
    lip = empirical_lipschitz(m, xt[:8], steps=30, restarts=2)
    assert lip.passed and 0.5 < lip.details["empirical"] <= m.lipschitz_bound() * (1 + 1e-3)
    assert head_check(m, xt).passed
    cert = lipnext.certify(m, xt, yt)
    att = attack_certified(m, xt, yt, cert, eps=EPS, steps=10, restarts=2, ddn_steps=30)
    assert att.passed and att.details["counterexamples"] == 0
    assert att.details["certified_points_attacked"] == int((cert.correct & (cert.radius > 0)).sum())


# ---------------------------------------------------------------- (a) orthogonality
def test_R_scaled_by_1_01_is_flagged(trained):
    m = fresh(trained)
    with torch.no_grad():
        m.blocks[1].R.mul_(1.01)
    res = orthogonality_check(m)
    assert not res.passed
    assert res.details["off_manifold"] == ["blocks.1.R"]
    assert res.details["weights"]["blocks.1.R"]["error"] == pytest.approx(1.01 ** 2 - 1, rel=1e-3)
    assert res.details["weights"]["blocks.1.R"]["bound"] >= 1.01


# ---------------------------------------------------------------- (b) empirical Lipschitz
def test_bound_that_ignores_a_scaled_R_is_caught(trained, digits):
    """R x 1.01 makes Lip(trunk) up to 1.0201; a bound still claiming 1.0 is found out."""
    xt = digits[2][:8]
    m = fresh(trained)
    with torch.no_grad():
        m.blocks[1].R.mul_(1.01)
    honest = empirical_lipschitz(m, xt, steps=30, restarts=2)
    assert honest.passed                      # the measured bound includes the 1.01^2
    res = empirical_lipschitz(claim(m, 1.0), xt, steps=30, restarts=2)
    assert not res.passed
    assert 1.001 < res.details["empirical"] <= 1.0201 * (1 + 1e-6)


def test_bound_that_ignores_the_std_division_is_caught(trained, digits):
    """Dividing by std = 0.25 multiplies Lip by 4; a bound without 1/min(std) is caught by (b) and (c)."""
    _, _, xt, yt = digits
    m = fresh(trained)
    m.stem.inv_std = torch.full((1, 1, 1, 1), 4.0)
    f = m.lipschitz_factors()
    assert f["input"] == 4.0
    assert empirical_lipschitz(m, xt[:8], steps=30, restarts=2).passed   # the real bound is fine
    claim(m, f["stem"] * f["blocks"])                                    # forgets 1/min(std)
    res = empirical_lipschitz(m, xt[:8], steps=30, restarts=2)
    assert not res.passed and res.details["ratio"] > 2
    with pytest.raises(UnsoundClaim, match="below"):                     # certify refuses the claim
        lipnext.certify(m, xt, yt)
    with pytest.warns(Float32EstimateWarning):                          # radii with the claim anyway
        cert = float32_estimate(m, xt, yt)
    att = attack_certified(m, xt, yt, cert, steps=10, restarts=2, ddn_steps=30)
    assert not att.passed and att.details["counterexamples"] > 0


# ---------------------------------------------------------------- (c) attacks
def test_unsound_certificates_give_verified_counterexamples(trained, digits):
    _, _, xt, yt = digits
    m = fresh(trained)
    with torch.no_grad():
        for b in m.blocks:
            b.R.mul_(1.5)
    claim(m, 1.0)
    with pytest.raises(UnsoundClaim, match=r"L = 1 \(model.lipschitz_bound\(\)\) is below"):
        lipnext.certify(m, xt, yt)
    with pytest.warns(Float32EstimateWarning):        # what the claim would certify: attacked
        cert = float32_estimate(m, xt, yt)
    res = attack_certified(m, xt, yt, cert, eps=EPS, steps=10, restarts=2, ddn_steps=30)
    assert not res.passed and res.details["counterexamples"] > 0
    for c in res.details["examples"]:       # each is re-checked here, independently
        assert c["distance"] <= c["certified_radius"] * (1 + 1e-6) and c["prediction"] != c["label"]
    rep = verify_model(m, xt, yt, eps=EPS, budget=FAST)
    assert not rep.passed
    assert not rep["orthogonality"].passed and not rep["empirical_lipschitz"].passed
    assert not rep["certify"].passed and "below" in rep["certify"].summary


class _UnnormalisedHead(nn.Module):
    """forward uses row 0 unnormalised (x 3) while head_weight() claims unit rows."""

    def __init__(self, head):
        super().__init__()
        self.inner = head

    def normalized_weight(self):          # what head_weight() reports: unit rows
        return self.inner.normalized_weight()

    def forward(self, f):
        w = self.inner.normalized_weight().to(f.dtype).clone()
        w[0] = w[0] * 3
        return f @ w.mT + self.inner.bias.to(f.dtype)


def test_unnormalised_head_row_is_caught(trained, digits):
    _, _, xt, yt = digits
    m = fresh(trained)
    assert head_check(m, xt).passed
    m.head = _UnnormalisedHead(m.head)
    res = head_check(m, xt)
    assert not res.passed and "head_weight" in res.summary
    assert res.details["affine_rel_error"] > 0.1


def test_pgd_and_ddn_match_the_exact_distance_of_a_linear_model():
    """For z = W x the smallest adversarial L2 distance is known exactly."""
    torch.manual_seed(1)
    m = LinearModel(dim=12, classes=3)
    x = torch.rand(20, 1, 3, 4)
    with torch.no_grad():
        y = m(x).argmax(1)
        z = m(x).double()
    w = m.head_weight().double()
    cert, _ = certify_float64(m, x, y)                      # the formula: exact for a linear model with L = 1
    d_true = cert.radius.float()
    _, ok_above = pgd_attack(m, x, y, d_true * 1.02, steps=30, restarts=3, box=False)
    _, ok_below = pgd_attack(m, x, y, d_true * 0.98, steps=30, restarts=2, box=False)
    assert ok_above.all() and not ok_below.any()
    _, dist = ddn_attack(m, x, y, steps=150, box=False)
    ratio = dist / d_true
    assert (ratio >= 1 - 1e-4).all()                      # never below the exact distance
    assert ratio.median() <= 1.1 and ratio.max() <= 1.5   # minimum-norm: close to it
    assert z.shape == (20, 3) and w.shape == (3, 12)


# ---------------------------------------------------------------- (d) floating point
def test_precision_check_passes_on_a_sound_model(trained, digits):
    _, _, xt, yt = digits
    res = precision_check(fresh(trained), xt, yt, eps=EPS)
    assert res.passed, res.summary
    assert res.details["radius_above_formula"] == 0 and res.details["float64_twin_genuine"]
    assert res.details["max_radius_reduction"] < 1e-4


def test_margin_within_rounding_error_is_not_certified(trained, digits):
    """A margin of 1e-6 at one point is real in float64 (certified at about margin / (L d));
    inside the a-priori rounding allowance (here inflated to 1e-6 by a huge bias) it is not."""
    _, _, xt, _ = digits
    m = fresh(trained)
    x = xt[:1]
    twin = float64_twin(m)
    with torch.no_grad():
        z = twin(x)[0]
        top = z.argsort(descending=True)
        a, b = int(top[0]), int(top[1])
        m.head.bias[a] -= float(z[a] - z[b]) - 1e-6     # margin ~1e-6 above the runner-up
        z = float64_twin(m)(x)[0]
    y = torch.tensor([a])
    margin = float(z[a] - z.clone().index_fill_(0, torch.tensor([a]), -math.inf).max())
    assert 0 < margin < 1e-5
    unguarded, _ = certify_float64(m, x, y)
    assert unguarded.certified(0.0).item()          # exact-arithmetic formula would certify it
    guarded = lipnext.certify(m, x, y)
    assert guarded.certified(0.0).item() and guarded.radius.item() < margin   # float64 vouches for 1e-6
    with torch.no_grad():
        m.blocks[0].bias += 1e7                       # rounding of values ~1e7: allowance ~1e-6
    guarded = lipnext.certify(m, x, y)
    assert guarded.radius.item() == 0 and not guarded.certified(0.0).item()


def test_guard_lowers_radii_only_by_the_proven_float64_allowance(trained, digits):
    """The float64 rounding bound costs at most 1e-9 of radius here (the measured guard: 3e-5)."""
    _, _, xt, yt = digits
    m = fresh(trained)
    c1 = lipnext.certify(m, xt, yt)
    c0, _ = certify_float64(m, xt, yt)                # the formula on the twin's float64 logits
    keep = c0.correct & (c0.radius > 0.01)
    assert (c1.radius <= c0.radius).all() and (c1.radius[keep] > 0).all()
    assert ((c0.radius - c1.radius)[keep] < 1e-9).all()


# ---------------------------------------------------------------- any model with the interface
class LinearModel(nn.Module):
    """A duck-typed certifiable model without orthogonal weights: f = A x / ||A||_2, L = 1.

    A is a plain parameter set to a random orthogonal matrix, so the certified radius
    min_j gap_j / ||w_y - w_j|| is exactly the distance to the decision boundary.
    """

    arch = "linear-test"
    num_classes, in_chans, image_size = 3, 1, (3, 4)

    def __init__(self, dim=12, classes=3, claimed=None):
        super().__init__()
        self.A = nn.Parameter(random_orthogonal(dim))
        self.W = nn.Parameter(torch.randn(classes, dim))
        self.b = nn.Parameter(torch.randn(classes) * 0.1)
        self.claimed = claimed

    def forward_features(self, x):
        a = self.A.to(x.dtype)
        return x.flatten(1) @ (a / torch.linalg.matrix_norm(a.double(), ord=2).to(x.dtype)).mT

    def head_weight(self):
        return self.W / self.W.norm(dim=1, keepdim=True)

    def forward_head(self, f):
        return f @ self.head_weight().to(f.dtype).mT + self.b.to(f.dtype)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def lipschitz_bound(self):
        return 1.0 + 1e-6 if self.claimed is None else self.claimed

    def rounding_program(self):
        """The trunk as float64 steps, for certify's a-priori rounding bound."""
        a = self.A.detach().double()
        return [exact(lambda h: h.flatten(1), "flatten"), linear(a / torch.linalg.matrix_norm(a, ord=2))]

    def head_program(self):
        """(W, b) of the head, as forward_head uses them."""
        return self.head_weight().detach().double(), self.b.detach().double()


def test_verify_works_for_a_model_without_orthogonal_weights():
    torch.manual_seed(0)
    m = LinearModel()
    x = torch.rand(24, 1, 3, 4)
    with torch.no_grad():
        y = m(x).argmax(1)
    rep = verify_model(m, x, y, eps=(0.05,), budget=FAST)
    assert rep["orthogonality"].passed and rep["orthogonality"].details["num_orthogonal"] == 0
    assert rep.passed, rep.to_markdown()
    lip = rep["empirical_lipschitz"].details["empirical"]
    assert lip == pytest.approx(1.0, abs=1e-3)     # a linear map attains its norm
    bad = verify_model(LinearModel(claimed=0.5), x, y, eps=(0.05,), budget=FAST)
    assert not bad.passed and not bad["empirical_lipschitz"].passed and not bad["certify"].passed


def test_report_formats():
    torch.manual_seed(0)
    m = LinearModel()
    x = torch.rand(8, 1, 3, 4)
    rep = verify_model(m, x, m(x).argmax(1).detach(), eps=(0.05,), budget=FAST, attacks=False)
    d = json.loads(rep.to_json())
    assert d["passed"] is rep.passed and [c["name"] for c in d["checks"]] == \
        ["orthogonality", "empirical_lipschitz", "head", "precision"]
    md = rep.to_markdown()
    assert md.count("\n| ") >= 5 and ("PASSED" in md) == rep.passed
    with pytest.raises(KeyError):
        rep["nope"]


# ---------------------------------------------------------------- the command
def test_cli_verify_exit_codes_and_files(trained, tmp_path, capsys):
    fast = ["--data", "digits", "--limit", "64", "--steps", "5", "--restarts", "1", "--ddn-steps", "10",
            "--lipschitz-steps", "10", "--lipschitz-restarts", "2", "--lipschitz-points", "4",
            "--radii", "25", "75"]
    rc = cli.main(["verify", str(trained), "--out", str(tmp_path / "ok"), *fast])
    rep = json.loads((tmp_path / "ok" / "verify.json").read_text())
    assert rc == (0 if rep["passed"] else 1)
    assert (tmp_path / "ok" / "verify.md").read_text().startswith("**verify")
    m = fresh(trained)
    with torch.no_grad():
        m.blocks[0].M.mul_(1.01)
    lipnext.save_model(m, tmp_path / "bad.safetensors")
    assert cli.main(["verify", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "bad"), *fast]) == 1
    bad = json.loads((tmp_path / "bad" / "verify.json").read_text())
    assert not bad["passed"] and not bad["checks"][0]["passed"]
    assert cli.main(["verify", str(trained), *fast, "--steps", "0"]) == 2
    assert "--steps must be > 0" in capsys.readouterr().err


# ---------------------------------------------------------------- trust features (issue 10)
def test_tightness_is_reported_per_point_and_as_a_distribution(trained, digits):
    _, _, xt, yt = digits
    rep = verify_model(fresh(trained), xt[:48], yt[:48], eps=EPS, budget=FAST)
    t = rep["attack"].details["tightness"]
    assert rep["attack"].details["counterexamples"] == 0 and t["points"] > 5
    assert 1.0 <= t["min"] <= t["q25"] <= t["median"] <= t["q75"] <= t["max"]   # none closer than its radius
    for p in t["per_point"]:
        assert p["ratio"] == pytest.approx(p["closest"] / p["radius"]) or math.isinf(p["closest"])
    assert t["points"] + t["never_broken"] == len(t["per_point"])
    assert "Tightness" in rep.to_markdown() and json.loads(rep.to_json())


def test_library_attacks_are_the_default_when_installed(trained, digits):
    pytest.importorskip("torchattacks")
    _, _, xt, yt = digits
    m = fresh(trained)
    cert = lipnext.certify(m, xt[:24], yt[:24])
    att = attack_certified(m, xt[:24], yt[:24], cert, eps=EPS, steps=10, restarts=1, ddn_steps=20)
    assert att.details["library"] == "torchattacks"
    assert set(att.details["attacks"]) == {"pgd", "ddn", "apgd-ce", "apgd-dlr", "fab"}
    assert att.details["points_attacked"]["fab"] > 0 and att.passed
    hand = attack_certified(m, xt[:24], yt[:24], cert, eps=EPS, steps=10, restarts=1, ddn_steps=20, library=False)
    assert hand.details["attacks"] == ["pgd", "ddn"] and hand.details["library"] is None


def test_apgd_and_fab_match_the_exact_distance_of_a_linear_model():
    pytest.importorskip("torchattacks")
    from lipnext.verify import apgd_attack, fab_attack
    torch.manual_seed(1)
    m = LinearModel(dim=12, classes=3)
    x = 0.5 + 0.02 * torch.rand(20, 1, 3, 4)          # far inside the box
    with torch.no_grad():
        y = m(x).argmax(1)
    d_true = certify_float64(m, x, y)[0].radius.float()
    keep = d_true < 0.45                               # within the box around every point
    _, dist = fab_attack(m, x[keep], y[keep], steps=50)
    ratio = dist / d_true[keep]
    assert (ratio >= 1 - 1e-4).all() and ratio.median() <= 1.1
    for i in keep.nonzero().squeeze(1).tolist()[:5]:
        _, ok = apgd_attack(m, x[i:i + 1], y[i:i + 1], float(d_true[i]) * 0.98, steps=30)
        assert not ok.any()


def test_a_time_budget_stops_the_attacks_and_says_so(trained, digits):
    _, _, xt, yt = digits
    rep = verify_model(fresh(trained), xt[:32], yt[:32], eps=EPS,
                       budget=Budget(**{**FAST.__dict__, "seconds": 0.0}))
    att = rep["attack"].details
    assert att["budget_exhausted"] and att["counterexamples"] == 0
    assert all(not v["complete"] for v in att["per_eps"].values()) and "time budget" in rep["attack"].summary


def test_verify_does_not_depend_on_autocast_or_default_dtype(trained, digits):
    _, _, xt, yt = digits
    m = fresh(trained)
    ref = verify_model(m, xt[:32], yt[:32], eps=EPS, budget=FAST, attacks=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = verify_model(m, xt[:32], yt[:32], eps=EPS, budget=FAST, attacks=False)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        d64 = verify_model(m, xt[:32], yt[:32], eps=EPS, budget=FAST, attacks=False)
    finally:
        torch.set_default_dtype(old)
    for rep in (bf, d64):
        assert rep.passed and rep.info["lipschitz_bound"] == ref.info["lipschitz_bound"]
        assert rep.info["cra"] == ref.info["cra"]
        assert rep["empirical_lipschitz"].details["empirical"] == pytest.approx(
            ref["empirical_lipschitz"].details["empirical"], rel=1e-6)


def test_cli_budget_in_points_or_seconds(trained, tmp_path, capsys):
    from lipnext.commands.verify import parse_budget
    assert parse_budget("50") == (50, None) and parse_budget("120s") == (None, 120.0)
    assert parse_budget("all") == (None, None)
    for bad in ("0", "-3", "x", "0s"):
        with pytest.raises(ValueError, match="--budget"):
            parse_budget(bad)
    fast = ["--data", "digits", "--limit", "40", "--steps", "5", "--restarts", "1", "--ddn-steps", "10",
            "--lipschitz-steps", "10", "--lipschitz-restarts", "2", "--lipschitz-points", "4",
            "--radii", "25", "--library", "no"]
    rc = cli.main(["verify", str(trained), "--out", str(tmp_path), "--budget", "16", *fast])
    rep = json.loads((tmp_path / "verify.json").read_text())
    assert rc == 0 and rep["checks"][3]["details"]["points"] == 16
    err = capsys.readouterr().err
    assert "verify" in err and "check" in err            # the progress display
    assert cli.main(["verify", str(trained), "--budget", "zero", *fast]) == 2


def test_tightness_has_every_key_when_no_point_was_broken():
    from lipnext.certify import Certificate
    from lipnext.verify.attacks import tightness
    n = 3
    cert = Certificate(torch.full((n,), 0.5, dtype=torch.float64), torch.ones(n, dtype=torch.bool),
                       torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.float64), 1.0, "pairwise")
    t = tightness(cert, torch.full((n,), math.inf, dtype=torch.float64), torch.arange(n))
    assert t["points"] == 0 and t["never_broken"] == n
    assert all(t[k] is None for k in ("min", "q05", "q25", "median", "q75", "q95", "max"))
    t = tightness(cert, torch.tensor([0.6, 0.9, math.inf], dtype=torch.float64), torch.arange(n))
    assert t["points"] == 2 and t["min"] == pytest.approx(1.2) and t["max"] == pytest.approx(1.8)


def test_empirical_lipschitz_reevaluates_by_the_float64_twin():
    """The best pairs are re-evaluated by the float64 twin (no deep copy of the model), and
    the model comes back in its training mode with its gradient flags."""
    m = lipnext.create_model("lipnext_l4w64", num_classes=4, in_chans=1, image_size=8, patch_size=2,
                             depth=2, width=16, seed=0).train()
    flags = [p.requires_grad for p in m.parameters()]
    res = empirical_lipschitz(m, torch.rand(4, 1, 8, 8), steps=5, restarts=2)
    assert res.passed and res.details["reevaluated_by"] == "float64 twin"
    assert m.training and [p.requires_grad for p in m.parameters()] == flags
