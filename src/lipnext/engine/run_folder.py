"""The run folder's contract: what a training may start in, and what ``--overwrite`` removes.

A training starts in a folder that is new or empty (the lock file aside). A folder with
checkpoints continues with ``--resume``. Anything else (a finished run, a run killed before
its first checkpoint, files of your own) is refused unless ``--overwrite`` says to replace
it; the refusal says how. ``--overwrite`` removes the files a lipnext run writes
(:data:`RUN_FILES`), nothing else, and only once the new run is built and about to write.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..runlock import LOCK_NAME
from .checkpoint import CHECKPOINT_DIR, list_checkpoints

__all__ = ["RUN_FILES", "FINISHED_FILES", "check_run_dir", "remove_run_files"]

RUN_RECORD = "run.json"
FINISHED_FILES = ("model.safetensors", "results.json")        # a finished run's outputs
RUN_FILES = (*FINISHED_FILES, RUN_RECORD, "config.yaml", "metrics.jsonl", "certified_accuracy.png",
             "tensorboard", CHECKPOINT_DIR, "verify.json", "verify.md")


def _entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME) if run_dir.is_dir() else []


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> str:
    """How a training may use ``run_dir``: ``"new"`` (new or empty), ``"resume"`` (its last
    checkpoint), ``"restart"`` (--resume, but nothing to resume: starts over) or
    ``"overwrite"``; a clear ValueError when it may not."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run_dir {run_dir} is a file, not a folder; choose another run_dir")
    if resume and overwrite:
        raise ValueError("--resume continues the run in run_dir and --overwrite replaces it: choose one")
    entries = _entries(run_dir)
    if not entries:
        return "new"
    if overwrite:
        return "overwrite"
    ckpts = list_checkpoints(run_dir)
    finished = [f for f in FINISHED_FILES if f in entries]
    if resume:
        if ckpts:
            return "resume"
        if finished:
            raise ValueError(f"{run_dir} holds a finished run ({', '.join(finished)}) without "
                             "checkpoints (train.checkpoint=false), so there is nothing to resume; "
                             "pass --overwrite (overwrite=true) to train it again from scratch, "
                             "or choose another run_dir")
        return "restart"
    if ckpts:
        raise ValueError(f"{run_dir} already has checkpoints ({ckpts[-1].name}); pass --resume "
                         "(resume=true) to continue it, --overwrite (overwrite=true) to replace it, "
                         "or choose another run_dir")
    what = (f"a finished run ({', '.join(finished)})" if finished else
            "a run that stopped before its first checkpoint" if set(entries) <= set(RUN_FILES) else
            f"other files ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''})")
    raise ValueError(f"{run_dir} is not empty: it holds {what}; choose another run_dir, or pass "
                     "--overwrite (overwrite=true) to replace "
                     f"{'it' if set(entries) <= set(RUN_FILES) else 'the files lipnext writes there'}")


def remove_run_files(run_dir: Path) -> list[str]:
    """Remove what a lipnext run wrote in ``run_dir`` (:data:`RUN_FILES`); the names removed."""
    removed = []
    for name in RUN_FILES:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed
