"""``lipnext bench gpu``: the GPU check, one command for one GPU in a fixed budget.

Each stage runs in its own process (a crash, a hang or an out-of-memory ends that stage only),
under a deadline: the stages share ``--budget`` seconds (default 470), each at most its own cap,
and one that would start with under ``_MIN_START`` seconds left is skipped. ``gpu.json`` and
``gpu.md`` are rewritten after every stage, and a stage writes its own figures as it goes, so a
run cut off at any point reports what it measured (the stages' own files live in a temporary
folder; ``gpu.json`` holds all of them). Validation comes first, then measurement
(docs/BENCHMARKS.md, GPU check, says what each stage proves):

    env, numerics, compile, train, tests      (bench.gpu_checks, bench.gpu_runs)
    l32w1024, optimizer, 1b, 2b               (bench.gpu_measure)

``--smoke`` runs every stage at tiny sizes on the CPU (the test suite does), so the check
cannot rot between the rare runs on a GPU. Exit status 0 when every stage passed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import atomic_write

__all__ = ["STAGES", "Stage", "run_gpu_check"]

_MIN_START = 10.0           # seconds: a stage is not started with less left


@dataclass(frozen=True)
class Stage:
    name: str
    where: str              # "module:function" of lipnext.bench
    cap_s: float            # the most it may take on one H100 (the deadline may cut it shorter)
    proves: str


STAGES = (
    Stage("env", "gpu_checks:stage_env", 30, "the device, torch and CUDA; bf16, TF32, fp32 GEMM rates "
          "against the datasheet"),
    Stage("numerics", "gpu_checks:stage_numerics", 60, "products within their error bounds, FastExp, "
          "drift over 1,000 steps per precision, Newton-Schulz, bound and certificates = the CPU's"),
    Stage("compile", "gpu_checks:stage_compile", 75, "compiled = eager (fp32, bf16), no recompilation "
          "storm, activation checkpointing around compiled blocks"),
    Stage("train", "gpu_runs:stage_train", 120, "lipnext train with every CUDA default; SIGKILL and an "
          "exact resume"),
    Stage("tests", "gpu_runs:stage_tests", 45, "pytest -m gpu"),
    Stage("l32w1024", "gpu_measure:stage_l32w1024", 90, "L32W1024 at 256 images: images/s, MFU, bytes "
          "per parameter, against the paper's implied rate"),
    Stage("optimizer", "gpu_measure:stage_optimizer", 40, "optimizer seconds per matrix per precision at "
          "C = 1024, 4096, 5792, against the counted FLOPs at peak"),
    Stage("1b", "gpu_measure:stage_1b", 80, "L32W4096 at 128 images per GPU: one block's step and a "
          "whole step"),
    Stage("2b", "gpu_measure:stage_2b", 90, "lipnext_2b on one GPU with checkpointing: the largest batch, "
          "its step time and peak memory"),
)


def _stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(s.name for s in STAGES)}")


def run_gpu_check(out: str | Path, budget: float = 470.0, smoke: bool = False,
                  stages: Sequence[str] | None = None,
                  log: Callable[[str], None] = lambda s: print(s, flush=True)) -> int:
    """Run the stages (all, or those named) each in a subprocess under the deadline; write
    gpu.json and gpu.md after each. 0 if every stage ran passed, else 1."""
    chosen = [_stage(n) for n in stages] if stages else list(STAGES)
    if budget <= 0:
        raise ValueError(f"--budget must be positive, got {budget}")
    if not smoke:
        import torch
        if not torch.cuda.is_available():
            raise ValueError("no CUDA device is available: run this on a GPU, or add --smoke to run "
                             "every stage at tiny sizes on the CPU")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "smoke": smoke,
                              "budget_s": budget, "stages": []}
    with tempfile.TemporaryDirectory(prefix="lipnext-gpu-") as work:
        for stage in chosen:
            left = budget - (time.monotonic() - start)
            if left < _MIN_START:
                row = {"stage": stage.name, "status": "skipped", "detail": f"{left:.0f} s of the budget left"}
            else:
                row = _run_stage(stage, Path(work), smoke, left if smoke else min(left, stage.cap_s))
            report["stages"].append(row)
            report["elapsed_s"] = time.monotonic() - start
            _write(out, report)
            log(f"{stage.name}: {row['status']} ({row.get('seconds', 0):.0f} s) {row.get('detail', '')}".rstrip())
    log(report_markdown(report).split("\n## ")[0])
    return 0 if all(r["status"] == "passed" for r in report["stages"]) else 1


def _run_stage(stage: Stage, work: Path, smoke: bool, timeout: float) -> dict[str, Any]:
    """One stage in its own process group (killed whole at the timeout), writing its figures to
    ``work``; its record."""
    path = work / f"stage_{stage.name}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "lipnext.bench.gpu", "--stage", stage.name, "--out", str(work)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd + (["--smoke"] if smoke else []), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=os.environ.copy())
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        timed_out = True
    row: dict[str, Any] = {"stage": stage.name, "seconds": time.monotonic() - t0, "proves": stage.proves}
    if path.is_file():
        row.update(json.loads(path.read_text()))
    failed = [c["name"] for c in row.get("checks", []) if not c["ok"]]
    if timed_out:
        row.update(status="timed out", detail=f"stopped at {timeout:.0f} s; what it measured is kept")
    elif proc.returncode != 0:
        row.update(status="error", detail=f"exit code {proc.returncode}", stderr=stderr[-4000:])
    elif failed:
        row.update(status="failed", detail="failed: " + "; ".join(failed))
    else:
        row.update(status="passed")
    if stdout.strip():
        row["stdout"] = stdout[-2000:]
    return row


def _write(out: Path, report: dict[str, Any]) -> None:
    payload = json.dumps(report, indent=1, default=str)
    atomic_write(out / "gpu.json", lambda p: Path(p).write_text(payload))
    md = report_markdown(report)
    atomic_write(out / "gpu.md", lambda p: Path(p).write_text(md))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("\n", " ")[:200]


def _flat(figures: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in figures.items():
        if isinstance(value, dict):
            rows += _flat(value, f"{prefix}{key} / ")
        elif value is not None:
            rows.append((f"{prefix}{key}", _fmt(value)))
    return rows


def report_markdown(report: dict[str, Any]) -> str:
    """gpu.md: the stages' status, then each stage's checks and figures."""
    env = next((r.get("results", {}) for r in report["stages"] if r["stage"] == "env"), {})
    lines = [f"# GPU check{' (smoke, CPU)' if report['smoke'] else ''}", "",
             f"{report['date']}; device {env.get('device_name', env.get('device', '?'))}, torch "
             f"{env.get('torch', '?')}, CUDA {env.get('cuda', '-')}; {report.get('elapsed_s', 0):.0f} s of "
             f"a {report['budget_s']:.0f} s budget. Every figure below was measured in this run unless its "
             "name says computed.", "",
             "| stage | status | s | checks | detail |", "|---|---|---:|---|---|"]
    for r in report["stages"]:
        checks = r.get("checks", [])
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('seconds', 0):.0f} | "
                     f"{sum(c['ok'] for c in checks)}/{len(checks)} | {r.get('detail', '')} |")
    for r in report["stages"]:
        lines += ["", f"## {r['stage']}: {r['status']}", "", r.get("proves", "")]
        lines += [f"- {'ok' if c['ok'] else 'FAILED'}: {c['name']}: {c['detail']}" for c in r.get("checks", [])]
        figures = _flat(r.get("results", {}))
        if figures:
            lines += ["", "| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in figures]
        if "stderr" in r:
            lines += ["", "```", r["stderr"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def _child(argv: Sequence[str] | None = None) -> None:
    """The stage's process: ``python -m lipnext.bench.gpu --stage NAME --out DIR [--smoke]``."""
    p = argparse.ArgumentParser(prog="python -m lipnext.bench.gpu")
    p.add_argument("--stage", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    import torch
    from .gpu_context import StageContext
    stage = _stage(args.stage)
    module, function = stage.where.split(":")
    run = getattr(importlib.import_module(f"lipnext.bench.{module}"), function)
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    run(StageContext(Path(args.out) / f"stage_{stage.name}.json", args.smoke, device))


if __name__ == "__main__":
    _child()
