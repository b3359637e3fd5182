"""The training engine, readable top to bottom (nanoGPT style).

    build: data (batch sources) -> model -> optimizer + step -> batch plan -> resume -> log
    for step in range(start, T):                          (or until train.budget_s is spent)
        lr   = lr * warmup_cosine(step) * lr_scale        (lr_scale halves on each NaN rollback)
        eps  = eps_schedule(step / T) * eps_target        (under a budget: its share used)
        x, y = augment(train_ds.batches(plan(step)))      (in memory or streamed, same call)
        TrainStep: L every N steps, EMMA loss, backward, clip, finite check, ManifoldAdam step
        at each epoch end: polar retraction; certify the val split every eval_every epochs
        checkpoint (atomic) every checkpoint_every epochs / checkpoint_every_steps steps
    polar retraction; save model.safetensors; certify the test split; table, results.json, plot

One process writes a run folder at a time (``lipnext.runlock``); a training starts only in a
new or empty folder, continues one with checkpoints under resume=true, and replaces one only
under overwrite=true (``run_folder``). ``run.json`` records the run (``lipnext.provenance``):
written at the start, rewritten when it is interrupted and when it finishes.

Everything random is a function of (seed, step) (see ``batches``), so a run resumed from a
checkpoint repeats the uninterrupted run exactly on CPU. Under FSDP the model is sharded in
place: each block's bound is computed on the rank that owns it from its gathered fp32 rows
(``engine.distributed.lipschitz_bound``), checkpoints are gathered to the unsharded layout,
and rank 0 certifies an unsharded copy.
"""
from __future__ import annotations

import errno
import functools
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from ..card import write_run_artefacts
from ..config import Config, check_image_size, dataset_options, load_config, to_yaml, warmup_epochs
from ..data import SPLITS, Augment, BatchSource, get_dataset, parse_spec, split_options
from ..io import atomic_write, save_model, tensors_sha256
from ..losses import LOSSES, eps_schedule
from ..models.base import CertifiableModel, check_images
from ..models.lipnext import LipNeXtBlock, compile_mode, compiles, set_compile
from ..models.registry import build_from_config
from ..optim import build_optimizer
from ..program import same_function
from ..progress import progress
from ..provenance import data_record, provenance
from ..report import format_table, plot_certified_accuracy, results_dict, write_json
from ..runlock import RunFolderBusy, run_lock
from ..trackers import open_trackers
from .batches import BatchPlan, additional_data, step_generator
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .evaluate import certify_dataset
from .distributed import (DistInfo, all_true, barrier, broadcast_float, build_model, full_state_dict,
                          is_sharded, setup, sum_float, teardown, wrap_model)
from .metrics import MetricsLog
from .run_folder import RUN_RECORD, check_run_dir, remove_run_files
from .schedule import lr_factor
from .signals import StopOnSignal
from .step import LossHook, TrainStep

__all__ = ["train", "Trainer", "TrainingDiverged", "RunWriteError"]


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient that train.on_nan could not recover from."""


class RunWriteError(OSError):
    """A write in the run folder failed during training (a full disk): the training stopped;
    ``resumable`` says whether a complete checkpoint is there to continue from."""

    resumable = False


def train(cfg: Config | None = None, loss_hook: LossHook | None = None) -> dict[str, Any]:
    """Run the training described by ``cfg`` (single process, or one rank under torchrun).

    Returns the final results dict (on every rank), or ``{"interrupted": True, "step": s}``
    when ``train.stop_at_step`` stopped it (with ``"signal": "SIGINT"`` or ``"SIGTERM"`` when
    a signal did; a checkpoint is written first). ``loss_hook(step, loss) -> loss`` is a test hook.
    """
    cfg = cfg if cfg is not None else load_config()
    created = not dist.is_initialized()
    info, device = setup(cfg.dist.strategy, cfg.dist.backend, cfg.train.device)
    try:
        with _locked(Path(cfg.run_dir), info, device):
            return Trainer(cfg, info, device, loss_hook).run()
    finally:
        teardown(info, created)


@contextmanager
def _locked(run_dir: Path, info: DistInfo, device: torch.device) -> Iterator[None]:
    """Rank 0 holds the run folder's lock (``lipnext.runlock``) for the whole training; when it
    cannot take it, every rank raises (collective)."""
    with ExitStack() as stack:
        error: Exception | None = None
        if info.is_main:
            try:
                stack.enter_context(run_lock(run_dir, "lipnext train"))
            except (RunFolderBusy, OSError) as e:
                error = e
        if not all_true(error is None, info, device):
            raise error or RunFolderBusy(f"rank 0 could not lock {run_dir} (see its message)")
        yield


def radius_label(r: float, unit: float) -> str:
    """36, 255 -> '36/255'; 0.5, 1 -> '0.5'."""
    return f"{r:g}" if unit == 1 else f"{r:g}/{unit:g}"


def _enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them
    (``same_function``: the wrapper computes what the block computes, so certification
    still runs the block's own float64 program)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"train.activation_checkpointing needs a model with .blocks; "
                         f"{type(model).__name__} has none")
    from torch.utils.checkpoint import checkpoint
    for block in blocks:
        block.forward = same_function(functools.partial(checkpoint, block.forward, use_reentrant=False))


def compile_forward(model: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                    mode: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``train.compile``: auto (on CUDA) | true | false. A model with LipNeXt blocks compiles
    each block (``set_compile``: the same path on every device); another model compiles
    ``forward`` as a whole."""
    if any(isinstance(m, LipNeXtBlock) for m in model.modules()):
        set_compile(model, mode)
        return forward
    return torch.compile(forward) if compiles(compile_mode(mode), device) else forward


class Trainer:
    """One training run: ``Trainer(cfg, info, device).run()``. The constructor runs the build
    steps in order; ``run()`` the loop, then the end of training."""

    def __init__(self, cfg: Config, info: DistInfo, device: torch.device,
                 loss_hook: LossHook | None = None):
        self.cfg, self.info, self.device = cfg, info, device
        self.run_dir = Path(cfg.run_dir)
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()
        self._folder = check_run_dir(self.run_dir, cfg.resume, cfg.overwrite)
        self._build_data()
        self._build_model()
        self._build_step(loss_hook)
        self._build_plan()
        resume_step = self._resume()
        barrier(info)                 # every rank has checked the folder before rank 0 writes in it
        self._build_log(resume_step)

    # ---------------------------------------------------------------- build steps
    def _build_data(self) -> None:
        """The train split (a batch source), val if evaluated, and the generated images if mixed in."""
        data = self.cfg.data
        self.train_ds = get_dataset(data.name, "train", **dataset_options(self.cfg))
        self._datasets = {"train": self.train_ds, "val": None}
        self.val_ds = self._dataset("val") if data.val_fraction != 0 and self.cfg.train.eval_every else None
        self.gen_ds = None
        if data.generated and data.generated_fraction > 0:
            ds = self.train_ds
            gen_opts = {"num_classes": ds.num_classes} if parse_spec(data.generated)[0] == "npz" else {}
            self.gen_ds = get_dataset(data.generated, "train", val_fraction=0.0, **gen_opts)
            if ((self.gen_ds.in_chans, self.gen_ds.image_size) != (ds.in_chans, ds.image_size)
                    or self.gen_ds.num_classes > ds.num_classes):
                raise ValueError(f"generated images {self.gen_ds} do not match the real ones {ds}")
        check_image_size(self.cfg, self.train_ds.image_size)

    def _build_model(self) -> None:
        """The model for the data, checked once against its first images (so it skips its
        per-call input checks in the loop), then wrapped for training (DDP / FSDP / compile)."""
        cfg, ds, t = self.cfg, self.train_ds, self.cfg.train
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        kwargs = dict(OmegaConf.to_container(cfg.model.kwargs))
        kwargs.setdefault("mean", list(ds.mean))
        self.model = build_model(cfg.model.name, self.info, self.device, t.seed, num_classes=ds.num_classes,
                                 in_chans=ds.in_chans, image_size=ds.image_size, **kwargs)
        check_images(ds.probe(64)[0], self.model.in_chans, self.model.image_size)
        if t.activation_checkpointing:
            _enable_activation_checkpointing(self.model)
        self.forward = wrap_model(self.model, self.info, self.device, self.bf16)  # FSDP shards in place
        self.sharded = is_sharded(self.model)
        self.forward = compile_forward(self.model, self.forward, t.compile, self.device)

    def _build_step(self, loss_hook: LossHook | None) -> None:
        """The optimizer and the training step that uses it."""
        o, loss = self.cfg.optim, self.cfg.loss
        self.optimizer = build_optimizer(
            self.model, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, nesterov=o.nesterov,
            orthogonal_lr_scale=o.orthogonal_lr_scale, lookahead_k=o.lookahead_k,
            lookahead_alpha=o.lookahead_alpha, update=o["update"], precision=o.precision,
            chunk_size=o.chunk_size)
        self.train_step = TrainStep(self.forward, self.model, self.optimizer, LOSSES[loss.name], self.info,
                                    self.device, self.bf16, o.grad_clip if o.grad_clip > 0 else math.inf,
                                    loss.temperature, loss_hook, o.lie_gradients)

    def _build_plan(self) -> None:
        """The (seed, step) batch plan, the schedules' lengths, augmentation, and the state a
        checkpoint carries besides weights and optimizer."""
        cfg, t = self.cfg, self.cfg.train
        self.plan = BatchPlan(len(self.train_ds), t.batch_size, t.seed, len(self.gen_ds) if self.gen_ds else 0,
                              cfg.data.generated_fraction, self.info.world_size, self.info.rank)
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.total_steps = t.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(warmup_epochs(cfg) * self.steps_per_epoch))
        self.augment = Augment(**OmegaConf.to_container(cfg.augment))
        self._batches, self._batches_step = None, -1
        self.step, self.lr_scale, self.rollbacks, self.elapsed = 0, 1.0, 0, 0.0
        self.lipschitz: float | None = None
        self.stopped_early: int | None = None
        self._resumed_from: Path | None = None
        self.loop_cpu_s = 0.0                 # CPU seconds (all threads) of this process's loop
        self._saved_at: int | None = None     # the step of the last checkpoint written or loaded
        self._prior = {"wall_s": 0.0, "cpu_s": 0.0}   # times of the sessions before a resume

    def _resume(self) -> int | None:
        """Load the last checkpoint of run_dir when the folder check said "resume"."""
        if self._folder != "resume":
            return None
        return self._load(list_checkpoints(self.run_dir)[-1])

    def _build_log(self, resume_step: int | None) -> None:
        """The run folder (the previous run's files removed under overwrite=true), its
        config.yaml and run.json, the banner and the metrics log (rank 0 writes)."""
        if self.info.is_main:
            if self._folder in ("overwrite", "restart"):
                removed = remove_run_files(self.run_dir)
                why = ("overwrite: replacing the run" if self._folder == "overwrite" else
                       "resume: no checkpoint to resume; starting from scratch")
                print(f"{why} in {self.run_dir} (removed {', '.join(removed) or 'nothing'})")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "config.yaml", lambda p: Path(p).write_text(to_yaml(self.cfg)))
            self._data = self._data_record()
            self._write_record("running")
            print(self._banner(), flush=True)
        self.log = MetricsLog(self.run_dir, self.info.is_main, self.cfg.train.tensorboard, resume_step,
                              open_trackers(self.cfg, self.run_dir) if self.info.is_main else ())

    def _dataset(self, split: str) -> BatchSource:
        """The ``split`` of the run's data (loaded once; ValueError if the data has none)."""
        if self._datasets.get(split) is None:
            self._datasets[split] = get_dataset(self.cfg.data.name, split, **dataset_options(self.cfg))
        return self._datasets[split]

    def _split_sizes(self) -> dict[str, int]:
        """The number of images of each split of the run's data (0: the data has no such split)."""
        sizes = {}
        for split in SPLITS:
            try:
                sizes[split] = len(self._dataset(split))
            except (ValueError, FileNotFoundError):
                sizes[split] = 0
        return sizes

    def _data_record(self) -> dict[str, Any]:
        """The data section of run.json: the data's sha256, the effective split, its index hash."""
        d = self.cfg.data
        holdout, val_fraction = split_options(d.name, d.holdout, d.val_fraction)
        n = self._split_sizes()
        pool = n["train"] + n["val"] + (n["test"] if holdout is not None else 0)
        return data_record(d.name, self.run_dir, holdout, val_fraction, self.cfg.train.seed, pool,
                           n["test"] if holdout is None else None)

    def _times(self) -> dict[str, float | None]:
        """wall_s and cpu_s of all sessions of the run so far (CPU: summed over the ranks;
        collective), and gpu_s = wall_s x the GPUs used (None on the CPU)."""
        wall = self._prior["wall_s"] + broadcast_float(time.perf_counter() - self._wall0, self.info, self.device)
        cpu = self._prior["cpu_s"] + sum_float(time.process_time() - self._cpu0, self.info, self.device)
        gpu = wall * self.info.world_size if self.device.type == "cuda" else None
        return {"wall_s": wall, "cpu_s": cpu, "gpu_s": gpu}

    def _write_record(self, state: str, times: dict[str, float | None] | None = None,
                      weights_sha256: str | None = None, path: Path | None = None, **extra: Any) -> None:
        """run.json (rank 0): the provenance, and the run's state (running | interrupted |
        finished | incomplete: finished, but some outputs could not be written)."""
        record = {**provenance(self.device, self._data, self.cfg, weights_sha256=weights_sha256,
                               **(times or {})),
                  "state": state, "step": self.step, "total_steps": self.total_steps,
                  "resumed_from": self._resumed_from.name if self._resumed_from else None,
                  "updated": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
        write_json(record, path or self.run_dir / RUN_RECORD)

    def _banner(self) -> str:
        """What the run is about to do: model, data sizes, steps, run folder, resume point."""
        cfg, spe = self.cfg, self.steps_per_epoch
        n_params = sum(p.numel() for p in self.model.parameters())
        n = self._split_sizes()
        sizes = [f"train {n['train']:,}"] + [f"{split} {n[split]:,}" if n[split] else f"no {split} split"
                                            for split in ("val", "test")]
        lines = [f"lipnext train: {cfg.model.name} ({n_params / 1e6:.2f}M parameters) on {cfg.data.name}, "
                 f"{self.device} {'bf16' if self.bf16 else 'fp32'}, {self.info.world_size} process(es)",
                 f"  images: {', '.join(sizes)}; certify.split={cfg.certify.split} at the end",
                 f"  steps: {spe} per epoch (global batch {cfg.train.batch_size}) x {cfg.train.epochs} "
                 f"epochs = {self.total_steps}, warm-up {self.warmup_steps}",
                 f"  run folder: {self.run_dir}"]
        if cfg.train.budget_s is not None:
            lines.insert(3, f"  budget: {cfg.train.budget_s:g} s; the schedules run on its share used "
                            f"(warm-up {self.warmup_steps / self.total_steps:.1%}), at most these steps")
        if self.step:
            lines.append(f"  resumed from step {self.step} of {self.total_steps} "
                         f"(epoch {self.step / spe:g}; {self._resumed_from})")
        return "\n".join(lines)

    # ---------------------------------------------------------------- checkpoints
    def _load(self, path: Path) -> int:
        state = load_checkpoint(path, self.model, self.optimizer)
        old_total, spe = state.get("total_steps"), state.get("steps_per_epoch")
        if spe is None and old_total != self.total_steps:      # a checkpoint of lipnext <= 0.1.0
            raise ValueError(f"checkpoint {path} belongs to a run of {old_total} steps, this "
                             f"config gives {self.total_steps}; keep train.epochs and train.batch_size")
        if spe is not None and spe != self.steps_per_epoch:
            raise ValueError(f"checkpoint {path} belongs to a run of {spe} steps per epoch, this config "
                             f"gives {self.steps_per_epoch}; keep train.batch_size and the data of the "
                             "original run (train.epochs may change)")
        if state["step"] > self.total_steps:
            raise ValueError(f"checkpoint {path} is at step {state['step']}, beyond the "
                             f"{self.total_steps} steps of train.epochs={self.cfg.train.epochs}; "
                             f"set train.epochs >= {math.ceil(state['step'] / self.steps_per_epoch)}")
        if old_total != self.total_steps and self.info.is_main:
            print(f"resume: the run had {old_total} steps ({old_total // self.steps_per_epoch} epochs), "
                  f"it now has {self.total_steps} (train.epochs={self.cfg.train.epochs}): from step "
                  f"{state['step']} on, the lr and eps schedules are those of a "
                  f"{self.cfg.train.epochs}-epoch run")
        self._resumed_from = path
        self.step, self.lr_scale = state["step"], state["lr_scale"]
        self.rollbacks, self.elapsed, self.lipschitz = state["rollbacks"], state["elapsed_s"], state["lipschitz"]
        # the times of the sessions before this one (checkpoints of lipnext <= 0.1.0: the loop's)
        self._prior = {"wall_s": state.get("wall_s", self.elapsed), "cpu_s": state.get("cpu_s", 0.0)}
        self._saved_at = self.step
        return self.step

    def _save(self) -> None:
        """Write a checkpoint of this step (rank 0; collective), unless the last one written or
        loaded is of this very state. A failed write raises on every rank; the checkpoints
        before it stay as they were."""
        if not self.cfg.train.checkpoint or self._saved_at == self.step:
            return
        model_state = full_state_dict(self.model)            # collective under FSDP
        optimizer_state = self.optimizer.state_dict()        # collective under FSDP
        times, error = self._times(), None
        if self.info.is_main:
            try:
                save_checkpoint(self.run_dir, self.step, self.model, optimizer_state,
                                {"epoch": self.step // self.steps_per_epoch, "total_steps": self.total_steps,
                                 "steps_per_epoch": self.steps_per_epoch,
                                 "lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
                                 "elapsed_s": self.elapsed, "lipschitz": self.lipschitz,
                                 "model": self.cfg.model.name, "wall_s": times["wall_s"],
                                 "cpu_s": times["cpu_s"]},
                                keep_last=self.cfg.train.keep_last, model_state=model_state)
            except OSError as e:
                error = e
        if not all_true(error is None, self.info, self.device):
            raise error or OSError(errno.EIO, "rank 0 could not write the checkpoint (see its message)")
        self._saved_at = self.step

    # ---------------------------------------------------------------- one step
    def _local_indices(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (real, generated) indices at ``step``."""
        real, gen = self.plan.global_indices(step)
        idx = torch.cat([real, gen])[self.plan.local_rows()]
        is_gen = (torch.arange(self.plan.batch_size) >= len(real))[self.plan.local_rows()]
        return idx[~is_gen], idx[is_gen]

    def _real_images(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The real images of ``step``, from one ``batches`` stream over the rest of its epoch
        (a streamed dataset decodes ahead); a new stream at each epoch and after a rollback."""
        if self._batches is None or self._batches_step != step or step % self.steps_per_epoch == 0:
            end = (step // self.steps_per_epoch + 1) * self.steps_per_epoch
            self._batches = self.train_ds.batches((self._local_indices(s)[0] for s in range(step, end)),
                                                  self.device)
        self._batches_step = step + 1
        return next(self._batches)

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented training batch of ``step`` on this rank: real images, then generated ones."""
        params = self.augment.sample(self.plan.batch_size, self.train_ds.image_size,
                                     step_generator(self.cfg.train.seed, step, 3), self.plan.b_real)
        params = {k: v[self.plan.local_rows()] for k, v in params.items()}
        x, y = self._real_images(step)
        if self.gen_ds is not None and len(gen := self._local_indices(step)[1]):
            xg, yg = next(self.gen_ds.batches([gen], self.device))
            x, y = torch.cat([x, xg]), torch.cat([y, yg])
        return self.augment.apply(x, params, self.train_ds.mean), y

    def _schedules(self, step: int) -> tuple[float, float]:
        """(lr, eps) at ``step``: warm-up + cosine and the eps ramp at step / total_steps, or under
        train.budget_s at the share of the budget used (the lr clock then ticks in milliseconds)."""
        cfg, budget = self.cfg, self.cfg.train.budget_s
        if budget is None:
            t, total, warmup = step, self.total_steps, self.warmup_steps
        else:
            total = 1000 * budget
            t, warmup = min(1000 * self.elapsed, total), total * self.warmup_steps / self.total_steps
        lr = cfg.optim.lr * lr_factor(t, total, warmup, cfg.optim.min_lr / cfg.optim.lr) * self.lr_scale
        eps = eps_schedule(t / total, cfg.loss.eps_255 / 255.0, cfg.loss.eps_start, cfg.loss.eps_end,
                           cfg.loss.eps_ramp)
        return lr, eps

    def _on_nan(self, step: int) -> None:
        msg = (f"non-finite loss or gradient at step {step} (epoch {step // self.steps_per_epoch})")
        if self.cfg.train.on_nan == "stop":
            raise TrainingDiverged(f"{msg}; lower optim.lr, check the data, or set "
                                   "train.on_nan=rollback to reload the last checkpoint with half the lr")
        self.rollbacks += 1
        if self.rollbacks > self.cfg.train.max_rollbacks:
            raise TrainingDiverged(f"{msg} after {self.cfg.train.max_rollbacks} rollbacks "
                                   "(train.max_rollbacks); lower optim.lr or check the data")
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise TrainingDiverged(f"{msg} and no checkpoint to roll back to")
        rollbacks, lr_scale = self.rollbacks, self.lr_scale * 0.5
        prior = self._prior                          # a rollback is no new session
        self._load(ckpt)
        self.rollbacks, self.lr_scale = rollbacks, lr_scale
        self._prior, self._saved_at = prior, None
        self.log.rewind(self.step)
        self.log.log({"kind": "rollback", "step": self.step, "at_step": step, "lr_scale": lr_scale,
                      "rollbacks": rollbacks})
        if self.info.is_main:
            tqdm.write(f"{msg}: rolled back to {ckpt.name}, lr x {lr_scale:g} "
                       f"(rollback {rollbacks}/{self.cfg.train.max_rollbacks})")

    # ---------------------------------------------------------------- evaluation
    def _whole_model(self) -> CertifiableModel | None:
        """The model rank 0 certifies and saves: ``self.model``, or under FSDP a temporary
        unsharded copy holding the gathered weights (collective; None on the other ranks).

        The copy is built on the meta device (no initialisation), so nothing but the
        gathered weights is allocated, and only while the caller holds it."""
        if not self.sharded:
            return self.model
        state = full_state_dict(self.model)
        if not self.info.is_main:
            return None
        with torch.device("meta"):
            whole = build_from_config(self.model.arch, self.model.config())
        whole = whole.to_empty(device=self.device)
        whole.load_state_dict(state, strict=True)
        return whole

    def _certify(self, model: CertifiableModel, split: str,
                 limit: int | None = None) -> tuple[dict[str, Any], Any]:
        ds = self._dataset(split)
        cert = certify_dataset(model, ds, self.cfg.certify.rule, self.cfg.certify.batch_size, limit)
        radii, unit = list(self.cfg.certify.radii), self.cfg.certify.radius_unit
        return results_dict(cert, [r / unit for r in radii], labels=[radius_label(r, unit) for r in radii]), cert

    def _evaluate(self, epoch: int) -> None:
        if self.val_ds is None:
            return
        model = self._whole_model()
        if self.info.is_main:
            res, _ = self._certify(model, "val", self.cfg.train.eval_max)
            self.log.log({"kind": "eval", "split": "val", "step": self.step, "epoch": epoch,
                          "clean_accuracy": res["clean_accuracy"], "cra": res["cra"],
                          "lipschitz": res["lipschitz_bound"], "n": res["n"]})
            cra = " ".join(f"{k}:{100 * v:.1f}" for k, v in res["cra"].items())
            tqdm.write(f"epoch {epoch + 1}: val clean {100 * res['clean_accuracy']:.1f}%  CRA {cra}  "
                       f"L {res['lipschitz_bound']:.4f}")
        barrier(self.info)

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        """Train to the end (train.epochs, the budget or the time limit), then save and certify;
        on train.stop_at_step or SIGINT/SIGTERM (any rank), checkpoint and stop instead."""
        t = self.cfg.train
        if t.on_nan == "rollback" and latest_checkpoint(self.run_dir) is None:
            self._save()                              # something to roll back to
        already_final = self.step >= self.total_steps  # resumed from the final checkpoint
        self._bar = progress(self.total_steps, f"train {self.cfg.model.name}", t.progress and self.info.is_main,
                             initial=self.step)
        stop = StopOnSignal()                         # Ctrl-C / SIGTERM: checkpoint, then stop
        self.model.validate_inputs = False
        try:
            stop.install()
            interrupt = self._loop(stop)
        except OSError as e:                          # a full disk at a checkpoint or the log
            if isinstance(e, BrokenPipeError):
                raise
            raise self._stopped(e) from None
        finally:
            stop.restore()
            self.model.validate_inputs = True
            self._bar.close()
        if interrupt is not None:
            return self._interrupt(interrupt)
        unsaved = [] if already_final else self._end_of_training()   # resumed final weights: as they are
        return self._finish(unsaved)

    def _stopped(self, e: OSError) -> RunWriteError:
        """A write that failed during training, as an error that says what is safe and what to do."""
        last = latest_checkpoint(self.run_dir)
        kept = (f"the last complete checkpoint is {last}: fix the cause (free some space?), then "
                "continue with --resume" if last else "no checkpoint was written")
        what = e.strerror or str(e)
        if e.filename and str(e.filename) not in what:
            what = f"cannot write {e.filename}: {what}"
        err = RunWriteError(e.errno or errno.EIO,
                            f"{what}; training stopped at step {self.step} of {self.total_steps}; {kept}")
        err.resumable = last is not None
        return err

    def _loop(self, stop: StopOnSignal) -> str | None:
        """Steps until the schedule, the budget or the time limit ends; returns what interrupted
        it instead (a signal's name, or train.stop_at_step), else None."""
        self._t0 = time.perf_counter() - self.elapsed
        self._window_t, self._window_n = time.perf_counter(), 0    # images per second since the last log
        cpu0, interrupt = time.process_time(), None
        while self.step < self.total_steps:
            interrupt = self._interrupt_requested(stop)
            if interrupt is not None or self._out_of_time():
                break
            self._advance()
        self.loop_cpu_s = time.process_time() - cpu0
        return interrupt

    def _interrupt_requested(self, stop: StopOnSignal) -> str | None:
        """A SIGINT/SIGTERM on any rank (its name), train.stop_at_step reached, or None (collective)."""
        if not all_true(stop.signal is None, self.info, self.device):
            return stop.signal or "a signal on another rank"
        at = self.cfg.train.stop_at_step
        return "train.stop_at_step" if at is not None and self.step >= at else None

    def _out_of_time(self) -> bool:
        """Whether train.budget_s or train.time_limit_min is spent, by rank 0's clock (collective);
        reads the clock into ``elapsed`` for the budget's schedules."""
        t = self.cfg.train
        if t.budget_s is None and t.time_limit_min is None:
            return False
        self.elapsed = broadcast_float(time.perf_counter() - self._t0, self.info, self.device)
        spent = None
        if t.budget_s is not None and self.elapsed >= t.budget_s:
            spent = f"train.budget_s={t.budget_s:g} spent"
        elif t.time_limit_min is not None and self.elapsed >= 60 * t.time_limit_min:
            spent, self.stopped_early = f"train.time_limit_min={t.time_limit_min} reached", self.step
        if spent and self.info.is_main:
            tqdm.write(f"{spent} at step {self.step} of {self.total_steps}: ending training")
        return spent is not None

    def _advance(self) -> None:
        """One step: the update (or a NaN rollback), then the log, epoch-end work, checkpoints."""
        t, step = self.cfg.train, self.step
        lr, eps = self._schedules(step)
        x, y = self._batch(step)
        due = self.lipschitz is None or step % self.cfg.loss.lipschitz_every == 0
        stats = self.train_step(step, x, y, lr, eps, None if due else self.lipschitz)
        if stats is None:
            self._on_nan(step)
            self._bar.n = self.step
            return
        self.lipschitz = stats["lipschitz"]
        self.step += 1
        self._window_n += 1
        self._bar.update(1)
        epoch = (self.step - 1) // self.steps_per_epoch
        if self.step % t.log_every == 0 or self.step == self.total_steps:
            self._log_train(stats, epoch)
        epoch_end = self.step % self.steps_per_epoch == 0
        if epoch_end:
            drift = self.optimizer.retract(t.retraction) if t.retraction != "none" else None
            self.log.log({"kind": "epoch", "step": self.step, "epoch": epoch, "orthogonality_drift": drift})
            if t.eval_every and (epoch + 1) % t.eval_every == 0:
                self._evaluate(epoch)
        self.elapsed = time.perf_counter() - self._t0
        if self.step < self.total_steps and (
                (epoch_end and t.checkpoint_every and (epoch + 1) % t.checkpoint_every == 0)
                or (t.checkpoint_every_steps and self.step % t.checkpoint_every_steps == 0)):
            self._save()

    def _log_train(self, stats: dict[str, float], epoch: int) -> None:
        """A train record: the step's metrics and the images per second since the last one."""
        now = time.perf_counter()
        ips = self._window_n * self.plan.batch_size / max(now - self._window_t, 1e-9)
        self.elapsed = now - self._t0
        self.log.log({"kind": "train", "step": self.step, "epoch": epoch, **stats,
                      "img_per_s": ips, "time_s": self.elapsed})
        self._bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['train_acc']:.2f}",
                              eps=f"{stats['eps']:.3f}", img_s=f"{ips:.0f}")
        self._window_t, self._window_n = now, 0

    def _end_of_training(self) -> list[str]:
        """Polar retraction (none: certified as trained, bound measured) and the final checkpoint;
        what could not be written (a full disk: the run still saves and certifies what it can)."""
        if self.cfg.train.retraction != "none":
            self.optimizer.retract(self.cfg.train.retraction)
            self._saved_at = None                     # the weights changed at this step
        self.elapsed = time.perf_counter() - self._t0
        try:
            self._save()
        except OSError as e:
            if self.info.is_main:
                print(f"warning: the final checkpoint was not written ({getattr(e, 'reason', None) or e}); "
                      "saving the weights and results next", flush=True)
            return [f"checkpoint step_{self.step:08d}"]
        return []

    def _interrupt(self, reason: str) -> dict[str, Any]:
        """Checkpoint (atomic) and stop: train.stop_at_step, or SIGINT/SIGTERM (on any rank)."""
        try:
            self._save()
        except OSError as e:
            raise self._stopped(e) from None
        times = self._times()
        if self.info.is_main:
            self._write_record("interrupted", times)
        self.log.close()
        out: dict[str, Any] = {"interrupted": True, "step": self.step}
        if reason != "train.stop_at_step":
            out["signal"] = reason
            if self.info.is_main:
                saved = (f"checkpoint {latest_checkpoint(self.run_dir)} written" if self.cfg.train.checkpoint
                         else "nothing saved (train.checkpoint=false)")
                print(f"{reason}: stopped at step {self.step} of {self.total_steps}; {saved}", flush=True)
        return out

    def _final_split(self) -> str | None:
        """The split certified at the end: certify.split; for ``test`` on data without a test
        split, val (with a note); None for ``none`` or when the data has neither."""
        split = self.cfg.certify.split
        if split == "none":
            return None
        try:
            self._dataset(split)
            return split
        except ValueError as e:
            if split != "test":
                raise
            note = str(e)
        try:
            self._dataset("val")
        except ValueError:
            print(f"note: {note.split(':')[0]} and no val split")
            return None
        print(f"note: {note}; certifying the val split instead")
        return "val"

    def _finish(self, unsaved: list[str]) -> dict[str, Any]:
        """Save the final weights; certify the test split (val if there is none); report.

        A file that cannot be written (a full disk, a read-only folder) goes to a rescue folder
        in the system's temporary folder instead, the results table is printed either way, and
        an OSError then says what went where (``unsaved``: what the caller could not write)."""
        cfg = self.cfg
        results: dict[str, Any] = {}
        model = self._whole_model()
        times = self._times()
        failed: list[tuple[str, str, Path | None]] = []
        if self.info.is_main:
            weights = model.state_dict()
            failed += self._write("model.safetensors", lambda p: save_model(model, p))
            split = self._final_split()
            results = {"split": split, "dataset": cfg.data.name, "model": cfg.model.name,
                       "epochs": cfg.train.epochs, "steps": self.step, "train_time_s": round(self.elapsed, 1),
                       "loop_cpu_s": round(self.loop_cpu_s, 1),
                       "stopped_early_at_step": self.stopped_early, "total_steps": self.total_steps,
                       "world_size": self.info.world_size, "device": str(self.device),
                       "precision": "bf16" if self.bf16 else "fp32", "run_dir": str(self.run_dir),
                       "additional_data": additional_data(self.plan, cfg.data.generated)}
            prov = provenance(self.device, self._data, cfg, weights_sha256=tensors_sha256(weights), **times)
            cert = None
            if split is None:
                results = {**results, "certified": False, "provenance": prov}
                failed += self._write("results.json", lambda p: write_json(results, p))
                failed += self._log_final({"kind": "final", "step": self.step, "split": None})
                print(f"no test split was certified (certify.split={cfg.certify.split}); the weights "
                      f"are in {self.run_dir}. Certify them on held-out data with:\n"
                      f"  lipnext certify {self.run_dir} --data SPEC   (e.g. --data npz:test.npz)")
            else:
                res, cert = self._certify(model, split)
                results = {**res, **results, "provenance": prov}
                print(f"certified on the {split} split ({res['n']} images), rule {res['rule']}:")
                print(format_table(results))
                failed += self._write("results.json", lambda p: write_json(results, p))
                self._plot(cert, split)
                failed += self._log_final({"kind": "final", "step": self.step, **{k: results[k] for k in
                                           ("clean_accuracy", "cra", "lipschitz_bound", "split", "n")}})
            unwritten = [name for name, _, _ in failed] + unsaved
            extra = {"not_written": unwritten} if unwritten else {}
            failed += self._write(RUN_RECORD, lambda p: self._write_record(
                "incomplete" if unwritten else "finished", times, prov["weights_sha256"], p, **extra))
            if not failed and not unsaved:       # the card reads the files just written
                artefacts = write_run_artefacts(self.run_dir, cert)
                self.log.artifacts(artefacts)
                print(f"model card: {artefacts[-1]} ({artefacts[-2].name} beside it)")
            print(f"run folder: {self.run_dir}")
        self.log.close()
        barrier(self.info)
        if failed or unsaved:
            raise self._not_saved(failed, unsaved)
        return results

    def _write(self, name: str, write: Callable[[Path], Any]) -> list[tuple[str, str, Path | None]]:
        """``write(run_dir / name)``; on a filesystem error ``write(rescue / name)`` in a rescue
        folder of the system's temporary folder instead: [] or [(name, why, where or None)]."""
        try:
            write(self.run_dir / name)
            return []
        except OSError as e:
            if isinstance(e, BrokenPipeError):
                raise
            why = getattr(e, "reason", None) or e.strerror or str(e)
        rescue = Path(tempfile.gettempdir()) / f"lipnext-rescue-{self.run_dir.name}-{os.getpid()}"
        try:
            rescue.mkdir(parents=True, exist_ok=True)
            write(rescue / name)
            return [(name, why, rescue / name)]
        except OSError:
            return [(name, why, None)]

    def _log_final(self, record: dict[str, Any]) -> list[tuple[str, str, Path | None]]:
        """The last metrics line; [] or [("metrics.jsonl", why, None)] when it cannot be written."""
        try:
            self.log.log(record)
            return []
        except OSError as e:
            if isinstance(e, BrokenPipeError):
                raise
            return [("metrics.jsonl", getattr(e, "reason", None) or e.strerror or str(e), None)]

    def _not_saved(self, failed: list[tuple[str, str, Path | None]], unsaved: list[str]) -> OSError:
        """One error saying what could not be written in the run folder, and where it went instead."""
        parts = [f"{name} ({why})" for name, why, _ in failed] + unsaved
        rescued = [str(where) for _, _, where in failed if where is not None]
        lost = [name for name, _, where in failed if where is None]
        last = latest_checkpoint(self.run_dir)
        msg = (f"the run finished, but {', '.join(parts)} could not be written in {self.run_dir}"
               + (f"; saved instead: {', '.join(rescued)}" if rescued else "")
               + (f"; not saved anywhere: {', '.join(lost)} (the results are printed above)" if lost else "")
               + (f"; the last complete checkpoint is {last}" if last else ""))
        return OSError(errno.EIO, msg)

    def _plot(self, cert: Any, split: str) -> None:
        c = self.cfg.certify
        try:
            plot_certified_accuracy(cert, self.run_dir / "certified_accuracy.png",
                                    marks=[r / c.radius_unit for r in c.radii],
                                    mark_labels=[radius_label(r, c.radius_unit) for r in c.radii],
                                    title=f"{self.cfg.model.name} on {self.cfg.data.name} ({split}, "
                                          f"{len(cert)} images)")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'lipnext[demo]')")
        except OSError as e:                   # the plot is redrawn by lipnext certify --plot
            print(f"warning: no plot: {getattr(e, 'reason', None) or e}")
