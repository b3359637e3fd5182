"""Models: LipNeXt and a registry of named configurations."""
from .base import CertifiableModel, check_images, default_patch_size
from .lipnext import LipNeXt, LipNeXtBlock
from .registry import build_from_config, create_model, list_models, model_entry, register_arch, \
    register_model

register_arch(LipNeXt)

# name: (depth, width, note); trunk parameters 2 * width^2 * depth (docs/CORE.md, Model)
_LIPNEXT = {
    "lipnext_l4w64": (4, 64, "tiny, for tests"),
    "lipnext_l8w128": (8, 128, "small, for the CPU"),
    "lipnext_l12w256": (12, 256, "small, for the CPU"),
    "lipnext_l16w512": (16, 512, "medium"),
    "lipnext_l32w1024": (32, 1024, "paper, CIFAR-10"),
    "lipnext_l32w2048": (32, 2048, "paper, CIFAR-10/100, Tiny-ImageNet"),
    "lipnext_l32w4096": (32, 4096, "paper, ImageNet 1B"),
    "lipnext_2b": (32, 5792, "paper, ImageNet 2B"),
}
for _name, (_depth, _width, _note) in _LIPNEXT.items():
    _params = 2 * _width ** 2 * _depth
    register_model(_name, "lipnext", f"LipNeXt L{_depth} W{_width}, trunk params "
                   f"{_params / 1e6:,.{0 if _params >= 1e7 else 2}f}M; {_note}",
                   depth=_depth, width=_width)

__all__ = ["CertifiableModel", "LipNeXt", "LipNeXtBlock", "build_from_config", "check_images",
           "create_model", "default_patch_size", "list_models", "model_entry", "register_arch",
           "register_model"]

# Baselines (LiResNet-style, BRONet-style); configurations paired with LipNeXt at equal
# parameter counts: l7w64 / l6w96 ~ lipnext_l8w128, l11w128 / l12w172 ~ lipnext_l12w256.
from .bronet import BRONet  # noqa: E402
from .liresnet import LiResNet  # noqa: E402

register_arch(LiResNet)
register_arch(BRONet)
_BASELINES = {
    "liresnet_l7w64": ("liresnet", 7, 64, "0.27M params, pairs with lipnext_l8w128 (0.28M)"),
    "liresnet_l11w128": ("liresnet", 11, 128, "1.66M params, pairs with lipnext_l12w256 (1.64M)"),
    "liresnet_l12w128": ("liresnet", 12, 128, "1.81M params"),
    "liresnet_l12w512": ("liresnet", 12, 512, "28.9M params, LiResNet-paper-scale width"),
    "bronet_l6w96": ("bronet", 6, 96, "0.26M params, pairs with lipnext_l8w128 (0.28M)"),
    "bronet_l12w128": ("bronet", 12, 128, "0.91M params"),
    "bronet_l12w172": ("bronet", 12, 172, "1.64M params, pairs with lipnext_l12w256 (1.64M)"),
    "bronet_l12w512": ("bronet", 12, 512, "14.4M params, BRONet-paper-scale width"),
}
for _name, (_arch, _depth, _width, _note) in _BASELINES.items():
    _label = "LiResNet-style" if _arch == "liresnet" else "BRONet-style"
    register_model(_name, _arch, f"{_label} L{_depth} W{_width}, {_note}", depth=_depth, width=_width)
__all__ += ["BRONet", "LiResNet"]
