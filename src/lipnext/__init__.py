"""lipnext: certifiably robust 1-Lipschitz image classifiers (LipNeXt, ICLR 2026).

``import lipnext`` is light (no torch import): every name below, and every submodule
(``lipnext.optim``, ``lipnext.losses``, ``lipnext.verify``, ``lipnext.nn``, ``lipnext.data``,
...), is imported on first use, so ``lipnext --help`` is fast and
``lipnext.optim.build_optimizer`` works after a plain ``import lipnext``.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the submodule that defines it
_NAMES = {"Certificate": "certify", "certify": "certify", "load_model": "io", "save_model": "io",
          "LipNeXt": "models", "create_model": "models", "list_models": "models"}
SUBMODULES = ("bench", "bounds", "card", "certify", "compare", "config", "data", "demo", "engine", "export",
              "hub", "io", "losses", "models", "nn", "ops", "optim", "predict", "program", "report", "rounding",
              "samples", "trackers", "train", "verify")

__all__ = [*sorted(_NAMES), *SUBMODULES, "__version__"]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    elif name in SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'lipnext' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``lipnext.certify`` is the function, also after the submodule of that name is imported
    (the import system would otherwise set the package attribute to the submodule)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _NAMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
