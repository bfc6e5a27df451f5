"""Predictions back to the labelling tool: Label Studio tasks and image-level COCO results.

Both are written from the records ``mumic predict`` writes (JSON lines with ``image``,
``predicted`` and ``scores``), so that a team reviews the model's tags instead of tagging
from scratch, then imports the corrected export with ``mumic data import``.

Label Studio (``labelstudio``): a JSON list of tasks, one per image, in input order::

    {"data": {"image": "/data/local-files/?d=cats/1.jpg",
              "mumic_scores": {"cat": 0.91, "indoor": 0.62}},
     "predictions": [{"model_version": "<run fingerprint>", "score": 0.62,
                      "result": [{"id": "mumic-1", "from_name": "choice", "to_name": "image",
                                  "type": "choices", "value": {"choices": ["cat", "indoor"]}}]}]}

``choices`` are the calibrated decisions, highest score first; ``data.mumic_scores`` the
score of each decision (Label Studio shows data fields as columns); the prediction's
``score`` is the lowest score among the decisions (the least sure one), or, with no
decision, one minus the highest score, so that sorting by prediction score puts the
tasks most worth a look first. The image is ``URL_PREFIX + its path relative to the
images root``, URL-quoted (the default prefix suits Label Studio serving the images root
as local files).

COCO (``coco``): one JSON object in the layout of a COCO instances file, without boxes::

    {"info": {"description": "mumic predictions", "model_version": "<run fingerprint>"},
     "images": [{"id": 1, "file_name": "cats/1.jpg"}, ...],
     "categories": [{"id": 1, "name": "cat"}, ...],
     "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "score": 0.91}, ...]}

Image ids count the inputs from 1 in order, category ids the scored labels in the run's
order; one annotation per decision, with its score; an image with no decision has no
annotation (it imports back as an untagged row).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mumic.errors import ConfigError
from mumic.io import atomic_path

FORMATS = ("labelstudio", "coco")
LOCAL_FILES = "/data/local-files/?d="


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The prediction records of a ``mumic predict`` JSON lines file, one at a time."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def images_root_of(images: Iterable[str]) -> Path:
    """The deepest folder holding every image (the default images root)."""
    folders = [os.path.dirname(os.path.abspath(p)) for p in images]
    if not folders:
        return Path.cwd()
    return Path(os.path.commonpath(folders))


def _relative(image: str, root: Path) -> str:
    path = os.path.normpath(os.path.abspath(image))
    rel = os.path.relpath(path, root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        raise ConfigError(f"image {image} is outside --images-root {root}; give an images root that holds every input")
    return Path(rel).as_posix()


def _decisions(rec: dict[str, Any]) -> list[tuple[str, float]]:
    scores = rec.get("scores") or {}
    return sorted(((n, float(scores[n])) for n in rec.get("predicted", [])), key=lambda x: -x[1])


def labelstudio_task(rec: dict[str, Any], *, model_version: str, root: Path, url_prefix: str = LOCAL_FILES,
                     from_name: str = "choice", to_name: str = "image", data_key: str = "image") -> dict[str, Any]:
    """One Label Studio task with the model's decisions as its prediction."""
    decided = _decisions(rec)
    scores = list((rec.get("scores") or {}).values())
    # the least sure decision; with none, how sure it is that nothing applies
    score = min(p for _, p in decided) if decided else (1.0 - max(scores) if scores else 0.0)
    return {
        "data": {data_key: url_prefix + quote(_relative(rec["image"], root), safe="/"),
                 "mumic_scores": {n: p for n, p in decided}},
        "predictions": [{
            "model_version": model_version,
            "score": round(score, 6),
            "result": [{"id": "mumic-1", "from_name": from_name, "to_name": to_name, "type": "choices",
                        "value": {"choices": [n for n, _ in decided]}}],
        }],
    }


def coco_document(records: Iterable[dict[str, Any]], *, label_names: Sequence[str], model_version: str, root: Path) -> dict[str, Any]:
    """Image-level COCO results: images, categories and one scored annotation per decision."""
    cat = {name: c for c, name in enumerate(label_names, start=1)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i, rec in enumerate(records, start=1):
        images.append({"id": i, "file_name": _relative(rec["image"], root)})
        for name, p in _decisions(rec):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": cat[name], "score": round(p, 6)})
    return {
        "info": {"description": "mumic predictions", "model_version": model_version},
        "images": images,
        "categories": [{"id": c, "name": name} for name, c in cat.items()],
        "annotations": annotations,
    }


def write_preannotations(records_path: Path, out: Path, fmt: str, *, label_names: Sequence[str], model_version: str,
                         images_root: Path | None = None, url_prefix: str = LOCAL_FILES, from_name: str = "choice",
                         to_name: str = "image") -> int:
    """Write the prediction records at ``records_path`` to ``out`` as ``fmt`` (atomically);
    returns the number of images written."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown pre-annotation format {fmt!r}; choose one of {', '.join(FORMATS)}")
    root = Path(os.path.normpath(os.path.abspath(images_root))) if images_root is not None else \
        images_root_of(r["image"] for r in read_records(records_path))
    n = 0
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        if fmt == "coco":
            doc = coco_document(read_records(records_path), label_names=label_names, model_version=model_version, root=root)
            json.dump(doc, fh, indent=1)
            n = len(doc["images"])
        else:
            fh.write("[")
            for rec in read_records(records_path):
                task = labelstudio_task(rec, model_version=model_version, root=root, url_prefix=url_prefix,
                                        from_name=from_name, to_name=to_name)
                fh.write(("," if n else "") + "\n" + json.dumps(task, ensure_ascii=False))
                n += 1
            fh.write("\n]\n")
        fh.flush()
        os.fsync(fh.fileno())
    return n
