"""The whole audit: cross-fit, score, write suspects.csv and report.md, optionally a corrected manifest."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mumic.audit.fixes import corrected_manifest, read_fixes, top_rows, top_suggestions
from mumic.audit.folds import audit_config, cross_fit
from mumic.audit.report import write_report
from mumic.audit.scores import score_cells, suspects
from mumic.errors import ConfigError
from mumic.io import atomic_write_csv, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

COLUMNS = ("image", "label", "kind", "score", "oof_probability", "rank", "threshold", "suggested")


def run_audit(run_or_config: str | os.PathLike[str], out: str | os.PathLike[str], *, manifest: str | os.PathLike[str] | None = None,
              folds: int = 5, method: str = "neighbours", apply: str | os.PathLike[str] | None = None, fix_top: int | None = None,
              drop_top: int | None = None, corrected: str | os.PathLike[str] | None = None, device: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Audit the training rows of a manifest with a run's (or a config file's) configuration.

    Writes OUT/suspects.csv, OUT/report.md (with image grids) and OUT/audit.json; with
    `apply` (a fixes file), `fix_top` or `drop_top`, also a corrected manifest
    (default OUT/manifest.corrected.csv). Returns {"out", "suspects", "report",
    "corrected", "oof", "scores", "table"}.
    """
    for name, v in (("--fix-top", fix_top), ("--drop-top", drop_top)):
        if v is not None and v < 1:
            raise ConfigError(f"{name} must be at least 1, got {v}")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a folder; choose another --out")
    cfg = audit_config(run_or_config, manifest, {"device": device})
    fixes = read_fixes(apply) if apply is not None else []  # a bad fixes file fails before anything trains
    oof = cross_fit(cfg, out_dir, folds=folds, progress=progress)
    scores = score_cells(oof, method)
    table = suspects(oof, scores)
    if table:
        atomic_write_csv(out_dir / "suspects.csv", [{k: r[k] for k in COLUMNS} for r in table])
    else:
        atomic_write_text(out_dir / "suspects.csv", ",".join(COLUMNS) + "\n")
    info: dict[str, Any] = {"manifest": str(cfg.manifest), "source": str(run_or_config), "rows": len(oof.rows), "labels": len(oof.names),
            "folds": folds, "method": method, "loss": cfg.loss, "backbone": cfg.backbone}
    report = write_report(out_dir, table, info)
    result: dict[str, Any] = {"out": out_dir, "suspects": out_dir / "suspects.csv", "report": report, "corrected": None,
                              "oof": oof, "scores": scores, "table": table}
    if fixes or fix_top or drop_top:
        if fix_top:
            fixes = fixes + top_suggestions(table, fix_top)
        drop = top_rows(table, drop_top) if drop_top else []
        target = Path(corrected) if corrected else out_dir / "manifest.corrected.csv"
        changed: dict[str, Any] = dict(corrected_manifest(oof.manifest, target, fixes=fixes, drop=drop, where=str(apply or "suspects")))
        info["corrected"] = {**changed, "path": str(target)}
        result["corrected"] = target
        log.info("corrected manifest %s: %s", target, info["corrected"])
    atomic_write_json(out_dir / "audit.json", info)
    return result
