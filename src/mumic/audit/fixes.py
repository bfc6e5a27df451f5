"""Corrected manifests: the audited manifest with suspect tags fixed or suspect rows dropped.

The original manifest is never touched: the corrected one is a new CSV file (written
atomically) whose images are named through a link, beside it, to the original's folder,
so its paths stay relative and inside its own folder.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mumic.data.manifest import SEPARATOR, Manifest
from mumic.errors import ManifestError
from mumic.io import atomic_write_text, link_folder
from mumic.readers import read_text

ACTIONS = {"add": "add", "remove": "remove", "missing": "add", "wrong": "remove"}


def read_fixes(path: str | os.PathLike[str]) -> list[tuple[str, str, str]]:
    """(image, label, add|remove) of a fixes file: a CSV with image, label and either an
    action column (add / remove) or a kind column (missing: add, wrong: remove), such as
    a copy of suspects.csv keeping the rows to apply. Swapped and outlier rows are skipped."""
    p = Path(path)
    rows = list(csv.DictReader(io.StringIO(read_text(p, error=ManifestError))))
    if not rows:
        raise ManifestError(f"{p}: no fixes (an empty file)")
    cols = set(rows[0])
    col = "action" if "action" in cols else "kind" if "kind" in cols else None
    if not {"image", "label"} <= cols or col is None:
        raise ManifestError(f"{p}: a fixes file needs the columns image, label and action (add/remove) or kind "
                            f"(missing/wrong); found {', '.join(sorted(cols))}")
    out = []
    for n, r in enumerate(rows, 2):
        what = (r.get(col) or "").strip().lower()
        if col == "kind" and what in ("swapped", "outlier"):
            continue
        if what not in ACTIONS:
            raise ManifestError(f"{p} line {n}: {col} is {r.get(col)!r}; use add or remove (or missing / wrong)")
        out.append((r["image"].strip(), r["label"].strip(), ACTIONS[what]))
    return out


def top_suggestions(table: list[dict[str, Any]], k: int) -> list[tuple[str, str, str]]:
    """The top k missing tags (to add) and the top k wrong tags (to remove) of a suspects table."""
    out = []
    for kind in ("missing", "wrong"):
        rows = sorted((r for r in table if r["kind"] == kind), key=lambda r: r["rank"])[:k]
        out += [(r["image"], r["label"], ACTIONS[kind]) for r in rows]
    return out


def top_rows(table: list[dict[str, Any]], k: int) -> list[str]:
    """The images of the top k suspects of each kind (missing, wrong, swapped), each once."""
    seen: dict[str, None] = {}
    for kind in ("missing", "wrong", "swapped"):
        for r in sorted((r for r in table if r["kind"] == kind), key=lambda r: r["rank"])[:k]:
            seen.setdefault(r["image"])
    return list(seen)


def _row_index(m: Manifest) -> dict[str, list[int]]:
    index: dict[str, list[int]] = {}
    for i, img in enumerate(m.images):
        for key in {str(img), str(Path(img).resolve())}:
            index.setdefault(key, []).append(i)
    raw = m.frame["image"].tolist() if "image" in m.frame else []
    for i, v in enumerate(raw):
        index.setdefault(str(v), []).append(i)
    return index


def _rows_of(index: dict[str, list[int]], image: str, where: str) -> list[int]:
    rows = index.get(image) or index.get(str(Path(image).resolve()))
    if not rows:
        raise ManifestError(f"{where}: image {image!r} is not in the manifest")
    return sorted(set(rows))


def corrected_manifest(m: Manifest, out: str | os.PathLike[str], *, fixes: Iterable[tuple[str, str, str]] = (),
                       drop: Iterable[str] = (), where: str = "fixes") -> dict[str, int]:
    """Write `m` with `fixes` applied ((image, label, add|remove): an added label leaves
    the row's negatives) and the rows of the images in `drop` left out, as the CSV file
    `out` (never the manifest's own file). Returns counts of what changed."""
    out = Path(out)
    if out.resolve() == Path(m.path).resolve():
        raise ManifestError(f"{out} is the audited manifest itself; write the corrected manifest to another file")
    index = _row_index(m)
    labels = [list(l) for l in m.labels]
    negatives = [list(n) for n in m.negatives] if m.negatives is not None else None
    added = removed = 0
    for image, label, action in fixes:
        for i in _rows_of(index, image, where):
            if action == "add" and label not in labels[i]:
                labels[i].append(label)
                added += 1
                if negatives is not None and label in negatives[i]:
                    negatives[i].remove(label)
            elif action == "remove" and label in labels[i]:
                labels[i].remove(label)
                removed += 1
    dropped = {i for image in drop for i in _rows_of(index, image, where)}
    keep = [i for i in range(len(m)) if i not in dropped]
    folder = Path(m.path).parent.absolute()
    link = link_folder(out.parent, folder)
    df = m.frame.copy()
    names = []
    for img in m.images:
        rel = os.path.relpath(Path(img).absolute(), folder)
        names.append(str(img) if rel.startswith("..") else f"{link}/{Path(rel).as_posix()}")
    df["image"] = names
    df["labels"] = [SEPARATOR.join(l) for l in labels]
    if negatives is not None:
        df["negatives"] = [SEPARATOR.join(n) for n in negatives]
    if m.splits is not None:
        df["split"] = m.splits
    df = df.iloc[keep].reset_index(drop=True)
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n")
    atomic_write_text(out, buf.getvalue())
    return {"rows": len(keep), "added": added, "removed": removed, "dropped_rows": len(dropped)}
