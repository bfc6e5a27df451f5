"""`mumic index` and `mumic search`."""

from __future__ import annotations

import argparse
import json
import sys
import typing

from mumic.cli._options import add_device_options, add_engine_option, add_manifest_options


def register(sub: typing.Any) -> None:
    from mumic.search import BACKENDS

    p = sub.add_parser(
        "index", help="build a nearest-neighbour index over the embeddings of images or manifests",
        description="Embed every image of the inputs with a run and write an index folder "
        "(HNSW graph, normalised embeddings, items) for `mumic search` and `mumic serve --index`.",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("inputs", nargs="*", help="image files, folders of images (every .jpg .jpeg .png .webp .bmp .gif .tif .tiff "
                   "below, sorted), manifests (only the image column is needed; other columns are kept) and quoted shell "
                   "patterns of those")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--from-embeddings", metavar="FILE", help="index the embeddings `mumic embed` wrote (a .parquet of this "
                   "run) instead of embedding the inputs again")
    p.add_argument("--backend", choices=BACKENDS, default="faiss",
                   help="faiss: HNSW graph plus exact vectors; exact: vectors only (default: faiss)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    add_device_options(p, batch_size=64)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_manifest_options(p)
    add_engine_option(p)
    p.set_defaults(func=index)

    p = sub.add_parser(
        "search", help="nearest indexed images of a text or an image (JSON lines)",
        description="Print the k nearest images of an index to a text or image query, one JSON object per line, best first.",
    )
    p.add_argument("index", help="index folder written by `mumic index`")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="query text, embedded in the image space")
    q.add_argument("--image", help="query image file")
    p.add_argument("-k", type=int, default=10, help="number of results (default: 10)")
    p.add_argument("--exact", action="store_true", help="exact search over all vectors instead of the HNSW graph")
    p.add_argument("--run", help="run directory (default: the run recorded in the index)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    add_engine_option(p)
    p.set_defaults(func=search)


def index(args: argparse.Namespace) -> int:
    from mumic.errors import ConfigError
    from mumic.search import build_index, index_from_embeddings

    if args.from_embeddings:
        if args.inputs:
            raise ConfigError("give inputs or --from-embeddings, not both")
        path = index_from_embeddings(args.run, args.from_embeddings, args.out, backend=args.backend, overwrite=args.overwrite)
    elif not args.inputs:
        raise ConfigError("nothing to index: give images, folders or manifests, or --from-embeddings FILE.parquet")
    else:
        path = build_index(
            args.run, args.inputs, args.out, backend=args.backend, overwrite=args.overwrite,
            batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, progress=not args.no_progress,
            allow_outside=args.allow_outside_paths, allow_duplicates=args.allow_duplicate_rows, engine=args.engine,
        )
    meta = json.loads((path / "index.json").read_text())
    sys.stderr.write(f"indexed {meta['count']} images (dim {meta['dim']}, {meta['backend']}) into {path}\n")
    return 0


def search(args: argparse.Namespace) -> int:
    from mumic.search import search_index

    hits = search_index(args.index, text=args.text, image=args.image, k=args.k, exact=args.exact, run_dir=args.run, device=args.device,
                        engine=args.engine)
    for hit in hits:
        sys.stdout.write(json.dumps(hit, default=str) + "\n")
    return 0
