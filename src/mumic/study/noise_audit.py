"""The label-noise study: detection of the injected errors by `mumic audit` and by
cleanlab on the same out-of-fold probabilities, repair of the manifest, and a
noise-robust loss (see ablations/noise.yaml).

Per seed: the study's seeded noise (mumic.study.noise, the exact corrupted cells known)
on the training rows; K-fold audits with MuMIC and with the linear baseline; detection
figures for both score rules on both models' probabilities; test figures of training on
noisy labels, on the manifest after --fix-top K / --drop-top K, and on clean labels; and
the robust option under noise and on clean labels. Every training is a normal run under
OUT/runs/, reused when finished, so the study resumes.
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
KEYS = ("base", "noisy", "seeds", "folds", "mumic", "baseline", "robust_mumic", "robust_baseline", "drop_top", "description")


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
    per_seed = []
    for seed in seed_list:
        per_seed.append(_one_seed(doc, base, noise, seed, folds, out_dir, progress))
        from mumic.study.noise_report import write_noise_report

        write_noise_report(out_dir, doc, per_seed, config=str(config), elapsed=time.time() - t0, seeds_planned=len(seed_list))
    return {"out": out_dir, "report": out_dir / "report.md", "seeds": per_seed}


def _train(values: dict[str, Any], name: str, seed: int, out_dir: Path, progress: bool) -> dict[str, float]:
    cfg = load_config(None, {**values, "seed": seed, "out": str(out_dir / "runs" / f"{name}-s{seed}")})
    run, _ = run_cell(cfg, progress=progress)
    return _metrics(run)


def _one_seed(doc: dict[str, Any], base: dict[str, Any], noise: dict[str, float], seed: int, folds: int, out_dir: Path,
              progress: bool) -> dict[str, Any]:
    t0 = time.time()
    data_dir = out_dir / "data"
    noisy_path = derive_manifest(base, Cell(name="noisy", group="noisy", noisy=noise), seed, data_dir)
    assert noisy_path is not None
    clean_m = read_manifest(base["manifest"], allow_outside=bool(base.get("allow_outside_paths")))
    noisy_m = read_manifest(noisy_path)
    res: dict[str, Any] = {"seed": seed, "detection": {}, "repair": {}, "robust": {}, "fold_time_s": {}}
    audit_table: list[dict[str, Any]] = []
    for model in ("mumic", "baseline"):
        values = {**base, **doc[model], "manifest": str(noisy_path), "seed": seed}
        t1 = time.time()
        oof = cross_fit(load_config(None, values), out_dir / "runs" / f"audit-{model}-s{seed}", folds=folds, progress=progress)
        res["fold_time_s"][model] = round((time.time() - t1) / folds, 1)
        missing_true, wrong_true = _truth(clean_m, noisy_m, oof.rows, oof.names)
        cl_missing = cl_wrong = None
        for method in ("margin", "llr"):
            sc = score_cells(oof, method)
            if method == "margin":
                cl_missing, cl_wrong = cleanlab_scores(sc, oof.probs)
                res["detection"][f"{model}/cleanlab"] = {"missing": detection(cl_missing, missing_true),
                                                         "wrong": detection(cl_wrong, wrong_true)}
                if model == "mumic":
                    audit_table = suspects(oof, sc)
            res["detection"][f"{model}/{method}"] = {"missing": detection(sc.missing, missing_true),
                                                     "wrong": detection(sc.wrong, wrong_true)}
    # repair (MuMIC): K = the suspects the audit itself decides on (score > 0), per kind
    mumic_values = {**base, **doc["mumic"]}
    k_fix = {kind: sum(r["kind"] == kind for r in audit_table) for kind in ("missing", "wrong")}
    fixed = data_dir / f"fixed-s{seed}.csv"
    dropped = data_dir / f"dropped-s{seed}.csv"
    fixes = top_suggestions([r for r in audit_table if r["kind"] == "missing"], k_fix["missing"]) + \
        top_suggestions([r for r in audit_table if r["kind"] == "wrong"], k_fix["wrong"])
    res["repair"]["fix_counts"] = corrected_manifest(noisy_m, fixed, fixes=fixes)
    res["repair"]["drop_counts"] = corrected_manifest(noisy_m, dropped, drop=top_rows(audit_table, int(doc.get("drop_top", 500))))
    res["repair"]["k_fix"] = k_fix
    for name, path in (("clean", base["manifest"]), ("noisy", noisy_path), ("fixed", fixed), ("dropped", dropped)):
        res["repair"][name] = _train({**mumic_values, "manifest": str(path)}, f"mumic-{name}", seed, out_dir, progress)
    # robust option against the plain setting, MuMIC and baseline, noisy and clean
    for model in ("mumic", "baseline"):
        plain = {**base, **doc[model]}
        robust = {**base, **doc[f"robust_{model}"]}
        noisy_plain = {**plain, "manifest": str(noisy_path)}
        r = {"noisy": res["repair"]["noisy"] if model == "mumic" else _train(noisy_plain, f"{model}-noisy", seed, out_dir, progress),
             "clean": res["repair"]["clean"] if model == "mumic" else _train(plain, f"{model}-clean", seed, out_dir, progress),
             "robust_noisy": _train({**robust, "manifest": str(noisy_path)}, f"{model}-robust-noisy", seed, out_dir, progress),
             "robust_clean": _train(robust, f"{model}-robust-clean", seed, out_dir, progress)}
        res["robust"][model] = r
    res["time_s"] = round(time.time() - t0, 1)
    (out_dir / "seeds").mkdir(parents=True, exist_ok=True)
    from mumic.io import atomic_write_text

    atomic_write_text(out_dir / "seeds" / f"s{seed}.json", json.dumps(res, indent=2) + "\n")
    return res
