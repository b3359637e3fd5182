"""`lipnext verify --autoattack`: the standard L2 AutoAttack must not beat the certificates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lipnext
from lipnext.certify import Certificate
from lipnext.cli import main
from lipnext.data import get_dataset
from lipnext.verify import autoattack_check, verify_model

pytest.importorskip("torchattacks")
REPO = Path(__file__).resolve().parents[1]
EPS = (0.1, 0.5)


def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return get_dataset("digits", "test", holdout=360).probe(n)


@pytest.mark.slow
def test_autoattack_respects_the_certificates_of_a_trained_model(tiny_run):
    model = lipnext.load_model(tiny_run)
    x, y = _digits(16)
    cert = lipnext.certify(model, x, y)
    check = autoattack_check(model, x, y, cert, EPS)
    assert check.name == "autoattack" and check.passed, check.summary
    d = check.details
    assert d["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and d["points"] == 16
    for e in EPS:
        row = d["per_eps"][f"{e:.6g}"]
        assert row["cra"] == cert.cra(e) and row["autoattack_acc"] >= row["cra"]
    assert d["per_eps"]["0.1"]["cra"] > 0 and d["counterexamples"] == 0
    # AutoAttack is a real attack: it breaks correctly classified points
    assert d["per_eps"]["0.5"]["autoattack_acc"] < d["clean_accuracy_fp32"]


def test_a_false_certificate_is_a_critical_failure():
    """A certificate that claims more than holds (radius 10 for every correct point) must fail:
    AutoAttack accuracy falls below the claimed CRA, and the broken points are counterexamples."""
    torch.manual_seed(0)
    model = lipnext.create_model("lipnext_l4w64", num_classes=10, in_chans=1, image_size=8, patch_size=2)
    x, y = _digits(8)
    with torch.no_grad():
        y = model(x).argmax(1)                     # every point is correctly classified
    n = len(y)
    forged = Certificate(torch.full((n,), 10.0, dtype=torch.float64), torch.ones(n, dtype=torch.bool),
                         y.clone(), torch.ones(n, dtype=torch.float64), 1.0, "pairwise", labels=y.clone())
    check = autoattack_check(model, x, y, forged, (2.0,))
    assert not check.passed
    assert check.details["per_eps"]["2"]["autoattack_acc"] < 1.0 == check.details["per_eps"]["2"]["cra"]
    assert check.details["counterexamples"] >= 1 and "CRITICAL" in check.summary


@pytest.mark.slow
def test_verify_autoattack_cli_writes_the_figures_into_the_card(run_copy, capsys):
    code = main(["verify", str(run_copy), "--autoattack", "--no-attacks", "--budget", "12", "--no-progress",
                 "--radii", "0.25", "--radius-unit", "1", "--lipschitz-steps", "5", "--lipschitz-points", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((run_copy / "verify.json").read_text())
    assert "attack" not in [c["name"] for c in report["checks"]]          # --no-attacks: check (c) skipped
    check = next(c for c in report["checks"] if c["name"] == "autoattack")
    assert check["passed"] and check["details"]["points"] == 12
    card = json.loads((run_copy / "model_card.json").read_text())
    assert card["autoattack"]["points"] == 12 and card["autoattack"]["passed"]
    assert set(card["autoattack"]["per_eps"]) == {"0.25"}            # the eps it ran at
    for lab, row in card["autoattack"]["per_eps"].items():
        assert row["autoattack_acc"] == check["details"]["per_eps"][lab]["autoattack_acc"] >= row["cra"]
    assert "AutoAttack (12 images)" in (run_copy / "README.md").read_text()
    # figures of other weights are not shown: retrain-free check by changing the recorded hash
    check["details"]["weights_sha256"] = "0" * 64
    (run_copy / "verify.json").write_text(json.dumps(report))
    assert main(["card", str(run_copy)]) == 0
    assert json.loads((run_copy / "model_card.json").read_text())["autoattack"] is None


def _save(name: str, path: Path, data: Path, imports: str = "") -> None:
    """A fresh model of ``name`` for digits, and an npz of 4 digits labelled with its own
    predictions (so every point counts and AutoAttack has work to do at eps 1)."""
    code = (f"import sys, torch, numpy as np, lipnext; sys.path.insert(0, {str(REPO / 'examples')!r}); {imports}\n"
            f"torch.manual_seed(0)\n"
            f"m = lipnext.create_model({name!r}, num_classes=10, in_chans=1, image_size=8)\n"
            f"lipnext.save_model(m, {str(path)!r})\n"
            f"x = lipnext.data.get_dataset('digits', 'test', holdout=360).probe(4)[0]\n"
            f"y = m(x).argmax(1).numpy()\n"
            f"np.savez({str(data)!r}, x=(x * 255).round().byte().permute(0, 2, 3, 1).numpy(), y=y, "
            f"classes=np.array([str(k) for k in range(10)]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("name,imports", [("liresnet_l7w64", ""), ("bronet_l6w96", ""),
                                          ("toy_mlp_l2w64", "import toy_mlp.model")])
def test_autoattack_on_baselines_and_imported_models(name, imports, tmp_path):
    weights, data = tmp_path / f"{name}.safetensors", tmp_path / "four.npz"
    _save(name, weights, data, imports)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "lipnext.cli", *(["--import", "toy_mlp.model"] if imports else []), "verify",
            str(weights), "--data", f"npz:{data}", "--split", "train", "--val-fraction", "0", "--radii", "1",
            "--radius-unit", "1", "--autoattack", "--no-attacks", "--no-progress", "--lipschitz-steps", "2",
            "--lipschitz-points", "2", "--lipschitz-restarts", "1", "--out", str(tmp_path)]
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, cwd=REPO / "examples")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    check = next(c for c in json.loads((tmp_path / "verify.json").read_text())["checks"] if c["name"] == "autoattack")
    d = check["details"]
    assert check["passed"] and d["points"] == 4 and d["clean_accuracy_fp32"] == 1.0
    assert d["per_eps"]["1"]["autoattack_acc"] < 1.0 and d["weights_sha256"]     # it attacked them


def test_autoattack_without_torchattacks_is_a_one_line_error(run_copy, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    assert main(["verify", str(run_copy), "--autoattack"]) == 2
    assert "--autoattack needs torchattacks" in capsys.readouterr().err


def test_verify_model_runs_autoattack_when_asked():
    torch.manual_seed(0)
    model = lipnext.create_model("lipnext_l4w64", num_classes=10, in_chans=1, image_size=8, patch_size=2)
    x = _digits(4)[0]
    with torch.no_grad():
        y = model(x).argmax(1)
    from lipnext.verify import Budget
    report = verify_model(model, x, y, eps=(1.0,), budget=Budget(pgd_steps=2, pgd_restarts=1, ddn_steps=2,
                          lipschitz_steps=2, lipschitz_restarts=1, lipschitz_points=2, library=False),
                          attacks=False, autoattack=True)
    assert [c.name for c in report.checks][-1] == "autoattack" and report["autoattack"].passed
    assert report["autoattack"].details["points"] == 4
