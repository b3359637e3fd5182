"""The embedded default: train a small LipNeXt on scikit-learn's digits, certify it.

A thin call into the training engine (``lipnext.engine.train``) with the recipe of
``configs/demo.yaml``: 1,797 real 8x8 grey images, the last 360 held out for
certification; lipnext_l8w128 (patch 4 -> a 2x2 token grid) trained with EMMA and
ManifoldAdam (NAdam + manifold Lookahead) on randomly translated images, polar-retracted,
certified, and written to a run folder (weights, config, metrics, results, plot).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

__all__ = ["DemoConfig", "DEMO_RECIPE", "demo_config", "run_demo", "print_results"]

# the same recipe as configs/demo.yaml (a test checks that they agree)
DEMO_RECIPE = [
    "data.name=digits", "data.holdout=360", "data.val_fraction=0.0",
    "augment.crop_padding=1", "augment.pad_mode=zeros", "augment.flip=false",
    "model.kwargs={patch_size: 4}", "optim.lr=5e-3",
    "loss.name=emma", "loss.eps_255=63.75", "loss.eps_end=1.0", "train.batch_size=64", "train.eval_every=0",
    "train.checkpoint=false", "train.log_every=10", "certify.radii=[0.25, 0.5, 0.75]",
    "certify.radius_unit=1",
]


@dataclass
class DemoConfig:
    model: str = "lipnext_l8w128"
    epochs: int = 60
    seed: int = 0
    out: str = "runs/demo"
    threads: int | None = 1      # torch CPU threads; 1: the figures repeat bit for bit on a machine
    overwrite: bool = False      # replace a previous run in ``out`` (else a non-empty ``out`` is refused)


def demo_config(cfg: DemoConfig, progress: bool = True) -> Config:
    """The engine config of the demo."""
    from .config import load_config

    return load_config(None, DEMO_RECIPE + [
        f"model.name={cfg.model}", f"train.epochs={cfg.epochs}", f"train.seed={cfg.seed}",
        f"run_dir={cfg.out}", f"train.progress={str(progress).lower()}",
        f"overwrite={str(cfg.overwrite).lower()}"])


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Train, retract, certify; write the run folder; return the results dict.

    With ``cfg.threads`` set, torch uses that many CPU threads for the run (then the
    previous number again): float32 sums split over another number of threads round
    differently, and the training diverges from there (docs/RESULTS.md, The digits demo)."""
    import torch

    from .engine import train

    before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return train(demo_config(cfg, progress))
    finally:
        torch.set_num_threads(before)


def print_results(results: dict, out: str) -> None:
    """The engine prints the table, where the model card is and the run folder; list what it holds."""
    from .card import CARD_NAME, README_NAME, SAMPLES_NAME

    print(f"  {out} holds model.safetensors, config.yaml, results.json, metrics.jsonl, "
          f"certified_accuracy.png, {SAMPLES_NAME} and the model card ({README_NAME}, {CARD_NAME})")
