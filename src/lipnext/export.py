"""Export a model for inference and for external verifiers: ONNX or a ``torch.export`` program.

    export_model(model, "model.onnx")   # or .pt2; format from the suffix unless given

The model is traced by ``torch.export`` in eval mode with a dynamic batch dimension. A
LipNeXt block traces its plain composition (``models.lipnext.block_forward``: the GEMM by
R^T, the shift, the GEMM by R M^T, the bias, beta-Abs), not the one-function block of
training, and R M^T is formed once from the weights, so the graph holds plain operators
only. ONNX goes through ``torch.onnx.export`` (extra ``export``: onnx, onnxscript,
onnxruntime); ``.pt2`` through ``torch.export.save``. Neither file needs lipnext to run:
``onnxruntime.InferenceSession(file)`` or ``torch.export.load(file).module()``.

After writing, the file is loaded back with onnxruntime (ONNX) or torch.export (.pt2) and
run on ``example``: its outputs must equal ``model(example)`` within ``atol`` (1e-5, fp32),
else the export fails. The exported graph takes float32 images (N, C, H, W) in [0, 1] and
returns the logits; it has no input checks and gives no certificates (certify the lipnext
model, ``lipnext certify``). Models whose operators ONNX lacks (the LiResNet baseline's
Cholesky factorisation, the BRONet baseline's complex FFT convolutions) export to .pt2 only.
"""
from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .io import atomic_write
from .modes import evaluating, standard_numerics

__all__ = ["FORMATS", "export_model", "run_exported"]

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
ATOL = 1e-5


def _format(path: Path, format: str | None) -> str:
    if format is None:
        if path.suffix not in FORMATS:
            raise ValueError(f"cannot tell the format of {path}: name it .onnx or .pt2, or give --format")
        return FORMATS[path.suffix]
    if format not in FORMATS.values():
        raise ValueError(f"unknown export format {format!r}; choose onnx or pt2")
    return format


@contextmanager
def _quiet() -> Iterator[None]:
    """torch's own notes while exporting (operator libraries not installed, torch.export's
    deprecations) are not the user's to act on."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _save_pt2(program, path: str) -> None:
    with open(path, "wb") as fh:                      # a file object: any temporary name will do
        torch.export.save(program, fh)


def _dynamic() -> dict[str, Any]:
    return {"x": {0: torch.export.Dim("batch", min=1, max=1 << 20)}}


def run_exported(path: str | Path, x: torch.Tensor) -> torch.Tensor:
    """Outputs of an exported file on ``x`` (float32), by onnxruntime (.onnx) or torch.export (.pt2)."""
    path = Path(path)
    if _format(path, None) == "onnx":
        from .extras import require
        ort = require("onnxruntime", "checking an ONNX export")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return torch.from_numpy(session.run(None, {name: x.float().cpu().numpy()})[0])
    program = torch.export.load(str(path))
    with torch.no_grad():
        return program.module()(x.float())


def export_model(model, path: str | Path, format: str | None = None, example: torch.Tensor | None = None,
                 atol: float = ATOL) -> dict[str, Any]:
    """Write ``model`` to ``path`` as ONNX or .pt2 (module doc) and check the file on ``example``
    (default: 16 uniform random images). Returns the format, the file, the largest absolute
    difference from ``model(example)`` and the number of images it was checked on."""
    path = Path(path)
    fmt = _format(path, format)
    if example is None:
        gen = torch.Generator().manual_seed(0)
        example = torch.rand(16, model.in_chans, *model.image_size, generator=gen)
    example = example.float().cpu()
    model = model.cpu()
    with evaluating(model), standard_numerics(model), torch.no_grad(), _quiet():
        reference = model(example)
        try:
            program = torch.export.export(model, (example,), dynamic_shapes=_dynamic())
        except (torch._dynamo.exc.UserError, RuntimeError) as e:
            raise ValueError(f"torch.export cannot trace {type(model).__name__}: {str(e).splitlines()[0]}") from None
        if fmt == "pt2":
            atomic_write(path, lambda tmp: _save_pt2(program, tmp))
        else:
            from .extras import require
            for module in ("onnx", "onnxscript", "onnxruntime"):
                require(module, "ONNX export")
            from torch.onnx.errors import OnnxExporterError
            with _quiet():
                try:
                    onnx = torch.onnx.export(program, (example,), dynamo=True, verbose=False)
                except OnnxExporterError as e:
                    op = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", str(e))
                    reason = f"ONNX has no operator for {op.group(1)}" if op else str(e).splitlines()[0]
                    raise ValueError(f"ONNX cannot express {type(model).__name__}: {reason}; "
                                     "export it with --format pt2") from None
            atomic_write(path, lambda tmp: onnx.save(tmp))
    got = run_exported(path, example)
    error = float((got - reference).abs().max()) if reference.numel() else 0.0
    if not error <= atol:
        path.unlink()
        raise ValueError(f"the exported {fmt} graph differs from the model by {error:.3g} > {atol:g} "
                         "on the check images; the file was removed")
    return {"format": fmt, "file": str(path), "max_abs_error": error, "checked_on": int(example.shape[0]),
            "atol": atol, "input": f"float32 (N, {model.in_chans}, {model.image_size[0]}, {model.image_size[1]}) "
            "in [0, 1]", "output": f"logits (N, {model.num_classes})"}
