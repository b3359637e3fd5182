"""Training configuration: an OmegaConf structured config (dataclass schema).

``load_config(path, overrides)`` merges, in order, the schema defaults, a YAML file and
dotted command-line overrides (``train.epochs=3 model.name=lipnext_l4w64``). A key that is
not in the schema, or a value of the wrong type, is a clear error. Radii are given in
units of 1/255 (``loss.eps_255: 36`` is eps = 36/255; ``certify.radii`` are divided
by ``certify.radius_unit``, 255 by default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .options import RULES, SPLITS

__all__ = ["Config", "DataConfig", "AugmentConfig", "ModelConfig", "OptimConfig", "LossConfig",
           "TrainConfig", "CertifyConfig", "DistConfig", "LogConfig", "load_config", "to_yaml",
           "config_from_dict", "dataset_options", "warmup_epochs", "resolve_config_path", "packaged_configs",
           "check_image_size"]


@dataclass
class DataConfig:
    name: str = "digits"                 # dataset spec: digits, npz:<file>, cifar10:<dir>, ...
    holdout: Optional[int] = None        # digits/npz: the last N images are the test split
    val_fraction: Optional[float] = None  # share of the training part kept for validation
    num_classes: Optional[int] = None    # npz: number of classes (default: from the file)
    image_size: Optional[int] = None     # imagenet: decoded image size (default 224)
    num_workers: int = 4                 # imagenet: DataLoader decoding processes
    generated: Optional[str] = None      # dataset spec of extra generated images (train only)
    generated_fraction: float = 0.0      # share of each training batch drawn from them


@dataclass
class AugmentConfig:
    crop_padding: int = 4                # random crop after padding by this many pixels (0 = off)
    pad_mode: str = "reflect"            # reflect | zeros
    flip: bool = True                    # random horizontal flip
    cutout: int = 0                      # cutout square side in pixels (0 = off)
    randaugment: bool = False            # RandAugment on the real images (not the generated ones)
    randaugment_ops: int = 2             # ops per augmented image (N)
    randaugment_magnitude: int = 9       # magnitude M, of 31 bins (0..30)
    randaugment_p: float = 0.5           # probability that a real image is augmented
    generated_crop_padding: Optional[int] = None  # crop padding of generated images (null: crop_padding)


@dataclass
class ModelConfig:
    name: str = "lipnext_l4w64"          # a name from `lipnext models`
    kwargs: Dict[str, Any] = field(default_factory=dict)  # constructor overrides (patch_size, ...)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    nesterov: bool = True                # NAdam
    orthogonal_lr_scale: float = 0.5
    lookahead_k: int = 5                 # manifold Lookahead every k steps (0 = off)
    lookahead_alpha: float = 0.5
    grad_clip: float = 3.0               # max global gradient norm (0 = off)
    warmup_epochs: Optional[float] = None  # linear warm-up, then cosine decay to min_lr;
    #                                      None: 5% of train.epochs, at most 20 (warmup_epochs())
    min_lr: float = 0.0
    update: str = "fast_exp"             # X <- X exp(U) by: fast_exp | exact | cayley
    precision: str = "auto"              # arithmetic of that update: auto (tf32 on CUDA, else fp32) | fp32 | fp64 | tf32 | bf16
    lie_gradients: bool = True           # the training step's orthogonal gradients as X^T G (one product
    #                                      per matrix less in the optimizer; only inside the step)
    chunk_size: Optional[int] = None     # orthogonal matrices updated at a time (null: as many as fit
    #                                      512 MiB per temporary on a GPU, 8 MiB on a CPU)


@dataclass
class LossConfig:
    name: str = "emma"                   # emma | margin | ce
    eps_255: float = 36.0                # target certified radius, in 1/255 units
    eps_start: float = 0.1               # training eps ramps from eps_start x ...
    eps_end: float = 3.0                 # ... to eps_end x the target
    eps_ramp: float = 0.5                # over this share of training
    lipschitz_every: int = 50            # model.lipschitz_bound() every N steps (docs/TRAINING.md)
    temperature: float = 1.0             # cross-entropy on T x logits (see lipnext.losses)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256                # global batch (split over processes)
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    precision: str = "auto"              # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: str = "auto"                # torch.compile: auto (on CUDA) | true | false (LipNeXt: each block)
    activation_checkpointing: bool = False
    retraction: str = "auto"             # polar retraction: auto (newton_schulz on CUDA, else svd) | svd | newton_schulz | none (no per-epoch retraction)
    eval_every: int = 1                  # certify the val split every N epochs (0 = never)
    eval_max: Optional[int] = None       # certify at most this many val images
    checkpoint_every: int = 1            # epochs between checkpoints (0 = only at the end)
    checkpoint_every_steps: int = 0      # also every N steps (0 = off)
    keep_last: int = 3                   # checkpoints kept
    checkpoint: bool = True              # write checkpoints at all (false: a throw-away run)
    log_every: int = 10                  # steps between metrics lines
    progress: bool = True                # tqdm progress bar (rank 0)
    tensorboard: bool = True             # also write TensorBoard events (if installed)
    on_nan: str = "stop"                 # stop | rollback (reload last checkpoint, lr x 0.5)
    max_rollbacks: int = 3
    stop_at_step: Optional[int] = None   # stop after this global step, as if interrupted
    time_limit_min: Optional[float] = None  # safety net: end training early (then certify) after this
    budget_s: Optional[float] = None     # train for this many seconds: the schedules run on its share used


@dataclass
class CertifyConfig:
    rule: str = "pairwise"               # pairwise | sqrt2
    radii: List[float] = field(default_factory=lambda: [36.0, 72.0, 108.0, 255.0])
    radius_unit: float = 255.0           # radii are radii[i] / radius_unit (1 = plain L2 radii)
    batch_size: int = 512
    split: str = "test"                  # split certified at the end of training (none: skip)


@dataclass
class DistConfig:
    strategy: str = "auto"               # auto (ddp when launched by torchrun) | none | ddp | fsdp
    backend: str = "auto"                # auto (nccl on CUDA, gloo on CPU) | nccl | gloo


@dataclass
class LogConfig:
    wandb: bool = False                  # also log to Weights & Biases (extra wandb; lipnext.trackers)
    wandb_mode: Optional[str] = None     # online | offline | disabled (null: WANDB_MODE or W&B's default)
    mlflow: bool = False                 # also log to MLflow (extra mlflow)
    mlflow_uri: Optional[str] = None     # tracking URI (null: MLFLOW_TRACKING_URI or MLflow's default)
    project: str = "lipnext"             # W&B project / MLflow experiment


@dataclass
class Config:
    run_dir: str = "runs/default"
    resume: bool = False                 # continue from the last checkpoint in run_dir
    overwrite: bool = False              # replace the run in a non-empty run_dir (docs/TRAINING.md)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)


_CHOICES = {"loss.name": ("emma", "margin", "ce"), "train.precision": ("auto", "bf16", "fp32"),
            "train.on_nan": ("stop", "rollback"), "certify.rule": RULES,
            "certify.split": (*SPLITS, "none"), "dist.strategy": ("auto", "none", "ddp", "fsdp"),
            "dist.backend": ("auto", "nccl", "gloo"), "augment.pad_mode": ("reflect", "zeros"),
            "train.compile": ("auto", "true", "false")}


def _choices() -> dict[str, tuple[str, ...]]:
    """Every key's allowed values; the optimizer's lists come from lipnext.optim (torch)."""
    from .optim.exp_update import METHODS as UPDATES
    from .optim.polar import METHODS as RETRACTIONS
    from .ops.precision import PRECISIONS
    return {**_CHOICES, "train.retraction": (*RETRACTIONS, "none"), "optim.update": UPDATES,
            "optim.precision": PRECISIONS}


# key -> (lowest value, whether the lowest is allowed); None (where the schema allows it) passes
_BOUNDS = {"train.epochs": (1, True), "train.batch_size": (1, True), "certify.batch_size": (1, True),
           "loss.eps_255": (0, True), "loss.eps_start": (0, True), "loss.eps_end": (0, True),
           "loss.lipschitz_every": (1, True), "train.log_every": (1, True), "train.eval_every": (0, True),
           "train.eval_max": (1, True), "train.checkpoint_every": (0, True),
           "train.checkpoint_every_steps": (0, True), "train.keep_last": (0, True),
           "train.max_rollbacks": (0, True), "train.stop_at_step": (0, True),
           "augment.crop_padding": (0, True), "augment.cutout": (0, True),
           "optim.weight_decay": (0, True), "optim.orthogonal_lr_scale": (0, False),
           "optim.lookahead_k": (0, True), "optim.lookahead_alpha": (0, False), "optim.grad_clip": (0, True),
           "data.holdout": (0, True), "data.val_fraction": (0, True), "data.num_classes": (2, True),
           "data.image_size": (1, True), "data.num_workers": (0, True)}
# key -> (highest value, whether the highest is allowed)
_UPPER = {"data.val_fraction": (1, False), "loss.eps_ramp": (1, True), "optim.lookahead_alpha": (1, True)}


def _check_numbers(cfg: Config) -> None:
    """Every numeric key: finite, and inside its range (_BOUNDS, _UPPER)."""
    for key in sorted({*_BOUNDS, *_UPPER, "loss.eps_ramp"}):
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        low, low_ok = _BOUNDS.get(key, (0, True))
        high, high_ok = _UPPER.get(key, (math.inf, False))
        if not (math.isfinite(value) and (value >= low if low_ok else value > low)
                and (value <= high if high_ok else value < high)):
            rng = (f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}" if high < math.inf
                   else f"{'>=' if low_ok else '>'} {low:g}")
            raise ValueError(f"config {key}={value!r}: must be {'in ' if high < math.inf else ''}{rng}")
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"config optim.betas={betas}: must be two values in [0, 1), e.g. [0.9, 0.999]")
    radii = list(cfg.certify.radii)
    if not radii or not all(math.isfinite(r) and r >= 0 for r in radii):
        raise ValueError(f"config certify.radii={radii}: must be a non-empty list of radii >= 0 "
                         "(in units of 1/certify.radius_unit), e.g. [36, 72]")


def _check_names(cfg: Config) -> None:
    """The model name is registered and the dataset specs parse (cheap: nothing is loaded)."""
    from .data import parse_spec
    from .models import model_entry

    try:
        model_entry(cfg.model.name)
    except KeyError as e:
        raise ValueError(f"config model.name: {e.args[0]}") from None
    for key in ("data.name", "data.generated"):
        spec = OmegaConf.select(cfg, key)
        if spec is not None:
            try:
                parse_spec(spec)
            except ValueError as e:
                raise ValueError(f"config {key}: {e}") from None


def check_image_size(cfg: Config, image_size: tuple[int, int]) -> None:
    """The augmentation fits images of ``image_size`` (H, W): cutout smaller than the image
    (else every image is blanked and the model stays at chance), reflect padding smaller
    than the image (torch's reflect padding needs it)."""
    a, side = cfg.augment, min(image_size)
    if a.cutout >= side:
        raise ValueError(f"augment.cutout={a.cutout} covers the whole {image_size[0]}x{image_size[1]} "
                         f"image: every training image would be blanked; use a square smaller than "
                         f"the image (e.g. augment.cutout={side // 2}) or 0 (off)")
    if a.pad_mode == "reflect" and a.crop_padding >= side:
        raise ValueError(f"augment.crop_padding={a.crop_padding} with pad_mode=reflect needs images "
                         f"larger than the padding, these are {image_size[0]}x{image_size[1]}; lower "
                         "it or set augment.pad_mode=zeros")


def _check(cfg: Config) -> Config:
    cfg.train.compile = str(cfg.train.compile).lower()     # true/false may arrive as YAML booleans
    for key, choices in _choices().items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ValueError(f"config {key}={value!r}: choose one of {', '.join(choices)}")
    if cfg.log.wandb_mode not in (None, "online", "offline", "disabled"):
        raise ValueError(f"config log.wandb_mode={cfg.log.wandb_mode!r}: choose online, offline, disabled or null")
    _check_numbers(cfg)
    _check_names(cfg)
    if not 0 <= cfg.data.generated_fraction < 1:
        raise ValueError(f"data.generated_fraction must lie in [0, 1), got {cfg.data.generated_fraction}")
    if cfg.data.generated_fraction > 0 and not cfg.data.generated:
        raise ValueError("data.generated_fraction > 0 needs data.generated (a dataset spec)")
    from .data import Augment
    Augment(**OmegaConf.to_container(cfg.augment))       # its own checks of the augment keys
    if cfg.train.on_nan == "rollback" and not cfg.train.checkpoint:
        raise ValueError("train.on_nan=rollback needs checkpoints (train.checkpoint=true)")
    if cfg.certify.radius_unit <= 0:
        raise ValueError("certify.radius_unit must be > 0")
    if cfg.loss.temperature <= 0:
        raise ValueError(f"loss.temperature must be > 0, got {cfg.loss.temperature}")
    if cfg.optim.chunk_size is not None and cfg.optim.chunk_size < 1:
        raise ValueError(f"optim.chunk_size must be >= 1 or null, got {cfg.optim.chunk_size}")
    if not (math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0) or not 0 <= cfg.optim.min_lr < math.inf:
        raise ValueError(f"optim.lr must be > 0 and optim.min_lr >= 0, got {cfg.optim.lr:g} and "
                         f"{cfg.optim.min_lr:g}")
    if cfg.train.time_limit_min is not None and not cfg.train.time_limit_min > 0:
        raise ValueError(f"train.time_limit_min must be > 0 minutes (or null: no limit), "
                         f"got {cfg.train.time_limit_min:g}")
    if cfg.train.budget_s is not None and not cfg.train.budget_s > 0:
        raise ValueError(f"train.budget_s must be > 0 seconds (or null: train for train.epochs), "
                         f"got {cfg.train.budget_s:g}")
    w, epochs = cfg.optim.warmup_epochs, cfg.train.epochs
    if w is not None and not 0 <= w <= epochs / 2:
        raise ValueError(f"optim.warmup_epochs={w:g} is {'negative' if w < 0 else 'more than half of'} "
                         f"train.epochs={epochs}: the learning rate would spend the run ramping up "
                         f"and the model would stay near chance. Set optim.warmup_epochs=null for the "
                         f"automatic warm-up (5% of the run, here {auto_warmup_epochs(epochs):g} epochs) or a "
                         f"value in [0, {epochs / 2:g}]")
    return cfg


def auto_warmup_epochs(epochs: int) -> float:
    """The default warm-up: 5% of the run, at most 20 epochs (the paper's 20 of 800; 3 of the
    demo's 60)."""
    return min(20.0, epochs / 20)


def warmup_epochs(cfg: Config) -> float:
    """optim.warmup_epochs, or by default auto_warmup_epochs(train.epochs)."""
    w = cfg.optim.warmup_epochs
    return auto_warmup_epochs(cfg.train.epochs) if w is None else float(w)


def _merge(*parts) -> Config:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), *parts)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        where = f" [{key}]" if key else ""
        hint = ("values are YAML: quote text that ends in a colon or holds ': ', e.g. data.name='npz:x.npz'"
                if "Cannot convert 'DictConfig'" in str(e) else
                "see configs/*.yaml and docs/TRAINING.md for the keys")
        raise ValueError(f"bad config: {str(e).splitlines()[0]}{where} ({hint})") from None
    return _check(merged)  # type: ignore[arg-type]


CONFIG_DIR = Path(__file__).resolve().parent / "configs"   # shipped with the package


def packaged_configs() -> list[str]:
    """Names of the configs shipped with lipnext (``--config NAME`` finds them)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A config file: ``path`` itself if it exists, else a packaged config named ``path``
    (``cifar10_l32w1024`` or ``cifar10_l32w1024.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.parent == Path("."):
        packaged = CONFIG_DIR / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
        if packaged.is_file():
            return packaged
    raise FileNotFoundError(f"no config file at {p}, and no packaged config of that name; "
                            f"packaged: {', '.join(packaged_configs())}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults <- YAML file (a path or a packaged config's name) <- dotted overrides
    ``key=value``; validated."""
    parts: list[Any] = []
    if path is not None:
        path = resolve_config_path(path)
        try:
            loaded = OmegaConf.load(path)
        except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:  # YAML syntax errors
            raise ValueError(f"cannot read config {path}: {' '.join(str(e).split())}") from None
        if not isinstance(loaded, DictConfig):
            raise ValueError(f"config {path} must be a YAML mapping of keys (e.g. 'train: {{epochs: 3}}'), "
                             f"it holds a {type(loaded).__name__.replace('Config', '').lower()}")
        parts.append(loaded)
    for o in overrides or []:
        if "=" not in o:
            raise ValueError(f"override {o!r} must look like key=value (e.g. train.epochs=3)")
    if overrides:
        try:
            parts.append(OmegaConf.from_dotlist(list(overrides)))
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise ValueError(f"bad override in {' '.join(overrides)}: {str(e).splitlines()[0]} "
                             "(values are YAML: quote text with brackets or colons)") from None
    return _merge(*parts)


def config_from_dict(d: dict) -> Config:
    """A validated Config from a plain dict (e.g. a run's saved config.yaml)."""
    return _merge(OmegaConf.create(d))


def dataset_options(cfg: Config) -> dict[str, Any]:
    """The keyword options of ``get_dataset`` that the data section sets (None left out)."""
    d = cfg.data
    opts = {"holdout": d.holdout, "val_fraction": d.val_fraction, "num_classes": d.num_classes,
            "image_size": d.image_size}
    from .data import parse_spec
    if parse_spec(d.name)[0] == "imagenet":          # streamed: decoded by DataLoader workers
        opts["num_workers"] = d.num_workers
    return {k: v for k, v in opts.items() if v is not None}


def to_yaml(cfg: Config | DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
