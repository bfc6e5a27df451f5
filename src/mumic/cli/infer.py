"""`mumic evaluate`, `mumic predict`, `mumic embed`: a run over images and manifests."""

from __future__ import annotations

import argparse
import sys
import tempfile
import typing
from pathlib import Path

from mumic.cli._options import (
    add_batch_options,
    add_decode_option,
    add_device_options,
    add_engine_option,
    add_manifest_options,
)

INPUTS_HELP = ("image files, folders of images (every .jpg .jpeg .png .webp .bmp .gif .tif .tiff below, sorted), "
               "manifests (.csv .tsv .jsonl .parquet) and quoted shell patterns of those ('photos/**/*.jpg')")
OVERWRITE_HELP = "replace a finished --out file (an interrupted job's OUT.parts/ resumes without it)"


def register(sub: typing.Any) -> None:
    p = sub.add_parser("evaluate", help="metrics of a run on a manifest")
    p.add_argument("run", help="run directory")
    p.add_argument("--manifest", required=True, help="manifest with image and labels")
    p.add_argument("--split", help="evaluate only the rows of this split")
    add_manifest_options(p)
    p.add_argument("--out", help="metrics JSON (default: RUN/eval-MANIFEST[-SPLIT].json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing metrics JSON")
    p.add_argument("--per-label", action="store_true",
                   help="also print (and write) one row per label: positives, AP, calibrated threshold, whether it is the global one")
    add_device_options(p, batch_size=64)
    add_decode_option(p)
    add_engine_option(p)
    p.set_defaults(func=evaluate)

    p = sub.add_parser("predict", help="label probabilities and decisions for images or manifests "
                                       "(JSON lines, Parquet, or Label Studio / COCO pre-annotations)")
    p.add_argument("run", help="run directory")
    p.add_argument("inputs", nargs="+", help=INPUTS_HELP)
    p.add_argument("--labels", nargs="+", metavar="LABEL",
                   help="score these labels (names not in the run are zero-shot, from the prompt templates)")
    p.add_argument("--top-k", type=int, help="keep the K highest scores per image")
    p.add_argument("--out", help="output file: JSON lines, or Parquet if it ends in .parquet (default: JSON lines on standard output)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_preannotation_options(p)
    add_batch_options(p)
    p.set_defaults(func=predict)

    p = sub.add_parser("embed", help="normalised image embeddings of images or manifests, as Parquet")
    p.add_argument("run", help="run directory")
    p.add_argument("inputs", nargs="+", help=INPUTS_HELP + "; of a manifest only the image column is needed")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_batch_options(p)
    p.set_defaults(func=embed)


def evaluate(a: argparse.Namespace) -> int:
    from mumic.evaluate import evaluate_run, format_metrics
    from mumic.report import per_label_markdown

    def show(m: dict[str, typing.Any]) -> None:  # before the JSON is written: a failed write keeps the metrics
        sys.stdout.write(format_metrics(m) + "\n")
        if a.per_label:
            sys.stdout.write("\n" + "\n".join(per_label_markdown(m["per_label"])) + "\n")
        sys.stdout.flush()

    evaluate_run(a.run, a.manifest, split=a.split, out=a.out, batch_size=a.batch_size, num_workers=a.num_workers, device=a.device,
                 allow_outside=a.allow_outside_paths, allow_duplicates=a.allow_duplicate_rows, decode=a.decode,
                 engine=a.engine, per_label=a.per_label, overwrite=a.overwrite, on_result=show)
    return 0


def _batch_model(a: argparse.Namespace) -> typing.Any:
    """The run of `predict` / `embed` on this rank's device, with the batch options
    applied (decode checked, engine set, tower compiled)."""
    from mumic import distributed as dist
    from mumic.data.gpu_decode import check_decode
    from mumic.predictor import Predictor

    dist.init()
    model = Predictor.from_run(a.run, device=dist.device_name(a.device))
    check_decode(a.decode, model.device)
    model.set_engine(a.engine)
    if a.compile:
        model.compile_image_tower()
    return model


def _inputs_and_model(a: argparse.Namespace) -> tuple[typing.Any, typing.Any]:
    """The inputs of `predict` / `embed` as one manifest, and the run on this rank's device;
    before the run is loaded, --out is checked: neither an input nor a finished output
    (without --overwrite)."""
    from mumic.batch import check_output
    from mumic.data.inputs import inputs_manifest

    manifest = inputs_manifest(a.inputs, allow_outside=a.allow_outside_paths, allow_duplicates=a.allow_duplicate_rows)
    if a.out:
        check_output(a.out, manifest, run_dir=a.run, overwrite=a.overwrite)
    model = _batch_model(a)
    if a.on_bad_image == "fail":
        manifest.check_images_exist()
    return manifest, model


def predict(a: argparse.Namespace) -> int:
    from mumic import distributed as dist
    from mumic.batch import predict_manifest
    from mumic.errors import ConfigError

    if a.format:
        return _preannotate(a)
    if a.images_root or a.url_prefix is not None:
        raise ConfigError("--images-root and --url-prefix shape pre-annotations: give them with --format labelstudio or coco")
    if a.out is None and dist.launched():
        raise ConfigError("under torchrun, predict needs --out (the ranks write shards of one file)")
    manifest, model = _inputs_and_model(a)
    if a.out:
        n = predict_manifest(model, manifest, a.out, labels=a.labels, top_k=a.top_k, batch_size=a.batch_size, num_workers=a.num_workers,
                             on_bad_image=a.on_bad_image, shard_rows=a.shard_rows, decode=a.decode, overwrite=a.overwrite)
        if dist.is_main():
            sys.stderr.write(f"wrote {n} predictions to {a.out}\n")
    else:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "p.jsonl"
            predict_manifest(model, manifest, out, labels=a.labels, top_k=a.top_k, batch_size=a.batch_size, num_workers=a.num_workers,
                             progress=False, on_bad_image=a.on_bad_image, decode=a.decode)
            skipped = out.with_name(out.name + ".skipped.csv")
            if skipped.is_file():
                sys.stderr.write("skipped images (line,image,reason):\n" + skipped.read_text().split("\n", 1)[1])
            sys.stdout.write(out.read_text())
    return 0


def _add_preannotation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pre-annotations for a labelling tool (--format; needs --out)")
    g.add_argument("--format", choices=("labelstudio", "coco"),
                   help="write the decisions for review instead of predictions: labelstudio (a JSON list of tasks whose "
                        "predictions carry the run's fingerprint as model_version) or coco (image-level COCO results)")
    g.add_argument("--images-root",
                   help="image paths are written relative to this folder (default: the deepest folder holding every input)")
    g.add_argument("--url-prefix", help="labelstudio: put before each relative path (default: /data/local-files/?d=, for Label Studio "
                                        "serving the images root as local files)")
    g.add_argument("--from-name", default="choice", help="labelstudio: the name of the Choices control (default: choice)")
    g.add_argument("--to-name", default="image", help="labelstudio: the name of the Image object (default: image)")


def _preannotate(a: argparse.Namespace) -> int:
    from mumic import distributed as dist
    from mumic.batch import predict_preannotations
    from mumic.errors import ConfigError

    if not a.out:
        raise ConfigError(f"--format {a.format} needs --out (the file of tasks or results to write)")
    manifest, model = _inputs_and_model(a)
    n = predict_preannotations(model, manifest, a.out, a.format, images_root=a.images_root, url_prefix=a.url_prefix,
                               from_name=a.from_name, to_name=a.to_name, labels=a.labels, top_k=a.top_k, batch_size=a.batch_size,
                               num_workers=a.num_workers, on_bad_image=a.on_bad_image, shard_rows=a.shard_rows, decode=a.decode,
                               overwrite=a.overwrite)
    if dist.is_main():
        sys.stderr.write(f"wrote {a.format} pre-annotations of {n} images to {a.out}\n")
    return 0


def embed(a: argparse.Namespace) -> int:
    from mumic import distributed as dist
    from mumic.batch import embed_manifest

    manifest, model = _inputs_and_model(a)
    n = embed_manifest(model, manifest, a.out, batch_size=a.batch_size, num_workers=a.num_workers, on_bad_image=a.on_bad_image,
                       shard_rows=a.shard_rows, decode=a.decode, overwrite=a.overwrite)
    if dist.is_main():
        sys.stderr.write(f"wrote {n} embeddings to {a.out}\n")
    return 0
