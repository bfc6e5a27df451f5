"""`mumic train`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per config key, listed in --help by settings group."""
    from mumic.config import FIELDS, GROUPS, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    group_of = {name: g for g, names in GROUPS.items() for name in names}
    sections = {g: parser.add_argument_group(f"{g} settings") for g in GROUPS}
    for name, f in FIELDS.items():
        p = sections[group_of[name]]
        flag = "--" + name.replace("_", "-")
        hint = hints[name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = hint if typing.get_origin(hint) is list else (args[0] if args else hint)
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        text = f.metadata["help"]
        help_ = text if "default:" in text else f"{text} (default: {default})"  # the help may say it in words
        if base is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(base) is list:
            p.add_argument(flag, dest=name, nargs="+", default=None, metavar="TEXT", help=help_)
        else:
            kw = {"choices": f.metadata["choices"]} if f.metadata.get("choices") else {}
            p.add_argument(flag, dest=name, default=None, metavar=None if kw else name.upper(), help=help_, **kw)


def register(sub: typing.Any) -> None:
    p = sub.add_parser("train", help="train a run from a manifest", description="Train MuMIC on a manifest. "
                       "Options override the YAML config; the resolved config is saved in the run.")
    p.add_argument("config", nargs="?", help="YAML config file (keys as the options below, with underscores)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint (its saved config is used)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_options(p)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from mumic import distributed as dist
    from mumic.config import FIELDS, load_config
    from mumic.train import fit, resume

    if a.resume:
        out = resume(a.resume, progress=not a.no_progress)
    else:
        overrides = {k: getattr(a, k) for k in FIELDS}
        cfg = load_config(a.config, overrides)
        out = fit(cfg, overwrite=a.overwrite, progress=not a.no_progress)
    if dist.is_main():
        print_summary(out)
    return 0


def print_summary(run: Path) -> None:
    from mumic.evaluate import format_metrics

    metrics = json.loads((run / "metrics.json").read_text())
    split = "test" if "test" in metrics else "val"
    sys.stdout.write(f"run: {run}\n{split} metrics:\n{format_metrics(metrics[split])}\n")
