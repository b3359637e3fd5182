"""Optional dependencies (the extras of ``pip install 'lipnext[...]'``): a missing one is a
one-line error that names the extra to install, never a traceback."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtra", "require", "missing_extra"]

# top-level module -> (pip package, lipnext extra)
EXTRAS = {"sklearn": ("scikit-learn", "demo"), "matplotlib": ("matplotlib", "demo"),
          "tensorboard": ("tensorboard", "log"), "PIL": ("pillow", "imagenet"),
          "geoopt": ("geoopt", "bench"), "geotorch": ("geotorch", "bench"),
          "deel": ("deel-torchlip", "bench"), "orthogonium": ("orthogonium", "bench"),
          "pytest": ("pytest", "test"), "hypothesis": ("hypothesis", "test"),
          "huggingface_hub": ("huggingface_hub", "hub"), "onnx": ("onnx", "export"),
          "onnxscript": ("onnxscript", "export"), "onnxruntime": ("onnxruntime", "export"),
          "wandb": ("wandb", "wandb"), "mlflow": ("mlflow-skinny", "mlflow")}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def _message(module: str, purpose: str) -> str:
    package, extra = EXTRAS.get(module.split(".")[0], (module.split(".")[0], None))
    how = f"pip install 'lipnext[{extra}]' (or pip install {package})" if extra else f"pip install {package}"
    return f"{purpose} needs {package}, which is not installed: {how}"


def require(module: str, purpose: str) -> ModuleType:
    """``import module``, or raise MissingExtra naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(_message(module, purpose)) from None


def missing_extra(e: ImportError) -> str | None:
    """The one-line message for an ImportError of an optional dependency, else None."""
    if isinstance(e, MissingExtra):
        return str(e)
    name = (getattr(e, "name", None) or "").split(".")[0]
    return _message(name, "this command") if name in EXTRAS else None
