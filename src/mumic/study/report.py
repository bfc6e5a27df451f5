"""The report of a grid: results.csv, results.md and plots from the finished runs.

The report is chosen on validation only: the table shows test figures (mean ± std over
seeds) with the best of each column in bold, and marks the configuration with the best
validation GAP@10 in each axis; the one best on validation overall is named with its test
figures. Nothing is selected on test.

The markdown is rendered from the rows alone (:func:`render_results`), so the rows of a
results.csv (:func:`read_results_csv`) give the same table as the runs they came from.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from mumic.config import TrainConfig
from mumic.errors import ConfigError
from mumic.io import atomic_path, atomic_write_text
from mumic.readers import read_text
from mumic.study.schema import PATH_KEYS, Ablation, Cell, describe, run_dir

log = logging.getLogger(__name__)

METRICS = (
    ("gap10", "GAP@10"), ("gap", "GAP"), ("map_macro", "macro mAP"), ("map_majority", "majority mAP"),
    ("map_micro", "micro mAP"), ("f1_micro_thr", "micro F1 (thr)"), ("zsl_map", "ZSL mAP"), ("gzsl_map", "GZSL mAP"),
)
"""Test metrics in the table, CSV and plots (keys of metrics.json's "test")."""
LOWER_IS_BETTER = ("train_time_s",)
CSV_METRICS = [k for k, _ in METRICS] + ["train_time_s", "val_gap10", "tau"]
CSV_COLUMNS = ["name", "group", "loss", "noisy", "cross_style", "seeds", *CSV_METRICS, *[k + "_std" for k in CSV_METRICS]]
PLOTS = (("gap10", "GAP@10"), ("map_macro", "macro mAP"))


# ----------------------------------------------------------------------------- rows


def _metric(m: dict[str, Any], split: str, key: str) -> float:
    v = (m.get(split) or {}).get(key) if split else m.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.array([x for x in xs if not math.isnan(x)], float)
    if not len(a):
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _cell_fields(abl: Ablation, cell: Cell) -> dict[str, Any]:
    """The columns of a row that come from the ablation file. "learning": the configuration
    apart from its data and how unlisted labels count, so noisy cells are compared with the
    clean cell of the same setup."""

    cfg = TrainConfig(**{**abl.base, **cell.overrides})
    d = dataclasses.asdict(cfg)
    for k in ("unlisted", "seed", "manifest", "labels_file", "out", *PATH_KEYS):
        d.pop(k, None)
    return {"name": cell.name, "group": cell.group, "loss": cfg.loss, "noisy": int(bool(cell.noisy)),
            "cross_style": int(cell.cross_style), "learning": json.dumps(d, sort_keys=True, default=str)}


def collect(abl: Ablation, out: Path) -> list[dict[str, Any]]:
    """One row per configuration with at least one finished seed: means and stds over seeds."""
    rows = []
    for cell in abl.cells:
        metrics = []
        for seed in abl.seeds:
            f = run_dir(out, cell, seed) / "metrics.json"
            if f.is_file():
                try:
                    metrics.append(json.loads(f.read_text(encoding="utf-8")))
                except (OSError, ValueError):
                    log.warning("ignoring unreadable %s", f)
        if not metrics:
            continue
        fields = _cell_fields(abl, cell)
        row: dict[str, Any] = {k: fields[k] for k in ("name", "group", "loss", "noisy", "cross_style")}
        row.update(seeds=len(metrics), learning=fields["learning"])
        series = {k: [_metric(m, "test", k) for m in metrics] for k, _ in METRICS}
        series["train_time_s"] = [_metric(m, "", "train_time_s") for m in metrics]
        series["val_gap10"] = [_metric(m, "val", "gap10") for m in metrics]
        series["tau"] = [_metric(m, "", "tau") for m in metrics]
        for k, xs in series.items():
            row[k], row[k + "_std"] = _mean_std(xs)
        rows.append(row)
    return rows


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else round(v, 6)
    return v


def results_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as results.csv (numbers rounded to 6 digits, an empty field for n/a)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


def read_results_csv(path: Path, abl: Ablation) -> list[dict[str, Any]]:
    """The rows of a results.csv that `abl`'s grid wrote, as :func:`collect` gives them."""

    cells = {c.name: c for c in abl.cells}
    rows = []
    for r in csv.DictReader(io.StringIO(read_text(path, error=ConfigError), newline="")):
        if r.get("name") not in cells:
            raise ConfigError(f"{path}: row {r.get('name')!r} is not a cell of {abl.path}")
        row: dict[str, Any] = {"name": r["name"], "group": r["group"], "loss": r["loss"], "noisy": int(r["noisy"]),
                               "cross_style": int(r["cross_style"]), "seeds": int(r["seeds"]),
                               "learning": _cell_fields(abl, cells[r["name"]])["learning"]}
        for k in CSV_METRICS:
            for col in (k, k + "_std"):
                row[col] = float(r[col]) if r[col] != "" else float("nan")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- selection


def _fmt(mean: float, std: float, seeds: int, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if seeds > 1 else "")


def _best(rows: list[dict[str, Any]], key: str) -> set[int]:
    """Indices of the best mean of `key`, among rows tested on the same test set (cross-style apart)."""
    best: set[int] = set()
    for cross in (0, 1):
        idx = [i for i, r in enumerate(rows) if r["cross_style"] == cross and not math.isnan(r[key])]
        if not idx:
            continue
        vals = [rows[i][key] for i in idx]
        target = min(vals) if key in LOWER_IS_BETTER else max(vals)
        best |= {i for i, v in zip(idx, vals) if abs(v - target) < 1e-12}
    return best


def _val_choice(rows: list[dict[str, Any]], pick: list[int]) -> int | None:
    ok = [i for i in pick if not math.isnan(rows[i]["val_gap10"])]
    return max(ok, key=lambda i: rows[i]["val_gap10"]) if ok else None


def _targets(rows: list[dict[str, Any]]) -> list[str]:
    """The paper's claims as checks on the test split, each side chosen on validation:
    MuMIC (a tempered-sigmoid loss) vs. the linear-head baseline on clean labels, the GAP@10
    each loses under noisy labels, and zero-shot mAP with seen-label GAP@10."""
    def pick(pred) -> dict[str, Any] | None:
        c = _val_choice(rows, [i for i, r in enumerate(rows) if not r["cross_style"] and pred(r)])
        return rows[c] if c is not None else None

    def mumic(r: dict[str, Any]) -> bool:
        return str(r["loss"]).startswith("tempered_sigmoid")

    def f(r: dict[str, Any], k: str) -> str:
        return _fmt(r[k], r[k + "_std"], r["seeds"])

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    m = pick(lambda r: mumic(r) and not r["noisy"])
    b = pick(lambda r: r["loss"] == "linear_bce" and not r["noisy"])
    if m is None or b is None:
        return []
    lines = ["## Targets", "",
             "Each side is the configuration with the best validation GAP@10 among its kind (MuMIC: a tempered-sigmoid "
             "loss; baseline: `linear_bce`); the figures are test means ± std over seeds. \"Outside one std\": the "
             "difference exceeds the sum of both stds.", ""]
    for k, title in (("gap10", "GAP@10"), ("map_macro", "macro mAP")):
        d = m[k] - b[k]
        ok = d >= 0.03 and d > m[k + "_std"] + b[k + "_std"]
        lines.append(f"- {title}: MuMIC `{m['name']}` {f(m, k)} vs. baseline `{b['name']}` {f(b, k)}: "
                     f"{d * 100:+.1f} points (target +3, outside one std): {verdict(ok)}.")
    mn = pick(lambda r: mumic(r) and r["noisy"])
    bn = pick(lambda r: r["loss"] == "linear_bce" and r["noisy"])
    clean = {r["learning"]: r for r in rows if not r["noisy"] and not r["cross_style"]}
    if mn is not None and bn is not None and mn["learning"] in clean and bn["learning"] in clean:
        cm, cb = clean[mn["learning"]], clean[bn["learning"]]
        dm, db = cm["gap10"] - mn["gap10"], cb["gap10"] - bn["gap10"]
        lines.append(f"- Noisy labels (each noisy configuration against the clean one with the same settings): GAP@10 "
                     f"drops {dm * 100:.1f} points for MuMIC (`{cm['name']}` {f(cm, 'gap10')} → `{mn['name']}` "
                     f"{f(mn, 'gap10')}) and {db * 100:.1f} for the baseline (`{cb['name']}` {f(cb, 'gap10')} → "
                     f"`{bn['name']}` {f(bn, 'gap10')}); MuMIC loses {(db - dm) * 100:+.1f} points less (target +5): "
                     f"{verdict(db - dm >= 0.05)}.")
    if not math.isnan(m["zsl_map"]):
        best_zsl = max((r for r in rows if not r["cross_style"] and not math.isnan(r["zsl_map"])), key=lambda r: r["zsl_map"])
        ok = m["zsl_map"] >= 0.30 and m["gap10"] >= 0.70
        lines.append(f"- Zero-shot: `{m['name']}` has ZSL mAP {f(m, 'zsl_map')} with seen-label GAP@10 {f(m, 'gap10')} "
                     f"(target ZSL >= 0.30 with GAP@10 >= 0.70): {verdict(ok)}. The highest ZSL mAP of any configuration "
                     f"is {f(best_zsl, 'zsl_map')} (`{best_zsl['name']}`).")
    lines.append("")
    return lines


# ----------------------------------------------------------------------------- report


def render_results(abl: Ablation, rows: list[dict[str, Any]], out: Path, *, plots: list[str] | None = None,
                   failed: dict[str, str] | None = None) -> str:
    """results.md from the rows (`out`: where the grid writes, named in the resume command)."""
    n_seeds = len(abl.seeds)
    lines = [f"# Ablations: {abl.name}", ""]
    if abl.description:
        lines += [abl.description, ""]
    base = ", ".join(f"{k}={v}" for k, v in abl.base.items() if k not in PATH_KEYS)
    lines += [
        f"Grid `{abl.path.as_posix()}`: {len(abl.cells)} configurations × {n_seeds} seeds ({', '.join(map(str, abl.seeds))}); "
        f"shared settings: {base or '(defaults)'}.",
        "",
        "Test split, mean ± std over the finished seeds. **Bold**: the best mean of each column (cross-style rows, which "
        "test on other images, are compared only with each other). ✓: the configuration of its axis with the best "
        "*validation* GAP@10 — selection uses validation only, never test.",
        "",
    ]
    plain = [i for i, r in enumerate(rows) if not r["cross_style"]]
    choice = _val_choice(rows, plain)
    if choice is not None:
        r = rows[choice]
        lines += [f"Best on validation: **{r['name']}** (val GAP@10 {_fmt(r['val_gap10'], r['val_gap10_std'], r['seeds'])}); "
                  f"its test GAP@10 {_fmt(r['gap10'], r['gap10_std'], r['seeds'])}, macro mAP "
                  f"{_fmt(r['map_macro'], r['map_macro_std'], r['seeds'])}, "
                  f"ZSL mAP {_fmt(r['zsl_map'], r['zsl_map_std'], r['seeds'])}.", ""]
    marked: set[int] = set()
    for g in dict.fromkeys(r["group"] for r in rows):
        for cross in (0, 1):
            best = _val_choice(rows, [i for i, r in enumerate(rows) if r["group"] == g and r["cross_style"] == cross])
            if best is not None:
                marked.add(best)
    cols = [*METRICS, ("train_time_s", "train time (s)")]
    head = ["axis", "configuration", "loss", "noisy", "seeds", "final τ", "val GAP@10", *[t for _, t in cols]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    bests = {k: _best(rows, k) for k, _ in cols}
    bests["val_gap10"] = _best(rows, "val_gap10")
    for i, r in enumerate(rows):
        cells = [r["group"], r["name"] + (" ✓" if i in marked else ""), r["loss"], "yes" if r["noisy"] else "no",
                 f"{r['seeds']}/{n_seeds}", "n/a" if math.isnan(r["tau"]) or r["loss"] == "linear_bce" else f"{r['tau']:.3f}"]
        for k in ["val_gap10", *[k for k, _ in cols]]:
            digits = 0 if k == "train_time_s" else 3
            s = _fmt(r[k], r[k + "_std"], r["seeds"], digits)
            cells.append(f"**{s}**" if i in bests[k] and s != "n/a" else s)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["ZSL mAP is over the labels marked unseen (never trained); GZSL over seen + unseen; n/a where a run has no text "
              "classifier (linear head). Majority mAP: the labels with the most training positives (`majority_n`). "
              "Final τ: the temperature of the selected (best-validation) weights, mean over seeds. Train time is wall "
              "time, which depends on what else the machine was doing.", ""]
    for p in plots or []:
        lines += [f"![{p}]({p})", ""]
    lines += _targets(rows)
    lines += ["## Configurations", "", "| axis | configuration | changes from the shared settings | finished seeds |", "|---|---|---|---|"]
    done = {r["name"]: r["seeds"] for r in rows}
    for c in abl.cells:
        lines.append(f"| {c.group} | {c.name} | {describe(c)} | {done.get(c.name, 0)}/{n_seeds} |")
    lines.append("")
    pending = [c.name for c in abl.cells if done.get(c.name, 0) < n_seeds]
    if pending:
        again = f"mumic ablate {abl.path.as_posix()} --seeds {n_seeds} --out {Path(out).as_posix()}"
        lines += [f"Not finished yet ({len(pending)}): {', '.join(pending)}. `{again}` resumes.", ""]
    if failed:
        lines += ["Failed runs:", "", *[f"- {k}: {v}" for k, v in failed.items()], ""]
    lines += ["Runs: `runs/<configuration>-s<seed>/` (each a normal run directory with its own report); derived "
              "manifests (noisy labels, cross-style) in `data/`; numbers in `results.csv`.", ""]
    return "\n".join(lines)


def write_results(abl: Ablation, out: Path, *, failed: dict[str, str] | None = None) -> Path:
    """results.csv, results.md and plots under `out` from the finished runs."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(abl, out)
    atomic_write_text(out / "results.csv", results_csv(rows))
    plots = _plots(rows, out) if rows else []
    report = out / "results.md"
    atomic_write_text(report, render_results(abl, rows, out, plots=plots, failed=failed))
    return report


def _plots(rows: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    groups = list(dict.fromkeys(r["group"] for r in rows))
    colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    made = []
    for key, title in PLOTS:
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(rows) + 1)))
        y = np.arange(len(rows))[::-1]
        vals = [0.0 if math.isnan(r[key]) else r[key] for r in rows]
        err = [0.0 if math.isnan(r[key + "_std"]) else r[key + "_std"] for r in rows]
        ax.barh(y, vals, xerr=err, color=[colours[r["group"]] for r in rows], capsize=2, height=0.75)
        ax.axvline(vals[0], color="grey", linestyle="--", linewidth=0.8)  # the first (reference) configuration
        ax.set_yticks(y, [r["name"] for r in rows], fontsize=7)
        ax.set_xlabel(f"test {title} (mean ± std over seeds)")
        ax.set_xlim(0, 1)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in groups]
        ax.legend(handles, groups, fontsize=6, loc="lower right")
        fig.tight_layout()
        name = f"{key}.png"
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        made.append(name)
    return made
