"""`mumic export` and `mumic card`."""

from __future__ import annotations

import argparse
import sys
import typing


def register(sub: typing.Any) -> None:
    from mumic.backbones.onnx import DEFAULT_OPSET
    from mumic.export import FORMATS

    p = sub.add_parser(
        "export", help="export a run: ONNX encoders, or a transformers CLIPModel/SiglipModel folder",
        description="--format onnx: write the image tower+head and text tower+head as ONNX graphs, with the label embeddings, "
        "tau and b, the tokenizer files, a README.json describing inputs, outputs and preprocessing, and predict.py "
        "(numpy, Pillow and onnxruntime only) giving the same scores and decisions as `mumic predict`. "
        "--format hf (hf: runs): save the base model with the run's tuned weights applied (save_pretrained, safetensors), "
        "its tokenizer and image-processor config, and classifier.json + classifier.safetensors (class embeddings, tau, b, "
        "thresholds) for p = sigmoid(u.v/tau + b). Both folders get a model card (README.md).",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="export format (default: onnx)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET}; onnx only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the checks of the export against the run (onnx: graphs and predict.py; hf: the reloaded model)")
    p.set_defaults(func=run)

    c = sub.add_parser(
        "card", help="(re)write a run's model card, RUN/README.md",
        description="Write RUN/README.md, a model card in the Hugging Face layout (front matter with library, tags, base "
        "model and metrics; intended use, training data, settings, evaluation with the per-label table, thresholds, "
        "zero-shot labels, limitations, how to load it), from the run's own files. A README.md mumic did not write is "
        "refused unless --overwrite.",
    )
    c.add_argument("run", help="run directory")
    c.add_argument("--overwrite", action="store_true", help="replace a README.md that mumic did not write")
    c.set_defaults(func=card)


def _diffs(verification: dict[str, typing.Any]) -> str:
    diffs = {k: v for k, v in verification.items() if k.endswith("diff")}
    return ", ".join(f"{k.replace('_max_abs_diff', '')} {v:.1e}" for k, v in diffs.items())


def run(args: argparse.Namespace) -> int:
    if args.format == "hf":
        from mumic.export_hf import export_hf

        doc = export_hf(args.run, args.out, overwrite=args.overwrite, verify=not args.no_verify)
        msg = f"exported {doc['run']} to {args.out} ({doc['model_class']}"
        if "verification" in doc:
            msg += "; reloaded vs the run: " + _diffs(doc["verification"])
        msg += ")"
        if not doc["heads"]["folded"]:
            msg += (f"\nnote: the trained projections do not fold into {doc['model_class']}; they are in "
                    f"{doc['heads']['file']}, applied as classifier.json describes")
        sys.stderr.write(msg + "\n")
        return 0
    from mumic.export import export_onnx

    readme = export_onnx(args.run, args.out, opset=args.opset, overwrite=args.overwrite, verify=not args.no_verify)
    msg = f"exported {readme['run']} to {args.out}"
    if "verification" in readme:
        msg += " (onnxruntime vs PyTorch: " + _diffs(readme["verification"]) + ")"
    sys.stderr.write(msg + "\n")
    return 0


def card(args: argparse.Namespace) -> int:
    from mumic.card import write_card

    path = write_card(args.run, overwrite=args.overwrite)
    sys.stderr.write(f"wrote {path}\n")
    return 0
