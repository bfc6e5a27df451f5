"""`mumic data` (build data sets) and `mumic demo`."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path


def register(sub: typing.Any) -> None:
    p = sub.add_parser("data", help="build data sets")
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

    p = sub.add_parser("demo", help="EmojiTags end to end: build the data, train MuMIC and the baseline, report")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--data", default="data/emoji", help="EmojiTags folder, built if missing (default: data/emoji)")
    p.add_argument("--from", dest="from_dir", help="folder with the already-downloaded npm tarballs")
    p.add_argument("--overwrite", action="store_true", help="train again even where a run already finished")
    p.set_defaults(func=demo)


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
