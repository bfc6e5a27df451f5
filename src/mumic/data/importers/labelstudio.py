"""Label Studio: the JSON export of an image classification project -> manifest.

Mapping: a task's labels are the ``choices`` (and the leaves of the ``taxonomy`` paths,
or the whole ``A/B`` path with ``taxonomy_paths``) of its annotation; of several, the one
marked ``ground_truth``, else the last updated; cancelled ones are skipped. An annotation
submitted with nothing chosen is an untagged row; a task nobody annotated is dropped
(with ``use_predictions`` its latest prediction stands in, which is how pre-annotations
come back unreviewed). ``from_name`` keeps only one control's results. Older exports'
``completions`` are read as annotations.

Image references: ``/data/upload/P/NAME`` is ``ROOT/P/NAME`` (ROOT being Label Studio's
``media/upload`` folder), else ``ROOT/upload/P/NAME`` (ROOT being ``media``), else ``ROOT/NAME``, else
``ROOT/NAME`` without the 8-hex-digit prefix Label Studio adds to uploads
(``1a2b3c4d-cat.jpg`` -> ``cat.jpg``); ``/data/local-files/?d=PATH`` is ``ROOT/PATH``
(ROOT being the folder served as local files); the same with a host in front; a plain
path is taken under ROOT. Other URLs (http, s3, gs) are not fetched: their tasks are dropped.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from mumic.data.importers.common import ImageRoot, Import, label_name, split_of
from mumic.errors import ManifestError
from mumic.readers import read_json

UPLOAD = "/data/upload/"
LOCAL = "/data/local-files/"
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
KINDS = ("choices", "taxonomy")


def _image_ref(task: dict[str, Any], where: str, data_key: str | None) -> str:
    data = task.get("data")
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: no 'data' object (is this a JSON-MIN or CSV export? export the project as JSON)")
    if data_key is None:
        if "image" in data:
            data_key = "image"
        else:
            texts = [k for k, v in data.items() if isinstance(v, str)]
            if len(texts) != 1:
                raise ManifestError(f"{where}: data has no 'image' key (keys: {', '.join(map(str, data)) or 'none'}); "
                                    "pass --data-key with the key that holds the image")
            data_key = texts[0]
    ref = data.get(data_key)
    if not isinstance(ref, str) or not ref.strip():
        raise ManifestError(f"{where}: data[{data_key!r}] is {ref!r}, not an image path or URL")
    return ref.strip()


def candidates(ref: str) -> list[str] | None:
    """Paths under the images root that a Label Studio image reference may mean, in order;
    None for a URL that is not Label Studio's own (it would have to be fetched)."""
    parts = urlsplit(ref)
    if parts.scheme in ("http", "https", "") and parts.path.startswith(UPLOAD):
        rest = unquote(parts.path[len(UPLOAD):])
        name = PurePosixPath(rest).name
        out = [rest, "upload/" + rest, name]
        if _UPLOAD_PREFIX.match(name):
            out.append(_UPLOAD_PREFIX.sub("", name))
        return list(dict.fromkeys(out))
    if parts.scheme in ("http", "https", "") and parts.path.startswith(LOCAL):
        d = parse_qs(parts.query).get("d")
        return [d[0]] if d else []
    if parts.scheme in ("", "file") and not parts.netloc:
        return [unquote(parts.path) if parts.scheme else ref]
    if len(parts.scheme) == 1:  # a Windows drive letter, C:\...
        return [ref]
    return None


def _chosen(task: dict[str, Any], where: str, use_predictions: bool) -> tuple[dict[str, Any] | None, str]:
    annotations = task.get("annotations", task.get("completions")) or []
    if not isinstance(annotations, list):
        raise ManifestError(f"{where}: 'annotations' is a {type(annotations).__name__}, expected a list")
    usable = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    if usable:
        truth = [a for a in usable if a.get("ground_truth")]
        pool = truth or usable
        key = [(str(a.get("updated_at") or a.get("created_at") or ""), i) for i, a in enumerate(pool)]
        return pool[max(range(len(pool)), key=lambda i: key[i])], "annotation"
    predictions = task.get("predictions") or []
    if use_predictions and isinstance(predictions, list) and predictions:
        pool = [p for p in predictions if isinstance(p, dict)]
        if pool:
            key = [(str(p.get("created_at") or ""), i) for i, p in enumerate(pool)]
            return pool[max(range(len(pool)), key=lambda i: key[i])], "prediction"
    return None, ""


def _labels(result: Any, where: str, from_name: str | None, taxonomy_paths: bool, ignored: Counter[str],
            leaves: dict[str, tuple[str, ...]]) -> list[str]:
    if not isinstance(result, list):
        raise ManifestError(f"{where}: 'result' is a {type(result).__name__}, expected a list")
    out: list[str] = []
    for j, item in enumerate(result):
        here = f"{where} result[{j}]"
        if not isinstance(item, dict):
            raise ManifestError(f"{here}: expected an object, got {type(item).__name__}")
        kind = item.get("type")
        if kind not in KINDS:
            ignored[str(kind)] += 1
            continue
        if from_name is not None and item.get("from_name") != from_name:
            ignored[f"{kind} of {item.get('from_name')!r}"] += 1
            continue
        value = item.get("value")
        if not isinstance(value, dict) or not isinstance(value.get(kind), list):
            raise ManifestError(f"{here}: a {kind} result needs value.{kind} as a list, got {str(value)[:80]}")
        for entry in value[kind]:
            if kind == "choices":
                out.append(label_name(entry, here))
                continue
            if not isinstance(entry, list) or not entry:
                raise ManifestError(f"{here}: a taxonomy entry must be a non-empty list (a path), got {entry!r}")
            path = tuple(label_name(e, here) for e in entry)
            if taxonomy_paths:
                out.append("/".join(path))
                continue
            first = leaves.setdefault(path[-1], path)
            if first != path:
                raise ManifestError(f"{here}: taxonomy leaf {path[-1]!r} is both {'/'.join(first)} and {'/'.join(path)}; "
                                    "pass --taxonomy-paths to name labels by their whole path")
            out.append(path[-1])
    return list(dict.fromkeys(out))


def import_labelstudio(sources: list[Path], root: ImageRoot | None, *, use_predictions: bool = False, from_name: str | None = None,
                       data_key: str | None = None, taxonomy_paths: bool = False, split: str | None = None,
                       allow_outside: bool = False) -> Import:
    """Read one or more Label Studio JSON exports into an Import."""
    imp = Import("labelstudio")
    imp.report.sources = list(sources)
    ignored: Counter[str] = Counter()
    leaves: dict[str, tuple[str, ...]] = {}
    used: Counter[str] = Counter()
    repeated = 0
    for path in sources:
        tasks = read_json(path, error=ManifestError, hint=None)
        if not isinstance(tasks, list):
            raise ManifestError(f"{path}: expected the JSON list of tasks of a Label Studio export, got a {type(tasks).__name__}")
        file_split = split_of(path, split, len(sources) > 1)
        base = root or ImageRoot(path.parent, allow_outside=allow_outside)
        for k, task in enumerate(tasks):
            if not isinstance(task, dict):
                raise ManifestError(f"{path} task #{k + 1}: expected an object, got {type(task).__name__}")
            where = f"{path} task {task['id']}" if "id" in task else f"{path} task #{k + 1}"
            ref = _image_ref(task, where, data_key)
            chosen, what = _chosen(task, where, use_predictions)
            if chosen is None:
                imp.report.drop("no annotation (not labelled yet)" + ("" if use_predictions else "; --use-predictions takes "
                                                                      "the model's pre-annotation instead"), where)
                continue
            labels = _labels(chosen.get("result", []), f"{where} {what}", from_name, taxonomy_paths, ignored, leaves)
            refs = candidates(ref)
            if refs is None:
                imp.report.drop("a remote URL (images are not fetched)", f"{where} {ref}")
                continue
            found = None
            for r in refs:
                found = base.find(r, where)
                if found is not None:
                    break
            if found is None:
                imp.report.drop("image not found", f"{where} {ref}")
                continue
            repeated += found in imp.rows
            imp.add(found, labels, split=file_split, where=where)
            used[what] += 1
    if used["prediction"]:
        imp.report.note(f"{used['prediction']} tasks had no annotation and took their prediction (--use-predictions)")
    if repeated:
        imp.report.note(f"{repeated} tasks name an image an earlier task names; their labels are joined")
    for kind, n in ignored.most_common():
        imp.report.note(f"{n} result(s) of type {kind} ignored (only choices and taxonomy are image labels)")
    return imp
