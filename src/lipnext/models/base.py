"""The interface every certifiable lipnext model follows, and the base that builds one.

A model is a trunk f = forward_features(x) with a sound Lipschitz bound L
(``lipschitz_bound()``) followed by a linear head z = forward_head(f) = W f + b whose
effective weight W is ``head_weight()``. Certification (``lipnext.certify``) needs
nothing else, so any architecture with this interface can be certified and verified.

An architecture is a ``CertifiableConfig`` dataclass (its constructor options) and a
``CertifiableModel`` subclass naming it in ``config_class`` and building its layers in
``build(config)``. The base resolves the shared options once (the geometry, the mean),
builds inside the seed scope (``seeded()``) and saves the config (``config()``, JSON).
The trunk's bound is the product over its layers of their ``lipschitz_bound()``
(``lipschitz_factors()``); its float64 programs, ``rounding_program()`` and
``head_program()``, are assembled from the layers' own (``lipnext.program``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from ..program import NotCertifiable, affine_of, lipschitz_of
from ..rounding import Step

# float pixels outside this range draw a warning: [0, 1], with room for attacks in R^n
PIXEL_RANGE = (-1.0, 2.0)

__all__ = ["CertifiableConfig", "CertifiableModel", "check_images", "check_pixel_range",
           "default_patch_size", "resolve_geometry", "resolve_mean"]


def default_patch_size(image_size: int) -> int:
    """4 for CIFAR-sized inputs, 16 for ImageNet-sized ones, smaller for tiny images."""
    if image_size >= 128:
        return 16
    if image_size >= 32:
        return 4
    return max(1, image_size // 4)


def resolve_geometry(image_size: int | Sequence[int],
                     patch_size: int | None) -> tuple[tuple[int, int], int]:
    """(H, W) and the patch size (default_patch_size if None), checked: it must divide both sides."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size must be an int or (H, W), got {image_size}")
    if patch_size is not None and patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    chosen = patch_size or default_patch_size(min(hw))
    if hw[0] % chosen or hw[1] % chosen:
        divisors = [k for k in range(1, min(hw) + 1) if hw[0] % k == 0 and hw[1] % k == 0]
        if patch_size is None:
            raise ValueError(f"image size {hw[0]}x{hw[1]} has no default patch size (the default, "
                             f"{chosen}, does not divide it): pass patch_size=, one of {divisors}")
        raise ValueError(f"patch_size {patch_size} does not divide the image size {hw[0]}x{hw[1]}; "
                         f"choose one of {divisors}")
    return hw, chosen


def resolve_mean(mean: Sequence[float] | None, in_chans: int) -> list[float]:
    """The per-channel mean subtracted inside the model (0.5 per channel by default)."""
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive number of input channels, got {in_chans!r}")
    mean = [float(m) for m in mean] if mean is not None else [0.5] * in_chans
    if len(mean) != in_chans:
        raise ValueError(f"mean has {len(mean)} entries but the input has {in_chans} channels")
    return mean


def check_images(x: torch.Tensor, in_chans: int, image_size: tuple[int, int]) -> None:
    """Raise a clear error unless x is a float (B, in_chans, H, W) batch of finite pixels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected float pixels in [0, 1], got dtype {x.dtype}; "
                        "convert uint8 images with x.float() / 255")
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (B, {in_chans}, {image_size[0]}, {image_size[1]}), "
                         f"got shape {tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)"
                         if x.dim() == 3 else
                         f"expected images of shape (B, {in_chans}, {image_size[0]}, {image_size[1]}), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        hint = " (channels-last input? use x.permute(0, 3, 1, 2))" if x.shape[-1] == in_chans else ""
        raise ValueError(f"the model expects {in_chans} input channels, got {x.shape[1]} "
                         f"in shape {tuple(x.shape)}{hint}")
    if tuple(x.shape[-2:]) != tuple(image_size):
        raise ValueError(f"the model was built for {image_size[0]}x{image_size[1]} images, got "
                         f"{x.shape[-2]}x{x.shape[-1]}; resize the inputs or create the model with "
                         f"image_size={x.shape[-2]}")
    if x.numel() and not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()):
        lo, hi = (float(v) for v in torch.stack(torch.aminmax(x.detach())).tolist())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("the input contains NaN or Inf values")
        check_pixel_range(lo, hi)


def check_pixel_range(lo: float, hi: float) -> None:
    """Warn when float pixels lie far outside [0, 1] (e.g. 0..255 pixels not divided by 255)."""
    if hi > PIXEL_RANGE[1] or lo < PIXEL_RANGE[0]:
        # one fixed text, so that Python shows it once per place, not once per batch
        warnings.warn(f"the inputs lie far outside [0, 1] (below {PIXEL_RANGE[0]:g} or above "
                      f"{PIXEL_RANGE[1]:g}): lipnext models take raw pixels in [0, 1] (the mean is "
                      "subtracted inside the model); divide 0..255 pixels by 255", UserWarning, stacklevel=3)


@dataclasses.dataclass(kw_only=True)
class CertifiableConfig:
    """The options every image model shares, resolved on creation: ``image_size`` -> (H, W),
    ``patch_size`` -> a divisor of both (``default_patch_size`` if None), ``mean`` -> one float
    per channel (0.5 if None). Subclasses add their architecture's options."""

    num_classes: int = 10
    in_chans: int = 3
    image_size: int | Sequence[int] = 32
    patch_size: int | None = None
    mean: Sequence[float] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        self.image_size, self.patch_size = resolve_geometry(self.image_size, self.patch_size)
        self.mean = resolve_mean(self.mean, self.in_chans)
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"need num_classes >= 2, got {self.num_classes!r}")

    @property
    def grid(self) -> tuple[int, int]:
        """The token grid (H / p, W / p) of p x p patches."""
        (h, w), p = self.image_size, self.patch_size
        return h // p, w // p


class CertifiableModel(nn.Module):
    """Base class: trunk with a sound Lipschitz bound + linear head; config round-trips.

    ``Model(config)`` or ``Model(**options)`` (or both: the options replace fields of the
    config). ``model.cfg`` is the resolved config; the fields every model shares are also
    attributes (``num_classes``, ``in_chans``, ``image_size``, ``patch_size``). A subclass
    without a ``config_class`` sets those itself and takes no options.
    """

    arch: ClassVar[str] = ""
    config_class: ClassVar[type[CertifiableConfig] | None] = None
    num_classes: int
    in_chans: int
    image_size: tuple[int, int]

    def __init__(self, config: CertifiableConfig | None = None, /, **options: Any):
        super().__init__()
        if self.config_class is None:
            if config is not None or options:
                raise TypeError(f"{type(self).__name__} has no config_class: it takes no options")
            return
        if config is None:
            config = self.config_class(**options)
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        elif options:
            config = dataclasses.replace(config, **options)
        self.cfg = config
        self.num_classes, self.in_chans = config.num_classes, config.in_chans
        self.image_size, self.patch_size = config.image_size, config.patch_size
        self.validate_inputs = True
        with self.seeded():
            self.build(config)

    def build(self, config: CertifiableConfig) -> None:
        """Create the layers (called once, inside ``seeded()``)."""
        raise NotImplementedError

    @contextmanager
    def seeded(self) -> Iterator[None]:
        """Draw random numbers from ``torch.manual_seed(seed)`` when the config has a seed,
        leaving the global generator as it was; without a seed, from the global generator."""
        seed = self.cfg.seed
        with torch.random.fork_rng(enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            yield

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """Logits from features; float64 features give float64 logits (for certify)."""
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def lipschitz_factors(self) -> dict[str, float]:
        """Upper bounds of the trunk's parts, measured from the weights: for each child module
        but the head, in order, its ``lipschitz_bound()``, and for a list of layers the product
        of theirs (1 for an empty list). A module without a certificate (``lipschitz_bound()``
        and ``rounding_steps()``) is refused (``lipnext.program.NotCertifiable``), never taken
        as 1-Lipschitz. A model whose forward uses a child several times overrides this."""
        factors = {}
        for name, child in self.named_children():
            if name == "head":
                continue
            if isinstance(child, nn.ModuleList):
                factors[name] = math.prod(lipschitz_of(layer, f"{name}.{i}") for i, layer in enumerate(child))
            else:
                factors[name] = lipschitz_of(child, name)
        return factors

    def lipschitz_bound(self) -> float:
        """Upper bound on the L2 Lipschitz constant of forward_features: the product of
        ``lipschitz_factors()``. A claim: ``certify`` checks it against the bound of the
        layers' programs and refuses it when it is below."""
        return math.prod(self.lipschitz_factors().values())

    def rounding_program(self) -> list[Step]:
        """forward_features as float64 steps (``lipnext.rounding``), assembled from the layers
        with ``lipnext.program.steps_of``; a certifiable model defines it."""
        raise NotCertifiable(f"{type(self).__name__} has no rounding_program(): give it one, assembled "
                             "from its layers' rounding_steps (docs/EXTENDING.md, Adding a model)")

    def head_program(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) in float64 of forward_head, z = W f + b: the head layer's ``affine_map()``."""
        return affine_of(self.head, "head")

    def head_weight(self) -> torch.Tensor:
        """The effective (K, C) weight W of the linear head z = W f + b (normalised rows)."""
        return self.head.normalized_weight()

    def config(self) -> dict[str, Any]:
        """The config's fields as JSON values (tuples become lists): ``type(model)(**config)``
        rebuilds the model; ``lipnext.save_model`` stores it in the file's header."""
        return json.loads(json.dumps(dataclasses.asdict(self.cfg)))
