"""What a run says about itself: per-label tables and the plots of report.md.

Every run's report.md holds, besides the paper's metrics, the label counts of each split,
each label's average precision and calibrated threshold (and whether it fell back to the
global one), a precision-recall curve, an example grid and the learning curve. The demo's
report draws its plots with the same functions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mumic.io import atomic_path, atomic_write_text
from mumic.metrics import average_precision_per_label

log = logging.getLogger(__name__)

HEADLINE = ("gap10", "gap", "map_macro", "map_majority", "zsl_map", "gzsl_map", "map_micro", "f1_micro_thr", "f1_macro_thr")
"""The paper's figures first, then the rest."""

PER_LABEL_COLUMNS = ("label", "seen", "train", "positives", "ap", "threshold", "global threshold")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, *, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG, written atomically, then closed."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    _pyplot().close(fig)


def per_label_rows(names: Sequence[str], seen: Sequence[bool], y: np.ndarray, probs: np.ndarray,
                   thresholds: dict[str, Any] | None, train_counts: dict[str, int] | None) -> list[dict[str, Any]]:
    """One row per label: whether it was trained on, its training positives, its positives
    here, its average precision here (None without a positive), its calibrated threshold and
    whether that is the global one (labels with too few validation positives)."""
    ap = average_precision_per_label(y, probs) if len(y) else np.full(len(names), np.nan)
    per_label = (thresholds or {}).get("per_label", {})
    default = (thresholds or {}).get("default")
    fallback = set((thresholds or {}).get("global", ()))
    rows = []
    for j, name in enumerate(names):
        rows.append({
            "label": name, "seen": bool(seen[j]), "train": int((train_counts or {}).get(name, 0)), "positives": int(y[:, j].sum()),
            "ap": None if math.isnan(ap[j]) else float(ap[j]),
            "threshold": float(per_label.get(name, default)) if (name in per_label or default is not None) else None,
            "global threshold": name in fallback or name not in per_label,
        })
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def per_label_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The per-label rows as a Markdown table, best AP first (labels without AP last)."""
    order = sorted(rows, key=lambda r: (r["ap"] is None, -(r["ap"] or 0.0), r["label"]))
    lines = ["| " + " | ".join(PER_LABEL_COLUMNS) + " |", "|" + "---|" * len(PER_LABEL_COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in PER_LABEL_COLUMNS) + " |" for r in order]
    return lines


def plot_precision_recall(path: Path, y: np.ndarray, series: dict[str, np.ndarray], title: str) -> None:
    """Micro precision-recall curves over all (image, label) cells, one per named score set."""
    from sklearn.metrics import precision_recall_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, p in series.items():
        prec, rec, _ = precision_recall_curve(y.ravel(), p.ravel())
        ax.plot(rec, prec, label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_per_label_ap(path: Path, names: Sequence[str], ap: np.ndarray, other: tuple[str, np.ndarray] | None = None,
                      name: str = "AP", xlabel: str = "average precision") -> None:
    """Horizontal bars of each label's AP (sorted), optionally with a second run as dots."""
    plt = _pyplot()
    ok = ~np.isnan(ap)
    order = np.argsort(ap[ok])
    lab = np.array(names)[ok][order]
    fig, ax = plt.subplots(figsize=(7, max(4, 0.13 * len(lab))))
    ax.barh(np.arange(len(lab)), ap[ok][order], color="tab:blue", label=name, height=0.8)
    if other is not None:
        ax.scatter(other[1][ok][order], np.arange(len(lab)), color="tab:orange", s=8, label=other[0], zorder=3)
    ax.set_yticks(np.arange(len(lab)), lab, fontsize=5 if len(lab) > 40 else 8)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def plot_examples(path: Path, images: Sequence[Path], labels: Sequence[Sequence[str]], names: Sequence[str], probs: np.ndarray,
                  decided: np.ndarray, *, n: int = 12, seed: int = 0) -> None:
    """A grid of images with their true tags and the decided ones (best first, ✓ / ✗)."""
    from PIL import Image

    plt = _pyplot()
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(images), size=min(n, len(images)), replace=False)
    known = set(names)
    fig, axes = plt.subplots(3, 4, figsize=(11, 9.5))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), pick):
        with Image.open(images[i]) as img:
            ax.imshow(img.convert("RGB"))
        true = [t for t in labels[i] if t in known]
        pred = [names[j] for j in np.argsort(-probs[i]) if decided[i, j]][:5]
        hit = [("✓ " if t in true else "✗ ") + t for t in pred] or ["(none)"]
        ax.set_title("true: " + ", ".join(true[:5]) + "\npred: " + ", ".join(hit), fontsize=7, loc="left")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_learning_curve(path: Path, log_rows: Sequence[dict[str, Any]]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in log_rows]
    ax.plot(steps, [r["val_gap10"] for r in log_rows], marker="o", label="val GAP@10")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["train_loss"] for r in log_rows], color="tab:red", alpha=0.6, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("val GAP@10")
    ax2.set_ylabel("train loss")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def metrics_table(m: dict[str, Any]) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    for k in [k for k in HEADLINE if k in m] + [k for k in m if k not in HEADLINE]:
        v = m[k]
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) and not math.isnan(v) else f"| {k} | {v} |")
    return lines


def write_run_report(run: Path, metrics: dict[str, Any], log_rows: Sequence[dict[str, Any]], *,
                     split_counts: dict[str, dict[str, int]] | None = None, detail: dict[str, Any] | None = None) -> None:
    """report.md and its plots for a finished run.

    `split_counts`: {split: {label: positives}} for the label-count table. `detail` (the
    split the per-label table, the PR curve and the example grid describe): {"split",
    "names", "seen", "y", "probs", "decided", "images", "labels", "thresholds", "train_counts"}.
    """
    run = Path(run)
    lines = [f"# Run {run.name}", ""]
    for split in ("val", "test"):
        if split in metrics:
            lines += [f"## {split}", "", *metrics_table(metrics[split]), ""]
    lines += [f"best step {metrics.get('best_step')} of {metrics.get('steps')}, tau {metrics.get('tau', float('nan')):.4f}, "
              f"train time {metrics.get('train_time_s')} s", ""]
    plots: list[tuple[str, str, Any]] = []
    if log_rows:
        plots.append(("learning curve", "curve.png", lambda p: plot_learning_curve(p, log_rows)))
    if split_counts:
        splits = list(split_counts)
        names = sorted({n for c in split_counts.values() for n in c})
        lines += ["## labels per split", "", "| label | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
        lines += [f"| {n} | " + " | ".join(str(split_counts[s].get(n, 0)) for s in splits) + " |" for n in names]
        lines.append("")
    if detail is not None and len(detail["y"]):
        d = detail
        rows = per_label_rows(d["names"], d["seen"], d["y"], d["probs"], d["thresholds"], d["train_counts"])
        n_global = sum(r["global threshold"] for r in rows if r["seen"])
        n_seen = sum(r["seen"] for r in rows)
        lines += [f"## per label ({d['split']})", "",
                  f"{n_global} of {n_seen} trained labels use the global threshold (too few validation positives "
                  f"for a threshold of their own).", "", *per_label_markdown(rows), ""]
        series = {"seen labels": d["probs"][:, np.asarray(d["seen"], bool)]}
        y_seen = d["y"][:, np.asarray(d["seen"], bool)]
        plots.append(("precision-recall", "precision_recall.png",
                      lambda p: plot_precision_recall(p, y_seen, series, f"{d['split']}, all (image, seen label) pairs")))
        plots.append(("examples", "examples.png",
                      lambda p: plot_examples(p, d["images"], d["labels"], d["names"], d["probs"], d["decided"])))
    for title, name, draw in plots:
        try:
            draw(run / name)
            lines += [f"![{title}]({name})", ""]
        except Exception as e:  # a report without a plot is still a report
            log.warning("could not draw %s: %s", name, e)
    atomic_write_text(run / "report.md", "\n".join(lines))
