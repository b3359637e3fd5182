"""Engine options: streamed image folders, generated-image mixing, activation checkpointing,
bf16 autocast, TensorBoard."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lipnext.config import load_config
from lipnext.engine import read_metrics, train

BASE = ["model.name=lipnext_l4w64", "train.progress=false", "train.tensorboard=false",
        "train.log_every=1", "train.eval_every=0", "optim.warmup_epochs=0.5"]
DIGITS = BASE + ["data.name=digits", "model.kwargs={depth: 2, width: 32, patch_size: 2}",
                 "augment.crop_padding=1", "train.batch_size=128", "train.epochs=1"]


def run(tmp_path, name, *extra, base=DIGITS, **kw):
    return train(load_config(None, base + [f"run_dir={tmp_path / name}", *extra]), **kw)


def test_activation_checkpointing_gives_the_same_run(tmp_path):
    run(tmp_path, "plain")
    run(tmp_path, "ckpt", "train.activation_checkpointing=true")
    a, b = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    res = run(tmp_path, "bf16", "train.precision=bf16")
    assert res["precision"] == "bf16" and np.isfinite(res["clean_accuracy"])
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["blocks.0.R"].dtype == torch.float32


def test_generated_images_are_mixed_in(tmp_path):
    # "generated" images: a class-0-only set of blank images, a quarter of each batch
    np.savez(tmp_path / "gen.npz", x=np.zeros((40, 8, 8, 1), np.uint8), y=np.zeros(40, np.int64))
    res = run(tmp_path, "mix", f"data.generated=npz:{tmp_path / 'gen.npz'}", "data.generated_fraction=0.25")
    recs = [r for r in read_metrics(tmp_path / "mix" / "metrics.jsonl") if r["kind"] == "train"]
    # 1293 real images, 96 real + 32 generated per batch of 128 -> 13 steps per epoch
    assert len(recs) == 13 and np.isfinite(res["clean_accuracy"])
    np.savez(tmp_path / "bad.npz", x=np.zeros((40, 4, 4, 1), np.uint8), y=np.zeros(40, np.int64))
    with pytest.raises(ValueError, match="do not match"):
        run(tmp_path, "bad", f"data.generated=npz:{tmp_path / 'bad.npz'}", "data.generated_fraction=0.25")
    with pytest.raises(ValueError, match="needs data.generated"):
        run(tmp_path, "bad2", "data.generated_fraction=0.25")


def test_streamed_image_folders_train_and_certify(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 3)):
        for k, w in enumerate(["n1", "n2"]):
            for i in range(n):
                arr = np.clip(rng.normal(60 + 120 * k, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
                (tmp_path / "img" / split / w).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(tmp_path / "img" / split / w / f"{i}.png")
    res = run(tmp_path, "stream", f"data.name=imagenet:{tmp_path / 'img'}", "data.image_size=16",
              "data.val_fraction=0.25", "data.num_workers=0", "train.batch_size=6", "train.epochs=2",
              "train.eval_every=1", "model.kwargs={depth: 2, width: 32}", base=BASE)
    assert res["n"] == 6 and res["split"] == "test"
    recs = read_metrics(tmp_path / "stream" / "metrics.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert sum(r["kind"] == "eval" and r["n"] == 6 for r in recs) == 2


def test_tensorboard_events_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    run(tmp_path, "tb", "train.tensorboard=true")
    assert any((tmp_path / "tb" / "tensorboard").iterdir())


def test_a_wall_clock_budget_ends_training_and_paces_the_schedules(tmp_path, capsys):
    """train.budget_s: training ends once the budget is spent (long before train.epochs) and
    the eps ramp and the lr warm-up + cosine run on the share of the budget used."""
    from lipnext.losses import eps_schedule
    res = run(tmp_path, "budget", "train.budget_s=2", "train.epochs=1000", "optim.warmup_epochs=250",
              "train.checkpoint=false")
    assert "train.budget_s=2 spent at step" in capsys.readouterr().out
    assert 0 < res["steps"] < res["total_steps"] and res["train_time_s"] >= 2
    recs = [r for r in read_metrics(tmp_path / "budget" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(recs) == res["steps"] > 5
    before = 0.0                              # each step's eps is read from the clock between two records
    for r in recs:
        assert eps_schedule(min(before / 2, 1), 36 / 255) <= r["eps"] <= eps_schedule(min(r["time_s"] / 2, 1), 36 / 255)
        before = r["time_s"]
    lr = [r["lr"] for r in recs]
    peak = lr.index(max(lr))
    assert 0 < peak < len(lr) - 1 and lr[:peak + 1] == sorted(lr[:peak + 1])
    assert lr[peak:] == sorted(lr[peak:], reverse=True) and lr[-1] < 0.5 * lr[peak]
    with pytest.raises(ValueError, match="budget_s must be > 0"):
        load_config(None, ["train.budget_s=0"])
