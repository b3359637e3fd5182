"""`lipnext train`, `lipnext certify`, `lipnext models` and the demo recipe, end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lipnext.cli import main
from lipnext.config import load_config
from lipnext.demo import DEMO_RECIPE

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.kwargs={depth: 2, width: 32, patch_size: 2}", "train.batch_size=128", "train.epochs=1",
         "train.progress=false", "train.tensorboard=false", "train.eval_every=0", "augment.crop_padding=1"]


def test_train_then_certify(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--run-dir", str(run), *SMALL,
                 "train.checkpoint=true"]) == 0
    out = capsys.readouterr().out
    assert "clean accuracy" in out and "CRA @ eps=0.25" in out and "Lipschitz bound" in out
    saved = json.loads((run / "results.json").read_text())
    # certify the run folder again (its config names the data and radii): the same numbers
    assert main(["certify", str(run), "--out", str(tmp_path / "c.json")]) == 0
    again = json.loads((tmp_path / "c.json").read_text())
    assert again["n"] == 360 and again["clean_accuracy"] == saved["clean_accuracy"]
    assert again["cra"] == saved["cra"] and list(again["cra"]) == ["0.25", "0.5", "0.75"]
    assert main(["certify", str(run), "--radii", "36", "--radius-unit", "255", "--out",
                 str(tmp_path / "c2.json")]) == 0
    assert list(json.loads((tmp_path / "c2.json").read_text())["cra"]) == ["36/255"]
    # a checkpoint folder and a weights file certify too, on explicit data
    ckpt = next((run / "checkpoints").iterdir())
    assert main(["certify", str(ckpt), "--data", "digits", "--limit", "50"]) == 0
    assert main(["certify", str(run / "model.safetensors"), "--data", "digits", "--split", "test",
                 "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").is_file()


def test_certify_matches_training_results(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "data.holdout=300", *SMALL]) == 0
    saved = json.loads((run / "results.json").read_text())
    assert main(["certify", str(run), "--out", str(tmp_path / "c.json")]) == 0
    again = json.loads((tmp_path / "c.json").read_text())
    assert again["n"] == saved["n"] == 300
    assert again["cra"] == saved["cra"] and again["clean_accuracy"] == saved["clean_accuracy"]


def test_certify_uses_the_runs_image_size(tmp_path):
    """A run on ImageNet folders at data.image_size=16 re-certifies at 16, not at 224."""
    Image = pytest.importorskip("PIL.Image")
    for split, n in (("train", 4), ("val", 2)):
        for k, wnid in enumerate(["n1", "n2"]):
            for i in range(n):
                (tmp_path / split / wnid).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (24, 20), (90 * k, 40 * i, 60)).save(tmp_path / split / wnid / f"{i}.JPEG")
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), f"data.name=imagenet:{tmp_path}", "data.image_size=16",
                 "data.val_fraction=0", "data.num_workers=0", "certify.radii=[36]", *SMALL,
                 "train.batch_size=8"]) == 0
    saved = json.loads((run / "results.json").read_text())
    assert main(["certify", str(run), "--out", str(tmp_path / "c.json")]) == 0
    again = json.loads((tmp_path / "c.json").read_text())
    assert again["n"] == saved["n"] == 4
    assert again["cra"] == saved["cra"] and again["clean_accuracy"] == saved["clean_accuracy"]


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lipnext train: error: bad config: Key 'epoch' not in") and "Traceback" not in err
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no config file" in capsys.readouterr().err
    assert main(["train", f"data.name=cifar10:{tmp_path / 'missing'}", *SMALL,
                 f"run_dir={tmp_path / 'r'}"]) == 2
    assert "no CIFAR folder" in capsys.readouterr().err
    assert main(["certify", str(tmp_path / "none")]) == 2
    assert "no run folder or weights" in capsys.readouterr().err
    np.savez(tmp_path / "d.npz", x=np.zeros((20, 8, 8, 1), np.uint8), y=np.arange(20) % 12)
    assert main(["train", f"data.name={tmp_path / 'd.npz'}", "data.num_classes=10", *SMALL,
                 f"run_dir={tmp_path / 'r2'}"]) == 2
    assert "labels must lie in [0, 9]" in capsys.readouterr().err


def test_print_config_and_models(capsys):
    assert main(["train", "--config", str(REPO / "configs" / "cifar10_l32w1024.yaml"), "--print-config",
                 "train.epochs=70"]) == 0
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.train.epochs == 70 and cfg.model.name == "lipnext_l32w1024" and cfg.optim.grad_clip == 3.0
    assert main(["models", "l32"]) == 0
    assert "lipnext_l32w2048" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_loads(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.train.epochs >= 1


def test_paper_configs_follow_the_recipe():
    for name, model, epochs, eps_end in [("cifar10_l32w1024", "lipnext_l32w1024", 800, 3.0),
                                         ("cifar10_l32w2048", "lipnext_l32w2048", 800, 3.0),
                                         ("cifar100_l32w2048", "lipnext_l32w2048", 800, 3.0),
                                         ("tinyimagenet_l32w2048", "lipnext_l32w2048", 800, 3.0),
                                         ("imagenet_1b", "lipnext_l32w4096", 400, 2.0),
                                         ("imagenet_2b", "lipnext_2b", 400, 2.0)]:
        c = load_config(REPO / "configs" / f"{name}.yaml")
        assert (c.model.name, c.train.epochs, c.loss.eps_end) == (model, epochs, eps_end), name
        assert (c.optim.lr, c.optim.weight_decay, c.optim.grad_clip, c.optim.warmup_epochs) == (1e-3, 0, 3, 20)
        assert c.optim.nesterov and c.optim.lookahead_k > 0 and c.loss.name == "emma"
        assert (c.loss.eps_255, c.loss.eps_start, c.loss.eps_ramp) == (36, 0.1, 0.5)


def test_demo_recipe_is_configs_demo_yaml():
    from_file = load_config(REPO / "configs" / "demo.yaml")
    from_code = load_config(None, DEMO_RECIPE + ["model.name=lipnext_l8w128", "train.epochs=60",
                                                 "run_dir=runs/demo"])
    assert OmegaConf.to_container(from_file) == OmegaConf.to_container(from_code)


# ---------------------------------------------------------------- first contact
def test_configs_ship_with_the_package_and_resolve_by_name(tmp_path, monkeypatch, capsys):
    from lipnext.config import CONFIG_DIR, packaged_configs
    assert CONFIG_DIR.is_relative_to(REPO / "src" / "lipnext")
    assert (REPO / "configs").resolve() == CONFIG_DIR                        # one source of truth
    assert "cifar10_l32w1024" in packaged_configs() and "demo" in packaged_configs()
    monkeypatch.chdir(tmp_path)                                              # no configs/ here
    for name in ("cifar10_l32w1024", "cifar10_l32w1024.yaml"):
        assert main(["train", "--config", name, "--print-config"]) == 0
        assert OmegaConf.create(capsys.readouterr().out).model.name == "lipnext_l32w1024"
    assert main(["train", "--config", "cifar10_l32w999"]) == 2
    err = capsys.readouterr().err
    assert "no packaged config of that name" in err and "cifar10_l32w1024" in err
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'lipnext = ["configs/*.yaml"]' in pyproject                       # installed as package data


def test_train_on_all_the_data_then_certify_elsewhere(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "data.holdout=0", "data.val_fraction=0", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "no test split was certified" in out and f"lipnext certify {run} --data SPEC" in out
    # the same digits cut another way are training images: refused
    assert main(["certify", str(run), "--data", "digits", "--holdout", "300"]) == 2
    assert "300 images of this test split (holdout 300, val_fraction 0.1) are images" in capsys.readouterr().err
    rng = np.random.default_rng(0)                      # other images: certified
    np.savez(tmp_path / "other.npz", x=rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), y=np.arange(40) % 10)
    assert main(["certify", str(run), "--data", str(tmp_path / "other.npz"), "--holdout", "30"]) == 0
    assert "clean accuracy" in capsys.readouterr().out


def test_small_user_errors(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *SMALL]) == 0
    capsys.readouterr()
    for args, msg in [(["--batch-size", "0"], "--batch-size must be >= 1"),
                      (["--limit", "0"], "--limit must be >= 1")]:
        assert main(["certify", str(run), *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    for override, msg in [("optim.lr=-1", "optim.lr must be > 0"),
                          ("train.time_limit_min=-1", "time_limit_min must be > 0"),
                          ("train.budget_s=-1", "train.budget_s must be > 0 seconds"),
                          ("optim.warmup_epochs=20", "more than half of train.epochs=10")]:
        assert main(["train", override]) == 2
        assert msg in capsys.readouterr().err


def test_ctrl_c_prints_how_to_resume(tmp_path, monkeypatch, capsys):
    import os
    import signal

    import lipnext.engine as engine
    real = engine.train

    def interrupted_train(cfg):
        def hook(step, loss):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return loss
        return real(cfg, loss_hook=hook)

    monkeypatch.setattr(engine, "train", interrupted_train)
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *SMALL]) == 130
    out = capsys.readouterr().out
    assert "SIGINT: stopped at step 3 of 10; checkpoint" in out
    last = out.rstrip().splitlines()[-1]
    assert "continue with:\n  lipnext train " in out and f"run_dir={run}" in last and last.endswith(" --resume")
    monkeypatch.setattr(engine, "train", real)
    assert main(["train", "--run-dir", str(run), *SMALL, "--resume"]) == 0
    assert "resumed from step 3 of 10" in capsys.readouterr().out


@pytest.mark.parametrize("missing,command", [
    ("sklearn", ["demo", "--epochs", "1"]), ("matplotlib", ["demo", "--epochs", "1"]),
    ("sklearn", ["train"])])
def test_a_missing_extra_is_a_one_line_error(tmp_path, monkeypatch, capsys, missing, command):
    """Simulate a core-only install: the optional module cannot be imported."""
    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")] + [missing]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    err = capsys.readouterr().err
    package = {"sklearn": "scikit-learn"}.get(missing, missing)
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"needs {package}, which is not installed: pip install 'lipnext[demo]'" in err
    assert not (tmp_path / "runs").exists()                                 # failed before training


def test_help_does_not_import_torch():
    code = ("import runpy, sys\n"
            "for argv in (['--help'], ['train', '--help'], ['certify', '--help'], ['demo', '--help']):\n"
            "    sys.argv = ['lipnext', *argv]\n"
            "    try:\n"
            "        runpy.run_module('lipnext.cli', run_name='__main__')\n"
            "    except SystemExit:\n"
            "        pass\n"
            "    assert 'torch' not in sys.modules, argv\n"
            "print('no torch')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.rstrip().endswith("no torch") and "usage: lipnext" in p.stdout


def test_the_plot_names_the_data_and_labels_the_radii(tmp_path, monkeypatch):
    import matplotlib.figure
    import torch

    import lipnext
    from lipnext.report import plot_certified_accuracy
    seen, real = {}, matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        seen["fig"] = fig
        return real(fig, *a, **k)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    model = lipnext.create_model("lipnext_l4w64", num_classes=3, in_chans=1, image_size=8, patch_size=2)
    cert = lipnext.certify(model, torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,)))
    plot_certified_accuracy(cert, tmp_path / "p.png", title="m on digits (test, 16 images)",
                            marks=[36 / 255, 72 / 255], mark_labels=["36/255", "72/255"])
    ax = seen["fig"].axes[0]
    assert ax.get_title().startswith("m on digits (test, 16 images)")
    labels = [t.get_text() for t in ax.texts]
    assert labels == [f"{lab}: {100 * cert.cra(e):.1f}%" for lab, e in (("36/255", 36 / 255), ("72/255", 72 / 255))]
