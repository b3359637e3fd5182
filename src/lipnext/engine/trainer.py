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

Everything random is a function of (seed, step) (see ``batches``), so a run resumed from a
checkpoint repeats the uninterrupted run exactly on CPU. Under FSDP the model is sharded in
place: the bound gathers the weights for a moment, checkpoints are gathered to the unsharded
layout, and rank 0 certifies an unsharded copy.
"""
from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from ..card import write_run_artefacts
from ..config import Config, dataset_options, load_config, to_yaml, warmup_epochs
from ..data import Augment, BatchSource, get_dataset, parse_spec
from ..io import atomic_write, save_model
from ..losses import LOSSES, eps_schedule
from ..models.base import CertifiableModel, check_images
from ..models.lipnext import LipNeXtBlock, compile_mode, compiles, set_compile
from ..models.registry import build_from_config
from ..optim import build_optimizer
from ..program import same_function
from ..report import format_table, plot_certified_accuracy, results_dict, write_json
from ..trackers import open_trackers
from .batches import BatchPlan, additional_data, step_generator
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .evaluate import certify_dataset
from .distributed import (DistInfo, all_true, barrier, broadcast_float, build_model, full_state_dict,
                          is_sharded, setup, teardown, wrap_model)
from .metrics import MetricsLog
from .schedule import lr_factor
from .signals import StopOnSignal
from .step import LossHook, TrainStep

__all__ = ["train", "Trainer", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient that train.on_nan could not recover from."""


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
        return Trainer(cfg, info, device, loss_hook).run()
    finally:
        teardown(info, created)


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
        self._build_data()
        self._build_model()
        self._build_step(loss_hook)
        self._build_plan()
        resume_step = self._resume()
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

    def _resume(self) -> int | None:
        """Load the last checkpoint of run_dir under resume=true; refuse to overwrite one otherwise."""
        existing = list_checkpoints(self.run_dir)
        if not self.cfg.resume:
            if existing:
                raise ValueError(f"{self.run_dir} already has checkpoints ({existing[-1].name}); "
                                 "pass --resume (resume=true) to continue it, or choose another run_dir")
            return None
        if not existing:
            if self.info.is_main:
                print(f"resume: no checkpoint in {self.run_dir}, starting from scratch")
            return None
        return self._load(existing[-1])

    def _build_log(self, resume_step: int | None) -> None:
        """The run folder, its config.yaml, the banner and the metrics log (rank 0 writes)."""
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "config.yaml", lambda p: Path(p).write_text(to_yaml(self.cfg)))
            print(self._banner(), flush=True)
        self.log = MetricsLog(self.run_dir, self.info.is_main, self.cfg.train.tensorboard, resume_step,
                              open_trackers(self.cfg, self.run_dir) if self.info.is_main else ())

    def _dataset(self, split: str) -> BatchSource:
        """The ``split`` of the run's data (loaded once; ValueError if the data has none)."""
        if self._datasets.get(split) is None:
            self._datasets[split] = get_dataset(self.cfg.data.name, split, **dataset_options(self.cfg))
        return self._datasets[split]

    def _banner(self) -> str:
        """What the run is about to do: model, data sizes, steps, run folder, resume point."""
        cfg, spe = self.cfg, self.steps_per_epoch
        n_params = sum(p.numel() for p in self.model.parameters())
        sizes = [f"train {len(self.train_ds):,}"]
        for split in ("val", "test"):
            try:
                sizes.append(f"{split} {len(self._dataset(split)):,}")
            except (ValueError, FileNotFoundError):
                sizes.append(f"no {split} split")
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
        return self.step

    def _save(self) -> None:
        if not self.cfg.train.checkpoint:
            return
        model_state = full_state_dict(self.model)            # collective under FSDP
        optimizer_state = self.optimizer.state_dict()        # collective under FSDP
        if self.info.is_main:
            save_checkpoint(self.run_dir, self.step, self.model, optimizer_state,
                            {"epoch": self.step // self.steps_per_epoch, "total_steps": self.total_steps,
                             "steps_per_epoch": self.steps_per_epoch,
                             "lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
                             "elapsed_s": self.elapsed, "lipschitz": self.lipschitz,
                             "model": self.cfg.model.name},
                            keep_last=self.cfg.train.keep_last, model_state=model_state)
        barrier(self.info)

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
        self._load(ckpt)
        self.rollbacks, self.lr_scale = rollbacks, lr_scale
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
        self._bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                         desc=f"train {self.cfg.model.name}", mininterval=1.0,
                         disable=not (t.progress and self.info.is_main))
        stop = StopOnSignal()                         # Ctrl-C / SIGTERM: checkpoint, then stop
        self.model.validate_inputs = False
        try:
            stop.install()
            interrupt = self._loop(stop)
        finally:
            stop.restore()
            self.model.validate_inputs = True
            self._bar.close()
        if interrupt is not None:
            results = self._interrupt(interrupt)
        else:
            if not already_final:                     # its weights are already final
                self._end_of_training()
            results = self._finish()
        return results

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

    def _end_of_training(self) -> None:
        """Polar retraction (none: certified as trained, bound measured) and the final checkpoint."""
        if self.cfg.train.retraction != "none":
            self.optimizer.retract(self.cfg.train.retraction)
        self.elapsed = time.perf_counter() - self._t0
        self._save()

    def _interrupt(self, reason: str) -> dict[str, Any]:
        """Checkpoint (atomic) and stop: train.stop_at_step, or SIGINT/SIGTERM (on any rank)."""
        self._save()
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

    def _finish(self) -> dict[str, Any]:
        """Save the final weights; certify the test split (val if there is none); report."""
        cfg = self.cfg
        results: dict[str, Any] = {}
        model = self._whole_model()
        if self.info.is_main:
            save_model(model, self.run_dir)
            split = self._final_split()
            results = {"split": split, "dataset": cfg.data.name, "model": cfg.model.name,
                       "epochs": cfg.train.epochs, "steps": self.step, "train_time_s": round(self.elapsed, 1),
                       "loop_cpu_s": round(self.loop_cpu_s, 1),
                       "stopped_early_at_step": self.stopped_early, "total_steps": self.total_steps,
                       "world_size": self.info.world_size, "device": str(self.device),
                       "precision": "bf16" if self.bf16 else "fp32", "run_dir": str(self.run_dir),
                       "additional_data": additional_data(self.plan, cfg.data.generated)}
            cert = None
            if split is None:
                write_json({**results, "certified": False}, self.run_dir / "results.json")
                self.log.log({"kind": "final", "step": self.step, "split": None})
                print(f"no test split was certified (certify.split={cfg.certify.split}); the weights "
                      f"are in {self.run_dir}. Certify them on held-out data with:\n"
                      f"  lipnext certify {self.run_dir} --data SPEC   (e.g. --data npz:test.npz)")
            else:
                res, cert = self._certify(model, split)
                results = {**res, **results}
                write_json(results, self.run_dir / "results.json")
                self._plot(cert, split)
                self.log.log({"kind": "final", "step": self.step, **{k: results[k] for k in
                              ("clean_accuracy", "cra", "lipschitz_bound", "split", "n")}})
                print(f"certified on the {split} split ({res['n']} images), rule {res['rule']}:")
                print(format_table(results))
            artefacts = write_run_artefacts(self.run_dir, cert)
            self.log.artifacts(artefacts)
            print(f"model card: {artefacts[-1]} ({artefacts[-2].name} beside it)\nrun folder: {self.run_dir}")
        self.log.close()
        barrier(self.info)
        return results

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
