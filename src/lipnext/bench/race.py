"""Budget race: every model is trained by the trainer (``lipnext.engine``) on the same data
for the same wall-clock budget (``train.budget_s``), then certified on the same held-out images.

Equal treatment: one (seed, step) batch plan and augmentation stream (model k sees exactly
the batches model j saw, only fewer or more of them), the EMMA loss with the training eps
ramped by ``eps_schedule``, ``build_optimizer`` (NAdam + Lookahead; the manifold rule for
LipNeXt's orthogonal weights, plain NAdam for the baselines' weights), gradient clipping at
3, and the trainer's learning rate (``lr_factor``: linear warm-up, then cosine decay). Under
a budget the schedules run on the share of the budget used, so each model sees a complete
schedule. The Lipschitz bound used by EMMA is re-measured every ``bound_every`` steps (its
cost counts in the budget); orthogonal weights are polar-retracted after every epoch and
before certification. ``cpu_s`` (process CPU time of the training loop, all threads) shows
how much of the machine a model actually got when the machine is shared.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config, config_from_dict
from ..engine import train
from ..io import atomic_write, load_model

__all__ = ["RaceConfig", "race_config", "race_one", "run_race", "race_table"]

EPS_LIST = (36 / 255, 72 / 255, 108 / 255, 1.0)
EPOCHS = 10 ** 6            # the budget ends every race long before this many epochs


@dataclass
class RaceConfig:
    data: str
    holdout: int = 1000
    budget_s: float = 600.0
    batch: int = 128
    lr: float = 1e-3
    eps: float = 36 / 255
    warmup_fraction: float = 0.05
    grad_clip: float = 3.0
    bound_every: int = 50
    seed: int = 0
    threads: int | None = None
    eps_list: Sequence[float] = field(default_factory=lambda: list(EPS_LIST))


def race_config(name: str, cfg: RaceConfig, run_dir: str | Path) -> Config:
    """The training config of model ``name`` in the race: ``cfg``'s budget, data and optimizer,
    no checkpoints or validation, the test split certified at ``cfg.eps_list``; a rerun
    replaces the model's run folder (``overwrite``, which the trainer reports)."""
    return config_from_dict({
        "run_dir": str(run_dir), "overwrite": True,        # a rerun of the race replaces its runs
        "data": {"name": cfg.data, "holdout": cfg.holdout, "val_fraction": 0.0},
        "model": {"name": name},
        "optim": {"lr": cfg.lr, "grad_clip": cfg.grad_clip, "warmup_epochs": cfg.warmup_fraction * EPOCHS},
        "loss": {"eps_255": cfg.eps * 255, "lipschitz_every": cfg.bound_every},
        "train": {"epochs": EPOCHS, "budget_s": cfg.budget_s, "batch_size": cfg.batch, "seed": cfg.seed,
                  "checkpoint": False, "eval_every": 0, "log_every": 20, "progress": False,
                  "tensorboard": False},
        "certify": {"radii": [e * 255 for e in cfg.eps_list], "radius_unit": 255.0, "split": "test"}})


def race_one(name: str, cfg: RaceConfig, out_dir: str | Path,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train model ``name`` for cfg.budget_s seconds of wall clock, then certify it (its run
    folder: ``out_dir/name``)."""
    run_dir = Path(out_dir) / name
    log(f"{name}: training for {cfg.budget_s:g} s in {run_dir}")
    res = train(race_config(name, cfg, run_dir))
    model = load_model(run_dir)
    steps_per_epoch = res["total_steps"] // res["epochs"]
    result = {"model": name, "arch": model.arch, "params": sum(p.numel() for p in model.parameters()),
              "steps": res["steps"], "epochs": round(res["steps"] / steps_per_epoch, 2),
              "train_s": res["train_time_s"], "cpu_s": res["loop_cpu_s"],
              "step_s": round(res["train_time_s"] / max(res["steps"], 1), 3), "clean": res["clean_accuracy"],
              "cra": dict(zip(_labels(cfg), res["cra"].values())), "lipschitz": res["lipschitz_bound"], "rule": res["rule"], "n_test": res["n"]}
    log(f"{name}: done {json.dumps(result)}")
    return result


def _labels(cfg: RaceConfig) -> list[str]:
    return [f"{e * 255:.0f}/255" for e in cfg.eps_list]


def race_table(results: list[dict[str, Any]], cfg: RaceConfig) -> str:
    """Markdown table of clean accuracy and CRA (%), steps and bound, per model."""
    eps_cols = _labels(cfg)
    head = ("| model | params | steps | epochs | s/step | CPU s | clean | "
            + " | ".join(f"CRA {c}" for c in eps_cols) + " | L (bound) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cra = " | ".join(f"{100 * r['cra'][c]:.1f}" for c in eps_cols)
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['epochs']} | "
                     f"{r['step_s']:.2f} | {r.get('cpu_s', '-')} | {100 * r['clean']:.1f} | {cra} | "
                     f"{r['lipschitz']:.4f} |")
    return "\n".join(lines) + "\n"


def run_race(models: Sequence[str], cfg: RaceConfig, out_dir: str | Path,
             log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Race ``models`` one after the other; write race.json and race.md after each."""
    out = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    meta = {"config": asdict(cfg) | {"eps_list": list(cfg.eps_list)}, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results: list[dict[str, Any]] = []
    for name in models:
        results.append(race_one(name, cfg, out, log))
        payload = json.dumps({**meta, "results": results}, indent=2)
        atomic_write(out / "race.json", lambda p: Path(p).write_text(payload))
        table = race_table(results, cfg)
        atomic_write(out / "race.md", lambda p: Path(p).write_text(table))
    return results
