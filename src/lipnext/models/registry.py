"""A registry of architectures and of named configurations (timm-style).

``register_arch`` (a class decorator) records a model class under its ``arch`` name so that
a saved config rebuilds it; ``register_model`` records a named configuration. Each model's
own file registers both; a model defined outside lipnext registers the same way when its
module is imported (``lipnext --import MODULE`` for the command line).
"""
from __future__ import annotations

import difflib
from typing import Any

from .base import CertifiableModel

__all__ = ["register_arch", "register_model", "register_sizes", "create_model", "list_models",
           "model_entry", "build_from_config"]

_ARCHS: dict[str, type[CertifiableModel]] = {}
_MODELS: dict[str, tuple[str, dict[str, Any], str]] = {}


def register_arch(cls: type[CertifiableModel]) -> type[CertifiableModel]:
    """Class decorator: make ``cls`` loadable from a saved config by its ``arch`` name."""
    if not cls.arch:
        raise ValueError(f"{cls.__name__} has no arch name: set the class attribute arch = '...'")
    _ARCHS[cls.arch] = cls
    return cls


def register_model(name: str, arch: str, description: str = "", **defaults: Any) -> None:
    """Record a named configuration: the architecture and its constructor defaults."""
    if name in _MODELS:
        raise ValueError(f"model name {name!r} is already registered")
    _MODELS[name] = (arch, defaults, description)


def register_sizes(arch: str, label: str, sizes: dict[str, tuple[int, int, str]]) -> None:
    """Register named (depth, width) configurations of ``arch``: {name: (depth, width, note)},
    each described as "<label> L<depth> W<width>, <note>"."""
    for name, (depth, width, note) in sizes.items():
        register_model(name, arch, f"{label} L{depth} W{width}, {note}", depth=depth, width=width)


def list_models(pattern: str = "") -> list[str]:
    """Names of the registered configurations, optionally filtered by a substring."""
    return sorted(n for n in _MODELS if pattern in n)


def model_entry(name: str) -> tuple[str, dict[str, Any], str]:
    """(arch, defaults, description) of a named configuration."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())} "
                       "(`lipnext models` lists them; a model of your own registers when its module "
                       "is imported: `lipnext --import MODULE ...`)")
    return _MODELS[name]


def build_from_config(arch: str, config: dict[str, Any]) -> CertifiableModel:
    """Instantiate architecture ``arch`` with constructor kwargs ``config``."""
    if arch not in _ARCHS:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(sorted(_ARCHS))} (a model "
                       "of your own registers when its module is imported: `lipnext --import MODULE ...`)")
    return _ARCHS[arch](**config)


def create_model(name: str, num_classes: int | None = None, in_chans: int | None = None,
                 image_size: Any = None, pretrained: str | None = None, **overrides: Any) -> CertifiableModel:
    """Build the named model for ``num_classes`` classes (default 10) of (in_chans, H, W) images
    (default 3, 32). With ``pretrained`` (a run folder, weights file, URL#sha256=HEX or
    ``hf-hub:ORG/NAME[@REV]``, see ``lipnext.hub``): the saved model, in eval mode, which must be
    this named configuration and agree with every option given."""
    arch, defaults, _ = model_entry(name)
    given = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans),
                               ("image_size", image_size)) if v is not None}
    if pretrained is not None:
        return _pretrained(name, arch, {**defaults, **given, **overrides}, pretrained)
    kwargs = {**defaults, "num_classes": 10, "in_chans": 3, "image_size": 32, **given, **overrides}
    try:
        return build_from_config(arch, kwargs)
    except TypeError as e:
        raise TypeError(f"bad option for model {name!r}: {e}") from None


def _pretrained(name: str, arch: str, expected: dict[str, Any], location: str) -> CertifiableModel:
    """The saved model at ``location``, checked to be ``name`` with the ``expected`` options."""
    import dataclasses

    from ..io import load_model

    model = load_model(location)
    if model.arch != arch:
        raise ValueError(f"{location} holds a {model.arch!r} model, not {name!r} ({arch})")
    try:
        wanted = dataclasses.replace(model.cfg, **expected)
    except TypeError as e:
        raise TypeError(f"bad option for model {name!r}: {e}") from None
    differ = [f"{f.name}={getattr(model.cfg, f.name)!r} (asked {getattr(wanted, f.name)!r})"
              for f in dataclasses.fields(model.cfg) if getattr(model.cfg, f.name) != getattr(wanted, f.name)]
    if differ:
        raise ValueError(f"{location} is not {name} with these options: it has {', '.join(differ)}")
    return model
