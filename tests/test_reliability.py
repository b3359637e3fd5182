"""Reliability of every entry point: clear one-line errors for user mistakes, no code
execution from files, resume after SIGKILL, NaN detection and rollback."""
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lipnext
from lipnext import cli
from lipnext.config import load_config
from lipnext.engine import TrainingDiverged, train
from lipnext.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

SMALL = ["train.epochs=3", "train.batch_size=128", "train.eval_every=0", "train.checkpoint_every_steps=3",
         "train.tensorboard=false", "train.progress=false", "train.device=cpu", "data.val_fraction=0",
         "optim.warmup_epochs=0", "optim.lr=1e-2", "augment.flip=false", "augment.crop_padding=0"]




def small_cfg(run, *extra):
    return load_config(None, [f"run_dir={run}", *SMALL, *extra])


def tiny_model():
    return lipnext.create_model("lipnext_l4w64", num_classes=10, in_chans=1, image_size=8, seed=0)


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_user_error(capsys, argv, match):
    """Exit code 2, `lipnext <cmd>: error: ...` on stderr (one message), no traceback."""
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert err.startswith(f"lipnext {argv[0]}: error: ") and err.count("error:") == 1, err
    assert "Traceback" not in err and match.lower() in err.lower(), err


# ---------------------------------------------------------------- crafted pickles
class _Evil:
    """Unpickling this creates the marker file: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_files(tmp_path):
    marker = tmp_path / "PWNED"
    payload = {"stem.weight": _Evil(marker), "state_dict": {"x": _Evil(marker)}}
    files = {}
    for ext in ("pt", "ckpt", "safetensors", "pth"):
        p = tmp_path / f"torch_save.{ext}"
        torch.save(payload, p)                       # zip + pickle, as torch checkpoints are
        files[p.name] = p
        q = tmp_path / f"raw_pickle.{ext}"
        q.write_bytes(pickle.dumps(payload))
        files[q.name] = q
    return marker, files


def test_crafted_pickle_really_runs_code_when_unpickled(tmp_path):
    """Sanity check of the fixture: an unsafe loader would be exploited."""
    marker, files = _evil_files(tmp_path)
    torch.load(files["torch_save.pt"], weights_only=False)
    assert marker.exists()


def test_every_loader_refuses_crafted_pickles(tmp_path, capsys):
    marker, files = _evil_files(tmp_path)
    for name, path in files.items():
        with pytest.raises(ValueError, match="not a readable safetensors"):
            lipnext.load_model(path)
        assert_user_error(capsys, ["certify", path, "--data", "digits"], "not a readable safetensors")
        assert_user_error(capsys, ["verify", path, "--data", "digits"], "not a readable safetensors")
        run = tmp_path / f"run_{name.replace('.', '_')}"          # a run folder holding it
        run.mkdir()
        (run / "model.safetensors").write_bytes(path.read_bytes())
        assert_user_error(capsys, ["verify", run, "--data", "digits"], "not a readable safetensors")
    # resume: a checkpoint whose files are crafted pickles
    run = tmp_path / "resume_run"
    ck = run / "checkpoints" / "step_00000003"
    ck.mkdir(parents=True)
    for f in ("model.safetensors", "optimizer.safetensors"):
        (ck / f).write_bytes(files["torch_save.pt"].read_bytes())
    (ck / "state.json").write_text("{}")
    assert_user_error(capsys, ["train", "--run-dir", run, "--resume", *SMALL], "not a readable safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_checkpoint(ck, tiny_model())
    assert not marker.exists(), "a loader unpickled the crafted file"


# ---------------------------------------------------------------- damaged or foreign weights
def _config_set(**items):
    """A metadata edit that sets ``items`` in the saved model config."""
    def edit(m):
        m["config"] = json.dumps({**json.loads(m["config"]), **items})
    return edit


def _rewrite(src, dst, meta_fn=None, tensor_fn=None):
    """A copy of ``src`` with edited metadata or tensors; edited tensors get their own sha256
    (as if saved so, e.g. NaN weights of a diverged run)."""
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if meta_fn:
        meta_fn(meta)
    if tensor_fn:
        tensor_fn(tensors)
        meta["tensors_sha256"] = lipnext.io.tensors_sha256(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_damaged_and_foreign_weights_give_one_line_errors(tmp_path, capsys):
    good = lipnext.save_model(tiny_model(), tmp_path / "good.safetensors")
    raw = good.read_bytes()
    cases = {}
    (tmp_path / "empty.safetensors").write_bytes(b"")
    cases["empty.safetensors"] = "not a readable safetensors"
    (tmp_path / "random.safetensors").write_bytes(os.urandom(4096))
    cases["random.safetensors"] = "not a readable safetensors"
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    cases["truncated.safetensors"] = "safetensors"
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    cases["foreign.safetensors"] = "not a lipnext model"
    _rewrite(good, tmp_path / "version.safetensors", lambda m: m.update(format_version="99"))
    cases["version.safetensors"] = "format version"
    _rewrite(good, tmp_path / "arch.safetensors", lambda m: m.update(arch="resnet"))
    cases["arch.safetensors"] = "unknown architecture"

    _rewrite(good, tmp_path / "newkey.safetensors", _config_set(gamma=2))
    cases["newkey.safetensors"] = "another lipnext version"
    _rewrite(good, tmp_path / "badjson.safetensors", lambda m: m.update(config="{not json"))
    cases["badjson.safetensors"] = "damaged lipnext header"

    _rewrite(good, tmp_path / "othermodel.safetensors", _config_set(width=32))
    cases["othermodel.safetensors"] = "does not match"
    _rewrite(good, tmp_path / "nan.safetensors",
             tensor_fn=lambda t: t["blocks.0.R"].__setitem__((0, 0), float("nan")))
    cases["nan.safetensors"] = "NaN or Inf"
    cases["missing.safetensors"] = "no model weights"
    (tmp_path / "emptydir").mkdir()
    cases["emptydir"] = "no model weights"
    for name, match in cases.items():
        with pytest.raises((ValueError, KeyError, FileNotFoundError), match=match):
            lipnext.load_model(tmp_path / name)
        for cmd in ("certify", "verify"):
            if name == "missing.safetensors":
                match_cli = "no run folder or weights"
            else:
                match_cli = match
            assert_user_error(capsys, [cmd, tmp_path / name, "--data", "digits"], match_cli)


def test_data_mistakes_give_one_line_errors(tmp_path, capsys):
    good = lipnext.save_model(tiny_model(), tmp_path / "m.safetensors")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "badlabels.npz", x=x, y=np.full(40, -3))
    np.savez(tmp_path / "threeclass.npz", x=x, y=np.arange(40) % 3)
    np.savez(tmp_path / "wrongsize.npz", x=rng.integers(0, 256, (40, 9, 9, 1), dtype=np.uint8),
             y=np.arange(40) % 10)
    np.savez(tmp_path / "floatx.npz", x=np.full((40, 8, 8, 1), np.nan, dtype=np.float32), y=np.arange(40) % 10)
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04garbage")
    for cmd in ("certify", "verify"):
        assert_user_error(capsys, [cmd, good, "--data", f"npz:{tmp_path / 'badlabels.npz'}",
                                   "--holdout", "10"], "label")
        assert_user_error(capsys, [cmd, good, "--data", f"npz:{tmp_path / 'threeclass.npz'}",
                                   "--holdout", "10"], "classes")
        assert_user_error(capsys, [cmd, good, "--data", f"npz:{tmp_path / 'wrongsize.npz'}",
                                   "--holdout", "10"], "9x9")
        assert_user_error(capsys, [cmd, good, "--data", f"npz:{tmp_path / 'floatx.npz'}",
                                   "--holdout", "10"], "uint8")
        assert_user_error(capsys, [cmd, good, "--data", f"npz:{tmp_path / 'corrupt.npz'}"], "npz")
        assert_user_error(capsys, [cmd, good, "--data", "nosuchdata"], "unknown dataset")
        assert_user_error(capsys, [cmd, good], "--data")


def test_config_mistakes_give_one_line_errors(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  epochs: 2\n  epoch: 3\n")
    assert_user_error(capsys, ["train", "--config", cfg, "--run-dir", tmp_path / "r"], "epoch")
    cfg.write_text("train: [1, 2\n")
    assert_user_error(capsys, ["train", "--config", cfg], "bad.yaml")
    assert_user_error(capsys, ["train", "--run-dir", tmp_path / "r", "model.nme=x"], "nme")
    assert_user_error(capsys, ["train", "--run-dir", tmp_path / "r", "train.epochs=many"], "many")
    assert_user_error(capsys, ["train", "--config", tmp_path / "none.yaml"], "no config file")


def test_model_and_certify_input_mistakes_are_clear():
    m = tiny_model()
    bad_inputs = [
        (torch.rand(2, 3, 8, 8), ValueError, "1 input channels"),
        (torch.rand(2, 8, 8, 1), ValueError, "channels"),
        (torch.rand(1, 8, 8), ValueError, "unsqueeze"),
        (torch.rand(2, 1, 16, 16), ValueError, "8x8"),
        (torch.randint(0, 255, (2, 1, 8, 8), dtype=torch.uint8), TypeError, "float"),
        (torch.full((2, 1, 8, 8), float("nan")), ValueError, "NaN"),
        (torch.full((2, 1, 8, 8), float("inf")), ValueError, "Inf"),
        (np.zeros((2, 1, 8, 8), dtype=np.float32), TypeError, "torch.Tensor"),
    ]
    for x, err, match in bad_inputs:
        with pytest.raises(err, match=match):
            m(x)
        with pytest.raises(err, match=match):
            lipnext.certify(m, x, torch.zeros(len(x), dtype=torch.long))


# ---------------------------------------------------------------- NaN during training
def test_nan_is_detected_and_stops(tmp_path):
    def poison(step, loss):
        return loss * float("nan") if step == 5 else loss
    with pytest.raises(TrainingDiverged, match="non-finite loss or gradient at step 5"):
        train(small_cfg(tmp_path / "r"), loss_hook=poison)
    assert not (tmp_path / "r" / "model.safetensors").exists()   # no silently broken final model


def test_nan_is_rolled_back_to_the_last_checkpoint(tmp_path):
    seen = []

    def poison(step, loss):
        seen.append(step)
        return loss * float("nan") if step == 7 and seen.count(7) == 1 else loss
    res = train(small_cfg(tmp_path / "r", "train.on_nan=rollback"), loss_hook=poison)
    events = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e.get("kind") == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["at_step"] == 7 and rollbacks[0]["step"] == 6
    assert seen.count(6) == 2                      # step 6 re-run from the checkpoint
    m = lipnext.load_model(tmp_path / "r")
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert res["clean_accuracy"] > 0.5             # a trained model, not a 10% one


def test_persistent_nan_gives_up_after_max_rollbacks(tmp_path):
    with pytest.raises(TrainingDiverged, match="rollbacks"):
        train(small_cfg(tmp_path / "r", "train.on_nan=rollback", "train.max_rollbacks=2"),
              loss_hook=lambda step, loss: loss * float("nan") if step >= 4 else loss)


# ---------------------------------------------------------------- SIGKILL and resume
def _weights(path):
    return load_file(str(path))


def _spawn(run, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    main = "import sys; from lipnext.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", main, "train", "--run-dir", str(run), *SMALL, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def test_sigkill_at_random_moments_then_resume_reproduces_the_run(tmp_path):
    ref = train(small_cfg(tmp_path / "ref"))
    run = tmp_path / "killed"
    rnd = random.Random(1234)
    kills, seen_steps = 0, set()
    for attempt in range(4):                              # three kills, then run to the end
        proc = _spawn(run, *(["--resume"] if attempt else []))
        if attempt < 3:
            start = time.time()
            before = {p.name for p in list_checkpoints(run)}
            # wait for a new complete checkpoint, then kill at a random moment after it
            while time.time() - start < 60 and proc.poll() is None:
                if {p.name for p in list_checkpoints(run)} - before:
                    break
                time.sleep(0.02)
            time.sleep(rnd.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=60)
            ck = latest_checkpoint(run)
            assert ck is not None, proc.stdout.read().decode()[-2000:]
            seen_steps.add(ck.name)
            for f in ("model.safetensors", "optimizer.safetensors", "state.json"):
                assert (ck / f).is_file()                # the one resume will load is complete
        else:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out.decode()[-2000:]
    assert kills >= 2 and len(seen_steps) >= 2
    a, b = _weights(tmp_path / "ref" / "model.safetensors"), _weights(run / "model.safetensors")
    # bit-identical: a lost or repeated step (or a repeated retraction) would show
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = json.loads((run / "results.json").read_text())
    assert abs(res["clean_accuracy"] - ref["clean_accuracy"]) <= 1 / res["n"]
    assert all(abs(res["cra"][k] - ref["cra"][k]) <= 1 / res["n"] for k in ref["cra"])
    assert res["steps"] == ref["steps"]
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(l).get("kind") == "train"]
    assert steps == sorted(set(steps))                    # no step logged twice after resuming


def test_resume_skips_a_partially_deleted_checkpoint(tmp_path):
    """A kill inside shutil.rmtree (checkpoint rotation, or re-saving a step) leaves a partial
    step_* folder; resume must use the last complete checkpoint instead."""
    run = tmp_path / "r"
    assert train(small_cfg(run, "train.stop_at_step=6"))["interrupted"]
    complete = latest_checkpoint(run)
    assert complete.name == "step_00000006"
    partial = run / "checkpoints" / "step_00000009"       # what a kill mid-rmtree leaves
    partial.mkdir()
    (partial / "model.safetensors").write_bytes((complete / "model.safetensors").read_bytes())
    assert latest_checkpoint(run) == complete
    assert train(small_cfg(run, "resume=true"))["steps"] == 33


def test_float64_pixels_work_or_are_refused_clearly():
    m = tiny_model()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    try:
        z = m(x)
    except TypeError as e:
        assert "float64" in str(e)
        return
    torch.testing.assert_close(z.float(), m(x.float()), rtol=1e-4, atol=1e-5)


def test_stop_and_resume_is_bit_identical(tmp_path):
    train(small_cfg(tmp_path / "ref"))
    ref = _weights(tmp_path / "ref" / "model.safetensors")
    for stop in (7, 20):
        assert train(small_cfg(tmp_path / "r", f"train.stop_at_step={stop}", "resume=true"))["interrupted"]
    train(small_cfg(tmp_path / "r", "resume=true"))
    out = _weights(tmp_path / "r" / "model.safetensors")
    assert all(torch.equal(ref[k], out[k]) for k in ref)


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    train(small_cfg(tmp_path / "r"))
    before = _weights(tmp_path / "r" / "model.safetensors")
    train(small_cfg(tmp_path / "r", "resume=true"))
    after = _weights(tmp_path / "r" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
