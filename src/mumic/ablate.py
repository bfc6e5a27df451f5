"""`mumic ablate`: a grid of training configurations, several seeds each, as one report.

An ablation file (YAML) names what every cell shares and what each cell changes:

    base:                     # TrainConfig keys shared by every cell
      manifest: data/emoji/manifest.csv
      labels_file: data/emoji/labels.yaml
      image_size: 128
    seeds: 3                  # how many seeds (0..N-1), or a list of seeds
    cells:
      - name: mumic           # the run folder is OUT/runs/<name>-s<seed>
        group: loss           # the axis the cell belongs to
        overrides: {loss: tempered_sigmoid}
      - name: noisy_bce
        group: noisy
        overrides: {loss: linear_bce}
        noisy: {drop_positives: 0.3, add_false_positives: 0.05}
      - name: cross_mumic
        group: cross_style
        cross_style: true

Every cell and seed is a normal run directory (trained with :func:`mumic.train.fit`,
evaluated on the test split), so frozen-tower cells share the feature cache and cost
seconds. A cell whose run already holds ``metrics.json`` (with the same configuration) is
reused, so an interrupted grid resumes where it stopped. Derived data lives in OUT/data/:

- ``noisy``: the *training* rows only get label noise, deterministic given the seed (the
  same noisy labels for every cell of that seed, so cells compare on the same data):
  ``drop_positives`` x P of the P true training positives are dropped at random (a row
  keeps at least one label), and ``add_false_positives`` x P false positives are added at
  random (row, trained label) cells that were negative. ``verified_negatives`` x N of
  each row's N remaining true negatives are listed as explicit negatives (what an
  annotator who checked them would give), so ``unlisted: unknown`` has negatives to learn
  from while the dropped positives stay unknown.
  Validation and test rows are untouched.
- ``cross_style``: train and validate on Google + Twitter artwork, test on OpenMoji
  artwork (EmojiTags' ``style`` column), as `mumic demo` does.
- ``templates`` in a cell's overrides replace the labels file's own templates (a
  labels file's templates otherwise win over the config's).

The report is chosen on validation only: the table shows test figures (mean ± std over
seeds) with the best of each column in bold, and marks the configuration with the best
validation GAP@10 in each axis; the one best on validation overall is named with its test
figures. Nothing is selected on test.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import hashlib
import io
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mumic.errors import ConfigError, MumicError

log = logging.getLogger(__name__)

TOP_KEYS = ("base", "seeds", "cells", "description")
CELL_KEYS = ("name", "group", "overrides", "noisy", "cross_style")
NOISY_KEYS = ("drop_positives", "add_false_positives", "verified_negatives")
RESERVED = ("out", "seed")  # set by the grid itself
PATH_KEYS = ("manifest", "val_manifest", "test_manifest", "labels_file", "cache_dir")
# keys that do not change what a run learns: a finished run is reused across them
NEUTRAL_KEYS = ("out", "device", "num_workers", "cache_dir", "engine")
FILE_KEYS = ("manifest", "val_manifest", "test_manifest", "labels_file")  # compared as resolved paths
CROSS_TRAIN_STYLES = ("google", "twitter")
CROSS_TEST_STYLE = "openmoji"
DEFAULT_SEEDS = 3
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

METRICS = (
    ("gap10", "GAP@10"), ("gap", "GAP"), ("map_macro", "macro mAP"), ("map_majority", "majority mAP"),
    ("map_micro", "micro mAP"), ("f1_micro_thr", "micro F1 (thr)"), ("zsl_map", "ZSL mAP"), ("gzsl_map", "GZSL mAP"),
)
"""Test metrics in the table, CSV and plots (keys of metrics.json's "test")."""
LOWER_IS_BETTER = ("train_time_s",)


# ----------------------------------------------------------------------------- config


@dataclass
class Cell:
    """One configuration of the grid."""

    name: str
    group: str
    overrides: dict[str, Any] = field(default_factory=dict)
    noisy: dict[str, float] | None = None
    cross_style: bool = False


@dataclass
class Ablation:
    """A parsed ablation file."""

    path: Path
    base: dict[str, Any]
    seeds: list[int]
    cells: list[Cell]
    description: str = ""

    @property
    def name(self) -> str:
        return self.path.stem


def _node_lines(node: Any, prefix: tuple = ()) -> dict[tuple, int]:
    """Line (1-based) of every mapping key and sequence item of a composed YAML node, by path."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            out[prefix + (key,)] = k.start_mark.line + 1
            out.update(_node_lines(v, prefix + (key,)))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[prefix + (i,)] = v.start_mark.line + 1
            out.update(_node_lines(v, prefix + (i,)))
    return out


def _check_overrides(values: Any, where: str, what: str, lines: dict[tuple, int], prefix: tuple, path: Path) -> dict[str, Any]:
    from mumic.config import FIELDS, _check_type, _unknown_key

    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: '{what}' must be a mapping of TrainConfig keys, got {type(values).__name__}")
    out: dict[str, Any] = {}
    for k, v in values.items():
        at = f"{path} line {lines[prefix + (k,)]}" if prefix + (k,) in lines else where
        if not isinstance(k, str) or k not in FIELDS:
            raise _unknown_key(str(k), f"{at}: {what}")
        if k in RESERVED:
            raise ConfigError(f"{at}: {what}: key '{k}' is set by the grid (OUT/runs/<cell>-s<seed>, seeds:); remove it")
        out[k] = _check_type(k, v, f"{at}: {what}")
    return out


def load_ablation(path: str | os.PathLike[str]) -> Ablation:
    """Read and validate an ablation file. Errors name the file, line and key."""
    from mumic.config import TrainConfig, _read_yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ablation file {p} does not exist")
    data, _ = _read_yaml(p)
    node = yaml.compose(p.read_text(encoding="utf-8-sig"), Loader=yaml.SafeLoader)
    lines = _node_lines(node)

    def at(*key: Any) -> str:
        return f"{p} line {lines[key]}" if key in lines else str(p)

    if not isinstance(data, dict):
        raise ConfigError(f"{p}: an ablation file must be a mapping with base:, seeds: and cells:")
    for k in data:
        if k not in TOP_KEYS:
            raise ConfigError(f"{at(k)}: unknown key '{k}' (allowed: {', '.join(TOP_KEYS)})")
    base = _check_overrides(data.get("base"), at("base"), "base", lines, ("base",), p)

    seeds_v = data.get("seeds", DEFAULT_SEEDS)
    if isinstance(seeds_v, bool) or not isinstance(seeds_v, (int, list)):
        raise ConfigError(f"{at('seeds')}: key 'seeds' must be a number of seeds or a list of seeds, got {seeds_v!r}")
    if isinstance(seeds_v, int):
        if seeds_v < 1:
            raise ConfigError(f"{at('seeds')}: key 'seeds' must be at least 1, got {seeds_v}")
        seeds = list(range(seeds_v))
    else:
        if not seeds_v or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds_v) or len(set(seeds_v)) != len(seeds_v):
            raise ConfigError(f"{at('seeds')}: key 'seeds' must be a list of distinct integers, got {seeds_v!r}")
        seeds = list(seeds_v)

    raw_cells = data.get("cells")
    if not isinstance(raw_cells, list) or not raw_cells:
        raise ConfigError(f"{at('cells')}: key 'cells' must be a non-empty list of cells (name, group, overrides, ...)")
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for i, c in enumerate(raw_cells):
        where = at("cells", i)
        if not isinstance(c, dict):
            raise ConfigError(f"{where}: cells[{i}] must be a mapping with name, group and overrides")
        for k in c:
            if k not in CELL_KEYS:
                raise ConfigError(f"{at('cells', i, k)}: cells[{i}]: unknown key '{k}' (allowed: {', '.join(CELL_KEYS)})")
        name = c.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(f"{where}: cells[{i}]: 'name' must be a short name of letters, digits, _ . + - (it names run folders), got {name!r}")
        if name in seen:
            raise ConfigError(f"{where}: cells[{i}]: name '{name}' is already used ({seen[name]}); cell names must be unique")
        seen[name] = where
        label = f"cell '{name}'"
        group = c.get("group", "other")
        if not isinstance(group, str):
            raise ConfigError(f"{at('cells', i, 'group')}: {label}: 'group' must be a string, got {group!r}")
        overrides = _check_overrides(c.get("overrides"), at("cells", i, "overrides"), f"{label} overrides", lines,
                                     ("cells", i, "overrides"), p)
        noisy = c.get("noisy")
        if noisy is not None:
            nwhere = at("cells", i, "noisy")
            if not isinstance(noisy, dict):
                raise ConfigError(f"{nwhere}: {label}: 'noisy' must be a mapping like {{drop_positives: 0.3, add_false_positives: 0.05}}")
            for k, v in noisy.items():
                kat = at("cells", i, "noisy", k)
                if k not in NOISY_KEYS:
                    raise ConfigError(f"{kat}: {label} noisy: unknown key '{k}' (allowed: {', '.join(NOISY_KEYS)})")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                    raise ConfigError(f"{kat}: {label} noisy: key '{k}' must be a number in [0, 1), got {v!r}")
            noisy = {k: float(noisy.get(k, 0.0)) for k in NOISY_KEYS}
            if not any(noisy.values()):
                noisy = None
        cross = c.get("cross_style", False)
        if not isinstance(cross, bool):
            raise ConfigError(f"{at('cells', i, 'cross_style')}: {label}: 'cross_style' must be true or false, got {cross!r}")
        merged = {**base, **overrides}
        try:
            TrainConfig(**merged)
        except TypeError as e:  # pragma: no cover - every key was checked above
            raise ConfigError(f"{where}: {label}: {e}") from None
        if cross and (merged.get("val_manifest") or merged.get("test_manifest")):
            raise ConfigError(f"{where}: {label}: cross_style derives val and test from 'manifest'; remove val_manifest/test_manifest")
        if not merged.get("manifest"):
            raise ConfigError(f"{where}: {label}: no training manifest; give 'manifest' in base: or in the cell's overrides")
        cells.append(Cell(name=name, group=group, overrides=overrides, noisy=noisy, cross_style=cross))
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{at('description')}: key 'description' must be a string")
    return Ablation(path=p, base=base, seeds=seeds, cells=cells, description=description.strip())


# ----------------------------------------------------------------------------- derived data


def _write_if_changed(path: Path, text: str) -> None:
    from mumic.io import atomic_write_text

    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _link_folder(data_dir: Path, folder: Path) -> str:
    """A link in data_dir to the source manifest's folder, so derived manifests name their
    images by relative paths inside their own folder (as a manifest must by default)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(folder.resolve(), data_dir.resolve())  # relative: the folder can move with the repository
    name = "src-" + hashlib.blake2b(target.encode(), digest_size=4).hexdigest()
    link = data_dir / name
    if link.is_symlink() and os.readlink(link) == target:
        return name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return name


def _manifest_frame(manifest_path: Path, data_dir: Path, allow_outside: bool) -> tuple[Any, Any]:
    """The source manifest as a CSV-ready frame (image paths through the link, labels
    `|`-joined) and the parsed Manifest."""
    from mumic.data.manifest import SEPARATOR, read_manifest

    m = read_manifest(manifest_path, allow_outside=allow_outside)
    folder = manifest_path.parent.absolute()
    link = _link_folder(data_dir, folder)
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


def _train_rows(n: int, splits: list[str] | None) -> np.ndarray:
    """Rows that training reads: split 'train', or every row where there is none (as train.py does)."""
    if splits is None or "train" not in set(splits):
        return np.ones(n, bool)
    return np.array([s == "train" for s in splits], bool)


def add_label_noise(labels: list[list[str]], negatives: list[list[str]] | None, vocabulary: list[str], rows: np.ndarray,
                    drop_positives: float, add_false_positives: float, seed: int,
                    verified_negatives: float = 0.0) -> tuple[list[list[str]], dict[str, Any]]:
    """Noisy copies of `labels` on the rows where `rows` is True (others are unchanged).

    round(drop_positives x P) of the P true positives in those rows are dropped, at random
    among all but one random label of each row (a manifest row needs a label, so a
    one-label row keeps its label); then round(add_false_positives x P) labels from
    `vocabulary` are added at random cells that were neither positive nor an explicit
    negative. Deterministic given `seed`.

    With `verified_negatives` > 0, stats["negatives"] holds each row's explicit negatives:
    the given ones plus round(verified_negatives x N) of the row's N true negatives that
    did not become false positives (drawn from their own random stream, so the noisy
    labels do not depend on it).
    """
    rng = np.random.default_rng([int(seed), 0x6E6F6973])
    out = [list(l) for l in labels]
    idx = np.flatnonzero(rows)
    positives = sum(len(labels[i]) for i in idx)
    # every row keeps one random label (a manifest row needs one); the others may go
    droppable = []
    for i in idx:
        if len(labels[i]) > 1:
            anchor = int(rng.integers(len(labels[i])))
            droppable += [(int(i), j) for j in range(len(labels[i])) if j != anchor]
    want_drop = min(int(round(drop_positives * positives)), len(droppable))
    gone: dict[int, set[int]] = {}
    for k in rng.choice(len(droppable), size=want_drop, replace=False) if want_drop else []:
        i, j = droppable[int(k)]
        gone.setdefault(i, set()).add(j)
    for i, js in gone.items():
        out[i] = [l for j, l in enumerate(labels[i]) if j not in js]
    dropped = want_drop
    added = 0
    want = int(round(add_false_positives * positives))
    if want and len(idx) and vocabulary:
        col = {n: j for j, n in enumerate(vocabulary)}
        taken = np.zeros((len(idx), len(vocabulary)), bool)
        for r, i in enumerate(idx):
            for l in labels[i] + (negatives[i] if negatives is not None else []):
                if l in col:
                    taken[r, col[l]] = True
        free = np.flatnonzero(~taken.ravel())
        pick = np.sort(rng.choice(free, size=min(want, len(free)), replace=False))
        for flat in pick:
            r, j = divmod(int(flat), len(vocabulary))
            out[idx[r]].append(vocabulary[j])
        added = len(pick)
    verified = 0
    neg_out = [list(n) for n in negatives] if negatives is not None else [[] for _ in labels]
    if verified_negatives > 0:
        vrng = np.random.default_rng([int(seed), 0x76657269])
        for i in idx:
            seen = set(labels[i]) | set(out[i]) | set(neg_out[i])
            pool = [l for l in vocabulary if l not in seen]
            k = int(round(verified_negatives * len(pool)))
            if k:
                pick = sorted(vrng.choice(len(pool), size=k, replace=False))
                neg_out[i] += [pool[j] for j in pick]
                verified += k
    stats = {"train_rows": int(len(idx)), "positives": int(positives), "dropped": dropped, "added": added,
             "verified_negatives_listed": verified, "verified_negatives": verified_negatives,
             "drop_rate": dropped / positives if positives else 0.0,
             "false_positive_rate": added / positives if positives else 0.0, "seed": int(seed),
             "drop_positives": drop_positives, "add_false_positives": add_false_positives}
    if verified_negatives > 0:
        stats["negatives"] = neg_out
    return out, stats


def _vocabulary(cfg_values: dict[str, Any], m: Any) -> list[str]:
    from mumic.data.manifest import read_labels_file

    if cfg_values.get("labels_file"):
        specs, _ = read_labels_file(cfg_values["labels_file"])
        return [s.name for s in specs if s.seen]
    return m.label_names()


def derive_manifest(values: dict[str, Any], cell: Cell, seed: int, data_dir: Path) -> Path | None:
    """The derived training manifest of a cell and seed under data_dir (None: use the base one)."""
    from mumic.data.manifest import SEPARATOR

    if not cell.noisy and not cell.cross_style:
        return None
    src = Path(values["manifest"])
    df, m = _manifest_frame(src, data_dir, bool(values.get("allow_outside_paths")))
    labels = list(m.labels)
    tag = src.stem
    if cell.cross_style:
        if "style" not in df.columns or m.splits is None:
            raise ConfigError(f"cell '{cell.name}': cross_style needs a manifest with 'split' and 'style' columns (EmojiTags); {src} lacks them")
        style = df["style"].astype(str).tolist()
        keep = np.array([(s in ("train", "val") and st in CROSS_TRAIN_STYLES) or (s == "test" and st == CROSS_TEST_STYLE)
                         for s, st in zip(m.splits, style)], bool)
        if not keep.any() or not any(s == "test" for s, k in zip(m.splits, keep) if k):
            raise ConfigError(f"cell '{cell.name}': cross_style found no {CROSS_TEST_STYLE} test rows in {src}")
        df = df[keep].reset_index(drop=True)
        labels = [l for l, k in zip(labels, keep) if k]
        m = m.select(keep)
        tag += "-cross_style"
    if cell.noisy:
        rows = _train_rows(len(m), m.splits)
        verified = cell.noisy.get("verified_negatives", 0.0)
        noisy, stats = add_label_noise(labels, m.negatives, _vocabulary(values, m), rows, cell.noisy["drop_positives"],
                                       cell.noisy["add_false_positives"], seed, verified_negatives=verified)
        df["labels"] = [SEPARATOR.join(l) for l in noisy]
        if "negatives" in stats:
            df["negatives"] = [SEPARATOR.join(n) for n in stats.pop("negatives")]
        tag += f"-noisy-d{cell.noisy['drop_positives']:g}-a{cell.noisy['add_false_positives']:g}"
        tag += (f"-v{verified:g}" if verified else "") + f"-s{seed}"
        _write_if_changed(data_dir / f"{tag}.json", json.dumps(stats, indent=2) + "\n")
    target = data_dir / f"{tag}.csv"
    _write_if_changed(target, _to_csv(df))
    return target


def derive_labels_file(values: dict[str, Any], data_dir: Path) -> Path | None:
    """A copy of the labels file whose templates are the config's, where the config sets
    templates and the labels file has its own (which would otherwise win)."""
    from mumic.data.manifest import read_labels_file

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
    h = hashlib.blake2b(json.dumps(values["templates"]).encode(), digest_size=4).hexdigest()
    target = data_dir / f"{src.stem}-templates-{h}.yaml"
    _write_if_changed(target, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return target


def cell_config(abl: Ablation, cell: Cell, seed: int, out: Path, extra: dict[str, Any] | None = None) -> Any:
    """The TrainConfig of one cell and seed (derived data written under OUT/data/)."""
    from mumic.config import load_config

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


def run_dir(out: Path, cell: Cell, seed: int) -> Path:
    return out / "runs" / f"{cell.name}-s{seed}"


def is_frozen(abl: Ablation, cell: Cell) -> bool:
    """Whether both towers are frozen in the cell (features cached: cheap)."""
    from mumic.config import TrainConfig

    cfg = TrainConfig(**{**abl.base, **cell.overrides})
    return cfg.image_tower == "frozen" and cfg.text_tower == "frozen"


# ----------------------------------------------------------------------------- running


def _same_config(run: Path, cfg: Any) -> tuple[bool, str]:
    try:
        saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return False, "config.yaml is unreadable"
    now = cfg.to_dict()
    for k, v in now.items():
        if k in NEUTRAL_KEYS:
            continue
        old = saved.get(k)
        if k in FILE_KEYS and old and v:
            old, v = Path(old).resolve(), Path(v).resolve()
        if old != v:
            return False, f"{k}: {saved.get(k)!r} -> {v!r}"
    return True, ""


def cell_state(run: Path) -> str:
    if (run / "metrics.json").is_file():
        return "finished"
    if (run / "checkpoint.safetensors").is_file():
        return "interrupted"
    return "pending"


def _select(abl: Ablation, only: list[str] | None, frozen_only: bool) -> list[Cell]:
    cells = abl.cells
    if only:
        pats = [p for o in only for p in o.split(",") if p]
        cells = [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) or fnmatch.fnmatchcase(c.group, p) for p in pats)]
        if not cells:
            raise ConfigError(f"--only {', '.join(pats)} matches no cell name or group of {abl.path}")
    if frozen_only:
        cells = [c for c in cells if is_frozen(abl, c)]
    return cells


def run_cell(cfg: Any, *, progress: bool = True) -> tuple[Path, str]:
    """Train one cell and seed (its TrainConfig, from cell_config) unless its run already
    finished with the same configuration. Returns the run and what was done: reused,
    resumed or trained."""
    from mumic.train import fit, resume

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
    cells = _select(abl, only, frozen_only)
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
    log.info("ablation %s: %d runs trained, %d reused, %d failed in %.0f s", abl.name, len(trained), len(reused), len(failed), time.time() - t0)
    return {"out": out_dir, "report": report, "trained": trained, "reused": reused, "failed": failed}


def _check_test_split(configs: Any) -> None:
    """Every configuration must have test data: the grid reports test figures."""
    from mumic.data.manifest import read_manifest

    checked: set[str] = set()
    for cfg in configs:
        if cfg.test_manifest or cfg.manifest in checked:
            continue
        checked.add(cfg.manifest)
        m = read_manifest(cfg.manifest, allow_outside=cfg.allow_outside_paths, allow_duplicates=cfg.allow_duplicate_rows)
        if "test" not in set(m.splits or ()):
            raise ConfigError(f"{cfg.manifest}: no rows with split 'test'; the grid reports test figures, so give the "
                              f"manifest a test split or set test_manifest in base:")


# ----------------------------------------------------------------------------- results


def _metric(m: dict[str, Any], split: str, key: str) -> float:
    v = (m.get(split) or {}).get(key) if split else m.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.array([x for x in xs if not math.isnan(x)], float)
    if not len(a):
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _learning_setup(cfg: Any) -> str:
    """A configuration apart from its data and how unlisted labels count: noisy cells are
    compared with the clean cell of the same setup."""
    d = dataclasses.asdict(cfg)
    for k in ("unlisted", "seed", "manifest", "labels_file", "out", *PATH_KEYS):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def collect(abl: Ablation, out: Path) -> list[dict[str, Any]]:
    """One row per configuration with at least one finished seed: means and stds over seeds."""
    from mumic.config import TrainConfig

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
        cfg = TrainConfig(**{**abl.base, **cell.overrides})
        row: dict[str, Any] = {"name": cell.name, "group": cell.group, "loss": cfg.loss, "noisy": int(bool(cell.noisy)),
                               "cross_style": int(cell.cross_style), "seeds": len(metrics),
                               "learning": _learning_setup(cfg)}
        series = {k: [_metric(m, "test", k) for m in metrics] for k, _ in METRICS}
        series["train_time_s"] = [_metric(m, "", "train_time_s") for m in metrics]
        series["val_gap10"] = [_metric(m, "val", "gap10") for m in metrics]
        series["tau"] = [_metric(m, "", "tau") for m in metrics]
        for k, xs in series.items():
            row[k], row[k + "_std"] = _mean_std(xs)
        rows.append(row)
    return rows


CSV_METRICS = [k for k, _ in METRICS] + ["train_time_s", "val_gap10", "tau"]
CSV_COLUMNS = ["name", "group", "loss", "noisy", "cross_style", "seeds", *CSV_METRICS, *[k + "_std" for k in CSV_METRICS]]


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else round(v, 6)
    return v


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


def _describe(abl: Ablation, cell: Cell) -> str:
    parts = [f"{k}={v}" if not isinstance(v, list) else f"{k}={json.dumps(v)}" for k, v in cell.overrides.items()]
    if cell.noisy:
        parts.append(f"noisy: -{cell.noisy['drop_positives']:.0%} positives, +{cell.noisy['add_false_positives']:.0%} false positives"
                     + (f", {cell.noisy['verified_negatives']:.0%} of true negatives listed" if cell.noisy.get("verified_negatives") else ""))
    if cell.cross_style:
        parts.append("cross-style (Google+Twitter → OpenMoji)")
    return ", ".join(parts) or "(base)"


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


def write_results(abl: Ablation, out: Path, *, failed: dict[str, str] | None = None) -> Path:
    """results.csv, results.md and plots under `out` from the finished runs."""
    from mumic.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    rows = collect(abl, out)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r[k]) for k in CSV_COLUMNS})
    atomic_write_text(out / "results.csv", buf.getvalue())
    plots = _plots(rows, out) if rows else []

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
                  f"{_fmt(r['map_macro'], r['map_macro_std'], r['seeds'])}, ZSL mAP {_fmt(r['zsl_map'], r['zsl_map_std'], r['seeds'])}.", ""]
    marked: set[int] = set()
    for g in dict.fromkeys(r["group"] for r in rows):
        for cross in (0, 1):
            c = _val_choice(rows, [i for i, r in enumerate(rows) if r["group"] == g and r["cross_style"] == cross])
            if c is not None:
                marked.add(c)
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
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    lines += _targets(rows)
    lines += ["## Configurations", "", "| axis | configuration | changes from the shared settings | finished seeds |", "|---|---|---|---|"]
    done = {r["name"]: r["seeds"] for r in rows}
    for c in abl.cells:
        lines.append(f"| {c.group} | {c.name} | {_describe(abl, c)} | {done.get(c.name, 0)}/{n_seeds} |")
    lines.append("")
    pending = [c.name for c in abl.cells if done.get(c.name, 0) < n_seeds]
    if pending:
        again = f"mumic ablate {abl.path.as_posix()} --seeds {n_seeds} --out {out.as_posix()}"
        lines += [f"Not finished yet ({len(pending)}): {', '.join(pending)}. `{again}` resumes.", ""]
    if failed:
        lines += ["Failed runs:", "", *[f"- {k}: {v}" for k, v in failed.items()], ""]
    lines += ["Runs: `runs/<configuration>-s<seed>/` (each a normal run directory with its own report); derived "
              "manifests (noisy labels, cross-style) in `data/`; numbers in `results.csv`.", ""]
    report = out / "results.md"
    atomic_write_text(report, "\n".join(lines))
    return report


def _plots(rows: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["group"] for r in rows))
    colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    made = []
    for key, title in (("gap10", "GAP@10"), ("map_macro", "macro mAP")):
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
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)
    return made


