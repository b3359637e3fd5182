"""Saving and loading models: safetensors weights with the JSON config in the metadata.

One file, no pickle: the header's metadata holds ``{"format": "lipnext", "arch": ...,
"config": <json>, "format_version": ..., "tensors_sha256": ...}``; loading rebuilds the
architecture from the config, checks the tensors against ``tensors_sha256`` (see
:func:`tensors_sha256`; files written before it existed load without the check) and loads
them strictly. Writes are atomic (temporary file + os.replace).
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .digest import tensors_sha256
from .models.base import CertifiableModel
from .models.registry import build_from_config

__all__ = ["save_model", "load_model", "atomic_write", "file_mode", "tensors_sha256", "check_tensors",
           "WEIGHTS_NAME", "FORMAT_VERSION"]

WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = "1"


def file_mode() -> int:
    """The mode of a newly created file under the current umask (0644 under umask 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then atomically rename tmp_path to ``path``. The file gets the
    mode of any newly created file (0666 minus the umask), not mkstemp's private 0600.

    On any failure the temporary file is removed and ``path`` is left as it was; a
    filesystem error (full disk, read-only folder, ...) is re-raised as an ``OSError`` of
    the same errno whose message names ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(e, path) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())               # after: some writers (safetensors) make it 0600
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):
            raise write_error(e, path) from None
        raise
    return path


def write_error(e: OSError, path: str | os.PathLike) -> OSError:
    """``e`` as an OSError of the same errno (and subclass) whose message names ``path``:
    "cannot write PATH: REASON" (REASON kept from an inner write_error)."""
    reason = getattr(e, "reason", None) or e.strerror or str(e)
    what = f"cannot write {path}: {reason}"
    err = OSError(e.errno, what) if e.errno is not None else OSError(what)
    err.reason = reason
    return err


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, its I/O errors (a full disk) raised as ``OSError``."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:              # the Rust writer reports "... (os error 28)"
        code = re.search(r"os error (\d+)", str(e))
        raise (OSError(int(code.group(1)), os.strerror(int(code.group(1)))) if code
               else OSError(errno.EIO, str(e))) from None


def check_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str | os.PathLike) -> None:
    """Refuse tensors whose :func:`tensors_sha256` differs from the one recorded in ``meta``
    when ``path`` was saved (a file without the record, from an older lipnext, passes)."""
    want = meta.get("tensors_sha256")
    if want is not None and tensors_sha256(tensors) != want:
        raise ValueError(f"{path} is damaged: its tensors' sha256 does not match the one recorded "
                         "when it was saved (the file was altered or corrupted on disk); use "
                         "another copy or an earlier checkpoint")


def weights_path(path: str | os.PathLike) -> Path:
    """The weights file of ``path``: itself, or model.safetensors in a folder."""
    path = Path(path)
    return path / WEIGHTS_NAME if path.is_dir() or path.suffix == "" else path


def save_model(model: CertifiableModel, path: str | os.PathLike,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` to ``path`` (a .safetensors file, or a folder that gets model.safetensors).

    ``state_dict`` replaces ``model.state_dict()`` (e.g. the gathered weights of an FSDP model).
    """
    target = weights_path(path)
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if v is not None}
    meta = {"format": "lipnext", "format_version": FORMAT_VERSION, "arch": model.arch,
            "config": json.dumps(model.config()), "tensors_sha256": tensors_sha256(tensors)}
    return atomic_write(target, lambda tmp: write_safetensors(tensors, tmp, meta))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of a lipnext weights file, with clear errors."""
    from safetensors import safe_open

    target = weights_path(path)
    if not target.exists():
        raise FileNotFoundError(f"no model weights at {target}")
    try:
        with safe_open(str(target), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{target} is not a readable safetensors file ({e}); "
                         "lipnext never unpickles weights, save them with lipnext.save_model") from None
    if meta.get("format") != "lipnext":
        raise ValueError(f"{target} is a safetensors file but not a lipnext model "
                         "(no lipnext metadata); build the model and load_state_dict yourself")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{target} has lipnext format version {meta.get('format_version')!r}, "
                         f"this lipnext reads version {FORMAT_VERSION}")
    return meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               sha256: str | None = None) -> CertifiableModel:
    """Rebuild a model saved by :func:`save_model`, in eval mode, after checking its tensors'
    sha256: from a run folder, a weights file, a URL with its sha256 or ``hf-hub:ORG/NAME[@REV]``
    (``lipnext.hub.resolve``, which checks the file's sha256 against ``sha256`` and the source's
    own); read on the CPU, then moved to ``device``."""
    from .hub import resolve

    target = resolve(path, sha256)
    meta = read_metadata(target)
    try:
        arch, config = meta["arch"], json.loads(meta["config"])
        if not isinstance(config, dict):
            raise ValueError("the config is not a JSON object")
    except (KeyError, ValueError) as e:
        raise ValueError(f"{target} has a damaged lipnext header (arch/config: {e}); "
                         "re-save the model with lipnext.save_model") from None
    try:
        model = build_from_config(arch, config)
    except KeyError:  # unknown architecture: its own clear message
        raise
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:  # unknown key, bad value
        raise ValueError(f"{target} was saved by another lipnext version or model: its {arch} "
                         f"config does not fit this version ({type(e).__name__}: {e})") from None
    try:
        state = load_file(str(target))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{target} is damaged: its tensors cannot be read ({e})") from None
    check_tensors(state, meta, target)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{target} holds NaN or Inf values in {bad[:5]}: the file is damaged or "
                         "the training diverged; use an earlier checkpoint")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"{target} does not match the {meta['arch']} architecture of its "
                         f"config: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"{target} does not match the {meta['arch']} architecture of its config: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()
