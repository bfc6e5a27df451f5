"""The label-noise study: detection of the injected errors by `mumic audit` and by
cleanlab on the same out-of-fold probabilities, repair of the manifest, and a
noise-robust loss (see ablations/noise.yaml).

Per seed: the study's seeded noise (mumic.study.noise, the exact corrupted cells known)
on the training rows; K-fold audits with MuMIC and with the linear baseline; detection
figures for every score rule and cleanlab on both models' probabilities; test figures of
training on noisy labels, on the manifests after fixing the top suspects (fix_top: pairs of
K missing / K wrong) or dropping their rows (drop_top: K per kind), and on clean labels
(settings base + clean:, complete labels); and the robust option under noise and on clean
labels. The repaired variant and the robust option are judged on validation GAP@10 only.
The dev_seed's audits (not a reported seed) are where the default rule was chosen; its
detection figures are reported apart. Every training is a normal run under OUT/runs/,
reused when finished, so the study resumes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from mumic.audit import corrected_manifest, cross_fit, score_cells, suspects, top_rows, top_suggestions
from mumic.audit.scores import Scores
from mumic.config import load_config
from mumic.data.manifest import read_manifest
from mumic.errors import ConfigError
from mumic.readers import read_json, read_yaml
from mumic.study.grid import derive_manifest, run_cell
from mumic.study.schema import Cell

log = logging.getLogger(__name__)

KS = (100, 500, 1000)
KEYS = ("base", "noisy", "clean", "seeds", "dev_seed", "folds", "mumic", "baseline", "robust_mumic", "robust_baseline", "fix_top",
        "drop_top", "description")
RULES = ("neighbours", "margin", "llr")  # the first is mumic audit's default


def load_study(path: str | os.PathLike[str]) -> dict[str, Any]:
    doc, _ = read_yaml(path, error=ConfigError)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a noise study is a mapping with the keys {', '.join(KEYS)}")
    odd = sorted(set(doc) - set(KEYS))
    if odd:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(odd)}; the keys are {', '.join(KEYS)}")
    for k in ("base", "noisy", "mumic", "baseline", "robust_mumic", "robust_baseline"):
        if not isinstance(doc.get(k), dict):
            raise ConfigError(f"{path}: '{k}' must be a mapping")
    if not isinstance(doc.get("clean", {}), dict):
        raise ConfigError(f"{path}: 'clean' must be a mapping (settings for training on the clean labels)")
    pairs = doc.setdefault("fix_top", [[500, 100]])
    if not isinstance(pairs, list) or not all(isinstance(x, list) and len(x) == 2 and all(isinstance(v, int) for v in x) for x in pairs):
        raise ConfigError(f"{path}: 'fix_top' must be a list of [K missing, K wrong] pairs of integers, e.g. [[500, 100]]")
    drops = doc.setdefault("drop_top", [500])
    drops = doc["drop_top"] = drops if isinstance(drops, list) else [drops]
    if not all(isinstance(v, int) and v > 0 for v in drops):
        raise ConfigError(f"{path}: 'drop_top' must be a positive integer or a list of them")
    return doc


def _truth(clean: Any, noisy: Any, rows: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Injected missing tags (clean lists it, noisy does not) and wrong tags (the reverse) of the audited rows."""
    yc, _ = clean.select(rows).targets(names, ignore_unknown=True)
    yn, _ = noisy.select(rows).targets(names, ignore_unknown=True)
    return (yc > 0.5) & (yn < 0.5), (yn > 0.5) & (yc < 0.5)


def detection(score: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Average precision, precision and recall at k of a ranking of candidate cells (NaN: not a candidate)."""
    from sklearn.metrics import average_precision_score

    cand = ~np.isnan(score)
    s, t = score[cand], truth[cand]
    order = np.argsort(-s, kind="stable")
    out = {"ap": float(average_precision_score(t, s)) if t.any() else float("nan"), "errors": int(truth.sum()),
           "candidates": int(cand.sum()), "errors_among_candidates": int(t.sum())}
    for k in KS:
        hits = int(t[order[:k]].sum())
        out[f"p@{k}"] = hits / k
        out[f"r@{k}"] = hits / max(int(truth.sum()), 1)
    return out


def cleanlab_scores(scores: Scores, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's per-cell label quality (multilabel_classification.rank.get_label_quality_scores_per_class,
    self-confidence) on the same probabilities, as suspect scores (1 - quality) on the same candidate cells."""
    from cleanlab.multilabel_classification.rank import get_label_quality_scores_per_class

    labels = [list(np.flatnonzero(r)) for r in scores.listed]
    q = np.asarray(get_label_quality_scores_per_class(labels, np.clip(probs, 1e-6, 1 - 1e-6)))
    if q.shape != probs.shape:  # cleanlab returns [K, N]
        q = q.T
    bad = 1.0 - q
    return np.where(np.isnan(scores.missing), np.nan, bad), np.where(np.isnan(scores.wrong), np.nan, bad)


def _metrics(run: Path) -> dict[str, float]:
    m = read_json(run / "metrics.json")
    return {"gap10": m["test"]["gap10"], "map_macro": m["test"]["map_macro"], "val_gap10": m["val"]["gap10"]}


def run_noise_study(config: str | os.PathLike[str], *, out: str | os.PathLike[str] = "docs/results/noise",
                    seeds: int | None = None, only_seeds: list[int] | None = None, manifest: str | None = None,
                    labels_file: str | None = None,
                    device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the study and write OUT/report.md, OUT/summary.json and plots."""
    doc = load_study(config)
    out_dir = Path(out)
    base = {**doc["base"], **({"manifest": manifest} if manifest else {}), **({"labels_file": labels_file} if labels_file else {}),
            **({"device": device} if device else {})}
    seed_list = list(range(seeds if seeds is not None else int(doc.get("seeds", 3))))
    if only_seeds:
        seed_list = [s for s in seed_list if s in set(only_seeds)]
    folds = int(doc.get("folds", 5))
    noise = {k: float(v) for k, v in doc["noisy"].items()}
    t0 = time.time()
    dev = None
    if doc.get("dev_seed") is not None:
        dev_seed = int(doc["dev_seed"])
        if dev_seed in seed_list:
            raise ConfigError(f"{config}: dev_seed {dev_seed} is also a reported seed; choose one outside 0..{len(seed_list) - 1}")
        dev = {"seed": dev_seed, "detection": _audits(doc, base, noise, dev_seed, folds, out_dir, progress)[0]}
    data = " ".join(f"`--{k.replace('_', '-')} {v}`" for k, v in (("manifest", manifest), ("labels_file", labels_file)) if v)
    per_seed = []
    for seed in seed_list:
        per_seed.append(_one_seed(doc, base, noise, seed, folds, out_dir, progress))
        from mumic.study.noise_report import write_noise_report

        write_noise_report(out_dir, doc, per_seed, config=str(config), elapsed=time.time() - t0, seeds_planned=len(seed_list), dev=dev,
                           data=data)
    return {"out": out_dir, "report": out_dir / "report.md", "seeds": per_seed}


def _train(values: dict[str, Any], name: str, seed: int, out_dir: Path, progress: bool) -> dict[str, float]:
    cfg = load_config(None, {**values, "seed": seed, "out": str(out_dir / "runs" / f"{name}-s{seed}")})
    run, _ = run_cell(cfg, progress=progress)
    return _metrics(run)


def _noisy_path(base: dict[str, Any], noise: dict[str, float], seed: int, out_dir: Path) -> Path:
    path = derive_manifest(base, Cell(name="noisy", group="noisy", noisy=noise), seed, out_dir / "data")
    assert path is not None
    return path


def _audits(doc: dict[str, Any], base: dict[str, Any], noise: dict[str, float], seed: int, folds: int, out_dir: Path,
            progress: bool) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    """Detection figures of every rule and cleanlab on both models' out-of-fold probabilities; the MuMIC suspects table
    (default rule); seconds per fold."""
    noisy_path = _noisy_path(base, noise, seed, out_dir)
    clean_m = read_manifest(base["manifest"], allow_outside=bool(base.get("allow_outside_paths")))
    noisy_m = read_manifest(noisy_path)
    det: dict[str, Any] = {}
    fold_time: dict[str, float] = {}
    table: list[dict[str, Any]] = []
    for model in ("mumic", "baseline"):
        values = {**base, **doc[model], "manifest": str(noisy_path), "seed": seed}
        t1 = time.time()
        oof = cross_fit(load_config(None, values), out_dir / "runs" / f"audit-{model}-s{seed}", folds=folds, progress=progress)
        fold_time[model] = round((time.time() - t1) / folds, 1)
        missing_true, wrong_true = _truth(clean_m, noisy_m, oof.rows, oof.names)
        for method in RULES:
            sc = score_cells(oof, method)
            if method == RULES[0]:
                cl_missing, cl_wrong = cleanlab_scores(sc, oof.probs)
                det[f"{model}/cleanlab"] = {"missing": detection(cl_missing, missing_true), "wrong": detection(cl_wrong, wrong_true)}
                if model == "mumic":
                    table = suspects(oof, sc)
            det[f"{model}/{method}"] = {"missing": detection(sc.missing, missing_true), "wrong": detection(sc.wrong, wrong_true)}
    return det, table, fold_time


def _one_seed(doc: dict[str, Any], base: dict[str, Any], noise: dict[str, float], seed: int, folds: int, out_dir: Path,
              progress: bool) -> dict[str, Any]:
    t0 = time.time()
    data_dir = out_dir / "data"
    noisy_path = _noisy_path(base, noise, seed, out_dir)
    noisy_m = read_manifest(noisy_path)
    det, audit_table, fold_time = _audits(doc, base, noise, seed, folds, out_dir, progress)
    res: dict[str, Any] = {"seed": seed, "detection": det, "repair": {}, "robust": {}, "fold_time_s": fold_time}
    clean = dict(doc.get("clean") or {})
    # repair (MuMIC, the default rule's suspects): fixed top K missing / K wrong, or the rows of the top K of each kind dropped
    mumic_values = {**base, **doc["mumic"]}
    res["repair"]["clean"] = _train({**mumic_values, **clean}, "mumic-clean", seed, out_dir, progress)
    res["repair"]["noisy"] = _train({**mumic_values, "manifest": str(noisy_path)}, "mumic-noisy", seed, out_dir, progress)
    res["repair"]["variants"] = {}
    res["repair"]["counts"] = {}
    # the ceiling of any repair: every injected error fixed (clean tags, the noisy manifest's explicit negatives)
    clean_m = read_manifest(base["manifest"], allow_outside=bool(base.get("allow_outside_paths")))
    oracle = [(str(noisy_m.images[i]), label, action) for i in range(len(noisy_m))
              for action, labels in (("add", set(clean_m.labels[i]) - set(noisy_m.labels[i])),
                                     ("remove", set(noisy_m.labels[i]) - set(clean_m.labels[i]))) for label in sorted(labels)]
    res["repair"]["counts"]["oracle"] = corrected_manifest(noisy_m, data_dir / f"oracle-s{seed}.csv", fixes=oracle)
    res["repair"]["oracle"] = _train({**mumic_values, "manifest": str(data_dir / f"oracle-s{seed}.csv")}, "mumic-oracle", seed, out_dir,
                                     progress)
    by_kind = {kind: [r for r in audit_table if r["kind"] == kind] for kind in ("missing", "wrong")}
    for k_missing, k_wrong in doc["fix_top"]:
        name = f"fixed-{k_missing}-{k_wrong}"
        path = data_dir / f"{name}-s{seed}.csv"
        fixes = top_suggestions(by_kind["missing"], k_missing) + top_suggestions(by_kind["wrong"], k_wrong)
        res["repair"]["counts"][name] = corrected_manifest(noisy_m, path, fixes=fixes)
        res["repair"]["variants"][name] = _train({**mumic_values, "manifest": str(path)}, f"mumic-{name}", seed, out_dir, progress)
    for k in doc["drop_top"]:
        name = f"dropped-{k}"
        path = data_dir / f"{name}-s{seed}.csv"
        res["repair"]["counts"][name] = corrected_manifest(noisy_m, path, drop=top_rows(audit_table, int(k)))
        res["repair"]["variants"][name] = _train({**mumic_values, "manifest": str(path)}, f"mumic-{name}", seed, out_dir, progress)
    # robust option against the plain setting, MuMIC and baseline, noisy and clean
    for model in ("mumic", "baseline"):
        plain = {**base, **doc[model]}
        robust = {**base, **doc[f"robust_{model}"]}
        r = {"noisy": res["repair"]["noisy"] if model == "mumic" else _train({**plain, "manifest": str(noisy_path)}, f"{model}-noisy",
                                                                               seed, out_dir, progress),
             "clean": res["repair"]["clean"] if model == "mumic" else _train({**plain, **clean}, f"{model}-clean", seed, out_dir, progress),
             "robust_noisy": _train({**robust, "manifest": str(noisy_path)}, f"{model}-robust-noisy", seed, out_dir, progress),
             "robust_clean": _train({**robust, **clean}, f"{model}-robust-clean", seed, out_dir, progress)}
        res["robust"][model] = r
    res["time_s"] = round(time.time() - t0, 1)
    from mumic.io import atomic_write_text

    atomic_write_text(out_dir / "seeds" / f"s{seed}.json", json.dumps(res, indent=2) + "\n")
    return res
