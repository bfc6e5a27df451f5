"""Manifests: which image has which labels (labels files are read in :mod:`mumic.data.labels`).

A manifest is a CSV, TSV, JSONL or Parquet table with a column ``image`` (a path,
relative to the manifest's folder unless absolute) and ``labels`` (a list in
JSONL/Parquet; ``|``-separated in CSV/TSV). Optional columns: ``negatives`` (explicit
negatives, same format), ``split``, and anything else, which is kept in
``Manifest.frame`` so it can be passed through to predictions.

Every problem in a file is reported as a :class:`~mumic.errors.ManifestError` that names
the file, the line (as a text editor shows it; Parquet has rows instead) and the problem.

A manifest may come from someone else, so by default it may only name images inside its
own folder (an absolute path into the folder is fine; ``../x.png`` or ``/elsewhere/x.png``
is refused unless ``allow_outside=True``), and a row repeated exactly is refused (a
mistake in a catalogue, and double weight in training) unless ``allow_duplicates=True``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mumic.data.labels import (  # noqa: F401
    MAX_LABELS,
    PLACEHOLDER,
    SEPARATOR,
    LabelSpec,
    duplicates,
    fill_template,
    normalize_label,
    read_labels_file,
    warn_case_clashes,
)
from mumic.data.tables import FORMATS as _FORMATS
from mumic.data.tables import read_table
from mumic.data.tables import show as _show
from mumic.errors import ConfigError, ImageError, ManifestError, shown

__all__ = [
    "Manifest", "read_manifest",
    # at home in mumic.data.labels; importable from here too
    "PLACEHOLDER", "SEPARATOR", "LabelSpec", "fill_template", "read_labels_file",
]

log = logging.getLogger(__name__)

_UNLISTED = ("negative", "unknown")


def _supported() -> str:
    return ", ".join(_FORMATS)


def _is_missing(value: Any) -> bool:
    """True for None and NaN (how pandas and JSON spell an absent cell)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return value is pd.NA or value is pd.NaT


# --------------------------------------------------------------------------- Manifest


@dataclass(eq=False, repr=False)
class Manifest:
    """A parsed manifest: one entry per row, in file order.

    ``images`` are absolute paths; ``labels`` and ``negatives`` are stripped and
    de-duplicated per row (order kept); ``frame`` holds the original columns; ``lines``
    the file line of each row (the row number for Parquet) for error messages.
    """

    path: Path
    images: list[Path]
    labels: list[list[str]]
    negatives: list[list[str]] | None = None
    splits: list[str] | None = None
    frame: pd.DataFrame = field(default_factory=pd.DataFrame)
    lines: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.images)
        if not self.lines:
            self.lines = list(range(1, n + 1))
        for name in ("labels", "negatives", "splits", "lines"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"Manifest.{name} has {len(value)} entries for {n} images")
        if len(self.frame) != n:
            raise ValueError(f"Manifest.frame has {len(self.frame)} rows for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"Manifest(path={str(self.path)!r}, rows={len(self)}, labels={len(self.label_names())})"

    def where(self, i: int) -> str:
        """``'<file> line N'`` (``row N`` for Parquet) for row ``i``, for messages."""
        return where_row(self.path, self.lines[i])

    def label_names(self) -> list[str]:
        """Sorted unique label names over ``labels`` and ``negatives``."""
        names: set[str] = set()
        for row in self.labels:
            names.update(row)
        for row in self.negatives or ():
            names.update(row)
        return sorted(names)

    def select(self, mask_or_indices: Sequence[int] | Sequence[bool] | np.ndarray) -> Manifest:
        """A new manifest with the rows picked by a boolean mask or by integer indices."""
        idx = np.asarray(mask_or_indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"boolean mask has shape {idx.shape}, expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.int64)
        elif not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"select() takes a boolean mask or integer indices, got {idx.dtype}")
        idx = idx.reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for a manifest of {len(self)} rows")
        pick = idx.tolist()
        return Manifest(
            path=self.path,
            images=[self.images[i] for i in pick],
            labels=[list(self.labels[i]) for i in pick],
            negatives=None if self.negatives is None else [list(self.negatives[i]) for i in pick],
            splits=None if self.splits is None else [self.splits[i] for i in pick],
            frame=self.frame.iloc[pick].reset_index(drop=True),
            lines=[self.lines[i] for i in pick],
        )

    def split_names(self) -> list[str]:
        """The non-empty split names present, sorted (empty when there is no split column)."""
        return sorted({s for s in self.splits or () if s})

    def split(self, name: str) -> Manifest:
        """The rows whose ``split`` is ``name``."""
        if self.splits is None:
            raise ManifestError(
                f"{self.path}: no 'split' column, so there is no split {name!r}; "
                "add a split column (e.g. train/val/test) or pass separate manifests"
            )
        mask = np.array([s == name for s in self.splits], dtype=bool)
        if not mask.any():
            present = ", ".join(self.split_names()) or "(none)"
            raise ManifestError(f"{self.path}: no rows with split {name!r}; splits present: {present}")
        return self.select(mask)

    def targets(
        self,
        label_names: Sequence[str],
        unlisted: str = "negative",
        *,
        ignore_unknown: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Targets ``y`` (float32 [N, C]) and the mask ``known`` (bool [N, C]).

        Listed labels are 1 and known; explicit negatives are 0 and known; every other
        cell is 0, and known if ``unlisted == "negative"``, unknown if ``"unknown"``.
        A manifest label missing from ``label_names`` is an error unless
        ``ignore_unknown`` (then it is dropped, as for zero-shot labels held out).
        """
        if unlisted not in _UNLISTED:
            raise ConfigError(f"unlisted must be one of {', '.join(_UNLISTED)}, got {unlisted!r}")
        index = {name: c for c, name in enumerate(label_names)}
        if len(index) != len(label_names):
            dup = duplicates(label_names)
            raise ValueError(f"label_names has duplicates: {', '.join(dup)}")
        n, c = len(self), len(index)
        y = np.zeros((n, c), dtype=np.float32)
        known = np.full((n, c), unlisted == "negative", dtype=bool)

        def columns(i: int, names: list[str]) -> list[int]:
            out = []
            for name in names:
                col = index.get(name)
                if col is None:
                    if ignore_unknown:
                        continue
                    raise ManifestError(
                        f"{self.where(i)}: label {name!r} is not one of the {c} known labels; "
                        "add it to the labels file or remove it from the manifest"
                    )
                out.append(col)
            return out

        for i in range(n):
            pos = columns(i, self.labels[i])
            y[i, pos] = 1.0
            known[i, pos] = True
            if self.negatives is not None:
                neg = columns(i, self.negatives[i])
                known[i, neg] = True
        return y, known

    def check_images_exist(self) -> None:
        """Raise ImageError naming the first missing image (and how many are missing)."""
        missing = [i for i, p in enumerate(self.images) if not p.is_file()]
        if missing:
            i = missing[0]
            where = self.where(i)
            what = "a folder, not an image" if self.images[i].is_dir() else "image not found"
            # a path given on its own is its own "where"
            head = f"{where}: {what}" if where != str(self.images[i]) else f"{what}"
            raise ImageError(f"{head}: {self.images[i]} ({len(missing)} of {len(self)} images are missing)")


# --------------------------------------------------------------------------- reading


def where_row(path: Path, line: int) -> str:
    """'FILE line N' (or 'row N' for Parquet), as every manifest message names a row."""
    unit = "row" if _FORMATS.get(path.suffix.lower()) == "parquet" else "line"
    return f"{path} {unit} {line}"


def _bad_text(text: str) -> str | None:
    """Why ``text`` cannot be used as a path or a label, or None."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate, e.g. from a JSON \\ud800 escape)"
    return None


def _parse_label_cell(value: Any, where: str, column: str, list_allowed: bool) -> list[str]:
    """One labels/negatives cell -> normalised (see normalize_label), de-duplicated labels (order kept)."""
    if _is_missing(value):
        return []
    if isinstance(value, str):
        text = value.strip()
        items: list[Any] = text.split(SEPARATOR) if text else []
    elif list_allowed and isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
    else:
        expected = "a list of strings or a '|'-separated string" if list_allowed else "a '|'-separated string"
        raise ManifestError(f"{where}: {column} must be {expected}, got {type(value).__name__}: {shown(value)}")
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise ManifestError(
                f"{where}: {column} must contain only strings, got {type(item).__name__}: {shown(item)}"
            )
        name = normalize_label(item)
        if not name:
            raise ManifestError(
                f"{where}: empty label in {column} {shown(value)} (check for a doubled or trailing '|')"
            )
        bad = _bad_text(name)
        if bad:
            raise ManifestError(f"{where}: label {shown(name)} in {column} {bad}; fix the label's text")
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def _inside(folder: str, image: str) -> bool:
    """Whether the normalised absolute path ``image`` lies in the folder ``folder`` (by
    name: symbolic links are not followed, so a link inside the folder stays inside)."""
    return image == folder or image.startswith(folder.rstrip(os.sep) + os.sep)


def _freeze(value: Any) -> Any:
    """A hashable stand-in for a cell, so that rows can be compared."""
    if _is_missing(value):
        return None
    if isinstance(value, (str, int, float, bool, bytes)):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def _check_repeats(
    path: Path,
    frame: pd.DataFrame,
    lines: list[int],
    images: list[Path],
    labels: list[list[str]],
    negatives: list[list[str]] | None,
    splits: list[str] | None,
    allow_duplicates: bool,
) -> None:
    """Refuse rows that repeat an earlier row exactly (after normalising paths and label
    order) unless ``allow_duplicates``; log images listed on several different rows."""
    others = [c for c in frame.columns if c not in ("image", "labels", "negatives", "split")]
    extra_cols = [frame[c].tolist() for c in others]
    first_row: dict[Any, int] = {}
    first_image: dict[Path, int] = {}
    duplicates: list[tuple[int, int]] = []
    repeated_images: list[tuple[int, int]] = []
    for i in range(len(images)):
        try:
            key: tuple[Any, ...] = (
                str(images[i]),
                tuple(sorted(labels[i])),
                tuple(sorted(negatives[i])) if negatives is not None else (),
                splits[i] if splits is not None else "",
                tuple(_freeze(col[i]) for col in extra_cols),
            )
            hash(key)
        except (RecursionError, TypeError):
            key = ("row", i)  # a cell too odd to compare: treat the row as unique
        j = first_row.setdefault(key, i)
        if j != i:
            if not allow_duplicates:
                unit = "row" if _FORMATS.get(path.suffix.lower()) == "parquet" else "line"
                raise ManifestError(
                    f"{where_row(path, lines[i])}: duplicate of {unit} {lines[j]} (same image {_show(images[i].name)}, "
                    f"labels and other columns); remove one of the two rows, or keep both with "
                    f"--allow-duplicate-rows (allow_duplicate_rows: true in a config)"
                )
            duplicates.append((j, i))
            continue
        k = first_image.setdefault(images[i], i)
        if k != i:
            repeated_images.append((k, i))
    if duplicates:
        j, i = duplicates[0]
        log.warning(
            "%s: %d row(s) repeat an earlier row exactly (first: %s repeats %s); kept, as allow_duplicates was given",
            path, len(duplicates), where_row(path, lines[i]), where_row(path, lines[j]),
        )
    if repeated_images:
        k, i = repeated_images[0]
        log.warning(
            "%s: %d row(s) name an image that an earlier row also names, with other labels or columns "
            "(first: %s on %s and %s); all rows are kept",
            path, len(repeated_images), _show(images[i].name), where_row(path, lines[k]), where_row(path, lines[i]),
        )


def read_manifest(
    path: str | os.PathLike[str],
    *,
    require_labels: bool = True,
    allow_outside: bool = False,
    allow_duplicates: bool = False,
    allow_untagged: bool = True,
) -> Manifest:
    """Read a CSV/TSV/JSONL/Parquet manifest (chosen by extension) and validate every row.

    Image files are not opened here (see :meth:`Manifest.check_images_exist`).
    ``allow_outside``: accept image paths outside the manifest's folder (``../x.png``, or
    an absolute path elsewhere); only for manifests you trust. ``allow_duplicates``:
    keep rows that repeat an earlier row exactly (a warning is logged) instead of failing.
    ``require_labels``: the ``labels`` column must be there. ``allow_untagged``: a row with
    an empty label list is an untagged image, a negative for every label (a catalogue's
    untagged photos); without it such a row is an error.
    """
    path = Path(path)
    if path.suffix.lower() not in _FORMATS:
        raise ManifestError(
            f"{path}: unsupported manifest extension {path.suffix or '(none)'!r}; supported: {_supported()}"
        )
    kind = _FORMATS[path.suffix.lower()]
    frame, lines = read_table(path)

    columns = [str(c) for c in frame.columns]
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise ManifestError(f"{path}: duplicate column name(s): {', '.join(map(_show, repeated))}; rename or remove them")
    required = ["image"] + (["labels"] if require_labels else [])
    for name in required:
        if name not in frame.columns:
            found = ", ".join(map(_show, columns)) or "(none)"
            raise ManifestError(f"{path}: missing '{name}' column; columns found: {found}")
    if len(frame) == 0:
        raise ManifestError(f"{path}: empty manifest (no rows)")

    list_allowed = kind in ("jsonl", "parquet")
    folder = os.path.normpath(path.parent.absolute())
    has_labels = "labels" in frame.columns
    has_negatives = "negatives" in frame.columns
    has_split = "split" in frame.columns

    image_col = frame["image"].tolist()
    label_col = frame["labels"].tolist() if has_labels else None
    neg_col = frame["negatives"].tolist() if has_negatives else None
    split_col = frame["split"].tolist() if has_split else None

    images: list[Path] = []
    labels: list[list[str]] = []
    negatives: list[list[str]] | None = [] if has_negatives else None
    splits: list[str] | None = [] if has_split else None
    for i, line in enumerate(lines):
        where = where_row(path, line)
        raw = image_col[i]
        if _is_missing(raw) or (isinstance(raw, str) and not raw.strip()):
            raise ManifestError(f"{where}: empty image path")
        if not isinstance(raw, str):
            raise ManifestError(f"{where}: image must be a path string, got {type(raw).__name__}: {raw!r}")
        bad = _bad_text(raw)
        if bad:
            raise ManifestError(f"{where}: image path {raw!r} {bad}; fix the path")
        image = os.path.normpath(os.path.join(folder, os.path.expanduser(raw.strip())))
        if not allow_outside and not _inside(folder, image):
            raise ManifestError(
                f"{where}: image path {raw.strip()!r} is outside the manifest's folder {folder} "
                f"(it points to {image}); move the image into that folder, or, for a manifest you trust, "
                f"pass --allow-outside-paths (allow_outside_paths: true in a config)"
            )
        images.append(Path(image))

        row = _parse_label_cell(label_col[i], where, "labels", list_allowed) if label_col is not None else []
        if require_labels and not row and not allow_untagged:
            raise ManifestError(f"{where}: empty label list (untagged images are refused here: "
                                "--allow-untagged, or allow_untagged: true in a config, takes them as negatives)")
        labels.append(row)

        if neg_col is not None and negatives is not None:
            neg = _parse_label_cell(neg_col[i], where, "negatives", list_allowed)
            both = [n for n in neg if n in row]
            if both:
                raise ManifestError(f"{where}: label {both[0]!r} is in both labels and negatives")
            negatives.append(neg)

        if split_col is not None and splits is not None:
            s = split_col[i]
            if _is_missing(s):
                s = ""
            if not isinstance(s, str):
                raise ManifestError(f"{where}: split must be a string, got {type(s).__name__}: {s!r}")
            bad = _bad_text(s)
            if bad:
                raise ManifestError(f"{where}: split {s!r} {bad}; fix the split name")
            splits.append(s.strip())

    _check_repeats(path, frame, lines, images, labels, negatives, splits, allow_duplicates)

    manifest = Manifest(
        path=path,
        images=images,
        labels=labels,
        negatives=negatives,
        splits=splits,
        frame=frame,
        lines=lines,
    )
    names = manifest.label_names()
    if len(names) > MAX_LABELS:
        raise ManifestError(f"{path}: {len(names)} distinct labels; at most {MAX_LABELS} are supported")
    warn_case_clashes(names, path)
    log.debug("read %d rows from %s", len(manifest), path)
    return manifest
