"""The `mumic` command: the only argparse in mumic. One module per verb group parses its
options and calls the library; building the parser imports neither torch nor transformers."""

from __future__ import annotations

import argparse
import logging
import sys

from mumic.cli import audit, data, export, infer, search, serve, study, train
from mumic.errors import MumicError

VERB_GROUPS = (train, infer, data, study, serve, search, export, audit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mumic",
        description="MuMIC: multi-label image classification with image-text embeddings and a tempered sigmoid.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for group in VERB_GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.version:
        from mumic import __version__

        sys.stdout.write(__version__ + "\n")
        return 0
    if not a.verb:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(a.func(a))
    except MumicError as e:
        sys.stderr.write(f"mumic: error: {e}\n")
        return 2
    except OSError as e:  # a write outside mumic.io that the user can fix: one line, not a traceback
        from mumic.io import output_error

        err = output_error(e.filename if e.filename is not None else "an output", e)
        if err is None:
            raise
        sys.stderr.write(f"mumic: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("mumic: interrupted\n")
        return 130
