"""The ablation file: what every cell of the grid shares, what each cell changes.

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

Every error names the file, the line and the key.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mumic.config import FIELDS, TrainConfig, check_type, unknown_key
from mumic.errors import ConfigError
from mumic.readers import read_text, read_yaml

TOP_KEYS = ("base", "seeds", "cells", "description")
CELL_KEYS = ("name", "group", "overrides", "noisy", "cross_style")
NOISY_KEYS = ("drop_positives", "add_false_positives", "verified_negatives")
RESERVED = ("out", "seed")  # set by the grid itself
PATH_KEYS = ("manifest", "val_manifest", "test_manifest", "labels_file", "cache_dir")
DEFAULT_SEEDS = 3
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


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


def run_dir(out: Path, cell: Cell, seed: int) -> Path:
    """The run folder of a cell and seed: OUT/runs/<cell>-s<seed>."""
    return Path(out) / "runs" / f"{cell.name}-s{seed}"


def describe(cell: Cell) -> str:
    """What a cell changes from the shared settings, in one line."""
    parts = [f"{k}={v}" if not isinstance(v, list) else f"{k}={json.dumps(v)}" for k, v in cell.overrides.items()]
    if cell.noisy:
        verified = cell.noisy.get("verified_negatives")
        parts.append(f"noisy: -{cell.noisy['drop_positives']:.0%} positives, "
                     f"+{cell.noisy['add_false_positives']:.0%} false positives"
                     + (f", {cell.noisy['verified_negatives']:.0%} of true negatives listed" if verified else ""))
    if cell.cross_style:
        parts.append("cross-style (Google+Twitter → OpenMoji)")
    return ", ".join(parts) or "(base)"


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


def _key_lines(p: Path) -> dict[tuple, int]:
    """The line of every key of a file that read_yaml has already accepted."""

    return _node_lines(yaml.compose(read_text(p, error=ConfigError), Loader=yaml.SafeLoader))


def _check_overrides(values: Any, where: str, what: str, lines: dict[tuple, int], prefix: tuple, path: Path) -> dict[str, Any]:

    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: '{what}' must be a mapping of TrainConfig keys, got {type(values).__name__}")
    out: dict[str, Any] = {}
    for k, v in values.items():
        at = f"{path} line {lines[prefix + (k,)]}" if prefix + (k,) in lines else where
        if not isinstance(k, str) or k not in FIELDS:
            raise unknown_key(str(k), f"{at}: {what}")
        if k in RESERVED:
            raise ConfigError(f"{at}: {what}: key '{k}' is set by the grid (OUT/runs/<cell>-s<seed>, seeds:); remove it")
        out[k] = check_type(k, v, f"{at}: {what}")
    return out


def _seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise ConfigError(f"{where}: key 'seeds' must be a number of seeds or a list of seeds, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{where}: key 'seeds' must be at least 1, got {value}")
        return list(range(value))
    if not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value) or len(set(value)) != len(value):
        raise ConfigError(f"{where}: key 'seeds' must be a list of distinct integers, got {value!r}")
    return list(value)


def _noisy(noisy: Any, label: str, at: Any) -> dict[str, float] | None:
    if noisy is None:
        return None
    if not isinstance(noisy, dict):
        raise ConfigError(f"{at('noisy')}: {label}: 'noisy' must be a mapping like {{drop_positives: 0.3, add_false_positives: 0.05}}")
    for k, v in noisy.items():
        if k not in NOISY_KEYS:
            raise ConfigError(f"{at('noisy', k)}: {label} noisy: unknown key '{k}' (allowed: {', '.join(NOISY_KEYS)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ConfigError(f"{at('noisy', k)}: {label} noisy: key '{k}' must be a number in [0, 1), got {v!r}")
    out = {k: float(noisy.get(k, 0.0)) for k in NOISY_KEYS}
    return out if any(out.values()) else None


def load_ablation(path: str | os.PathLike[str]) -> Ablation:
    """Read and validate an ablation file. Errors name the file, line and key."""

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ablation file {p} does not exist")
    data, _ = read_yaml(p, error=ConfigError)
    lines = _key_lines(p)

    def at(*key: Any) -> str:
        return f"{p} line {lines[key]}" if key in lines else str(p)

    if not isinstance(data, dict):
        raise ConfigError(f"{p}: an ablation file must be a mapping with base:, seeds: and cells:")
    for k in data:
        if k not in TOP_KEYS:
            raise ConfigError(f"{at(k)}: unknown key '{k}' (allowed: {', '.join(TOP_KEYS)})")
    base = _check_overrides(data.get("base"), at("base"), "base", lines, ("base",), p)
    seeds = _seeds(data.get("seeds", DEFAULT_SEEDS), at("seeds"))

    raw_cells = data.get("cells")
    if not isinstance(raw_cells, list) or not raw_cells:
        raise ConfigError(f"{at('cells')}: key 'cells' must be a non-empty list of cells (name, group, overrides, ...)")
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for i, c in enumerate(raw_cells):
        where = at("cells", i)

        def cat(*key: Any, i: int = i) -> str:
            return at("cells", i, *key)

        if not isinstance(c, dict):
            raise ConfigError(f"{where}: cells[{i}] must be a mapping with name, group and overrides")
        for k in c:
            if k not in CELL_KEYS:
                raise ConfigError(f"{cat(k)}: cells[{i}]: unknown key '{k}' (allowed: {', '.join(CELL_KEYS)})")
        name = c.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(f"{where}: cells[{i}]: 'name' must be a short name of letters, digits, _ . + - "
                              f"(it names run folders), got {name!r}")
        if name in seen:
            raise ConfigError(f"{where}: cells[{i}]: name '{name}' is already used ({seen[name]}); cell names must be unique")
        seen[name] = where
        label = f"cell '{name}'"
        group = c.get("group", "other")
        if not isinstance(group, str):
            raise ConfigError(f"{cat('group')}: {label}: 'group' must be a string, got {group!r}")
        overrides = _check_overrides(c.get("overrides"), cat("overrides"), f"{label} overrides", lines,
                                     ("cells", i, "overrides"), p)
        noisy = _noisy(c.get("noisy"), label, cat)
        cross = c.get("cross_style", False)
        if not isinstance(cross, bool):
            raise ConfigError(f"{cat('cross_style')}: {label}: 'cross_style' must be true or false, got {cross!r}")
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
