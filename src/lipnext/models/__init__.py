"""Models: LipNeXt, the LiResNet-style and BRONet-style baselines, and the registry of named
configurations (each model file registers its own)."""
from .base import CertifiableConfig, CertifiableModel, check_images, default_patch_size
from .bronet import BRONet, BRONetConfig
from .liresnet import LiResNet, LiResNetConfig
from .lipnext import LipNeXt, LipNeXtBlock, LipNeXtConfig, set_compile
from .registry import (build_from_config, create_model, list_models, model_entry, register_arch,
                       register_model, register_sizes)

__all__ = ["BRONet", "BRONetConfig", "CertifiableConfig", "CertifiableModel", "LiResNet",
           "LiResNetConfig", "LipNeXt", "LipNeXtBlock", "LipNeXtConfig", "build_from_config",
           "check_images", "create_model", "default_patch_size", "list_models", "model_entry",
           "register_arch", "register_model", "register_sizes", "set_compile"]
