"""`mumic data` (build data sets) and `mumic demo`."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path


def register(sub: typing.Any) -> None:
    p = sub.add_parser("data", help="build data sets, or import them from labelling tools")
    dsub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    q = dsub.add_parser("emoji", help="EmojiTags: emoji artwork of 3 styles with CLDR keyword tags (sources fetched with npm)")
    q.add_argument("--out", default="data/emoji", help="output folder (default: data/emoji)")
    q.add_argument("--from", dest="from_dir", help="folder with the already-downloaded npm tarballs (no npm needed)")
    q.add_argument("--size", type=int, default=64, help="image size in pixels (default: 64)")
    q.add_argument("--seed", type=int, default=0, help="seed of the splits and of the unseen labels")
    q.add_argument("--overwrite", action="store_true", help="replace a set built with other settings")
    q.set_defaults(func=emoji)
    q = dsub.add_parser("shapes", help="a small synthetic multi-label set of coloured shapes")
    q.add_argument("--out", default="data/shapes", help="output folder (default: data/shapes)")
    q.add_argument("-n", type=int, default=600, help="number of images")
    q.add_argument("--seed", type=int, default=0, help="seed of the images and their splits (default: 0)")
    q.add_argument("--overwrite", action="store_true", help="replace a set made with other settings")
    q.set_defaults(func=shapes)
    _register_import(dsub)

    p = sub.add_parser("demo", help="EmojiTags end to end: build the data, train MuMIC and the baseline, report")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--data", default="data/emoji", help="EmojiTags folder, built if missing (default: data/emoji)")
    p.add_argument("--from", dest="from_dir", help="folder with the already-downloaded npm tarballs")
    p.add_argument("--overwrite", action="store_true", help="train again even where a run already finished")
    p.set_defaults(func=demo)


IMPORT_FORMATS = ("coco", "voc", "openimages", "labelstudio", "folders")  # mumic.data.importers.FORMATS, kept torch-free here


def _register_import(dsub: typing.Any) -> None:
    q = dsub.add_parser("import", help="a manifest from a labelling tool's export: COCO, VOC, Open Images, Label Studio, label folders",
                        description="Write a mumic manifest (and a labels file where the format names its classes) from a COCO "
                                    "JSON, a VOC folder, Open Images label CSVs, a Label Studio JSON export or one folder per label.")
    q.add_argument("format", choices=IMPORT_FORMATS, metavar="FORMAT", help=f"one of {', '.join(IMPORT_FORMATS)}")
    q.add_argument("src", nargs="+", metavar="SRC",
                   help="coco, openimages, labelstudio: one file, or one per split (the split read from each name); "
                        "voc: the folder holding Annotations/; folders: the folder of label folders")
    q.add_argument("--out", required=True, help="manifest to write (.csv, .tsv or .jsonl); image paths are relative to its folder")
    q.add_argument("--images-root", help="folder the format's image references are resolved in (default: the source's folder; "
                                         "voc: SRC/JPEGImages)")
    q.add_argument("--allow-outside-root", action="store_true",
                   help="follow image references that lead out of the images root (only for sources you trust)")
    q.add_argument("--labels-out",
                   help="labels file to write (default: OUT_STEM.labels.json; coco, and openimages with --class-descriptions)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing manifest or labels file")
    q.add_argument("--split", help="coco, openimages, labelstudio: the split of the one file imported")
    q.add_argument("--skip-difficult", action="store_true", help="voc: leave out objects marked difficult (kept as positives by default)")
    q.add_argument("--class-descriptions", metavar="FILE", help="openimages: the class id,display name CSV that names the labels")
    q.add_argument("--use-predictions", action="store_true",
                   help="labelstudio: a task nobody annotated takes its latest prediction (default: dropped)")
    q.add_argument("--from-name", help="labelstudio: read only the results of this control")
    q.add_argument("--data-key", help="labelstudio: the task data key holding the image (default: image)")
    q.add_argument("--taxonomy-paths", action="store_true",
                   help="labelstudio: name taxonomy labels by their whole path (A/B), not the leaf")
    q.add_argument("--split-folders", action="store_true", help="folders: the first level is the split (SRC/train/LABEL/...)")
    q.set_defaults(func=import_data)


def import_data(a: argparse.Namespace) -> int:
    from mumic.data.importers import import_dataset

    report = import_dataset(a.format, a.src, a.out, images_root=a.images_root, allow_outside_root=a.allow_outside_root,
                            overwrite=a.overwrite, labels_out=a.labels_out, split=a.split, skip_difficult=a.skip_difficult,
                            class_descriptions=a.class_descriptions, use_predictions=a.use_predictions, from_name=a.from_name,
                            data_key=a.data_key, taxonomy_paths=a.taxonomy_paths, split_folders=a.split_folders)
    sys.stdout.write("\n".join(report.lines()) + "\n")
    return 0


def emoji(a: argparse.Namespace) -> int:
    from mumic.data.emoji import build_emoji

    out = build_emoji(Path(a.out), from_dir=Path(a.from_dir) if a.from_dir else None, size=a.size, seed=a.seed,
                      overwrite=a.overwrite)
    sys.stdout.write(f"manifest: {out}\n")
    return 0


def shapes(a: argparse.Namespace) -> int:
    from mumic.data.synthetic import make_shapes

    out = make_shapes(Path(a.out), n=a.n, seed=a.seed, overwrite=a.overwrite)
    sys.stdout.write(f"manifest: {out}\n")
    return 0


def demo(a: argparse.Namespace) -> int:
    from mumic.demo import run_demo

    report = run_demo(Path(a.out), Path(a.data), overwrite=a.overwrite, from_dir=Path(a.from_dir) if a.from_dir else None)
    sys.stdout.write(f"demo report: {report}\n{(Path(a.out) / 'summary.md').read_text()}")
    return 0
