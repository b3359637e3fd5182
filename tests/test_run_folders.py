"""Run folders and the command line never lose work (issue 22), driven as a user drives them:
``lipnext`` in subprocesses, real files, real signals, read-only and full mounts where this
machine allows them (else injected ``OSError``s). One section per point of the issue."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lipnext import cli

REPO = Path(__file__).resolve().parents[1]
MAIN = "import sys; from lipnext.cli import main; sys.exit(main())"
TINY = ["--config", str(REPO / "configs" / "demo.yaml"), "model.kwargs={depth: 2, width: 32, patch_size: 2}",
        "train.batch_size=128", "train.epochs=1", "train.tensorboard=false", "train.progress=false"]

# A full disk at the Nth safetensors write, reported as safetensors' writer reports it.
ENOSPC = '''
import os
import safetensors.torch as st
from safetensors import SafetensorError

_real, _calls = st.save_file, [0]


def save_file(tensors, filename, metadata=None):
    _calls[0] += 1
    if _calls[0] == int(os.environ["ENOSPC_AT"]):
        with open(filename, "wb") as fh:
            fh.write(bytes(64))                    # the part a full disk took
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return _real(tensors, filename, metadata=metadata)


st.save_file = save_file
'''


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def lipnext(*args, cwd: Path | None = None, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    """``lipnext ARGS`` in a fresh process (stdout and stderr captured: not a terminal)."""
    return subprocess.run([sys.executable, "-c", MAIN, *map(str, args)], cwd=cwd, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def spawn(*args, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", MAIN, *map(str, args)], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_line_error(p: subprocess.CompletedProcess, command: str, match: str, rc: int = 2) -> str:
    """Exit code ``rc``, one line `lipnext COMMAND: error: ...` on stderr holding ``match``."""
    err = p.stderr
    assert p.returncode == rc, (p.returncode, p.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err and err.startswith(f"lipnext {command}: error: ") and err.count("\n") == 1, err
    assert match in err, err
    return err


def cli_error(capsys, argv: list, match: str) -> None:
    """The same check for an in-process ``lipnext`` call (the quick validation cases)."""
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"lipnext {argv[0]}: error: ") and err.count("\n") == 1, (rc, err)
    assert match in err, err


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def mount(*args: str) -> bool:
    """Run ``mount ARGS``; False where this machine does not allow it (not root, a container)."""
    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run of configs/demo.yaml (no checkpoints, as every demo run), with progress on."""
    run = tmp_path_factory.mktemp("finished") / "run"
    p = lipnext("train", *TINY, f"run_dir={run}", "train.progress=true")
    assert p.returncode == 0, p.stderr
    (run / "train.stderr").write_text(p.stderr)
    return run


# ---------------------------------------------------------------- 1. nothing is overwritten silently
@pytest.mark.slow
def test_1_a_finished_run_is_not_overwritten(finished, tmp_path):
    before = files(finished)
    err = one_line_error(lipnext("train", *TINY, f"run_dir={finished}"), "train", "holds a finished run")
    assert "--overwrite" in err
    err = one_line_error(lipnext("train", *TINY, f"run_dir={finished}", "--resume"), "train",
                         "without checkpoints (train.checkpoint=false), so there is nothing to resume")
    assert "--overwrite" in err
    assert files(finished) == before                               # weights, results, metrics untouched
    # a folder of your own: refused, and --overwrite replaces only what lipnext writes
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    one_line_error(lipnext("train", *TINY, f"run_dir={mine}"), "train", "other files (notes.txt)")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    p = lipnext("train", *TINY, f"run_dir={mine}", "--overwrite")
    assert p.returncode == 0, p.stderr
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "model.safetensors").is_file()


# ---------------------------------------------------------------- 2. one writer per run folder
@pytest.mark.slow
def test_2_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    run = tmp_path / "run"
    first = spawn("train", *TINY, f"run_dir={run}", "train.epochs=300")
    try:
        deadline = time.time() + 120
        while not (run / "run.json").is_file():                    # the first one holds the folder
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline
            time.sleep(0.1)
        second = lipnext("train", *TINY, f"run_dir={run}", "train.epochs=300")
        one_line_error(second, "train", f"is in use by lipnext train, PID {first.pid}")
        assert first.poll() is None                                 # the first one carries on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run / ".lipnext.lock").is_file()                        # left by the SIGKILL, but unlocked
    p = lipnext("train", *TINY, f"run_dir={run}", "train.epochs=300", "--resume", "train.stop_at_step=0")
    assert p.returncode == 0, p.stderr                              # no stale lock


@pytest.mark.slow
def test_2_certify_out_verify_and_study_take_the_lock(finished, tmp_path):
    from lipnext.runlock import run_lock

    study = tmp_path / "s.yaml"
    study.write_text(f"base: {REPO / 'configs' / 'demo.yaml'}\nout: {tmp_path / 'study'}\n"
                     "overrides: {train.epochs: 1, train.batch_size: 128}\n")
    me = f"PID {os.getpid()}"
    with run_lock(finished, "the test"):
        one_line_error(lipnext("certify", finished, "--out", finished / "again.json"), "certify", me)
        one_line_error(lipnext("verify", finished, "--budget", "10"), "verify", me)
        assert not (finished / "again.json").exists() and not (finished / "verify.json").exists()
    with run_lock(tmp_path / "study" / "base" / "seed0", "the test"):
        one_line_error(lipnext("study", study), "study", me)


# ---------------------------------------------------------------- 3. --resume takes overrides on both sides
@pytest.mark.slow
def test_3_the_printed_resume_command_takes_more_overrides(tmp_path):
    run = tmp_path / "run"
    p = lipnext("train", *TINY, f"run_dir={run}", "train.checkpoint=true", "train.stop_at_step=4", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    again = p.stdout.rstrip().splitlines()[-1].strip()
    assert again.startswith("lipnext train ") and again.endswith(" --resume"), p.stdout
    p = lipnext(*shlex.split(again)[1:], "train.epochs=2", cwd=tmp_path)           # + an override after it
    assert p.returncode == 0, p.stderr
    assert json.loads((run / "results.json").read_text())["steps"] == 22          # 2 epochs of 11 steps


def test_3_a_usage_error_shows_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: lipnext train" in err and "unrecognized arguments: --bogus" in err


def documented_commands() -> list[str]:
    """Every complete `lipnext ...` (or `-m lipnext...`) command in README.md and docs/*.md code blocks."""
    out = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", path.read_text(), re.M | re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                m = re.search(r"(?:^lipnext|-m lipnext(?:\.cli)?) (.*)", line)
                if m and not re.search(r"[<\[|]|\.\.\.", m.group(1)):
                    out.append(m.group(1))
    return out


def test_3_every_documented_command_parses():
    commands = documented_commands()
    assert len(commands) > 20 and any("--resume train.epochs" in c for c in commands)
    for c in commands:
        args = cli.parse_args(shlex.split(c))
        assert args.command, c


# ---------------------------------------------------------------- 4. filesystem failures
def test_4_run_dir_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    cli_error(capsys, ["train", *TINY, f"run_dir={tmp_path / 'f'}"], "is a file, not a folder")


@pytest.mark.slow
def test_4_full_disk_at_a_checkpoint_keeps_the_last_one_and_resumes(tmp_path):
    (tmp_path / "enospc.py").write_text(ENOSPC)
    run = tmp_path / "run"
    args = ["--import", "enospc", "train", *TINY, f"run_dir={run}", "train.checkpoint=true", "train.checkpoint_every_steps=3",
            "train.keep_last=1"]
    p = lipnext(*args, cwd=tmp_path, ENOSPC_AT="3")        # checkpoint 3: calls 1-2; checkpoint 6 dies
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    first, command = p.stderr.splitlines()
    assert first.startswith("lipnext train: error: cannot write checkpoint ") and "step_00000006" in first
    assert "No space left on device; training stopped at step 6 of 11; the last complete " \
           "checkpoint is" in first and first.endswith("step_00000003: fix the cause (free some space?), "
                                                         "then continue with --resume:")
    assert [c.name for c in (run / "checkpoints").iterdir()] == ["step_00000003"]   # kept, no .tmp-*
    p = lipnext(*shlex.split(command)[1:], cwd=tmp_path, ENOSPC_AT="0")
    assert p.returncode == 0 and "resumed from step 3 of 11" in p.stdout, p.stderr


@pytest.mark.slow
def test_4_full_disk_at_the_final_save_rescues_the_weights(tmp_path):
    from lipnext.io import load_model

    (tmp_path / "enospc.py").write_text(ENOSPC)
    rescue = tmp_path / "tmp"
    rescue.mkdir()
    run = tmp_path / "run"
    p = lipnext("--import", "enospc", "train", *TINY, f"run_dir={run}", cwd=tmp_path, ENOSPC_AT="1",
                TMPDIR=str(rescue))
    err = one_line_error(p, "train", "the run finished, but model.safetensors (No space left on device) "
                         f"could not be written in {run}; saved instead: ", rc=1)
    assert "clean accuracy" in p.stdout                                # the results reach the terminal
    saved = Path(err.split("saved instead: ")[1].split(",")[0].strip())
    assert saved.parent.parent == rescue and load_model(saved).num_classes == 10
    assert not (run / "model.safetensors").exists() and not list(run.glob(".*.tmp"))
    assert json.loads((run / "run.json").read_text())["state"] == "incomplete"


@pytest.mark.slow
def test_4_read_only_and_full_mounts(finished, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if not mount("--bind", str(finished), str(ro)):
        pytest.skip("mount is not allowed here (the injected errors above cover the write sites)")
    try:
        assert mount("-o", "remount,ro,bind", str(ro))
        t0 = time.time()
        one_line_error(lipnext("verify", ro), "verify", f"cannot write in {ro} (its lock file .lipnext.lock): "
                       "Read-only file system; give --out DIR", rc=1)
        assert time.time() - t0 < 60                                # at once, not after the checks
        one_line_error(lipnext("train", *TINY, f"run_dir={ro / 'new'}"), "train",
                       f"cannot create the folder {ro / 'new'}: Read-only file system", rc=1)
    finally:
        umount(ro)
    full = tmp_path / "full"
    full.mkdir()
    if not mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)):
        pytest.skip("tmpfs mounts are not allowed here")
    try:
        fd = os.open(full / "ballast", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError, match="No space left"):
                while True:                                         # fill the disk
                    os.write(fd, bytes(4096))
        finally:
            os.close(fd)
        one_line_error(lipnext("train", *TINY, f"run_dir={full / 'run'}"), "train",
                       f"cannot write in {full / 'run'} (its lock file .lipnext.lock): No space left on device",
                       rc=1)
        assert sorted(p.name for p in full.iterdir()) == ["ballast"]     # nothing left behind
    finally:
        umount(full)


# ---------------------------------------------------------------- 5. every value validated before work
def test_5_bad_values_are_refused_before_training(tmp_path, capsys):
    run = tmp_path / "run"
    for override, match in [("certify.batch_size=0", "config certify.batch_size=0: must be >= 1"),
                            ("certify.radii=[-1]", "config certify.radii=[-1.0]: must be a non-empty list"),
                            ("loss.eps_255=-1", "config loss.eps_255=-1.0: must be >= 0"),
                            ("augment.cutout=8", "augment.cutout=8 covers the whole 8x8 image")]:
        cli_error(capsys, ["train", *TINY, f"run_dir={run}", override], match)
        assert not run.exists()                                     # nothing started, nothing written


def test_5_certify_arguments_are_checked_first(finished, capsys):
    cli_error(capsys, ["certify", finished, "--radius-unit", "0"], "--radius-unit must be > 0")
    cli_error(capsys, ["certify", finished, "--radii", "nan"], "--radii must be finite radii >= 0")


def test_5_study_dry_run_checks_every_cell(tmp_path, capsys):
    study = tmp_path / "s.yaml"
    study.write_text(f"base: {REPO / 'configs' / 'demo.yaml'}\nout: {tmp_path / 'o'}\n"
                     "grid: {augment.cutout: [2, 100]}\n")
    cli_error(capsys, ["study", study, "--dry-run"], "cell cutout=100: augment.cutout=100 covers the whole")


# ---------------------------------------------------------------- 6. the test split is what it says
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """proj/digits.npz and proj/runs/r trained on it from proj/ (a relative data path), holdout 300."""
    from sklearn.datasets import load_digits

    proj = tmp_path_factory.mktemp("moved") / "proj"
    proj.mkdir()
    d = load_digits()
    np.savez(proj / "digits.npz", x=(d.images * 255 / 16).round().astype(np.uint8), y=d.target)
    p = lipnext("train", *TINY, "data.name=npz:digits.npz", "data.holdout=300", "run_dir=runs/r", cwd=proj)
    assert p.returncode == 0, p.stderr
    return proj


@pytest.mark.slow
def test_6_a_test_split_that_overlaps_training_is_refused(project):
    run = project / "runs" / "r"
    err = one_line_error(lipnext("certify", run, "--holdout", "600", cwd=project), "certify",
                         "300 images of this test split (holdout 600, val_fraction 0) are images")
    assert "data.holdout=300" in err
    p = lipnext("certify", run, cwd=project)
    assert p.returncode == 0 and "test points               300" in p.stdout, p.stderr
    data = json.loads((run / "run.json").read_text())["data"]
    assert data["sha256"] == hashlib.sha256((project / "digits.npz").read_bytes()).hexdigest()
    assert (data["holdout"], data["val_fraction"], data["seed"], data["sizes"]) == \
        (300, 0.0, 0, {"train": 1497, "val": 0, "test": 300})
    assert re.fullmatch(r"[0-9a-f]{64}", data["split_indices_sha256"])


def test_6_official_test_data_accepts_holdout_0(tmp_path):
    import pickle

    from lipnext.data import get_dataset

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [str(i).encode() for i in range(10)]}))
    assert len(get_dataset(f"cifar10:{tmp_path}", "train", holdout=0, val_fraction=0.0)) == 50


# ---------------------------------------------------------------- 7. integrity and provenance
def flip_bytes(path: Path, n: int = 1000) -> None:
    """Flip the lowest byte of n float32 values in the tensor data (values change, none turns NaN)."""
    raw = bytearray(path.read_bytes())
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    spots = [8 + size + start + 4 * k for name, t in header.items() if name != "__metadata__" and t["dtype"] == "F32"
             for start, end in [t["data_offsets"]] for k in range((end - start) // 4)][:n]
    assert len(spots) == n
    for i in spots:
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.slow
def test_7_flipped_bytes_are_refused(finished, tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes((finished / "model.safetensors").read_bytes())
    flip_bytes(damaged)
    one_line_error(lipnext("certify", damaged, "--data", "digits"), "certify",
                   f"{damaged} is damaged: its tensors' sha256 does not match the one recorded when it was saved")


@pytest.mark.slow
def test_7_results_and_run_record_hold_the_provenance(project, tmp_path):
    from safetensors.torch import load_file

    run = project / "runs" / "r"
    assert (run / "run.json").is_file()
    from lipnext.io import tensors_sha256
    record = json.loads((run / "run.json").read_text())
    prov = json.loads((run / "results.json").read_text())["provenance"]
    keys = {"lipnext_version", "git_commit", "torch_version", "device", "data", "config_sha256", "wall_s",
            "cpu_s", "gpu_s", "weights_sha256"}
    assert keys <= set(prov) and keys <= set(record) and record["state"] == "finished"
    assert prov["weights_sha256"] == tensors_sha256(load_file(run / "model.safetensors"))
    assert prov["device"] == "cpu" and prov["gpu_s"] is None and prov["wall_s"] > 0 and prov["cpu_s"] > 0
    assert prov["data"]["path"] == "../../digits.npz" and prov["data"]["path_kind"] == "relative"
    # the project moves (data and run folder together): the run still certifies, from anywhere
    moved = project.parent / "elsewhere"
    project.rename(moved)
    try:
        p = lipnext("certify", moved / "runs" / "r", cwd=tmp_path)
        assert p.returncode == 0 and "test points               300" in p.stdout, p.stderr
    finally:
        moved.rename(project)


# ---------------------------------------------------------------- 8. messages on the common paths
def test_8_cuda_unavailable_is_named(finished, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cli_error(capsys, ["certify", finished, "--device", "cuda"], "--device cuda: CUDA is not available here")


@pytest.mark.slow
def test_8_a_closed_pipe_ends_quietly(tmp_path):
    import yaml

    study = tmp_path / "s.yaml"                       # 4 lines of 45 kB: more than a pipe holds
    study.write_text(yaml.safe_dump({"base": str(REPO / "configs" / "demo.yaml"), "out": str(tmp_path / "o"),
                                     "seeds": 4, "cells": [{"name": "long", "set": ["train.epochs=1"] * 3000}]}))
    p = subprocess.run(f"{shlex.quote(sys.executable)} -c {shlex.quote(MAIN)} study {study} --dry-run | head -3",
                       shell=True, env=env(), capture_output=True, text=True, timeout=300)
    assert p.stdout.count("\n") == 3 and p.stdout.startswith("   to do  ") and p.stderr == "", p.stderr[-2000:]


def test_8_mistakes_name_what_is_wrong(tmp_path, capsys):
    cli_error(capsys, ["models", "zzz"], "no model name contains 'zzz'; the families are")
    listed = tmp_path / "list.yaml"
    listed.write_text("- train.epochs=3\n")
    cli_error(capsys, ["train", "--config", listed], f"config {listed} must be a YAML mapping")
    noise = tmp_path / "noise.npz"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    cli_error(capsys, ["train", *TINY, f"data.name={noise}", f"run_dir={tmp_path / 'r'}"],
              f"{noise} is not a valid .npz file (not a zip archive)")
    assert "allow_pickle" not in capsys.readouterr().err


@pytest.mark.slow
def test_8_progress_off_a_terminal_is_periodic_lines(finished):
    err = (finished / "train.stderr").read_text()
    lines = [line for line in err.splitlines() if line.startswith("train lipnext_l8w128: ")]
    assert "\r" not in err and 2 <= len(lines) <= 12 and lines[-1].startswith("train lipnext_l8w128: 11/11 steps")


def test_8_make_demo_says_how_to_reach_lipnext():
    p = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "VENV": "/nonexistent/venv"})
    assert ". /nonexistent/venv/bin/activate" in p.stdout and "demo --overwrite" in p.stdout, p.stdout + p.stderr


def _plot(tmp_path, correct: float, scale: float, title: str, marks, labels):
    """The certified-accuracy figure of synthetic certificates, drawn (for text extents)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.figure
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from lipnext.certify import Certificate
    from lipnext.report import plot_certified_accuracy

    g = torch.Generator().manual_seed(0)
    n = 500
    ok = torch.rand(n, generator=g) < correct
    r = torch.where(ok, torch.rand(n, generator=g, dtype=torch.float64) * scale, torch.zeros(n, dtype=torch.float64))
    seen, real = {}, matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        seen["fig"] = fig
        return real(fig, *a, **k)
    matplotlib.figure.Figure.savefig = spy
    try:
        plot_certified_accuracy(Certificate(r, ok, torch.zeros(n, dtype=torch.long), r, 1.0, "pairwise"),
                                tmp_path / "p.png", title=title, marks=marks, mark_labels=labels)
    finally:
        matplotlib.figure.Figure.savefig = real
    fig = seen["fig"]
    FigureCanvasAgg(fig).draw()                           # the figure was closed: a canvas again
    return fig


@pytest.mark.parametrize("correct,scale", [(0.93, 1.3), (0.45, 1.2)])
def test_8_plot_labels_stay_off_the_curve_and_the_title_fits(tmp_path, correct, scale):
    title = "lipnext_l8w128 on npz:../shared/data/cifar10-subset.npz (test, 1000 images)"
    fig = _plot(tmp_path, correct, scale, title, [0.25, 0.5, 0.75], ["0.25", "0.5", "0.75"])
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    curve = ax.lines[0]
    points = ax.transData.transform(np.column_stack(curve.get_data()))
    for text in ax.texts:
        box = text.get_window_extent(renderer)
        inside = ((points[:, 0] > box.x0) & (points[:, 0] < box.x1) & (points[:, 1] > box.y0) & (points[:, 1] < box.y1))
        assert not inside.any(), f"{text.get_text()!r} sits on the curve"
    title_box = ax.title.get_window_extent(renderer)
    assert title_box.x0 >= 0 and title_box.x1 <= fig.bbox.x1 and title_box.y1 <= fig.bbox.y1


@pytest.mark.distributed
def test_8_fsdp_prints_no_view_warning(tmp_path):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lipnext.cli",
                        "train", *TINY, f"run_dir={tmp_path / 'run'}", "dist.strategy=fsdp"],
                       env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "returned a view tensor" not in p.stderr and "clean accuracy" in p.stdout
