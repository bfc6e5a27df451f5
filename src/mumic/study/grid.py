"""Running the grid: each cell and seed is a normal run directory (trained with
:func:`mumic.train.fit`, evaluated on the test split), so frozen-tower cells share the
feature cache and cost seconds. A cell whose run already holds ``metrics.json`` (with the
same configuration) is reused, so an interrupted grid resumes where it stopped.

Derived data lives in OUT/data/: noisy training labels (:mod:`mumic.study.noise`), the
cross-style split (:mod:`mumic.data.cross_style`), and a copy of the labels file where a
cell's ``templates`` must replace the file's own (a labels file's templates otherwise win
over the config's).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from mumic.config import TrainConfig, load_config
from mumic.data.cross_style import TEST_STYLE as CROSS_TEST_STYLE
from mumic.data.cross_style import TRAIN_STYLES as CROSS_TRAIN_STYLES
from mumic.data.cross_style import cross_style_manifest
from mumic.data.manifest import SEPARATOR, read_labels_file, read_manifest
from mumic.data.training import saved_config
from mumic.errors import ConfigError, ManifestError, MumicError
from mumic.io import atomic_write_text, link_folder
from mumic.readers import read_yaml
from mumic.study.noise import noisy_frame, noisy_tag
from mumic.study.report import write_results
from mumic.study.schema import Ablation, Cell, load_ablation, run_dir
from mumic.train import fit, resume

log = logging.getLogger(__name__)

# keys that do not change what a run learns: a finished run is reused across them
NEUTRAL_KEYS = ("out", "device", "num_workers", "cache_dir", "engine")
FILE_KEYS = ("manifest", "val_manifest", "test_manifest", "labels_file")  # compared as resolved paths


# ----------------------------------------------------------------------------- derived data


def _short_hash(text: str) -> str:
    """A short name for a derived file, from the text that determines it."""
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def _write_if_changed(path: Path, text: str) -> None:

    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


def _manifest_frame(manifest_path: Path, data_dir: Path, allow_outside: bool, folder: Path | None = None) -> tuple[Any, Any]:
    """A manifest as a CSV-ready frame (images under `folder`, the manifest's own by
    default, named through a link in data_dir; labels `|`-joined) and the parsed Manifest."""

    m = read_manifest(manifest_path, allow_outside=allow_outside)
    folder = folder if folder is not None else manifest_path.parent.absolute()
    link = link_folder(data_dir, folder)
    images = []
    for img in m.images:
        try:
            rel = Path(os.path.relpath(img, folder))
        except ValueError:
            rel = Path("..")
        images.append(str(img) if rel.parts and rel.parts[0] == ".." else f"{link}/{rel.as_posix()}")
    df = m.frame.copy()
    df["image"] = images
    df["labels"] = [SEPARATOR.join(l) for l in m.labels]
    if m.negatives is not None:
        df["negatives"] = [SEPARATOR.join(n) for n in m.negatives]
    if m.splits is not None:
        df["split"] = m.splits
    return df, m


def _to_csv(df: Any) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def _vocabulary(values: dict[str, Any], m: Any) -> list[str]:

    if values.get("labels_file"):
        specs, _ = read_labels_file(values["labels_file"])
        return [s.name for s in specs if s.seen]
    return m.label_names()


def derive_manifest(values: dict[str, Any], cell: Cell, seed: int, data_dir: Path) -> Path | None:
    """The derived training manifest of a cell and seed under data_dir (None: use the base one)."""

    if not cell.noisy and not cell.cross_style:
        return None
    src = Path(values["manifest"])
    allow_outside = bool(values.get("allow_outside_paths"))
    tag = src.stem
    if cell.cross_style:
        try:
            rows = cross_style_manifest(src, data_dir / f"{tag}-cross_style-rows.csv", CROSS_TRAIN_STYLES, CROSS_TEST_STYLE,
                                        allow_outside=allow_outside)
        except ManifestError as e:
            raise ConfigError(f"cell '{cell.name}': cross_style: {e}") from None
        tag += "-cross_style"
        df, m = _manifest_frame(rows, data_dir, True, folder=src.parent.resolve())
    else:
        df, m = _manifest_frame(src, data_dir, allow_outside)
    if cell.noisy:
        df, stats = noisy_frame(df, m, _vocabulary(values, m), cell.noisy, seed)
        tag += "-" + noisy_tag(cell.noisy, seed)
        _write_if_changed(data_dir / f"{tag}.json", json.dumps(stats, indent=2) + "\n")
    target = data_dir / f"{tag}.csv"
    _write_if_changed(target, _to_csv(df))
    return target


def derive_labels_file(values: dict[str, Any], data_dir: Path) -> Path | None:
    """A copy of the labels file whose templates are the config's, where the config sets
    templates and the labels file has its own (which would otherwise win)."""

    if "templates" not in values or not values.get("labels_file"):
        return None
    src = Path(values["labels_file"])
    specs, file_templates = read_labels_file(src)
    if not file_templates or list(file_templates) == list(values["templates"]):
        return None
    entries = []
    for s in specs:
        e: dict[str, Any] = {"name": s.name}
        if s.prompts:
            e["prompts"] = list(s.prompts)
        if s.description:
            e["description"] = s.description
        e["seen"] = bool(s.seen)
        entries.append(e)
    doc = {"templates": list(values["templates"]), "labels": entries}
    target = data_dir / f"{src.stem}-templates-{_short_hash(json.dumps(values['templates']))}.yaml"
    _write_if_changed(target, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return target


def cell_config(abl: Ablation, cell: Cell, seed: int, out: Path, extra: dict[str, Any] | None = None) -> Any:
    """The TrainConfig of one cell and seed (derived data written under OUT/data/)."""

    values = {**abl.base, **cell.overrides, **(extra or {})}
    data_dir = out / "data"
    manifest = derive_manifest(values, cell, seed, data_dir)
    if manifest is not None:
        values["manifest"] = str(manifest)
    labels_file = derive_labels_file(values, data_dir)
    if labels_file is not None:
        values["labels_file"] = str(labels_file)
    values.update(out=str(run_dir(out, cell, seed)), seed=seed)
    return load_config(None, values)


# ----------------------------------------------------------------------------- cells


def is_frozen(abl: Ablation, cell: Cell) -> bool:
    """Whether both towers are frozen in the cell (features cached: cheap)."""

    cfg = TrainConfig(**{**abl.base, **cell.overrides})
    return cfg.image_tower == "frozen" and cfg.text_tower == "frozen"


def select_cells(abl: Ablation, only: list[str] | None, frozen_only: bool) -> list[Cell]:
    """The cells whose name or group matches one of the shell patterns of `only`
    (comma-separated or repeated; all when None), with both towers frozen if `frozen_only`."""
    cells = abl.cells
    if only:
        pats = [p for o in only for p in o.split(",") if p]
        cells = [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) or fnmatch.fnmatchcase(c.group, p) for p in pats)]
        if not cells:
            raise ConfigError(f"--only {', '.join(pats)} matches no cell name or group of {abl.path}")
    if frozen_only:
        cells = [c for c in cells if is_frozen(abl, c)]
    return cells


def cell_state(run: Path) -> str:
    """finished (metrics.json), interrupted (a checkpoint) or pending."""
    if (run / "metrics.json").is_file():
        return "finished"
    if (run / "checkpoint.safetensors").is_file():
        return "interrupted"
    return "pending"


def _same_config(run: Path, cfg: Any) -> tuple[bool, str]:
    """Whether the finished run at `run` was trained with `cfg` (as its config.yaml records
    it: see data.training.saved_config), apart from settings that do not change results.
    A run saved before config.yaml recorded the labels file's templates matches `cfg` as given."""
    try:
        saved, _ = read_yaml(run / "config.yaml", error=ConfigError)
    except ConfigError:
        return False, "config.yaml is unreadable"
    saved = saved if isinstance(saved, dict) else {}
    why = ""
    for candidate in (saved_config(cfg), cfg):
        why = _difference(saved, candidate)
        if not why:
            return True, ""
    return False, why


def _difference(saved: dict[str, Any], cfg: Any) -> str:
    for k, v in cfg.to_dict().items():
        if k in NEUTRAL_KEYS:
            continue
        old = saved.get(k)
        if k in FILE_KEYS and old and v:
            old, v = Path(old).resolve(), Path(v).resolve()
        if old != v:
            return f"{k}: {saved.get(k)!r} -> {v!r}"
    return ""


# ----------------------------------------------------------------------------- running


def run_cell(cfg: Any, *, progress: bool = True) -> tuple[Path, str]:
    """Train one cell and seed (its TrainConfig, from cell_config) unless its run already
    finished with the same configuration. Returns the run and what was done: reused,
    resumed or trained."""

    run = Path(cfg.out)
    state = cell_state(run)
    if state != "pending":
        same, why = _same_config(run, cfg)
        if same and state == "finished":
            log.info("reusing the finished run %s", run)
            return run, "reused"
        if same and state == "interrupted":
            log.info("resuming the interrupted run %s", run)
            return resume(run, progress=progress), "resumed"
        log.warning("%s was trained with another configuration (%s); training it again", run, why)
    return fit(cfg, overwrite=True, progress=progress), "trained"


def _check_test_split(configs: Any) -> None:
    """Every configuration must have test data: the grid reports test figures."""

    checked: set[str] = set()
    for cfg in configs:
        if cfg.test_manifest or cfg.manifest in checked:
            continue
        checked.add(cfg.manifest)
        m = read_manifest(cfg.manifest, allow_outside=cfg.allow_outside_paths, allow_duplicates=cfg.allow_duplicate_rows)
        if "test" not in set(m.splits or ()):
            raise ConfigError(f"{cfg.manifest}: no rows with split 'test'; the grid reports test figures, so give the "
                              f"manifest a test split or set test_manifest in base:")


def run_ablation(config: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None, seeds: int | None = None,
                 only: list[str] | None = None, frozen_only: bool = False, device: str | None = None,
                 progress: bool = True, report_only: bool = False) -> dict[str, Any]:
    """Run (or resume) the grid of an ablation file and write the report.

    Returns {"out", "report", "trained", "reused", "failed"}; a cell whose training fails
    with a MumicError is reported and left out, and the grid goes on.
    """
    abl = load_ablation(config)
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {seeds}")
        abl.seeds = list(range(seeds))
    out_dir = Path(out) if out else Path("docs/results") / abl.name
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a folder")
    extra = {"device": device} if device else None
    cells = select_cells(abl, only, frozen_only)
    t0 = time.time()
    trained: list[str] = []
    reused: list[str] = []
    failed: dict[str, str] = {}
    if not report_only:
        # every configuration (and its derived data) first, so that a mistake stops the grid
        # before anything trains
        configs = {(c.name, s): cell_config(abl, c, s, out_dir, extra) for c in cells for s in abl.seeds}
        _check_test_split(configs.values())
        k = 0
        for cell in cells:
            for seed in abl.seeds:
                k += 1
                key = run_dir(out_dir, cell, seed).name
                log.info("[%d/%d] %s seed %d (%s)", k, len(configs), cell.name, seed, cell.group)
                try:
                    _, action = run_cell(configs[(cell.name, seed)], progress=progress)
                except MumicError as e:
                    log.error("run %s failed: %s", key, e)
                    failed[key] = str(e)
                    continue
                (reused if action == "reused" else trained).append(key)
            write_results(abl, out_dir, failed=failed)
    report = write_results(abl, out_dir, failed=failed)
    log.info("ablation %s: %d runs trained, %d reused, %d failed in %.0f s",
             abl.name, len(trained), len(reused), len(failed), time.time() - t0)
    return {"out": out_dir, "report": report, "trained": trained, "reused": reused, "failed": failed}
