"""The stages of the GPU check that run lipnext as a user does, in subprocesses:

* ``train``: a short ``lipnext train`` with every CUDA default (bf16 autocast, compiled blocks,
  TF32 optimizer products, Newton–Schulz retraction; forced on the CPU under ``--smoke``),
  killed with SIGKILL after a checkpoint and resumed: the resumed run must end with exactly the
  weights and losses of an uninterrupted one.
* ``tests``: ``pytest -m gpu``, the tests that only a GPU can run (skipped without CUDA).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..engine.metrics import read_metrics
from .gpu_context import StageContext

__all__ = ["stage_tests", "stage_train"]

_TRAIN = ["data.name=digits", "model.name=lipnext_l4w64", "model.kwargs={depth: 2, width: 64, patch_size: 2}",
          "augment.crop_padding=1", "train.batch_size=120", "train.epochs=2", "optim.warmup_epochs=0.5",
          "train.progress=false", "train.tensorboard=false", "train.log_every=1", "train.eval_every=0",
          "certify.radii=[36]", "train.checkpoint_every_steps=10"]
#: what auto means on CUDA, asked for by name under --smoke (the same code paths on the CPU)
_CUDA_DEFAULTS = ["train.device=cpu", "train.precision=bf16", "train.compile=true", "optim.precision=tf32",
                  "train.retraction=newton_schulz"]
_KILL_AFTER = 10          # the checkpoint after which the second run is killed


def _lipnext(*args: str) -> list[str]:
    return [sys.executable, "-m", "lipnext.cli", *args]


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:4])} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def stage_train(ctx: StageContext) -> None:
    extra = _CUDA_DEFAULTS if ctx.smoke else []
    with tempfile.TemporaryDirectory(prefix="lipnext-gpu-train-") as tmp:
        whole, resumed = Path(tmp) / "whole", Path(tmp) / "resumed"
        t0 = time.perf_counter()
        proc = _run(_lipnext("train", *_TRAIN, *extra, f"run_dir={whole}"), timeout=600)
        ctx.record(uninterrupted_s=time.perf_counter() - t0, banner=proc.stdout.splitlines()[:2])
        killed_at, stderr = _kill_after_checkpoint(_lipnext("train", *_TRAIN, *extra, f"run_dir={resumed}"),
                                                   resumed / "checkpoints" / f"step_{_KILL_AFTER:08d}")
        ctx.record(killed_after_step=killed_at)
        if not ctx.check("killed mid-run", killed_at is not None and killed_at < len(_losses(whole)),
                         f"SIGKILL after step {killed_at} of {len(_losses(whole))}"):
            ctx.record(stderr_of_the_killed_run=stderr)
            return
        _run(_lipnext("train", "--config", str(resumed / "config.yaml"), "--resume"), timeout=600)
        a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
        diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        losses_a, losses_b = _losses(whole), _losses(resumed)
        ctx.record(max_weight_diff=diff, steps=len(losses_a), final_loss=losses_a[-1],
                   config=(whole / "config.yaml").read_text())
        ctx.check("CUDA defaults in effect", ctx.smoke or _defaults_on_cuda(proc.stdout),
                  "bf16 on cuda (banner)")
        ctx.check("exact resume after SIGKILL", same and losses_a == losses_b,
                  f"weights identical: {same} (max diff {diff:.1e}); losses of all {len(losses_a)} steps "
                  f"identical: {losses_a == losses_b}")


def _defaults_on_cuda(banner: str) -> bool:
    return "cuda" in banner and "bf16" in banner


def _kill_after_checkpoint(cmd: list[str], checkpoint: Path, timeout: float = 600) -> tuple[int | None, str]:
    """Start ``cmd``, SIGKILL it as soon as ``checkpoint`` exists: (the last step it logged, or
    None if it ended first; the end of its stderr)."""
    log = checkpoint.parents[2] / f"{checkpoint.parents[1].name}.stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=os.environ.copy())
        deadline = time.monotonic() + timeout
        killed_at = None
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if checkpoint.is_dir():
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    steps = read_metrics(checkpoint.parents[1] / "metrics.jsonl")
                    killed_at = max(r["step"] for r in steps if r["kind"] == "train")
                    break
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return killed_at, log.read_text()[-2000:]


def stage_tests(ctx: StageContext) -> None:
    tests = Path(__file__).resolve().parents[3] / "tests"
    if not ctx.check("the test suite is here", tests.is_dir(), str(tests)):
        return
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           str(tests)], capture_output=True, text=True, cwd=tests.parent, env=os.environ.copy())
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    ctx.record(seconds=time.perf_counter() - t0, summary=summary, output=proc.stdout[-4000:])
    ctx.check("pytest -m gpu", proc.returncode == 0, summary)
