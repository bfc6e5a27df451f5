"""Open Images: image-level label CSVs (``ImageID,Source,LabelName,Confidence``) -> manifest.

Mapping: ``Confidence`` 1 is a positive, 0 a verified negative (the manifest's
``negatives`` column); a fractional confidence (the machine-generated files) is dropped
and counted. ``LabelName`` is a class id (``/m/0jbk``), mapped to its display name by the
class descriptions CSV (``LabelName,DisplayName``, with or without that header); two ids
sharing a display name become ``Name (/m/id)``; without the descriptions the ids are
the labels. Image ``ID`` is the file ``ID.jpg`` under the images root, else under
``ROOT/<the split word of the CSV's name>/`` (``validation-...csv`` -> ``ROOT/validation/``).
Most users hold a subset of the images: rows of absent images are dropped and counted.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from mumic.data.importers.common import SPLIT_WORDS, ImageRoot, Import, label_name, split_of
from mumic.data.labels import LabelSpec
from mumic.errors import ManifestError

REQUIRED = ("ImageID", "LabelName", "Confidence")


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line, row) of a CSV, read as UTF-8 in a stream; a decoding or quoting problem names the line."""
    try:
        fh = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e.strerror or e}") from None
    with fh:
        reader = csv.reader(fh, strict=True)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                raise ManifestError(f"{path} line {reader.line_num + 1}: cannot parse: {e}") from None
            if row and any(c.strip() for c in row):
                yield reader.line_num, row


def read_class_descriptions(path: Path) -> tuple[dict[str, str], list[str]]:
    """Class id -> display name (made unique), and the names that had to be made unique."""
    names: dict[str, str] = {}
    for line, row in _rows(path):
        if line == 1 and [c.strip().lower() for c in row] == ["labelname", "displayname"]:
            continue
        if len(row) != 2:
            raise ManifestError(f"{path} line {line}: expected 2 fields (class id, display name), found {len(row)}; "
                                "quote names that contain a comma")
        mid = row[0].strip()
        if mid in names:
            raise ManifestError(f"{path} line {line}: class id {mid!r} is given twice")
        names[mid] = label_name(row[1], f"{path} line {line}")
    counts = Counter(names.values())
    shared = sorted(n for n, c in counts.items() if c > 1)
    for mid, name in names.items():
        if counts[name] > 1:
            names[mid] = f"{name} ({mid})"
    return names, shared


def _confidence(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ManifestError(f"{where}: Confidence {text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ManifestError(f"{where}: Confidence {text!r} is outside [0, 1]")
    return value


def import_openimages(sources: list[Path], root: ImageRoot | None, *, class_descriptions: Path | None = None,
                      split: str | None = None, allow_outside: bool = False) -> Import:
    """Read one or more Open Images image-level label CSVs (one per split) into an Import."""
    imp = Import("openimages")
    imp.report.sources = list(sources)
    names: dict[str, str] | None = None
    if class_descriptions is not None:
        names, shared = read_class_descriptions(class_descriptions)
        if shared:
            imp.report.note(f"{len(shared)} display names are shared by several class ids (e.g. {shared[0]!r}); "
                            "those labels are named 'Name (/m/id)'")
    else:
        imp.report.note("no --class-descriptions: the labels are the class ids (/m/...)")
    for path in sources:
        file_split = split_of(path, split, len(sources) > 1)
        folders = [w for w in re.split(r"[^a-z]+", path.stem.lower()) if w in SPLIT_WORDS]
        base = root or ImageRoot(path.parent, allow_outside=allow_outside)
        header: list[str] | None = None
        col: dict[str, int] = {}
        images: dict[str, tuple[str, list[str], list[str]]] = {}
        for line, row in _rows(path):
            where = f"{path} line {line}"
            if header is None:
                header = [c.strip() for c in row]
                missing = [c for c in REQUIRED if c not in header]
                if missing:
                    raise ManifestError(f"{where}: missing column(s) {', '.join(missing)}; an image-level label CSV has "
                                        "ImageID,Source,LabelName,Confidence (a box CSV is not image-level)")
                col = {c: header.index(c) for c in REQUIRED}
                continue
            if len(row) != len(header):
                raise ManifestError(f"{where}: expected {len(header)} fields, found {len(row)}")
            image_id, mid = row[col["ImageID"]].strip(), row[col["LabelName"]].strip()
            if not image_id:
                raise ManifestError(f"{where}: empty ImageID")
            conf = _confidence(row[col["Confidence"]].strip(), where)
            if conf not in (0.0, 1.0):
                imp.report.drop("confidence neither 0 nor 1 (a machine-generated label)", f"{where} {mid}")
                continue
            if names is not None:
                if mid not in names:
                    imp.report.drop("class id not in the class descriptions", f"{where} {mid}")
                    continue
                name = names[mid]
            else:
                name = label_name(mid, where)
            entry = images.setdefault(image_id, (where, [], []))
            target = entry[1] if conf == 1.0 else entry[2]
            if name not in target:
                target.append(name)
        if header is None:
            raise ManifestError(f"{path}: empty file (no header)")
        for image_id, (where, pos, neg) in images.items():
            found = base.find(f"{image_id}.jpg", where, also=folders)
            if found is None:
                imp.report.drop("image not found", f"{where} {image_id}.jpg")
                continue
            imp.add(found, pos, neg, split=file_split, where=where)
            if names is not None:
                for n in (*pos, *neg):
                    imp.specs.setdefault(n, LabelSpec(name=n))
    return imp
