"""Adding a model takes one layer file and one model file: the toy 1-Lipschitz MLP of
examples/toy_mlp/ (orthogonal dense layers, MinMax) registers itself, and then trains,
certifies, verifies, saves and loads through the public API and the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lipnext
from lipnext.train import load_config, train
from lipnext.data import get_dataset
from lipnext.verify import Budget, verify_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from toy_mlp.layers import OrthogonalDense  # noqa: E402
from toy_mlp.model import ToyMLP  # noqa: E402

# an MLP on 8x8 digits: no random crops or flips (a one-pixel shift moves every input)
SMALL = ["model.name=toy_mlp_l2w64", "data.holdout=300", "train.epochs=3", "optim.lr=1e-2",
         "loss.eps_255=63.75", "augment.crop_padding=0", "augment.flip=false", "train.batch_size=128",
         "train.progress=false", "train.tensorboard=false", "train.eval_every=0",
         "train.checkpoint=false", "certify.radii=[0.25,0.5]", "certify.radius_unit=1"]


def test_the_layer_bound_is_sound_and_follows_the_weights():
    layer = OrthogonalDense(12, 6).double()
    w = layer.matrix().detach()
    assert torch.linalg.matrix_norm(w, 2).item() <= layer.lipschitz_bound() < 1 + 1e-6   # float32 Q
    with torch.no_grad():
        layer.weight.mul_(1.05)
    assert layer.lipschitz_bound() >= 1.05 * (1 - 1e-12)


def test_the_model_bound_is_the_product_over_its_layers():
    m = lipnext.create_model("toy_mlp_l2w64", num_classes=3, in_chans=1, image_size=4, seed=0)
    with torch.no_grad():
        m.layers[0].weight.mul_(1.1)
        m.layers[1].weight.mul_(1.2)
    assert m.lipschitz_factors() == {"layers": pytest.approx(1.1 * 1.2, rel=1e-6), "act": 1.0}
    # the bound holds against the real ratio ||f(a) - f(b)|| / ||a - b||
    m = m.double()
    a, b = torch.rand(64, 1, 4, 4, dtype=torch.float64), torch.rand(64, 1, 4, 4, dtype=torch.float64)
    ratio = (m.forward_features(a) - m.forward_features(b)).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert ratio.max().item() <= m.lipschitz_bound()


def test_api_train_certify_verify_and_round_trip(tmp_path):
    run = tmp_path / "run"
    result = train(load_config(None, [*SMALL, f"run_dir={run}"]))
    assert result["n"] == 300 and result["clean_accuracy"] > 0.5 and result["cra"]["0.25"] > 0.2  # it learns
    model = lipnext.load_model(run)
    assert type(model) is ToyMLP and model.config()["depth"] == 2
    x, y = (t[:100] for t in get_dataset("digits", "test", holdout=300).tensors())
    cert = lipnext.certify(model, x, y)
    assert cert.lipschitz == pytest.approx(model.lipschitz_bound()) and (cert.radius >= 0).all()
    report = verify_model(model, x, y, eps=(0.25, 0.5), budget=Budget.fast())
    assert report.passed, report.to_markdown()
    assert report["orthogonality"].details   # the orthogonal dense layers are checked


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "lipnext.cli", "--import", "toy_mlp.model", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_train_certify_verify(tmp_path):
    """`lipnext --import toy_mlp.model` (from the folder that holds the package) finds the model."""
    run = tmp_path / "run"
    p = _cli("train", f"run_dir={run}", *SMALL, cwd=EXAMPLES)
    assert p.returncode == 0, p.stderr
    assert "toy_mlp_l2w64" in p.stdout and "CRA @ eps=0.25" in p.stdout
    p = _cli("certify", str(run), "--out", str(tmp_path / "c.json"), cwd=EXAMPLES)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "c.json").read_text())["cra"] == json.loads(
        (run / "results.json").read_text())["cra"]
    p = _cli("verify", str(run), "--budget", "40", "--steps", "10", "--restarts", "2",
             "--ddn-steps", "30", "--lipschitz-steps", "30", "--lipschitz-restarts", "2",
             "--lipschitz-points", "8", "--library", "no", "--no-progress", cwd=EXAMPLES)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((run / "verify.json").read_text())["passed"] is True
    # without the import the saved model's architecture is unknown: a one-line error that says why
    p = subprocess.run([sys.executable, "-m", "lipnext.cli", "certify", str(run)], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent / "src")},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "toy_mlp" in p.stderr and "--import" in p.stderr
    assert "Traceback" not in p.stderr
