"""The `mumic` command: parses arguments, loads the config, calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

from mumic.errors import MumicError

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")


def _add_config_options(p: argparse.ArgumentParser) -> None:
    from mumic.config import FIELDS, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        hint = hints[name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = hint if typing.get_origin(hint) is list else (args[0] if args else hint)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f"{f.metadata['help']} (default: {default})"
        if base is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(base) is list:
            p.add_argument(flag, dest=name, nargs="+", default=None, metavar="TEXT", help=help_)
        else:
            kw = {"choices": f.metadata["choices"]} if f.metadata.get("choices") else {}
            p.add_argument(flag, dest=name, default=None, metavar=None if kw else name.upper(), help=help_, **kw)


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that stream a manifest through a run (predict, embed)."""
    p.add_argument("--compile", action="store_true", help="run the image tower through torch.compile (pays off on large jobs)")
    p.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail",
                   help="an unreadable image stops the job (fail, default) or is left out and listed in OUT.skipped.csv (skip)")
    p.add_argument("--shard-rows", type=int, default=4096,
                   help="rows per output shard: the unit of resuming and, under torchrun, of work per rank (default: 4096)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes for decoding (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    _add_decode_option(p)
    _add_engine_option(p)
    _add_manifest_options(p)


def _add_engine_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="what runs the image tower: onnxruntime (CPU only; the graph is exported once and cached), torch, "
                        "or auto (default: onnxruntime on the CPU, torch on GPUs)")


def _add_decode_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decode", choices=("cpu", "gpu"), default="cpu",
                   help="where JPEGs are decoded and resized: in the DataLoader workers (cpu, default) or with nvjpeg "
                        "on the CUDA device (gpu; needs torchvision); other formats always decode on the CPU")


def _add_manifest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="accept manifest image paths outside the manifest's folder (only for manifests you trust)")
    p.add_argument("--allow-duplicate-rows", action="store_true", help="keep exact duplicate manifest rows instead of refusing them")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mumic",
        description="MuMIC: multi-label image classification with image-text embeddings and a tempered sigmoid.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("train", help="train a run from a manifest", description="Train MuMIC on a manifest. "
                       "Options override the YAML config; the resolved config is saved in the run.")
    p.add_argument("config", nargs="?", help="YAML config file (keys as the options below, with underscores)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint (its saved config is used)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_options(p)

    p = sub.add_parser("evaluate", help="metrics of a run on a manifest")
    p.add_argument("run", help="run directory")
    p.add_argument("--manifest", required=True, help="manifest with image and labels")
    p.add_argument("--split", help="evaluate only the rows of this split")
    _add_manifest_options(p)
    p.add_argument("--out", help="metrics JSON (default: RUN/eval-MANIFEST[-SPLIT].json)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    _add_decode_option(p)
    _add_engine_option(p)

    p = sub.add_parser("predict", help="label probabilities and decisions for images or manifests (JSON lines)")
    p.add_argument("run", help="run directory")
    p.add_argument("inputs", nargs="+", help="image files and/or manifests (.csv .tsv .jsonl .parquet)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="score these labels (names not in the run are zero-shot, from the prompt templates)")
    p.add_argument("--top-k", type=int, help="keep the K highest scores per image")
    p.add_argument("--out", help="output file: JSON lines, or Parquet if it ends in .parquet (default: JSON lines on standard output)")
    _add_batch_options(p)

    p = sub.add_parser("embed", help="normalised image embeddings of a manifest, as Parquet")
    p.add_argument("run", help="run directory")
    p.add_argument("manifest", help="manifest (only the image column is needed)")
    p.add_argument("--out", required=True, help="output .parquet file")
    _add_batch_options(p)

    p = sub.add_parser("data", help="build data sets")
    dsub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    q = dsub.add_parser("emoji", help="EmojiTags: emoji artwork of 3 styles with CLDR keyword tags (sources fetched with npm)")
    q.add_argument("--out", default="data/emoji", help="output folder (default: data/emoji)")
    q.add_argument("--from", dest="from_dir", help="folder with the already-downloaded npm tarballs (no npm needed)")
    q.add_argument("--size", type=int, default=64, help="image size in pixels (default: 64)")
    q.add_argument("--seed", type=int, default=0, help="seed of the splits and of the unseen labels")
    q = dsub.add_parser("shapes", help="a small synthetic multi-label set of coloured shapes")
    q.add_argument("--out", default="data/shapes", help="output folder (default: data/shapes)")
    q.add_argument("-n", type=int, default=600, help="number of images")
    q.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="EmojiTags end to end: build the data, train MuMIC and the baseline, report")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--data", default="data/emoji", help="EmojiTags folder, built if missing (default: data/emoji)")
    p.add_argument("--from", dest="from_dir", help="folder with the already-downloaded npm tarballs")
    p.add_argument("--overwrite", action="store_true", help="train again even where a run already finished")
    from mumic import ablate, export, search, serve

    ablate.add_ablate_parser(sub)
    serve.add_serve_parser(sub)
    search.add_index_parser(sub)
    search.add_search_parser(sub)
    export.add_export_parser(sub)
    return parser


def _cmd_train(a: argparse.Namespace) -> int:
    from mumic.config import FIELDS, load_config
    from mumic.train import fit, resume

    if a.resume:
        run = resume(a.resume, progress=not a.no_progress)
    else:
        overrides = {k: getattr(a, k) for k in FIELDS}
        cfg = load_config(a.config, overrides)
        run = fit(cfg, overwrite=a.overwrite, progress=not a.no_progress)
    from mumic import distributed as dist

    if dist.is_main():
        _print_summary(run)
    return 0


def _print_summary(run: Path) -> None:
    from mumic.evaluate import format_metrics

    metrics = json.loads((run / "metrics.json").read_text())
    split = "test" if "test" in metrics else "val"
    print(f"run: {run}\n{split} metrics:\n{format_metrics(metrics[split])}")


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from mumic.evaluate import evaluate_run, format_metrics

    m = evaluate_run(a.run, a.manifest, split=a.split, out=a.out, batch_size=a.batch_size, num_workers=a.num_workers, device=a.device,
                     allow_outside=a.allow_outside_paths, allow_duplicates=a.allow_duplicate_rows, decode=a.decode,
                     engine=a.engine)
    print(format_metrics(m))
    return 0


def _inputs_manifest(inputs: list[str], allow_outside: bool = False, allow_duplicates: bool = False):
    """Images and manifests named on the command line as one manifest."""
    import pandas as pd

    from mumic.data.manifest import Manifest, read_manifest

    parts: list[Manifest] = []
    images = [x for x in inputs if not x.lower().endswith(MANIFEST_SUFFIXES)]
    for x in inputs:
        if x.lower().endswith(MANIFEST_SUFFIXES):
            parts.append(read_manifest(x, require_labels=False, allow_outside=allow_outside, allow_duplicates=allow_duplicates))
    paths = [p for m in parts for p in m.images] + [Path(x).resolve() for x in images]
    frames = [m.frame.drop(columns=["image"], errors="ignore").reset_index(drop=True) for m in parts]
    if images:
        frames.append(pd.DataFrame(index=range(len(images))))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    frame.insert(0, "image", [str(p) for p in paths])
    lines = [l for m in parts for l in m.lines] + [0] * len(images)
    return Manifest(path=Path(inputs[0]), images=paths, labels=[[] for _ in paths], negatives=None, splits=None, frame=frame, lines=lines)


def _batch_model(a: argparse.Namespace):
    """The run of `predict` / `embed` on this rank's device, with the options of
    _add_batch_options applied (decode checked, engine set, tower compiled)."""
    from mumic import distributed as dist
    from mumic.data.gpu_decode import check_decode
    from mumic.model import MuMIC

    dist.init()
    model = MuMIC.from_run(a.run, device=dist.device_name(a.device))
    check_decode(a.decode, model.device)
    model.set_engine(a.engine)
    if a.compile:
        model.compile_image_tower()
    return model


def _cmd_predict(a: argparse.Namespace) -> int:
    import tempfile

    from mumic import distributed as dist
    from mumic.errors import ConfigError
    from mumic.evaluate import predict_manifest

    if a.out is None and dist.launched():
        raise ConfigError("under torchrun, predict needs --out (the ranks write shards of one file)")
    model = _batch_model(a)
    manifest = _inputs_manifest(a.inputs, a.allow_outside_paths, a.allow_duplicate_rows)
    if a.on_bad_image == "fail":
        manifest.check_images_exist()
    if a.out:
        n = predict_manifest(model, manifest, a.out, labels=a.labels, top_k=a.top_k, batch_size=a.batch_size, num_workers=a.num_workers,
                             on_bad_image=a.on_bad_image, shard_rows=a.shard_rows, decode=a.decode)
        if dist.is_main():
            print(f"wrote {n} predictions to {a.out}", file=sys.stderr)
    else:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "p.jsonl"
            predict_manifest(model, manifest, out, labels=a.labels, top_k=a.top_k, batch_size=a.batch_size, num_workers=a.num_workers,
                             progress=False, on_bad_image=a.on_bad_image, decode=a.decode)
            skipped = out.with_name(out.name + ".skipped.csv")
            if skipped.is_file():
                sys.stderr.write("skipped images (row,reason):\n" + skipped.read_text().split("\n", 1)[1])
            sys.stdout.write(out.read_text())
    return 0


def _cmd_embed(a: argparse.Namespace) -> int:
    from mumic import distributed as dist
    from mumic.data.manifest import read_manifest
    from mumic.evaluate import embed_manifest

    model = _batch_model(a)
    manifest = read_manifest(a.manifest, require_labels=False, allow_outside=a.allow_outside_paths, allow_duplicates=a.allow_duplicate_rows)
    if a.on_bad_image == "fail":
        manifest.check_images_exist()
    n = embed_manifest(model, manifest, a.out, batch_size=a.batch_size, num_workers=a.num_workers, on_bad_image=a.on_bad_image,
                       shard_rows=a.shard_rows, decode=a.decode)
    if dist.is_main():
        print(f"wrote {n} embeddings to {a.out}", file=sys.stderr)
    return 0


def _cmd_data(a: argparse.Namespace) -> int:
    if a.dataset == "emoji":
        from mumic.data.emoji import build_emoji

        out = build_emoji(Path(a.out), from_dir=Path(a.from_dir) if a.from_dir else None, size=a.size, seed=a.seed)
    else:
        from mumic.data.synthetic import make_shapes

        out = make_shapes(Path(a.out), n=a.n, seed=a.seed)
    print(f"manifest: {out}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from mumic.demo import run_demo

    run_demo(Path(a.out), Path(a.data), overwrite=a.overwrite, from_dir=Path(a.from_dir) if a.from_dir else None)
    return 0


def _commands() -> dict:
    from mumic import ablate, export, search, serve

    return {"ablate": ablate.cmd_ablate, "train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict, "embed": _cmd_embed, "data": _cmd_data,
            "demo": _cmd_demo, "serve": serve.cmd_serve, "index": search.cmd_index, "search": search.cmd_search, "export": export.cmd_export}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.version:
        from mumic import __version__

        print(__version__)
        return 0
    if not a.verb:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _commands()[a.verb](a)
    except MumicError as e:
        print(f"mumic: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mumic: interrupted", file=sys.stderr)
        return 130
