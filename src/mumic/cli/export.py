"""`mumic export`."""

from __future__ import annotations

import argparse
import sys
import typing


def register(sub: typing.Any) -> None:
    from mumic.backbones.onnx import DEFAULT_OPSET
    from mumic.export import FORMATS

    p = sub.add_parser(
        "export", help="export a run's image and text encoders (ONNX)",
        description="Write the image tower+head and text tower+head as ONNX graphs, with the label embeddings, "
        "tau and b, the tokenizer files, a README.json describing inputs, outputs and preprocessing, and predict.py "
        "(numpy, Pillow and onnxruntime only) giving the same scores and decisions as `mumic predict`.",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="export format (default: onnx)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the checks of the graphs and of predict.py against PyTorch and mumic predict")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mumic.export import export_onnx

    readme = export_onnx(args.run, args.out, opset=args.opset, overwrite=args.overwrite, verify=not args.no_verify)
    msg = f"exported {readme['run']} to {args.out}"
    if "verification" in readme:
        diffs = {k: v for k, v in readme["verification"].items() if k.endswith("diff")}
        msg += " (onnxruntime vs PyTorch: " + ", ".join(f"{k.replace('_max_abs_diff', '')} {v:.1e}" for k, v in diffs.items()) + ")"
    sys.stderr.write(msg + "\n")
    return 0
