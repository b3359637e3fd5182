"""Studies: one base config, a grid (or a list) of overrides, several seeds.

Each (cell, seed) is one ordinary training run through ``lipnext.engine.train`` in
``<out>/<cell>/seed<k>/``, with ``resume=true`` and checkpoints on, so a study that was
stopped (killed, a full disk, the end of a session) continues where it was: a run with a
``study_record.json`` is finished and skipped, a run with a checkpoint resumes from it.
Every cell is checked when the study file is loaded (its config, and against its data: the
model builds, the augmentation fits the images), so a bad grid value fails before the first
run, ``--dry-run`` included. Each run's folder is locked while it runs (``lipnext.runlock``):
two processes never run the same run. The summary
is one table (``study.md``, ``study.csv``, ``study.json``) and one plot (``study.png``):
for each cell the mean and the spread over seeds of clean accuracy, certified robust
accuracy at each radius, training time, and the parameter count.

A study file (YAML):

    name: alpha
    base: configs/cifar10_subset_cpu.yaml   # the config every run starts from (path from the cwd)
    out: runs/studies/alpha                 # default runs/studies/<name>
    seeds: 2                                # or a list, e.g. [0, 1, 2]
    overrides: [train.epochs=5]             # or a mapping; applied to every cell
    grid:                                   # Cartesian product of these values
      model.kwargs.alpha: [0.0, 0.0625, 0.125, 0.25]
    cells:                                  # and/or named cells (each a mapping of overrides)
      - {name: base, set: {}}

With both ``grid`` and ``cells`` the cells are the product (each cell x each grid point).
"""
from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from .config import Config, check_image_size, config_from_dict, dataset_options, load_config
from .io import atomic_write
from .report import write_json
from .runlock import run_lock

__all__ = ["Cell", "Study", "load_study", "run_study", "collect", "summarize", "format_markdown",
           "write_outputs"]

RUN_FILE = "study_record.json"  # a finished run's record in the study (the marker that it is finished)
LEGACY_RUN_FILE = "run.json"    # the same, as lipnext <= 0.1.0 wrote it (holds "cell"; read only)
FAILED_FILE = "failed.json"     # a run that diverged (skipped on a rerun; delete it to retry)
_KEYS = {"name", "description", "base", "out", "seeds", "overrides", "grid", "cells"}


@dataclass
class Cell:
    """One point of the study: a name and its dotted overrides."""
    name: str
    overrides: list[str]


@dataclass
class Study:
    name: str
    base: str | None
    out: Path
    seeds: list[int]
    overrides: list[str]
    cells: list[Cell]
    description: str = ""
    extra: list[str] = field(default_factory=list)   # command-line overrides, after the cell's

    def runs(self) -> list[tuple[Cell, int]]:
        """Every (cell, seed), in the order they run."""
        return [(c, s) for c in self.cells for s in self.seeds]

    def run_dir(self, cell: Cell, seed: int) -> Path:
        return self.out / cell.name / f"seed{seed}"

    def config(self, cell: Cell, seed: int) -> Config:
        """The run's config: base <- study overrides <- cell <- command line <- seed, run_dir,
        resume=true, checkpoints on (a stopped study resumes)."""
        return load_config(self.base, ["train.progress=false", *self.overrides, *cell.overrides,
                                       *self.extra, f"train.seed={seed}",
                                       f"run_dir={self.run_dir(cell, seed)}", "resume=true",
                                       "train.checkpoint=true"])


def _value(v: Any) -> str:
    """A value as the right-hand side of a dotted override (JSON is YAML)."""
    return json.dumps(v)


def _label(v: Any) -> str:
    """A value as it reads in a cell name: text as is, the rest as JSON."""
    return v if isinstance(v, str) else json.dumps(v)


def _overrides(spec: Any, where: str) -> list[str]:
    """A list of 'key=value' strings, or a mapping rendered as such."""
    if spec is None:
        return []
    if isinstance(spec, dict):
        return [f"{k}={_value(v)}" for k, v in spec.items()]
    if isinstance(spec, list) and all(isinstance(o, str) for o in spec):
        return list(spec)
    raise ValueError(f"{where} must be a list of key=value strings or a mapping, got {spec!r}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+,-]+", "_", text).strip("_")[:80] or "base"


def _short(key: str) -> str:
    """'model.kwargs.alpha' -> 'alpha'."""
    return key.rsplit(".", 1)[-1]


def load_study(path: str | Path, extra: list[str] | None = None) -> Study:
    """Read and check a study file; ``extra`` are overrides applied to every run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no study file at {path} (see studies/*.yaml)")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"cannot read study {path}: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"study {path} must be a YAML mapping with keys {sorted(_KEYS)}")
    unknown = set(spec) - _KEYS
    if unknown:
        raise ValueError(f"study {path}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    name = str(spec.get("name") or path.stem)
    seeds = spec.get("seeds", 1)
    seeds = list(range(seeds)) if isinstance(seeds, int) else seeds
    if not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"study {path}: seeds must be a count >= 1 or a list of distinct ints, "
                         f"got {spec.get('seeds')!r}")

    named: list[Cell] = []
    for i, c in enumerate(spec.get("cells") or []):
        if not isinstance(c, dict) or set(c) - {"name", "set"}:
            raise ValueError(f"study {path}: cells[{i}] must be a mapping with 'name' and 'set'")
        ov = _overrides(c.get("set"), f"cells[{i}].set")
        named.append(Cell(str(c.get("name") or ",".join(ov) or "base"), ov))
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"study {path}: grid must map each dotted key to a non-empty list of values")
    points = [Cell(",".join(f"{_short(k)}={_label(v)}" for k, v in zip(grid, vals)),
                   [f"{k}={_value(v)}" for k, v in zip(grid, vals)])
              for vals in itertools.product(*grid.values())] if grid else []
    if named and points:
        cells = [Cell(f"{a.name}__{b.name}", a.overrides + b.overrides) for a in named for b in points]
    else:
        cells = named or points or [Cell("base", [])]
    cells = [Cell(_slug(c.name), c.overrides) for c in cells]
    dup = {c.name for c in cells if [d.name for d in cells].count(c.name) > 1}
    if dup:
        raise ValueError(f"study {path}: cell names must be distinct, repeated: {sorted(dup)}")
    base = spec.get("base")
    if base is not None and not Path(base).is_file():
        raise FileNotFoundError(f"study {path}: no base config at {base} (paths are relative to "
                                "the directory you run lipnext from)")
    study = Study(name, base, Path(spec.get("out") or f"runs/studies/{_slug(name)}"), seeds,
                  _overrides(spec.get("overrides"), "overrides"), cells,
                  str(spec.get("description") or ""), list(extra or []))
    checked: set[str] = set()
    datasets: dict[str, Any] = {}
    for cell, seed in study.runs():   # every config is valid before anything runs
        cfg = study.config(cell, seed)
        key = json.dumps({k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("run_dir", "train")})
        if key not in checked:
            checked.add(key)
            try:
                check_runnable(cfg, datasets)
            except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
                msg = e.args[0] if isinstance(e, KeyError) and e.args else e
                raise type(e)(f"study {path}, cell {cell.name}: {msg}") from None
    return study


def check_runnable(cfg: Config, datasets: dict[str, Any] | None = None) -> None:
    """What a run checks when it starts, without training: the data opens, the augmentation
    fits its images, the model builds for them (on the meta device: nothing is allocated).
    ``datasets`` caches the training splits across calls."""
    import torch

    from .data import get_dataset
    from .models import create_model

    datasets = {} if datasets is None else datasets
    key = json.dumps([cfg.data.name, dataset_options(cfg)], sort_keys=True)
    if key not in datasets:
        datasets[key] = get_dataset(cfg.data.name, "train", **dataset_options(cfg))
    ds = datasets[key]
    check_image_size(cfg, ds.image_size)
    kwargs = dict(OmegaConf.to_container(cfg.model.kwargs))
    kwargs.setdefault("mean", list(ds.mean))
    with torch.device("meta"):
        create_model(cfg.model.name, num_classes=ds.num_classes, in_chans=ds.in_chans,
                     image_size=ds.image_size, **kwargs)


def run_state(run_dir: Path) -> str:
    """finished | diverged | started | to do."""
    if record(run_dir) is not None:
        return "finished"
    if (run_dir / FAILED_FILE).is_file():
        return "diverged"
    return "started" if run_dir.exists() else "to do"


def record(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's study record (also as lipnext <= 0.1.0 wrote it), else None."""
    if (run_dir / RUN_FILE).is_file():
        return json.loads((run_dir / RUN_FILE).read_text())
    legacy = run_dir / LEGACY_RUN_FILE
    if legacy.is_file() and "cell" in (old := json.loads(legacy.read_text())):
        return old
    return None


def _num_params(run_dir: Path) -> int:
    from .io import load_model
    return sum(p.numel() for p in load_model(run_dir).parameters())


def _check_same_config(run_dir: Path, cfg: Config) -> None:
    """The run's saved config (read through the current schema, so new keys take their
    defaults) must be the one the study gives it now."""
    saved = run_dir / "config.yaml"
    if saved.is_file() and (OmegaConf.to_container(config_from_dict(yaml.safe_load(saved.read_text())))
                            != OmegaConf.to_container(cfg)):
        raise ValueError(f"{run_dir} was started with another config (the study file, the base "
                         "config or the command-line overrides changed); restore them, or give the "
                         "study another 'out' folder")


def run_study(study: Study, shard: tuple[int, int] = (0, 1), log=print) -> list[dict[str, Any]]:
    """Run the study's unfinished runs (those of this shard: index % n == i), one after
    the other; return the records of all finished runs."""
    i, n = shard
    todo = [run for k, run in enumerate(study.runs()) if k % n == i]
    for k, (cell, seed) in enumerate(todo):
        run_dir = study.run_dir(cell, seed)
        with run_lock(run_dir, "lipnext study"):
            _run_one(study, cell, seed, f"[{k + 1}/{len(todo)}] {cell.name} seed {seed}", log)
    return collect(study)


def _run_one(study: Study, cell: Cell, seed: int, tag: str, log) -> None:
    """One run of the study (its folder locked by the caller): skip, resume or start it."""
    from .engine import TrainingDiverged, train
    from .engine.checkpoint import CHECKPOINT_DIR, latest_checkpoint

    run_dir = study.run_dir(cell, seed)
    cfg = study.config(cell, seed)
    _check_same_config(run_dir, cfg)
    if run_state(run_dir) in ("finished", "diverged"):
        log(f"{tag}: done, skipped")
        return
    ckpt = latest_checkpoint(run_dir)
    log(f"{tag}: resuming from {ckpt.name}" if ckpt else f"{tag}: starting")
    t0 = time.perf_counter()
    try:
        results = train(cfg)
    except TrainingDiverged as e:
        write_json({"cell": cell.name, "seed": seed, "error": str(e)}, run_dir / FAILED_FILE)
        log(f"{tag}: diverged ({e}); recorded in {run_dir / FAILED_FILE}")
        return
    rec = {"cell": cell.name, "seed": seed, "overrides": cell.overrides,
           "clean_accuracy": results["clean_accuracy"], "cra": results["cra"],
           "lipschitz_bound": results["lipschitz_bound"], "n": results["n"],
           "train_time_s": results["train_time_s"], "params": _num_params(run_dir),
           "resumed_from": ckpt.name if ckpt else None,
           "wall_s_this_process": round(time.perf_counter() - t0, 1)}
    write_json(rec, run_dir / RUN_FILE)
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)   # the run is final
    log(f"{tag}: clean {100 * rec['clean_accuracy']:.1f}%, train {rec['train_time_s']:.0f} s")


def collect(study: Study) -> list[dict[str, Any]]:
    """The records of the finished runs (and of the diverged ones, with ``failed``)."""
    records = []
    for cell, seed in study.runs():
        d = study.run_dir(cell, seed)
        if (rec := record(d)) is not None:
            records.append(rec)
        elif (d / FAILED_FILE).is_file():
            records.append({"cell": cell.name, "seed": seed, "failed": True})
    return records


def _stats(values: list[float]) -> dict[str, float | None]:
    """mean, sample std (n - 1; None for one value), min, max."""
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    m = sum(values) / len(values)
    std = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": m, "std": std, "min": min(values), "max": max(values)}


def summarize(records: list[dict[str, Any]], cells: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per cell: seeds finished and failed, parameters, and the statistics over seeds
    of clean accuracy, CRA at each radius, training time and the certified Lipschitz bound
    (accuracies as fractions)."""
    order = cells or list(dict.fromkeys(r["cell"] for r in records))
    labels = list(dict.fromkeys(lab for r in records if not r.get("failed") for lab in r["cra"]))
    rows = []
    for name in order:
        done = [r for r in records if r["cell"] == name and not r.get("failed")]
        rows.append({"cell": name, "overrides": done[0]["overrides"] if done else None,
                     "n": len(done), "failed": sum(1 for r in records if r["cell"] == name and r.get("failed")),
                     "params": done[0]["params"] if done else None,
                     "clean": _stats([r["clean_accuracy"] for r in done]),
                     "cra": {lab: _stats([r["cra"][lab] for r in done if lab in r["cra"]]) for lab in labels},
                     "train_time_s": _stats([r["train_time_s"] for r in done]),
                     "lipschitz_bound": _stats([r["lipschitz_bound"] for r in done])})
    return rows


def _pm(s: dict[str, float | None], scale: float = 100.0, digits: int = 1) -> str:
    if s["mean"] is None:
        return "-"
    if s["std"] is None:
        return f"{scale * s['mean']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The table: mean ± sample std over seeds (accuracies in %), and the largest bound L."""
    labels = list(rows[0]["cra"]) if rows else []
    head = ["cell", "seeds", "params", "clean %", *[f"CRA {lab} %" for lab in labels], "train time (s)", "L (max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        seeds = f"{r['n']}" + (f" (+{r['failed']} diverged)" if r["failed"] else "")
        params = f"{r['params']:,}" if r["params"] is not None else "-"
        cells = [r["cell"], seeds, params, _pm(r["clean"]), *[_pm(r["cra"][lab]) for lab in labels],
                 _pm(r["train_time_s"], 1.0, 0),
                 "-" if r["lipschitz_bound"]["max"] is None else f"{r['lipschitz_bound']['max']:.6f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    labels = list(rows[0]["cra"]) if rows else []
    metrics = [("clean", lambda r: r["clean"])] + [(f"cra_{lab}", lambda r, lab=lab: r["cra"][lab])
                                                   for lab in labels] + [("train_time_s", lambda r: r["train_time_s"]),
                                                                    ("lipschitz_bound", lambda r: r["lipschitz_bound"])]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["cell", "overrides", "seeds", "failed", "params"]
               + [f"{m}_{s}" for m, _ in metrics for s in ("mean", "std", "min", "max")])
    for r in rows:
        w.writerow([r["cell"], " ".join(r["overrides"] or []), r["n"], r["failed"], r["params"]]
                   + ["" if get(r)[s] is None else f"{get(r)[s]:.6g}" for _, get in metrics
                      for s in ("mean", "std", "min", "max")])
    return buf.getvalue()


def plot_study(rows: list[dict[str, Any]], records: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Bars: mean clean accuracy and CRA per cell with ± std error bars and the seeds as dots;
    beside them the training time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows[0]["cra"]) if rows else []
    metrics = ["clean"] + labels
    fig, (ax, at) = plt.subplots(1, 2, figsize=(4 + 1.1 * len(rows) * len(metrics) / 3, 4.2), dpi=120,
                                 gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        xs, means, stds = [], [], []
        for i, r in enumerate(rows):
            s = r["clean"] if m == "clean" else r["cra"][m]
            if s["mean"] is None:
                continue
            xs.append(i + (j - (len(metrics) - 1) / 2) * width)
            means.append(100 * s["mean"])
            stds.append(100 * (s["std"] or 0))
            seeds = [rec["clean_accuracy"] if m == "clean" else rec["cra"].get(m) for rec in records
                     if rec["cell"] == r["cell"] and not rec.get("failed")]
            ax.scatter([xs[-1]] * len(seeds), [100 * v for v in seeds], s=6, color="k", zorder=3)
        ax.bar(xs, means, width, yerr=stds, capsize=2, label="clean" if m == "clean" else f"CRA {m}")
    ax.set_xticks(range(len(rows)), [r["cell"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="accuracy on the test split (%)", ylim=(0, 100), title=title)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    t = [r["train_time_s"] for r in rows]
    at.bar(range(len(rows)), [s["mean"] or 0 for s in t], yerr=[s["std"] or 0 for s in t], capsize=2,
           color="grey")
    at.set_xticks(range(len(rows)), [r["cell"] for r in rows], rotation=30, ha="right", fontsize=7)
    at.set(ylabel="training time (s)", title="time")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def write_outputs(study: Study, records: list[dict[str, Any]]) -> dict[str, Path]:
    """study.md, study.csv, study.json and study.png in the study's out folder."""
    rows = summarize(records, [c.name for c in study.cells])
    out = study.out
    out.mkdir(parents=True, exist_ok=True)
    md = (f"# Study {study.name}\n\n{study.description.strip()}\n\n"
          f"Mean ± sample standard deviation over seeds {study.seeds}; accuracies in % of the "
          f"test split.\n\n" + format_markdown(rows) + "\ncells:\n\n"
          + "".join(f"- `{c.name}`: `{' '.join(c.overrides) or '(base)'}`\n" for c in study.cells))
    paths = {"md": out / "study.md", "csv": out / "study.csv", "json": out / "study.json"}
    atomic_write(paths["md"], lambda t: Path(t).write_text(md))
    atomic_write(paths["csv"], lambda t: Path(t).write_text(_csv(rows)))
    write_json({"name": study.name, "base": study.base, "seeds": study.seeds,
                "overrides": study.overrides + study.extra, "rows": rows, "runs": records}, paths["json"])
    try:
        paths["png"] = plot_study(rows, records, out / "study.png", study.name)
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'lipnext[demo]')")
    return paths
