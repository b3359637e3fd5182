"""Checkpoints: ``<run>/checkpoints/step_XXXXXXXX/`` holding

* ``model.safetensors``: the weights (lipnext format, loadable by ``lipnext certify``);
* ``optimizer.safetensors``: every optimizer state tensor (``state.<i>.<name>``) and the
  RNG states (``rng.cpu``, ``rng.cuda.<d>``: uint8 tensors);
* ``state.json``: step, epoch, scalars, the optimizer's param groups and non-tensor state.

No pickle anywhere. Both safetensors files record their tensors' sha256 (``tensors_sha256``
in the header, :func:`lipnext.io.tensors_sha256`), checked at load. A checkpoint is written
into a hidden temporary folder, each file fsync'ed, then renamed into place with
``os.replace`` (atomic): a crash mid-write leaves only a ``.tmp-*`` folder, which loading
ignores, and a failed write (a full disk) removes it and raises an ``OSError`` naming the
checkpoint. Only the last ``keep_last`` are kept, and only once the new one is complete; an
old checkpoint is first renamed to a hidden ``.del-*`` folder, then deleted, so a crash
mid-deletion never leaves a partial ``step_*`` folder (and folders missing a file are
skipped anyway). A step written again (after a rollback) replaces its folder by two renames:
the old one to ``.old-*``, the new one into place; a crash between the two leaves the
``.old-*`` folder, which counts as that step until the step is written again.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..io import check_tensors, file_mode, read_metadata, save_model, tensors_sha256, write_error, write_safetensors
from .distributed import load_full_state_dict

__all__ = ["save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint",
           "CHECKPOINT_DIR"]

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^(?:\.old-)?step_(\d{8,})(?:-\d+)?$")
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = v.detach().cpu().clone().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "state_scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["state_scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first, one per step (temporary and half-deleted
    folders are ignored; an ``.old-step_*`` folder stands for its step only when the crash of a
    re-save left no ``step_*`` folder)."""
    d = Path(run_dir) / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in sorted(d.iterdir(), key=lambda p: p.name.startswith(".old-")):  # step_* first
        m = _NAME.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in FILES):
            found.setdefault(int(m.group(1)), p)
    return [found[k] for k in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module,
                    optimizer_state: dict[str, Any], state: dict[str, Any], keep_last: int = 3,
                    model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Atomically write checkpoint ``step`` and delete all but the last ``keep_last``.

    ``optimizer_state`` is the optimizer's ``state_dict()``; ``model_state`` replaces
    ``model.state_dict()`` (an FSDP model's gathered weights).
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write(tmp, step, model, optimizer_state, state, model_state)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)    # never leave a half-written folder behind
        raise write_error(e, f"checkpoint {final}") from None
    if final.exists():          # the same step written again (e.g. after a rollback)
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        _remove(old)
    for stale in [*root.glob(".tmp-*"), *root.glob(".del-*"), *root.glob(".old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _write(folder: Path, step: int, model: torch.nn.Module, optimizer_state: dict[str, Any],
           state: dict[str, Any], model_state: dict[str, torch.Tensor] | None) -> None:
    """The three files of a checkpoint, each fsync'ed, into ``folder``."""
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    save_model(model, folder / "model.safetensors", model_state)
    tensors = {**opt_tensors, **rng_tensors()}
    write_safetensors(tensors, folder / "optimizer.safetensors",
                      {"tensors_sha256": tensors_sha256(tensors)})
    (folder / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_meta}, indent=1))
    os.chmod(folder / "optimizer.safetensors", file_mode())   # safetensors writes 0600
    for f in ("optimizer.safetensors", "state.json"):
        _fsync(folder / f)


def _remove(path: Path) -> None:
    """Rename out of sight (atomic), then delete: never a half-deleted step_* folder."""
    hidden = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the header metadata of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: Any | None = None) -> dict[str, Any]:
    """Load weights (and optimizer state, RNG) into ``model`` / ``optimizer``; return state.json.

    Raises a clear error if the checkpoint holds another architecture or configuration.
    """
    path = Path(path)
    for f in FILES:
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path} is not a complete lipnext checkpoint ({f} missing)")
    meta = read_metadata(path / "model.safetensors")
    want = {"arch": getattr(model, "arch", ""), "config": model.config()}
    have = {"arch": meta["arch"], "config": json.loads(meta["config"])}
    if json.dumps(want, sort_keys=True) != json.dumps(have, sort_keys=True):
        diff = sorted(k for k in set(want["config"]) | set(have["config"])
                      if want["config"].get(k) != have["config"].get(k))
        raise ValueError(f"checkpoint {path} holds a different model ({have['arch']}, differing in "
                         f"{diff or 'arch'}: checkpoint {[have['config'].get(k) for k in diff]} vs "
                         f"config {[want['config'].get(k) for k in diff]}); use the run's own config "
                         "or a new run_dir")
    weights = load_file(str(path / "model.safetensors"))
    check_tensors(weights, meta, path / "model.safetensors")
    load_full_state_dict(model, weights)
    state = json.loads((path / "state.json").read_text())
    tensors, opt_meta = _read_safetensors(path / "optimizer.safetensors")
    check_tensors(tensors, opt_meta, path / "optimizer.safetensors")
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state.pop("optimizer")))
    restore_rng(tensors)
    return state
