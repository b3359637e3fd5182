"""The training engine: schedules, exact resume, atomic checkpoints, NaN handling, errors."""
from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from lipnext.config import load_config, warmup_epochs
from lipnext.engine import (TrainingDiverged, latest_checkpoint, list_checkpoints, load_checkpoint,
                            lr_factor, read_metrics, train)
from lipnext.engine import checkpoint as ckpt_mod
from lipnext.engine.batches import BatchPlan
from lipnext.losses import eps_schedule
from lipnext.models import create_model
from lipnext.optim import build_optimizer

TINY = ["data.name=digits", "model.name=lipnext_l4w64",
        "model.kwargs={depth: 2, width: 32, patch_size: 2}", "augment.crop_padding=1",
        "train.batch_size=128", "train.epochs=2", "optim.warmup_epochs=0.5", "optim.lookahead_k=3",
        "train.progress=false", "train.tensorboard=false", "train.log_every=1", "train.eval_every=1",
        "train.eval_max=64", "certify.radii=[36, 72]"]


def cfg(tmp_path, *extra, name="run"):
    return load_config(None, TINY + [f"run_dir={tmp_path / name}", *extra])


def losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def weights(path):
    return load_file(str(path / "model.safetensors"))


# ---------------------------------------------------------------- schedules and batches
def test_lr_factor_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(0, 10, 0) == pytest.approx(1.0)


def test_batch_plan_covers_epoch_and_shards():
    plan = BatchPlan(n_real=100, batch_size=32, seed=1)
    assert plan.steps_per_epoch == 3
    seen = torch.cat([plan.global_indices(s)[0] for s in range(3)])
    assert len(set(seen.tolist())) == 96                       # no repeats within an epoch
    assert not torch.equal(plan.global_indices(0)[0], plan.global_indices(3)[0])   # new epoch order
    assert torch.equal(plan.global_indices(4)[0], BatchPlan(100, 32, 1).global_indices(4)[0])
    mixed = BatchPlan(100, 32, 1, n_generated=50, generated_fraction=0.25, world_size=2, rank=1)
    real, gen = mixed.global_indices(0)
    assert (len(real), len(gen)) == (24, 8) and gen.max() < 50 and mixed.steps_per_epoch == 4
    assert mixed.local_rows() == slice(16, 32)
    with pytest.raises(ValueError, match="divisible"):
        BatchPlan(100, 31, 0, world_size=2)


# ---------------------------------------------------------------- a run end to end
def test_train_writes_run_folder_and_results(tmp_path):
    res = train(cfg(tmp_path))
    run = tmp_path / "run"
    for f in ("model.safetensors", "config.yaml", "metrics.jsonl", "results.json",
              "certified_accuracy.png"):
        assert (run / f).is_file(), f
    saved = json.loads((run / "results.json").read_text())
    assert saved["split"] == "test" and saved["n"] == 360 and set(saved["cra"]) == {"36/255", "72/255"}
    assert saved == json.loads(json.dumps(res))
    assert 0 <= saved["cra"]["72/255"] <= saved["cra"]["36/255"] <= saved["clean_accuracy"] <= 1
    recs = read_metrics(run / "metrics.jsonl")
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert steps == list(range(1, 21))                          # 1293 // 128 = 10 steps x 2 epochs
    assert sum(r["kind"] == "eval" for r in recs) == 2
    assert all(math.isfinite(l) for l in losses(run))
    tr = [r for r in recs if r["kind"] == "train"]
    assert tr[0]["eps"] == pytest.approx(0.1 * 36 / 255) and tr[-1]["eps"] == pytest.approx(3 * 36 / 255)
    assert tr[-1]["lr"] < tr[5]["lr"]
    assert [p.name for p in list_checkpoints(run)] == ["step_00000010", "step_00000020"]
    # the final model is retracted: orthogonal to float32 precision, bound ~ 1
    from lipnext.io import load_model
    from lipnext.nn import orthogonality_error
    model = load_model(run)
    assert max(orthogonality_error(b.R) for b in model.blocks) < 1e-5
    assert saved["lipschitz_bound"] == pytest.approx(model.lipschitz_bound())
    assert model.validate_inputs is True


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    train(cfg(tmp_path, name="full"))
    # interrupted at step 13 (mid-epoch, between two Lookahead syncs), then resumed
    out = train(cfg(tmp_path, "train.stop_at_step=13", name="cut"))
    assert out == {"interrupted": True, "step": 13}
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000013"
    train(cfg(tmp_path, "resume=true", name="cut"))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "full" / "results.json").read_text())
    rb = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert (ra["clean_accuracy"], ra["cra"]) == (rb["clean_accuracy"], rb["cra"])


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    real_save = ckpt_mod.write_safetensors       # the optimizer file of a checkpoint
    calls = {"n": 0}

    def crashing_save(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:                          # the second checkpoint dies mid-write
            with open(path, "wb") as fh:
                fh.write(b"\x00" * 100)
            raise KeyboardInterrupt("simulated crash")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "write_safetensors", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path))
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step_00000010"]
    assert any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    model = create_model("lipnext_l4w64", num_classes=10, in_chans=1, image_size=8, depth=2, width=32,
                         patch_size=2, mean=[0.3049], seed=0)
    state = load_checkpoint(latest_checkpoint(run), model, build_optimizer(model))
    assert state["step"] == 10
    monkeypatch.setattr(ckpt_mod, "write_safetensors", real_save)
    train(cfg(tmp_path, "resume=true"))                     # continues from step 10 and finishes
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    assert (run / "results.json").is_file()


def test_checkpoint_of_another_model_is_refused(tmp_path):
    train(cfg(tmp_path, "train.stop_at_step=3"))
    other = create_model("lipnext_l4w64", num_classes=10, in_chans=1, image_size=8, depth=2, width=16,
                         patch_size=2, mean=[0.3049], seed=0)
    with pytest.raises(ValueError, match=r"different model.*width"):
        load_checkpoint(latest_checkpoint(tmp_path / "run"), other)
    with pytest.raises(ValueError, match="different model"):
        train(cfg(tmp_path, "resume=true", "model.kwargs.width=16"))
    with pytest.raises(ValueError, match="already has checkpoints"):
        train(cfg(tmp_path))
    with pytest.raises(ValueError, match="10 steps per epoch, this config gives 20; keep train.batch_size"):
        train(cfg(tmp_path, "resume=true", "train.batch_size=64"))


def test_keep_last_n(tmp_path):
    train(cfg(tmp_path, "train.checkpoint_every_steps=3", "train.keep_last=2", "train.eval_every=0"))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000018", "step_00000020"]


# ---------------------------------------------------------------- non-finite loss
def nan_at(step):
    fired = {"done": False}

    def hook(s, loss):
        if s == step and not fired["done"]:
            fired["done"] = True
            return loss * float("nan")
        return loss
    return hook


def test_nan_stops_with_a_clear_message(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"non-finite loss or gradient at step 5 .*on_nan=rollback"):
        train(cfg(tmp_path, "train.eval_every=0"), loss_hook=nan_at(5))


def test_nan_rolls_back_with_half_lr(tmp_path):
    res = train(cfg(tmp_path, "train.on_nan=rollback", "train.eval_every=0"), loss_hook=nan_at(12))
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    rb = [r for r in recs if r["kind"] == "rollback"]
    assert len(rb) == 1 and rb[0]["at_step"] == 12 and rb[0]["step"] == 10 and rb[0]["lr_scale"] == 0.5
    tr = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in tr] == list(range(1, 21))        # steps 11-12 replayed, not duplicated
    ref = lr_factor(10, 20, 5) * 1e-3
    assert tr[10]["lr"] == pytest.approx(0.5 * ref)
    assert math.isfinite(res["clean_accuracy"])
    with pytest.raises(TrainingDiverged, match="after 0 rollbacks"):
        train(cfg(tmp_path, "train.on_nan=rollback", "train.max_rollbacks=0", "train.eval_every=0",
                  name="r2"), loss_hook=nan_at(3))


# ---------------------------------------------------------------- configuration errors
def test_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="Key 'epoch' not in"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ValueError, match="could not be converted"):
        load_config(None, ["train.epochs=three"])
    with pytest.raises(ValueError, match="loss.name='hinge'"):
        load_config(None, ["loss.name=hinge"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ValueError, match="bad override"):
        load_config(None, ["train.epochs=["])               # a YAML syntax error
    with pytest.raises(FileNotFoundError, match="no config file"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  nam: x\n")
    with pytest.raises(ValueError, match="Key 'nam' not in 'ModelConfig'"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="no CIFAR folder"):
        train(cfg(tmp_path, f"data.name=cifar10:{tmp_path / 'nope'}"))
    with pytest.raises(ValueError, match="config model.name: unknown model"):   # at load, not at train
        cfg(tmp_path, "model.name=lipnext_nope")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but dist.strategy=none; use ddp or fsdp"):
        train(cfg(tmp_path, "dist.strategy=none"))


def test_incomplete_checkpoint_folders_are_ignored(tmp_path):
    train(cfg(tmp_path, "train.stop_at_step=4", "train.eval_every=0"))
    run = tmp_path / "run"
    partial = run / "checkpoints" / "step_00000007"        # e.g. a kill in the middle of a deletion
    partial.mkdir()
    (partial / "state.json").write_text("{}")
    assert latest_checkpoint(run).name == "step_00000004"
    train(cfg(tmp_path, "resume=true", "train.eval_every=0", "train.checkpoint_every_steps=7",
              "train.keep_last=10"))
    names = [p.name for p in list_checkpoints(run)]
    assert names == ["step_00000004", "step_00000007", "step_00000010", "step_00000014", "step_00000020"]
    assert json.loads((partial / "state.json").read_text())["step"] == 7   # rewritten whole
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith((".del-", ".tmp-"))]


# ---------------------------------------------------------------- first contact
def test_warmup_scales_with_the_run_or_is_refused():
    c = load_config(None, ["model.name=lipnext_l4w64", "train.epochs=6"])     # the walkthrough's run
    assert c.optim.warmup_epochs is None and warmup_epochs(c) == pytest.approx(0.3)
    assert warmup_epochs(load_config(None, ["train.epochs=800"])) == 20     # the paper's 20 of 800
    assert warmup_epochs(load_config(None, ["train.epochs=60"])) == 3       # the demo's 3 of 60
    with pytest.raises(ValueError, match=r"optim.warmup_epochs=20 is more than half of train.epochs=6"
                                         r".*optim.warmup_epochs=null.*0.3 epochs"):
        load_config(None, ["train.epochs=6", "optim.warmup_epochs=20"])
    with pytest.raises(ValueError, match="negative"):
        load_config(None, ["optim.warmup_epochs=-1"])


def test_bad_numbers_are_refused():
    with pytest.raises(ValueError, match="optim.lr must be > 0"):
        load_config(None, ["optim.lr=-1"])
    with pytest.raises(ValueError, match="time_limit_min must be > 0"):
        load_config(None, ["train.time_limit_min=-5"])


def test_banner_at_start_and_on_resume(tmp_path, capsys):
    train(cfg(tmp_path, "train.stop_at_step=13"))
    out = capsys.readouterr().out
    assert "lipnext_l4w64" in out and "images: train 1,293, val 144, test 360" in out
    assert "steps: 10 per epoch (global batch 128) x 2 epochs = 20, warm-up 5" in out
    assert f"run folder: {tmp_path / 'run'}" in out and "resumed" not in out
    train(cfg(tmp_path, "resume=true"))
    assert "resumed from step 13 of 20 (epoch 1.3; " in capsys.readouterr().out


def test_training_on_all_the_data_ends_cleanly(tmp_path, capsys):
    """holdout=0 and val_fraction=0: no split to certify; the weights are saved, no traceback."""
    res = train(cfg(tmp_path, "data.holdout=0", "data.val_fraction=0", "train.epochs=1"))
    out = capsys.readouterr().out
    assert "images: train 1,797, no val split, no test split" in out
    assert "no test split was certified" in out and f"lipnext certify {tmp_path / 'run'} --data" in out
    assert res["split"] is None and res["steps"] == 14
    assert json.loads((tmp_path / "run" / "results.json").read_text())["certified"] is False
    assert (tmp_path / "run" / "model.safetensors").is_file()
    res = train(cfg(tmp_path, "certify.split=none", "train.epochs=1", name="none"))
    assert res["split"] is None and "no test split was certified (certify.split=none)" in capsys.readouterr().out


def kill_at(step, signum):
    def hook(s, loss):
        if s == step:
            os.kill(os.getpid(), signum)
        return loss
    return hook


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_and_the_resumed_run_is_exact(tmp_path, capsys, signum):
    train(cfg(tmp_path, "train.eval_every=0", name="full"))
    handler = signal.getsignal(signum)
    out = train(cfg(tmp_path, "train.eval_every=0", name="cut"), loss_hook=kill_at(6, signum))
    assert signal.getsignal(signum) is handler                        # the handler is restored
    name = signal.Signals(signum).name
    assert out == {"interrupted": True, "step": 7, "signal": name}   # step 6 completes first
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000007"
    assert f"{name}: stopped at step 7 of 20; checkpoint" in capsys.readouterr().out
    train(cfg(tmp_path, "resume=true", "train.eval_every=0", name="cut"))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extending_a_finished_run(tmp_path, capsys):
    """train.epochs=3 on a finished 2-epoch run: steps 21-30 follow the schedules of a 3-epoch
    run; the extension itself resumes exactly."""
    train(cfg(tmp_path, "train.eval_every=0", name="a"))
    before = losses(tmp_path / "a")
    res = train(cfg(tmp_path, "resume=true", "train.epochs=3", "train.eval_every=0", name="a"))
    assert "the run had 20 steps (2 epochs), it now has 30" in capsys.readouterr().out
    recs = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in recs] == list(range(1, 31)) and losses(tmp_path / "a")[:20] == before
    w = round(warmup_epochs(load_config(None, TINY + ["train.epochs=3"])) * 10)
    assert recs[20]["lr"] == pytest.approx(1e-3 * lr_factor(20, 30, w))
    assert recs[20]["eps"] == pytest.approx(eps_schedule(20 / 30, 36 / 255, 0.1, 3.0, 0.5))
    assert (res["epochs"], res["steps"], res["total_steps"]) == (3, 30, 30)
    assert load_config(tmp_path / "a" / "config.yaml").train.epochs == 3
    # the same extension, interrupted at step 25 and resumed: the same run
    train(cfg(tmp_path, "train.eval_every=0", name="b"))
    train(cfg(tmp_path, "resume=true", "train.epochs=3", "train.eval_every=0", "train.stop_at_step=25", name="b"))
    train(cfg(tmp_path, "resume=true", "train.epochs=3", "train.eval_every=0", name="b"))
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"at step 30, beyond the 10 steps of train.epochs=1; set train.epochs >= 3"):
        train(cfg(tmp_path, "resume=true", "train.epochs=1", name="b"))


def test_the_walkthroughs_short_run_reaches_its_learning_rate(tmp_path, capsys):
    """`lipnext train model.name=lipnext_l4w64 train.epochs=6` spent all its 30 steps in a
    20-epoch warm-up (lr <= 0.3 x optim.lr); now it warms up for 2 steps, then decays."""
    train(load_config(None, ["model.name=lipnext_l4w64", "train.epochs=6", f"run_dir={tmp_path / 'r'}",
                             "train.progress=false", "train.tensorboard=false", "train.checkpoint=false",
                             "train.log_every=1", "train.eval_every=0"]))
    assert "x 6 epochs = 30, warm-up 2" in capsys.readouterr().out
    lr = [r["lr"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(lr) == 30 and lr[0] == pytest.approx(0.5e-3) and lr[1] == pytest.approx(1e-3)
    assert lr == sorted(lr[:2]) + sorted(lr[2:], reverse=True) and lr[-1] < 0.01e-3
