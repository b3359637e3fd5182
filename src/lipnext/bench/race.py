"""Budget race: every model trains on the same data for the same wall-clock budget, then
is certified on the same held-out images.

Equal treatment: one data order and one augmentation stream (a generator seeded with
``seed`` and restarted for every model, so model k sees exactly the batches model j saw,
only fewer or more of them), the EMMA loss with the training eps ramped by
``eps_schedule``, ``build_optimizer`` (NAdam + Lookahead; the manifold rule for LipNeXt's
orthogonal weights, plain NAdam for the baselines' weights), gradient clipping at 3,
and a learning rate with linear warm-up then cosine decay. The schedules run on the
fraction of the budget used, so each model sees a complete schedule. The Lipschitz bound
used by EMMA is re-measured every ``bound_every`` steps (its cost counts in the budget);
orthogonal weights are polar-retracted after every epoch and before certification.
``cpu_s`` (process CPU time over the budget, all threads) shows how much of the machine a
model actually got when the machine is shared.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..certify import certify
from ..data import Augment, get_dataset
from ..io import atomic_write, save_model
from ..losses import emma_loss, eps_schedule
from ..models import create_model
from ..optim import build_optimizer, retract_model

__all__ = ["RaceConfig", "race_one", "run_race", "race_table"]

EPS_LIST = (36 / 255, 72 / 255, 108 / 255, 1.0)


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


def _lr_scale(progress: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of the budget, then cosine to 0."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    t = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return 0.5 * (1 + math.cos(math.pi * t))


def race_one(name: str, cfg: RaceConfig, out_dir: Path | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train model ``name`` for cfg.budget_s seconds of wall clock, then certify it."""
    train = get_dataset(cfg.data, "train", holdout=cfg.holdout, val_fraction=0.0)
    test = get_dataset(cfg.data, "test", holdout=cfg.holdout)
    x, y = train.tensors()
    xt, yt = test.tensors()
    torch.manual_seed(cfg.seed)
    model = create_model(name, num_classes=train.num_classes, in_chans=train.in_chans,
                         image_size=train.image_size, mean=list(train.mean))
    params = sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, lr=cfg.lr)
    base_lr = [g["lr"] for g in opt.param_groups]
    augment = Augment()
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(y)
    steps = seen = 0
    bound_time = 0.0
    lip = model.lipschitz_bound()
    model.train()
    start, cpu0 = time.perf_counter(), time.process_time()
    elapsed = 0.0
    done = False
    while not done:
        perm = torch.randperm(n, generator=gen)
        aug = augment.sample(n, train.image_size, gen)
        for i in range(0, n - cfg.batch + 1, cfg.batch):
            elapsed = time.perf_counter() - start
            if elapsed >= cfg.budget_s:
                done = True
                break
            progress = elapsed / cfg.budget_s
            for g, lr0 in zip(opt.param_groups, base_lr):
                g["lr"] = lr0 * _lr_scale(progress, cfg.warmup_fraction)
            idx = perm[i:i + cfg.batch]
            xb = augment.apply(x[idx], {k: v[i:i + cfg.batch] for k, v in aug.items()})
            if steps and steps % cfg.bound_every == 0:
                t0 = time.perf_counter()
                lip = model.lipschitz_bound()
                bound_time += time.perf_counter() - t0
            loss = emma_loss(model(xb), y[idx], model.head_weight(), lip,
                             eps_schedule(progress, cfg.eps))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            steps += 1
            seen += len(idx)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"{name}: the loss became {loss.item()} at step {steps}")
            if steps % 20 == 0:
                log(f"{name}: step {steps} t={elapsed:.0f}s loss={loss.item():.3f} L={lip:.4f}")
        else:
            retract_model(model)
    train_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu0
    retract_model(model)
    model.eval()
    t0 = time.perf_counter()
    cert = certify(model, xt, yt, rule="pairwise")
    cert_s = time.perf_counter() - t0
    result = {"model": name, "arch": model.arch, "params": params, "steps": steps,
              "epochs": round(seen / n, 2), "train_s": round(train_s, 1), "cpu_s": round(cpu_s, 1),
              "bound_s": round(bound_time, 1), "step_s": round(train_s / max(steps, 1), 3),
              "clean": cert.accuracy, "cra": dict(zip([f"{e * 255:.0f}/255" for e in cfg.eps_list],
                                                      cert.cra(list(cfg.eps_list)))),
              "lipschitz": cert.lipschitz, "rule": cert.rule, "n_test": len(cert),
              "certify_s": round(cert_s, 1)}
    if out_dir is not None:
        save_model(model, Path(out_dir) / name)
    log(f"{name}: done {json.dumps(result)}")
    return result


def race_table(results: list[dict[str, Any]], cfg: RaceConfig) -> str:
    """Markdown table of clean accuracy and CRA (%), steps and bound, per model."""
    eps_cols = [f"{e * 255:.0f}/255" for e in cfg.eps_list]
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
