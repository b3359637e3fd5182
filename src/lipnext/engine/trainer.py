"""The training engine, readable top to bottom (nanoGPT style).

    for step in range(start, T):
        lr   = lr * warmup_cosine(step) * lr_scale        (lr_scale halves on each NaN rollback)
        eps  = eps_schedule(step / T) * eps_target
        L    = model.lipschitz_bound()                    (measured, no gradient, every N steps)
        loss = EMMA(model(augment(x)), y, W_head, L, eps)  (bf16 autocast on CUDA)
        backward, clip the global grad norm, check it is finite on every rank, ManifoldAdam step
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

from ..config import Config, dataset_options, load_config, to_yaml, warmup_epochs
from ..data import Augment, get_dataset, parse_spec
from ..io import atomic_write, save_model
from ..losses import LOSSES, eps_schedule
from ..models.base import CertifiableModel, check_images
from ..models.registry import build_from_config
from ..optim import build_optimizer
from ..report import format_table, plot_certified_accuracy, results_dict, write_json
from .batches import BatchPlan, step_generator
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .evaluate import certify_dataset
from .distributed import DistInfo, all_true, barrier, build_model, clip_gradients, full_state_dict, \
    is_sharded, lipschitz_bound, setup, teardown, wrap_model
from .metrics import MetricsLog
from .schedule import lr_factor
from .signals import StopOnSignal

__all__ = ["train", "Trainer", "TrainingDiverged"]

LossHook = Callable[[int, torch.Tensor], torch.Tensor]


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
    """Recompute each block's activations in the backward pass instead of storing them."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"train.activation_checkpointing needs a model with .blocks; "
                         f"{type(model).__name__} has none")
    from torch.utils.checkpoint import checkpoint
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, device: torch.device,
                 loss_hook: LossHook | None = None):
        self.cfg, self.info, self.device, self.loss_hook = cfg, info, device, loss_hook
        self.run_dir = Path(cfg.run_dir)
        t = cfg.train
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
        self.loss_fn = LOSSES[cfg.loss.name]
        self.eps_target = cfg.loss.eps_255 / 255.0

        # data: validated once here, so the model skips its per-call input checks
        opts = dataset_options(cfg)
        self.train_ds = get_dataset(cfg.data.name, "train", **opts)
        self.streaming = bool(getattr(self.train_ds, "streaming", False))
        self.val_ds = None
        if cfg.data.val_fraction != 0 and t.eval_every:
            self.val_ds = get_dataset(cfg.data.name, "val", **opts)
        ds = self.train_ds
        self.gen_ds = None
        if cfg.data.generated and cfg.data.generated_fraction > 0:
            gen_opts = {"num_classes": ds.num_classes} if parse_spec(cfg.data.generated)[0] == "npz" else {}
            self.gen_ds = get_dataset(cfg.data.generated, "train", val_fraction=0.0, **gen_opts)
            if (self.gen_ds.in_chans, self.gen_ds.image_size) != (ds.in_chans, ds.image_size) \
                    or self.gen_ds.num_classes > ds.num_classes:
                raise ValueError(f"generated images {self.gen_ds} do not match the real ones {ds}")

        kwargs = dict(OmegaConf.to_container(cfg.model.kwargs))
        kwargs.setdefault("mean", list(ds.mean))
        self.model = build_model(cfg.model.name, info, device, t.seed, num_classes=ds.num_classes,
                                 in_chans=ds.in_chans, image_size=ds.image_size, **kwargs)
        if self.streaming:
            x_probe = ds[0][0][None].float() / 255.0
        else:
            x_probe, _ = ds.subset(torch.arange(min(len(ds), 64)).numpy(), "train").tensors()
        check_images(x_probe, self.model.in_chans, self.model.image_size)
        if t.activation_checkpointing:
            _enable_activation_checkpointing(self.model)
        self.forward = wrap_model(self.model, info, device, self.bf16)  # FSDP shards in place
        self.sharded = is_sharded(self.model)
        self.optimizer = build_optimizer(
            self.model, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
            nesterov=cfg.optim.nesterov, orthogonal_lr_scale=cfg.optim.orthogonal_lr_scale,
            lookahead_k=cfg.optim.lookahead_k, lookahead_alpha=cfg.optim.lookahead_alpha,
            update=cfg.optim["update"], precision=cfg.optim.precision, chunk_size=cfg.optim.chunk_size)

        self.plan = BatchPlan(len(ds), t.batch_size, t.seed, len(self.gen_ds) if self.gen_ds else 0,
                              cfg.data.generated_fraction, info.world_size, info.rank)
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.total_steps = t.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(warmup_epochs(cfg) * self.steps_per_epoch))
        self.augment = Augment(**OmegaConf.to_container(cfg.augment))
        if not self.streaming:
            self.x_train, self.y_train = ds.x.to(device), ds.y.to(device)
        self._stream, self._stream_step = None, -1
        if self.gen_ds is not None:
            self.x_gen, self.y_gen = self.gen_ds.x.to(device), self.gen_ds.y.to(device)

        # state that a checkpoint carries besides weights and optimizer
        self.step, self.lr_scale, self.rollbacks, self.elapsed = 0, 1.0, 0, 0.0
        self.lipschitz: float | None = None
        self.stopped_early: int | None = None
        self._datasets = {"train": self.train_ds, "val": self.val_ds}
        resume_step = self._maybe_resume()
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "config.yaml", lambda p: Path(p).write_text(to_yaml(cfg)))
            print(self._banner(), flush=True)
        self.log = MetricsLog(self.run_dir, info.is_main, t.tensorboard, resume_step)
        if t.compile:
            self.forward = torch.compile(self.forward)

    def _dataset(self, split: str):
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
                ds = self._dataset(split) if split == "val" or not self.streaming else None
                sizes.append(f"{split} {len(ds):,}" if ds is not None else f"{split} (streamed)")
            except ValueError:
                sizes.append(f"no {split} split")
        lines = [f"lipnext train: {cfg.model.name} ({n_params / 1e6:.2f}M parameters) on {cfg.data.name}, "
                 f"{self.device} {'bf16' if self.bf16 else 'fp32'}, {self.info.world_size} process(es)",
                 f"  images: {', '.join(sizes)}; certify.split={cfg.certify.split} at the end",
                 f"  steps: {spe} per epoch (global batch {cfg.train.batch_size}) x {cfg.train.epochs} "
                 f"epochs = {self.total_steps}, warm-up {self.warmup_steps}",
                 f"  run folder: {self.run_dir}"]
        if self.step:
            lines.append(f"  resumed from step {self.step} of {self.total_steps} "
                         f"(epoch {self.step / spe:g}; {self._resumed_from})")
        return "\n".join(lines)

    # ---------------------------------------------------------------- checkpoints
    def _maybe_resume(self) -> int | None:
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

    def _streamed(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The real images of ``step`` from a DataLoader over this epoch's remaining batches."""
        if self._stream is None or self._stream_step != step or step % self.steps_per_epoch == 0:
            end = (step // self.steps_per_epoch + 1) * self.steps_per_epoch
            batches = [self._local_indices(s)[0].tolist() for s in range(step, end)]
            self._stream = iter(torch.utils.data.DataLoader(
                self.train_ds, batch_sampler=batches, num_workers=self.cfg.data.num_workers,
                pin_memory=self.device.type == "cuda", persistent_workers=False))
        self._stream_step = step + 1
        x, y = next(self._stream)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.augment.sample(self.plan.batch_size, self.train_ds.image_size,
                                     step_generator(self.cfg.train.seed, step, 3))
        params = {k: v[self.plan.local_rows()] for k, v in params.items()}
        real, gen = self._local_indices(step)
        if self.streaming:
            x, y = self._streamed(step)
        else:
            x, y = self.x_train[real.to(self.device)], self.y_train[real.to(self.device)]
        if len(gen):
            x = torch.cat([x.to(self.x_gen.dtype), self.x_gen[gen.to(self.device)]])
            y = torch.cat([y, self.y_gen[gen.to(self.device)]])
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return self.augment.apply(x, params, self.train_ds.mean), y

    def _train_step(self, step: int) -> dict[str, float] | None:
        """One optimisation step; None if the loss or gradient was not finite (no update)."""
        cfg = self.cfg
        lr = cfg.optim.lr * lr_factor(step, self.total_steps, self.warmup_steps,
                                      cfg.optim.min_lr / cfg.optim.lr if cfg.optim.lr else 0.0) * self.lr_scale
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        eps = eps_schedule(step / self.total_steps, self.eps_target, cfg.loss.eps_start,
                           cfg.loss.eps_end, cfg.loss.eps_ramp)
        if self.lipschitz is None or step % cfg.loss.lipschitz_every == 0:   # rank 0, broadcast
            self.lipschitz = lipschitz_bound(self.model, self.info, self.device)
        x, y = self._batch(step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.forward(x)
        loss = self.loss_fn(logits.float(), y, self.model.head_weight(), self.lipschitz, eps,
                            cfg.loss.temperature)
        if self.loss_hook is not None:
            loss = self.loss_hook(step, loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        gnorm = clip_gradients(self.model, self.optimizer, clip)   # global norm, every rank
        stats = torch.stack([loss.detach().float(), (logits.argmax(1) == y).float().sum(),
                             gnorm.detach().float().to(loss.device)])
        if dist.is_initialized():
            dist.all_reduce(stats)
            stats[0] /= self.info.world_size
        finite = all_true(bool(torch.isfinite(stats).all()), self.info, self.device)
        if not finite:
            return None
        self.optimizer.step()
        return {"loss": stats[0].item(), "train_acc": stats[1].item() / self.plan.batch_size,
                "grad_norm": stats[2].item() / (self.info.world_size if dist.is_initialized() else 1),
                "lr": lr, "eps": eps, "lipschitz": self.lipschitz}

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
        cert = certify_dataset(model, ds, self.cfg.certify.rule, self.cfg.certify.batch_size, limit,
                               self.cfg.data.num_workers if self.streaming else 0)
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
        cfg, t = self.cfg, self.cfg.train
        if cfg.train.on_nan == "rollback" and latest_checkpoint(self.run_dir) is None:
            self._save()                              # something to roll back to
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   desc=f"train {cfg.model.name}", mininterval=1.0, disable=not (t.progress and self.info.is_main))
        self.model.validate_inputs = False
        finished = self.step >= self.total_steps      # resumed from the final checkpoint
        t0, window_t, window_n = time.perf_counter() - self.elapsed, time.perf_counter(), 0
        stop = StopOnSignal()                         # Ctrl-C / SIGTERM: checkpoint, then stop
        try:
            stop.install()
            while self.step < self.total_steps:
                signalled = not all_true(stop.signal is None, self.info, self.device)
                if signalled or (t.stop_at_step is not None and self.step >= t.stop_at_step):
                    return self._interrupt(bar, (stop.signal or "a signal on another rank") if signalled else None)
                if t.time_limit_min is not None and not all_true(
                        time.perf_counter() - t0 < 60 * t.time_limit_min, self.info, self.device):
                    self.stopped_early = self.step
                    if self.info.is_main:
                        tqdm.write(f"train.time_limit_min={t.time_limit_min} reached at step "
                                   f"{self.step} of {self.total_steps}: ending training early")
                    break
                stats = self._train_step(self.step)
                if stats is None:
                    self._on_nan(self.step)
                    bar.n = self.step
                    continue
                self.step += 1
                window_n += 1
                bar.update(1)
                epoch = (self.step - 1) // self.steps_per_epoch
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    ips = window_n * self.plan.batch_size / max(now - window_t, 1e-9)
                    self.elapsed = now - t0
                    self.log.log({"kind": "train", "step": self.step, "epoch": epoch, **stats,
                                  "img_per_s": ips, "time_s": self.elapsed})
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['train_acc']:.2f}",
                                    eps=f"{stats['eps']:.3f}", img_s=f"{ips:.0f}")
                    window_t, window_n = now, 0
                epoch_end = self.step % self.steps_per_epoch == 0
                if epoch_end:
                    drift = self.optimizer.retract(t.retraction) if t.retraction != "none" else None
                    self.log.log({"kind": "epoch", "step": self.step, "epoch": epoch,
                                  "orthogonality_drift": drift})
                    if t.eval_every and (epoch + 1) % t.eval_every == 0:
                        self._evaluate(epoch)
                self.elapsed = time.perf_counter() - t0
                if self.step < self.total_steps and (
                        (epoch_end and t.checkpoint_every and (epoch + 1) % t.checkpoint_every == 0)
                        or (t.checkpoint_every_steps and self.step % t.checkpoint_every_steps == 0)):
                    self._save()
            stop.restore()
            bar.close()
            if not finished:                          # its weights are already final
                if t.retraction != "none":            # (none: certified as trained, bound measured)
                    self.optimizer.retract(t.retraction)
                self.elapsed = time.perf_counter() - t0
                self._save()
            return self._finish()
        finally:
            stop.restore()
            self.model.validate_inputs = True
            bar.close()

    def _interrupt(self, bar: tqdm, signal_name: str | None) -> dict[str, Any]:
        """Checkpoint (atomic) and stop: train.stop_at_step, or SIGINT/SIGTERM (on any rank)."""
        self._save()
        bar.close()
        self.log.close()
        out: dict[str, Any] = {"interrupted": True, "step": self.step}
        if signal_name is not None:
            out["signal"] = signal_name
            if self.info.is_main:
                saved = (f"checkpoint {latest_checkpoint(self.run_dir)} written" if self.cfg.train.checkpoint
                         else "nothing saved (train.checkpoint=false)")
                print(f"{signal_name}: stopped at step {self.step} of {self.total_steps}; {saved}", flush=True)
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
                       "stopped_early_at_step": self.stopped_early, "total_steps": self.total_steps,
                       "world_size": self.info.world_size, "device": str(self.device),
                       "precision": "bf16" if self.bf16 else "fp32", "run_dir": str(self.run_dir)}
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
            print(f"run folder: {self.run_dir}")
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
