"""log.wandb and log.mlflow: the same scalars as TensorBoard, the config, and the card as an
artefact; W&B in its offline mode, MLflow on a file store."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lipnext.cli import main
from lipnext.engine.metrics import read_metrics
from lipnext.trackers import scalars

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "demo", "model.name=lipnext_l4w64", "model.kwargs={patch_size: 2}", "train.epochs=1",
        "train.progress=false", "train.tensorboard=false", "train.log_every=5"]


def _mlflow_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("lipnext")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    return client, run


def _check_mlflow(uri: str, run_dir: Path) -> None:
    client, run = _mlflow_run(uri, run_dir.name)
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in train]
    final = next(r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "final")
    assert run.data.metrics["final/cra_at_0.25"] == final["cra"]["0.25"]
    assert run.data.params["model.name"] == "lipnext_l4w64" and run.data.params["train.epochs"] == "1"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_card.json", "README.md", "results.json", "certificates.npz"} <= names
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_train_cli_logs_to_wandb_offline_and_mlflow_file_store(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")         # to read the store back here
    run_dir, uri = tmp_path / "tracked", f"file:{tmp_path / 'mlruns'}"
    env = {**os.environ, "WANDB_SILENT": "true",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "lipnext.cli", "train", "--run-dir", str(run_dir), *TINY,
                        "log.wandb=true", "log.wandb_mode=offline", "log.mlflow=true", f"log.mlflow_uri={uri}"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    _check_mlflow(uri, run_dir)
    # W&B offline: one run file under the run folder holding the scalars, the config and the card
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = log.read_bytes()
    last = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"][-1]
    for needle in ("train/loss", json.dumps(last["loss"]), "final/cra@0.25", "lipnext_l4w64",
                   "tracked-card", "model-card", "model_card.json", "README.md"):
        assert needle.encode() in data, needle


@pytest.mark.slow
def test_train_api_logs_to_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from lipnext.config import load_config
    from lipnext.engine import train

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    cfg = load_config("demo", [o for o in TINY if not o.startswith("--") and o != "demo"]
                      + [f"run_dir={tmp_path / 'api'}", "log.mlflow=true", f"log.mlflow_uri={uri}"])
    train(cfg)
    _check_mlflow(uri, tmp_path / "api")


def test_scalars_are_named_as_in_tensorboard():
    assert scalars({"kind": "eval", "step": 3, "epoch": 0, "loss": 1, "cra": {"36/255": 0.5}, "ok": True,
                    "split": "val"}) == {"eval/loss": 1.0, "eval/cra@36/255": 0.5}


def test_tracker_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(["train", "--run-dir", str(tmp_path / "a"), *TINY, "log.wandb=true"]) == 2
    assert "pip install 'lipnext[wandb]'" in capsys.readouterr().err
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert main(["train", "--run-dir", str(tmp_path / "b"), *TINY, "log.mlflow=true",
                 f"log.mlflow_uri=file:{tmp_path / 'mlruns'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lipnext train: error: log.mlflow: ") and "MLFLOW_ALLOW_FILE_STORE" in err
    assert main(["train", "--run-dir", str(tmp_path / "c"), *TINY, "log.wandb_mode=sometimes"]) == 2
    assert "log.wandb_mode='sometimes'" in capsys.readouterr().err
