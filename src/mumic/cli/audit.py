"""`mumic audit`: rank the suspect tags of a training manifest; write a corrected copy."""

from __future__ import annotations

import argparse
import sys
import typing


def register(sub: typing.Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "audit", help="find missing and wrong tags of a training manifest from out-of-fold probabilities",
        description="K-fold cross-fitting with a run's own configuration (frozen towers reuse the feature cache): "
                    "out-of-fold probabilities for every training image, then missing tags (unlisted, likely by the "
                    "image and its look-alikes), wrong tags (listed, unlikely), swapped tag sets and outliers, ranked "
                    "in AUDIT/suspects.csv and shown in AUDIT/report.md. Finished folds are reused, so a second call "
                    "resumes. The original manifest is never changed.")
    p.add_argument("source", metavar="RUN_OR_CONFIG", help="a run directory (its config.yaml) or a YAML training config")
    p.add_argument("--manifest", help="manifest to audit (default: the configuration's); its val rows calibrate the folds")
    p.add_argument("--out", required=True, metavar="AUDIT", help="output folder (folds, suspects.csv, report.md)")
    p.add_argument("--folds", type=int, default=5, help="number of folds K (default 5)")
    p.add_argument("--score", default="neighbours", choices=("neighbours", "margin", "llr"),
                   help="suspect score: neighbours (the image's log-odds plus the votes of its 10 most similar training "
                        "images, default), margin (log-odds past the label's threshold) or llr (log-likelihood ratio of the "
                        "label's score distributions plus the prior log-odds)")
    p.add_argument("--apply", metavar="FIXES", help="write a corrected manifest applying a fixes file (image, label, "
                                                    "action add/remove or kind missing/wrong; e.g. an edited suspects.csv)")
    p.add_argument("--fix-top", type=int, metavar="K", help="write a corrected manifest adding the top K missing tags and "
                                                            "removing the top K wrong tags")
    p.add_argument("--drop-top", type=int, metavar="K", help="write a corrected manifest without the rows of the top K suspects "
                                                             "of each kind")
    p.add_argument("--corrected", metavar="PATH", help="the corrected manifest (default AUDIT/manifest.corrected.csv)")
    p.add_argument("--device", help="device of the fold runs (default: the configuration's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    q = sub.add_parser(
        "noise-study", help="measure the audit and a noise-robust loss on seeded label noise (docs/results/noise)",
        description="Inject the ablation study's seeded label noise, audit the noisy manifest with MuMIC and the linear "
                    "baseline (and rank the same out-of-fold probabilities with cleanlab), retrain on the repaired "
                    "manifests, try the noise-robust loss, and write OUT/report.md, summary.json and plots. Finished "
                    "runs are reused, so a second call resumes.")
    q.add_argument("config", help="study file (YAML), e.g. ablations/noise.yaml")
    q.add_argument("--out", default="docs/results/noise", help="output folder (default docs/results/noise)")
    q.add_argument("--seeds", type=int, help="number of seeds 0..N-1 (default: the file's seeds:)")
    q.add_argument("--only-seed", type=int, action="append", metavar="S",
                   help="run only this seed (repeatable; the report covers the seeds run)")
    q.add_argument("--manifest", help="the clean manifest (default: the file's base: manifest)")
    q.add_argument("--labels-file", help="its labels file (default: the file's base: labels_file)")
    q.add_argument("--device", help="device of every run")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(func=run_study)
    return p


def run_study(args: argparse.Namespace) -> int:
    from mumic.study.noise_audit import run_noise_study

    res = run_noise_study(args.config, out=args.out, seeds=args.seeds, only_seeds=args.only_seed, manifest=args.manifest,
                          labels_file=args.labels_file,
                          device=args.device, progress=not args.no_progress)
    sys.stdout.write(f"noise study report: {res['report']}\n")
    return 0


def run(args: argparse.Namespace) -> int:
    from mumic.audit import run_audit

    res = run_audit(args.source, args.out, manifest=args.manifest, folds=args.folds, method=args.score, apply=args.apply,
                    fix_top=args.fix_top, drop_top=args.drop_top, corrected=args.corrected, device=args.device,
                    progress=not args.no_progress)
    counts: dict[str, int] = {}
    for r in res["table"]:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    sys.stdout.write(f"suspects: {res['suspects']} ({', '.join(f'{k} {v}' for k, v in counts.items()) or 'none'})\n")
    sys.stdout.write(f"report: {res['report']}\n")
    if res["corrected"] is not None:
        sys.stdout.write(f"corrected manifest: {res['corrected']}\n")
    return 0
