"""`mumic ablate`: the study grid."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path


def register(sub: typing.Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "ablate", help="train a grid of configurations over seeds; report mean ± std",
        description="Train every configuration (cell) of an ablation file over several seeds, each as a normal run "
                    "under OUT/runs/<cell>-s<seed>, evaluate on the test split, and write OUT/results.md, results.csv "
                    "and plots. Finished cells are reused, so a second call resumes.")
    p.add_argument("config", help="ablation file (YAML: base:, seeds:, cells:)")
    p.add_argument("--seeds", type=int, help="number of seeds, 0..N-1 (default: the file's seeds:, else 3)")
    p.add_argument("--out", help="output folder (default: docs/results/<config file name>)")
    p.add_argument("--only", action="append", metavar="PATTERN",
                   help="train only cells whose name or group matches (shell pattern, comma-separated or repeated); "
                        "the report still shows every finished cell")
    p.add_argument("--frozen-only", action="store_true", help="train only cells with both towers frozen (cheap: cached features)")
    p.add_argument("--list", action="store_true", help="list the cells and their state; train nothing")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; train nothing")
    p.add_argument("--device", help="device for every run (cpu, cuda, cuda:N; default: the config's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run `mumic ablate`; 0 when every selected run finished, 1 when some failed."""
    from mumic import study

    if getattr(args, "list", False):
        abl = study.load_ablation(args.config)
        if args.seeds:
            abl.seeds = list(range(args.seeds))
        out = Path(args.out) if args.out else Path("docs/results") / abl.name
        chosen = {c.name for c in study.select_cells(abl, args.only, args.frozen_only)}
        for c in abl.cells:
            states = [study.cell_state(study.run_dir(out, c, s)) for s in abl.seeds]
            mark = "*" if c.name in chosen else " "
            sys.stdout.write(f"{mark} {c.group:<14} {c.name:<24} {'frozen' if study.is_frozen(abl, c) else 'tuned ':<6} "
                             f"{sum(s == 'finished' for s in states)}/{len(states)} finished  {study.describe(c)}\n")
        return 0
    res = study.run_ablation(args.config, out=args.out, seeds=args.seeds, only=args.only, frozen_only=args.frozen_only,
                             device=args.device, progress=not args.no_progress, report_only=args.report_only)
    sys.stdout.write(f"ablation report: {res['report']}\n")
    if res["failed"]:
        sys.stdout.write(f"{len(res['failed'])} run(s) failed: {', '.join(res['failed'])}\n")
        return 1
    return 0
