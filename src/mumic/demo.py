"""`mumic demo`: a small end-to-end run on data the repo makes itself."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mumic.config import load_config
from mumic.errors import RunError

log = logging.getLogger(__name__)


def run_demo(out: Path, data: Path, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Build the shapes set if missing, train `lite` (frozen towers, cached features), report."""
    from mumic.data.synthetic import make_shapes
    from mumic.evaluate import format_metrics
    from mumic.train import fit

    root = make_shapes(data).parent
    if (out / "metrics.json").is_file() and not overwrite:
        log.info("%s already holds a finished demo run (use --overwrite to train again)", out)
    else:
        if out.exists() and any(out.iterdir()) and not overwrite and not (out / "metrics.json").is_file():
            raise RunError(f"{out} holds an unfinished run; pass --overwrite to start again")
        cfg = load_config(overrides={
            "manifest": str(root / "manifest.csv"), "labels_file": str(root / "labels.yaml"), "out": str(out),
            "backbone": "lite", "image_size": 128, "epochs": 40, "batch_size": 32, "eval_every": 20, "patience": 8,
            "majority_n": 5,
        })
        fit(cfg, overwrite=True, progress=progress)
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"demo run: {out}  (report: {out / 'report.md'})")
    print(format_metrics(metrics.get("test", metrics["val"])))
    return out
