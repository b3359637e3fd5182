"""`lipnext export`: ONNX and torch.export files that run without lipnext and equal model(x)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lipnext
from lipnext.cli import main
from lipnext.export import export_model

REPO = Path(__file__).resolve().parents[1]

# runs the exported file with lipnext made unimportable; prints the logits as JSON
WITHOUT_LIPNEXT = """
import json, sys
sys.modules["lipnext"] = None                    # any `import lipnext` now fails
import numpy as np, torch
path, x = sys.argv[1], np.load(sys.argv[2])
if path.endswith(".onnx"):
    import onnxruntime as ort
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = s.run(None, {s.get_inputs()[0].name: x})[0]
else:
    out = torch.export.load(path).module()(torch.from_numpy(x)).detach().numpy()
print(json.dumps(out.tolist()))
"""


def _run_without_lipnext(path: Path, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    np.save(tmp_path / "x.npy", x.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", WITHOUT_LIPNEXT, str(path), str(tmp_path / "x.npy")], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.tensor(json.loads(p.stdout))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_cli_runs_without_lipnext(fmt, tiny_run, tmp_path, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    out = tmp_path / "exp" / f"tiny.{fmt}"
    assert main(["export", str(tiny_run), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "checked on 32 images" in printed and f"model card: {out.parent / 'README.md'}" in printed
    model = lipnext.load_model(tiny_run)
    for n in (1, 5, 64):                                   # the batch dimension is dynamic
        x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(n))
        got = _run_without_lipnext(out, x, tmp_path)
        with torch.no_grad():
            ref = model(x)
        assert got.shape == ref.shape and float((got - ref).abs().max()) <= 1e-5
    card = json.loads((out.parent / "model_card.json").read_text())
    assert card["export"]["format"] == fmt and card["export"]["file"] == out.name
    assert card["export"]["max_abs_error"] <= 1e-5 and card["name"] == "tiny"


@pytest.mark.slow
def test_export_api_for_an_imported_model_and_the_baselines(tmp_path):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import toy_mlp.model  # noqa: F401
    finally:
        sys.path.remove(str(REPO / "examples"))
    pytest.importorskip("onnxruntime")
    x = torch.rand(8, 1, 8, 8)
    toy = lipnext.create_model("toy_mlp_l2w64", num_classes=10, in_chans=1, image_size=8)
    info = export_model(toy, tmp_path / "toy.onnx", example=x)
    assert info["format"] == "onnx" and info["max_abs_error"] <= 1e-5
    with torch.no_grad():
        assert float((_run_without_lipnext(tmp_path / "toy.onnx", x, tmp_path) - toy(x)).abs().max()) <= 1e-5
    for name in ("liresnet_l7w64", "bronet_l6w96"):
        model = lipnext.create_model(name, num_classes=10, in_chans=1, image_size=8)
        assert export_model(model, tmp_path / f"{name}.pt2", example=x)["max_abs_error"] <= 1e-5
        with pytest.raises(ValueError, match="ONNX cannot express .*export it with --format pt2"):
            export_model(model, tmp_path / f"{name}.onnx", example=x)
        assert not (tmp_path / f"{name}.onnx").exists()


def test_training_still_takes_the_one_function_block(tiny_run, tmp_path):
    """Tracing takes the blocks' plain composition; eager training keeps the one-function block."""
    model = lipnext.load_model(tiny_run)
    export_model(model, tmp_path / "m.pt2", example=torch.rand(2, 1, 8, 8))
    assert not model.training
    model.train()
    assert _uses_block(model(torch.rand(4, 1, 8, 8)).grad_fn)


def _uses_block(fn, seen=None) -> bool:
    seen = set() if seen is None else seen
    if fn is None or id(fn) in seen:
        return False
    seen.add(id(fn))
    return "_BlockBackward" in type(fn).__name__ or any(_uses_block(f, seen) for f, _ in fn.next_functions)


def test_export_usage_errors(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "m.bin")]) == 2
    assert "name it .onnx or .pt2" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "none"), "--out", str(tmp_path / "m.pt2")]) == 2
    assert "no model weights" in capsys.readouterr().err
