"""`lipnext export RUN --format onnx|pt2 --out FILE`: the model as an ONNX graph or a
torch.export program that runs without lipnext, checked against the model, card beside it."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX or torch.export (.pt2) for inference",
                       description="Trace the model (plain operators, dynamic batch), write FILE, load it "
                       "back (onnxruntime / torch.export) and check its logits against the model's on "
                       "--check-images images (the run's test images when its config names data, then "
                       "uniform random ones): at most 1e-5 apart. From a run folder the model card is "
                       "written beside FILE. Needs the extra 'export' for ONNX.")
    p.add_argument("model", help="run folder, .safetensors weights, URL#sha256=HEX or hf-hub:ORG/NAME")
    p.add_argument("--format", choices=["onnx", "pt2"], default=None, help="default: from --out's suffix")
    p.add_argument("--out", required=True, help="the file to write (.onnx or .pt2)")
    p.add_argument("--check-images", type=int, default=32, help="images the export is checked on (default 32)")
    p.set_defaults(func=run)


def _check_images(model, location: str, n: int):
    """The run's first test images (when its config names readable data), then uniform random ones."""
    import torch

    from ..predict import run_images

    real = run_images(location, n // 2, "test")
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(n - (0 if real is None else real.shape[0]), model.in_chans, *model.image_size, generator=gen)
    return noise if real is None else torch.cat([real, noise])


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..card import write_card
    from ..export import export_model
    from ..hub import file_sha256
    from ..io import load_model

    if args.check_images < 1:
        raise ValueError(f"--check-images must be >= 1, got {args.check_images}")
    out = Path(args.out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a file name ending in .onnx or .pt2")
    model = load_model(args.model)
    info = export_model(model, out, args.format, _check_images(model, args.model, args.check_images))
    print(f"{out}: {info['format']}, input {info['input']}, output {info['output']}; checked on "
          f"{info['checked_on']} images: max |exported - model| = {info['max_abs_error']:.3g} (<= {info['atol']:g})")
    run_dir = Path(args.model)
    if run_dir.is_dir() and (run_dir / "results.json").is_file():
        info = {**info, "file": out.name, "sha256": file_sha256(out)}
        print(f"model card: {write_card(run_dir, out.parent, {'export': info})[1]}")
    return 0
