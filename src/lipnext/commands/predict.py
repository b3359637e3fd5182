"""`lipnext predict RUN INPUTS... [--json]`: class, probabilities, certified radius and time per image."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images and certify each prediction",
                       description="For each image (PNG/JPEG files, folders of them, .npz files with x and "
                       "optionally y): the class (the float64 twin's, which the certificate covers), the "
                       "probabilities, the proven certified L2 radius (pixels in [0, 1]) and the time.")
    p.add_argument("model", help="run folder, .safetensors weights, URL#sha256=HEX or hf-hub:ORG/NAME")
    p.add_argument("inputs", nargs="+", help="image files, folders of images, or .npz files")
    p.add_argument("--json", action="store_true", help="print one JSON list (nothing else) instead of a table")
    p.add_argument("--resize", action="store_true", help="resize images to the model's size (bilinear)")
    p.add_argument("--batch-size", type=int, default=64, help="images certified together (default 64)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..io import load_model
    from ..predict import format_rows, load_inputs, predict

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model = load_model(args.model, args.device)
    inputs = load_inputs(args.inputs, model.in_chans, model.image_size, args.resize)
    rows = predict(model, inputs, args.batch_size)
    print(json.dumps(rows, indent=1) if args.json else format_rows(rows))
    return 0
