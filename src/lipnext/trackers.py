"""Experiment trackers beside TensorBoard: Weights & Biases (``log.wandb``, extra ``wandb``)
and MLflow (``log.mlflow``, extra ``mlflow``).

Each gets what TensorBoard gets, the same scalars under the same names (``<kind>/<name>``,
``<kind>/<name>@<key>`` for a dict such as the CRA at each eps, at the record's step), and
also the run's config at the start and the model card (``model_card.json``, ``README.md``)
and ``results.json`` as artefacts at the end. Rank 0 only.

* W&B: ``wandb.init(project=log.project, name=<run folder name>, dir=<run folder>,
  mode=log.wandb_mode)``; ``log.wandb_mode: offline`` (or ``WANDB_MODE=offline``) writes
  ``<run>/wandb/offline-run-*`` for a later ``wandb sync``.
* MLflow: an experiment named ``log.project`` and a run named after the run folder, on the
  tracking server ``log.mlflow_uri`` (null: ``MLFLOW_TRACKING_URI``, else MLflow's default);
  a file store (``file:DIR``) needs ``MLFLOW_ALLOW_FILE_STORE=true`` in MLflow >= 3.
  Metric names keep ``/``; ``@`` (not allowed there) becomes ``_at_``.
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from .extras import require

__all__ = ["Tracker", "WandbTracker", "MlflowTracker", "open_trackers", "scalars"]


class Tracker(Protocol):
    def log_scalars(self, values: dict[str, float], step: int) -> None: ...
    def log_artifacts(self, paths: Iterable[Path]) -> None: ...
    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record's numbers as tracker scalars, named as in TensorBoard (``kind/name``,
    ``kind/name@key`` for a dict's entries); the step and epoch are left out."""
    kind, out = record.get("kind", "train"), {}
    for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
            out[f"{kind}/{k}"] = float(v)
        elif isinstance(v, dict):
            out.update({f"{kind}/{k}@{kk}": float(vv) for kk, vv in v.items()
                        if isinstance(vv, (int, float)) and not isinstance(vv, bool)})
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class WandbTracker:
    """A W&B run (module doc)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, mode: str | None):
        wandb = require("wandb", "log.wandb")
        self._wandb = wandb
        self.run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=config,
                              mode=mode, reinit="create_new")

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        art = self._wandb.Artifact(re.sub(r"[^\w.-]", "-", f"{self.run.name}-card"), type="model-card")
        for p in paths:
            art.add_file(str(p))
        self.run.log_artifact(art)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run (module doc)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, uri: str | None):
        require("mlflow", "log.mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        try:
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(project)
            self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        except MlflowException as e:                 # a tracking backend that refuses (one line)
            raise ValueError(f"log.mlflow: {str(e).splitlines()[0]}") from None
        params = [Param(k, str(v)[:6000]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):             # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(k.replace("@", "_at_"), v, now, step) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(cfg, run_dir: Path) -> list[Tracker]:
    """The trackers that ``cfg.log`` switches on, started with the run's config."""
    from omegaconf import OmegaConf

    log = cfg.log
    config = OmegaConf.to_container(cfg, resolve=True)
    out: list[Tracker] = []
    if log.wandb:
        out.append(WandbTracker(run_dir, config, log.project, log.wandb_mode))
    if log.mlflow:
        out.append(MlflowTracker(run_dir, config, log.project, log.mlflow_uri))
    return out
