"""`lipnext study`: the study file, the table for known inputs, and a killed study that resumes."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lipnext.study import _csv, format_markdown, load_study, summarize

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def _write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_and_cells(tmp_path):
    spec = {"name": "g", "out": str(tmp_path / "out"), "seeds": 2,
            "overrides": {"train.epochs": 1},
            "grid": {"model.kwargs.alpha": [0.0, 0.125], "model.kwargs.padding": ["circular", "zero"]}}
    study = load_study(_write(tmp_path, spec))
    assert [c.name for c in study.cells] == ["alpha=0.0,padding=circular", "alpha=0.0,padding=zero",
                                             "alpha=0.125,padding=circular", "alpha=0.125,padding=zero"]
    assert study.cells[3].overrides == ["model.kwargs.alpha=0.125", 'model.kwargs.padding="zero"']
    assert len(study.runs()) == 8 and study.seeds == [0, 1]
    cfg = study.config(study.cells[3], 1)
    assert cfg.model.kwargs == {"alpha": 0.125, "padding": "zero"} and cfg.train.seed == 1
    assert cfg.resume and cfg.train.checkpoint and cfg.train.epochs == 1
    assert Path(cfg.run_dir) == tmp_path / "out" / "alpha=0.125,padding=zero" / "seed1"
    # named cells x grid
    spec = {"out": str(tmp_path / "o2"), "seeds": [3],
            "cells": [{"name": "a", "set": {"loss.eps_end": 1.0}}, {"name": "b", "set": ["loss.temperature=4"]}],
            "grid": {"train.epochs": [1, 2]}}
    study = load_study(_write(tmp_path, spec))
    assert [c.name for c in study.cells] == ["a__epochs=1", "a__epochs=2", "b__epochs=1", "b__epochs=2"]
    assert study.config(study.cells[3], 3).loss.temperature == 4


@pytest.mark.parametrize("spec, match", [
    ({"grid": {"x": 1}}, "grid must map"),
    ({"seeds": 0}, "seeds must be"),
    ({"seeds": [1, 1]}, "seeds must be"),
    ({"cels": []}, "unknown keys"),
    ({"cells": [{"name": "a", "set": {}}, {"name": "a", "set": {}}]}, "distinct"),
    ({"grid": {"train.nope": [1]}}, "bad config"),
    ({"base": "nowhere.yaml"}, "no base config"),
])
def test_bad_study_files(tmp_path, spec, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_study(_write(tmp_path, spec))


def _rec(cell, seed, clean, cra, t, params=100, lip=1.0):
    return {"cell": cell, "seed": seed, "overrides": [f"x={cell}"], "clean_accuracy": clean,
            "cra": {"36/255": cra[0], "72/255": cra[1]}, "train_time_s": t, "params": params,
            "lipschitz_bound": lip}


def test_table_for_known_inputs():
    records = [_rec("a", 0, 0.40, (0.30, 0.10), 10.0), _rec("a", 1, 0.60, (0.20, 0.10), 20.0),
               _rec("b", 0, 0.50, (0.25, 0.05), 7.0, params=50), {"cell": "b", "seed": 1, "failed": True},
               _rec("c", 0, 0.1, (0.0, 0.0), 1.0), _rec("c", 1, 0.2, (0.0, 0.0), 2.0),
               _rec("c", 2, 0.6, (0.3, 0.0), 6.0, lip=1.25)]
    rows = summarize(records, ["a", "b", "c", "d"])
    a, b, c, d = rows
    assert a["n"] == 2 and a["failed"] == 0 and a["params"] == 100
    assert a["clean"]["mean"] == pytest.approx(0.5) and a["clean"]["std"] == pytest.approx(math.sqrt(0.02))
    assert a["cra"]["36/255"]["mean"] == pytest.approx(0.25) and a["cra"]["72/255"]["std"] == pytest.approx(0.0)
    assert (a["clean"]["min"], a["clean"]["max"]) == (0.40, 0.60)
    assert b["n"] == 1 and b["failed"] == 1 and b["clean"]["std"] is None
    assert c["clean"]["mean"] == pytest.approx(0.3) and c["clean"]["std"] == pytest.approx(math.sqrt(0.07))
    assert c["train_time_s"]["mean"] == pytest.approx(3.0)
    assert d["n"] == 0 and d["clean"]["mean"] is None
    md = format_markdown(rows).splitlines()
    assert md[0] == ("| cell | seeds | params | clean % | CRA 36/255 % | CRA 72/255 % | train time (s) "
                     "| L (max) |")
    assert md[2] == "| a | 2 | 100 | 50.0 ± 14.1 | 25.0 ± 7.1 | 10.0 ± 0.0 | 15 ± 7 | 1.000000 |"
    assert md[3] == "| b | 1 (+1 diverged) | 50 | 50.0 | 25.0 | 5.0 | 7 | 1.000000 |"
    assert md[4] == "| c | 3 | 100 | 30.0 ± 26.5 | 10.0 ± 17.3 | 0.0 ± 0.0 | 3 ± 3 | 1.250000 |"
    assert md[5] == "| d | 0 | - | - | - | - | - | - |"
    csv = _csv(rows).splitlines()
    assert csv[0].startswith("cell,overrides,seeds,failed,params,clean_mean,clean_std,clean_min,clean_max,"
                             "cra_36/255_mean")
    assert csv[1].startswith("a,x=a,2,0,100,0.5,0.141421,0.4,0.6,0.25,0.0707107,0.2,0.3,")
    assert csv[2].startswith("b,x=b,1,1,50,0.5,,0.5,0.5,")


STUDY = {"name": "kill", "base": str(REPO / "configs" / "demo.yaml"), "seeds": 1,
         "overrides": {"model.name": "lipnext_l4w64", "model.kwargs": {"depth": 2, "width": 16, "patch_size": 2},
                       "train.epochs": 1, "train.batch_size": 4, "train.checkpoint_every_steps": 10,
                       "train.tensorboard": False, "train.log_every": 50},
         "grid": {"loss.eps_end": [1.0, 2.0]}}


def _study(path: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lipnext.cli", "study", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_study_runs_end_to_end_and_resumes_after_kill(tmp_path):
    out = tmp_path / "out"
    path = _write(tmp_path, {**STUDY, "out": str(out)})
    first, second = out / "eps_end=1.0" / "seed0", out / "eps_end=2.0" / "seed0"
    proc = _study(path)
    deadline = time.time() + 300
    while not (second / "checkpoints").is_dir() or not any((second / "checkpoints").glob("step_*")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the study never reached the second cell"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)      # mid-run: the second cell has a checkpoint, no result
    proc.wait()
    assert (first / "study_record.json").is_file() and not (second / "study_record.json").exists()
    done_before = (first / "study_record.json").read_text()
    mtime = (first / "study_record.json").stat().st_mtime_ns

    proc = _study(path)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert "[1/2] eps_end=1.0 seed 0: done, skipped" in log
    assert "[2/2] eps_end=2.0 seed 0: resuming from step_" in log
    assert (first / "study_record.json").stat().st_mtime_ns == mtime and (first / "study_record.json").read_text() == done_before
    rec = json.loads((second / "study_record.json").read_text())
    assert rec["resumed_from"].startswith("step_") and rec["n"] == 360
    assert rec["params"] == 16 * 16 + 2 * (2 * 16 * 16 + 16 + 16) + 10 * 16 + 10   # stem, blocks, head
    assert not (second / "checkpoints").exists()          # removed once the run is final
    table = (out / "study.md").read_text()
    assert "| eps_end=1.0 | 1 |" in table and "| eps_end=2.0 | 1 |" in table
    assert (out / "study.png").stat().st_size > 1000
    data = json.loads((out / "study.json").read_text())
    assert [r["cell"] for r in data["rows"]] == ["eps_end=1.0", "eps_end=2.0"]
    assert data["rows"][1]["clean"]["mean"] == rec["clean_accuracy"]
    # a rerun of a finished study runs nothing and gives the same table
    proc = _study(path)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and log.count("done, skipped") == 2
    assert (out / "study.md").read_text() == table


def test_shards_split_the_runs_and_divergence_is_recorded(tmp_path, monkeypatch):
    """With a stand-in trainer: --shard I/N runs disjoint parts; a diverged run is kept as failed."""
    import lipnext
    import lipnext.engine
    from lipnext.study import collect, run_study

    calls = []

    def fake_train(cfg):
        calls.append((Path(cfg.run_dir).parent.name, cfg.train.seed))
        if cfg.loss.eps_end == 2.0 and cfg.train.seed == 1:
            raise lipnext.engine.TrainingDiverged("non-finite loss")
        lipnext.save_model(lipnext.create_model("lipnext_l4w64", in_chans=1, image_size=8, patch_size=2,
                                                depth=1, width=8), cfg.run_dir)
        return {"clean_accuracy": 0.5 + cfg.train.seed / 10, "cra": {"0.25": 0.1}, "lipschitz_bound": 1.0,
                "n": 360, "train_time_s": 1.0}

    monkeypatch.setattr(lipnext.engine, "train", fake_train)
    study = load_study(_write(tmp_path, {**STUDY, "out": str(tmp_path / "out"), "seeds": 2}))
    run_study(study, (0, 2), log=lambda _: None)
    first = list(calls)
    run_study(study, (1, 2), log=lambda _: None)
    assert first == [("eps_end=1.0", 0), ("eps_end=2.0", 0)]
    assert calls[2:] == [("eps_end=1.0", 1), ("eps_end=2.0", 1)]
    records = run_study(study, log=lambda _: None)          # everything done: nothing runs
    assert len(calls) == 4
    assert [r.get("failed", False) for r in records] == [False, False, False, True]
    rows = summarize(collect(study), [c.name for c in study.cells])
    assert (rows[0]["n"], rows[1]["n"], rows[1]["failed"]) == (2, 1, 1)
    assert rows[0]["clean"]["mean"] == pytest.approx(0.55)
    assert rows[0]["params"] == sum(p.numel() for p in lipnext.load_model(
        study.run_dir(study.cells[0], 0)).parameters())
