"""What every importer shares: the rows it collects, where images may be, what it reports,
and writing the manifest (and labels file) through the one validated reader.

An importer collects :class:`Row` objects (an absolute image path, positives, explicit
negatives, a split) in an :class:`Import`, which joins rows naming the same image, and
counts in its :class:`ImportReport` what was kept and what was dropped and why. Broken
input (unparseable files, an entry that names an unknown image or class) is refused with
one :class:`~mumic.errors.ManifestError` naming the file and the entry; an image the
format lists but the disk lacks is dropped and reported, not refused.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mumic.data.labels import SEPARATOR, LabelSpec, read_labels_file
from mumic.data.tables import FORMATS
from mumic.errors import ConfigError, ManifestError
from mumic.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

EXAMPLES = 5
"""How many dropped entries a report names (the rest are counted)."""

WRITABLE = (".csv", ".tsv", ".jsonl")
"""Manifest formats an import writes (Parquet manifests are read, not written here)."""

SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
                "test": "test", "testing": "test"}


@dataclass
class Row:
    """One image of the manifest being built."""

    image: Path
    labels: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    split: str = ""
    where: str = ""  # the entry that first named the image, for messages


@dataclass
class ImportReport:
    """What an import kept and dropped: counts, the first few reasons, and where it wrote."""

    format: str
    sources: list[Path] = field(default_factory=list)
    rows: int = 0
    untagged: int = 0
    positives: int = 0
    negatives: int = 0
    labels: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    dropped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest: Path | None = None
    labels_file: Path | None = None

    def drop(self, reason: str, where: str = "") -> None:
        """Count one dropped entry under ``reason``; the first few are named in full."""
        self.dropped[reason] += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(f"{where}: {reason}" if where else reason)
        log.debug("dropped %s: %s", where, reason)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            log.debug("%s", text)

    def lines(self) -> list[str]:
        """The report as a person reads it (the CLI prints these)."""
        split = ", ".join(f"{k or '(none)'} {v}" for k, v in sorted(self.splits.items())) if self.splits else ""
        out = [f"{self.format}: kept {self.rows} images ({self.untagged} untagged), {self.labels} labels, "
               f"{self.positives} positive and {self.negatives} negative tags" + (f"; splits: {split}" if split else "")]
        if self.dropped:
            total = sum(self.dropped.values())
            out.append(f"dropped {total}: " + "; ".join(f"{reason} ({n})" for reason, n in self.dropped.most_common()))
            out += [f"  e.g. {e}" for e in self.examples]
        out += [f"note: {n}" for n in self.notes]
        if self.manifest is not None:
            out.append(f"manifest: {self.manifest}")
        if self.labels_file is not None:
            out.append(f"labels file: {self.labels_file}")
        return out


def label_name(value: Any, where: str) -> str:
    """A label name from a source file, stripped; refused (naming the entry) when it is not
    usable in a manifest."""
    if not isinstance(value, str):
        raise ManifestError(f"{where}: label {value!r} is a {type(value).__name__}, not a string")
    name = value.strip()
    if not name:
        raise ManifestError(f"{where}: empty label name")
    if SEPARATOR in name:
        raise ManifestError(f"{where}: label {name!r} contains '|', which separates labels in manifests; rename the class")
    if "\x00" in name:
        raise ManifestError(f"{where}: label {name!r} contains a NUL character")
    return name


def split_of(path: Path, given: str | None, several: bool) -> str:
    """The split of a source file: ``given`` (``--split``), else read from the file's name
    when several files are imported together (``instances_val2017.json`` is val), else none."""
    if given is not None:
        if several:
            raise ConfigError("--split names the split of one file; with several files each file's name must say its split "
                              "(train, val or test), or import them one at a time")
        return given.strip()
    if not several:
        return ""
    words = [w for w in re.split(r"[^a-z]+", path.stem.lower()) if w]
    found = {SPLIT_WORDS[w] for w in words if w in SPLIT_WORDS}
    if len(found) != 1:
        raise ConfigError(f"{path}: cannot tell its split from its name (expected one of train, val, test in it); "
                          "import it on its own with --split NAME")
    return found.pop()


class ImageRoot:
    """Where a format's image references are looked up. A reference that leads out of the
    root (``..``, an absolute path elsewhere, or a symbolic link to elsewhere) is refused
    unless ``allow_outside``."""

    def __init__(self, root: Path, *, allow_outside: bool = False) -> None:
        if not root.is_dir():
            raise ConfigError(f"--images-root {root} is not a folder")
        self.root = Path(os.path.normpath(root.absolute()))
        self.real = Path(os.path.realpath(self.root))
        self.allow_outside = allow_outside

    def _inside(self, path: Path) -> bool:
        for root, p in ((self.root, Path(os.path.normpath(path))), (self.real, Path(os.path.realpath(path)))):
            if p != root and root not in p.parents:
                return False
        return True

    def check(self, path: Path, where: str, ref: str) -> Path:
        """``path`` normalised; refused when it leaves the root and that was not allowed."""
        path = Path(os.path.normpath(path))
        if not self.allow_outside and not self._inside(path):
            raise ManifestError(f"{where}: image {ref!r} leads out of the images root {self.root} (to {os.path.realpath(path)}); "
                                "fix the entry, or for a source you trust pass --allow-outside-root")
        return path

    def find(self, ref: str, where: str, *, also: Sequence[str] = ()) -> Path | None:
        """The image file that ``ref`` names: ``root/ref`` (or ``ref`` if absolute), then
        ``root/A/ref`` for each folder name A in ``also``; None when none exists."""
        first = self.check(self.root / os.path.expanduser(ref), where, ref)
        if first.is_file():
            return first
        for folder in also:
            candidate = self.check(self.root / folder / ref, where, ref)
            if candidate.is_file():
                return candidate
        return None


class Import:
    """Rows collected by one importer, joined by image, and its report."""

    def __init__(self, fmt: str) -> None:
        self.report = ImportReport(format=fmt)
        self.rows: dict[Path, Row] = {}
        self.specs: dict[str, LabelSpec] = {}  # labels the format names (for the labels file), in order

    def add(self, image: Path, labels: Iterable[str], negatives: Iterable[str] = (), *, split: str = "", where: str = "") -> Row:
        """Add (or join onto an earlier row of the same image) positives and negatives. An
        image met again under another split is refused: it would leak between splits."""
        row = self.rows.get(image)
        if row is None:
            row = self.rows[image] = Row(image=image, split=split, where=where)
        elif row.split != split:
            raise ManifestError(f"{where}: image {image.name} is also in split {row.split or '(none)'!r} ({row.where}); "
                                "an image may be in one split only")
        for name in labels:
            if name not in row.labels:
                row.labels.append(name)
        for name in negatives:
            if name not in row.negatives:
                row.negatives.append(name)
        return row

    def finish(self) -> list[Row]:
        """The rows, with a label both positive and negative on one image kept as positive."""
        rows = list(self.rows.values())
        for row in rows:
            both = [n for n in row.negatives if n in row.labels]
            for name in both:
                row.negatives.remove(name)
                self.report.drop("a label both positive and negative on one image (kept as positive)", f"{row.where} {name}")
        return rows


def _relative(image: Path, folder: Path) -> tuple[str, bool]:
    """The manifest's spelling of ``image``: relative to the manifest's folder when inside it."""
    folder = Path(os.path.normpath(folder.absolute()))
    if folder in image.parents:
        return image.relative_to(folder).as_posix(), True
    return str(image), False


def check_outputs(out: Path, labels_out: Path | None, sources: Sequence[Path], overwrite: bool) -> None:
    """Refuse an output that is an input, is a folder, or exists (without ``overwrite``)."""
    if out.suffix.lower() not in WRITABLE:
        raise ConfigError(f"--out {out}: a manifest is written as {', '.join(WRITABLE)}; choose one of those extensions")
    real_sources = {os.path.realpath(s) for s in sources}
    for path in (out, labels_out):
        if path is None:
            continue
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; give a file name")
        if os.path.realpath(path) in real_sources:
            raise ConfigError(f"{path} is an input of the import; choose another output file (inputs are never replaced)")
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} already exists; pass --overwrite to replace it, or choose another --out")


def write_import(imp: Import, out: Path, *, labels_out: Path | None = None, write_labels: bool = False) -> ImportReport:
    """Write the rows as a manifest at ``out`` (and the labels file), each read back through
    :func:`~mumic.data.manifest.read_manifest` / :func:`read_labels_file` before it replaces
    anything; fill in the report's counts."""
    from mumic.data.manifest import read_manifest

    rows = imp.finish()
    report = imp.report
    if not rows:
        reasons = "; ".join(f"{r} ({n})" for r, n in report.dropped.most_common()) or "the source lists no images"
        raise ManifestError(f"{', '.join(map(str, report.sources))}: nothing to import ({reasons})"
                            + (f"; e.g. {report.examples[0]}" if report.examples else ""))
    kind = FORMATS[out.suffix.lower()]
    has_neg = any(r.negatives for r in rows)
    has_split = any(r.split for r in rows)
    outside = False
    records: list[dict[str, Any]] = []
    for r in rows:
        ref, inside = _relative(r.image, out.parent)
        outside |= not inside
        rec: dict[str, Any] = {"image": ref}
        rec["labels"] = list(r.labels) if kind == "jsonl" else SEPARATOR.join(r.labels)
        if has_neg:
            rec["negatives"] = list(r.negatives) if kind == "jsonl" else SEPARATOR.join(r.negatives)
        if has_split:
            rec["split"] = r.split
        records.append(rec)
    text = _render(records, kind)
    with atomic_path(out) as tmp:
        check = tmp.with_name(tmp.name + out.suffix)  # read back under the manifest's own extension
        try:
            check.write_text(text, encoding="utf-8")
            read_manifest(check, allow_outside=outside)
            os.replace(check, tmp)
        finally:
            check.unlink(missing_ok=True)
    if outside:
        report.note(f"some images lie outside {out.parent}, so the manifest names them by absolute path; "
                    "train with --allow-outside-paths (allow_outside_paths: true), or write the manifest above the images")
    report.manifest = out
    if write_labels and imp.specs:
        specs = list(imp.specs.values())
        path = labels_out or default_labels_path(out)
        entries: list[Any] = [{"name": s.name, **({"description": s.description} if s.description else {})} for s in specs]
        with atomic_path(path) as tmp:
            check = tmp.with_name(tmp.name + ".json")
            try:
                atomic_write_json(check, {"labels": entries})
                read_labels_file(check)
                os.replace(check, tmp)
            finally:
                check.unlink(missing_ok=True)
        report.labels_file = path
    report.rows = len(rows)
    report.untagged = sum(not r.labels for r in rows)
    report.positives = sum(len(r.labels) for r in rows)
    report.negatives = sum(len(r.negatives) for r in rows)
    report.labels = len({n for r in rows for n in (*r.labels, *r.negatives)})
    report.splits = dict(Counter(r.split for r in rows)) if has_split else {}
    log.info("imported %d images from %s into %s", len(rows), ", ".join(map(str, report.sources)), out)
    return report


def default_labels_path(out: Path) -> Path:
    """``train.csv`` -> ``train.labels.json`` beside it."""
    return out.with_name(out.stem + ".labels.json")


def _render(records: list[dict[str, Any]], kind: str) -> str:
    import csv
    import io
    import json

    if kind == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(records[0]), delimiter="\t" if kind == "tsv" else ",", lineterminator="\n")
    w.writeheader()
    w.writerows(records)
    return buf.getvalue()
