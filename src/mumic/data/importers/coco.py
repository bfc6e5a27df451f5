"""COCO: an instances file (or an image-level one: annotations without boxes) -> manifest.

Mapping: each category is a label (its ``name``; its ``supercategory`` becomes the label's
description in the labels file); an image's labels are the categories of its annotations
(boxes are ignored: several boxes of one class are one tag); an image with no annotation
is an untagged row (a negative for every label). LVIS-style ``neg_category_ids`` on an
image are its verified negatives. ``file_name`` is looked up under the images root, then
under ``ROOT/<the file's split folder>`` (``instances_val2017.json`` -> ``ROOT/val2017/``),
as COCO's own layout keeps one image folder per split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mumic.data.importers.common import ImageRoot, Import, label_name, split_of
from mumic.data.labels import LabelSpec
from mumic.errors import ManifestError
from mumic.readers import read_json


def _int_id(value: Any, where: str, what: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ManifestError(f"{where}: {what} must be an integer (or a string), got {value!r}")
    return value


def _list(doc: dict[str, Any], key: str, path: Path, required: bool = True) -> list[Any]:
    value = doc.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise ManifestError(f"{path}: '{key}' is {found}, expected a list (is this a COCO instances file?)")
    return value


def _categories(path: Path, doc: dict[str, Any], known: dict[Any, LabelSpec]) -> dict[Any, LabelSpec]:
    out: dict[Any, LabelSpec] = {}
    names: dict[str, Any] = {}
    for k, cat in enumerate(_list(doc, "categories", path)):
        where = f"{path} categories[{k}]"
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise ManifestError(f"{where}: a category needs 'id' and 'name', got {str(cat)[:80]}")
        cid = _int_id(cat["id"], where, "id")
        name = label_name(cat["name"], where)
        if cid in out:
            raise ManifestError(f"{where}: category id {cid!r} is given twice")
        if name in names:
            raise ManifestError(f"{where}: category name {name!r} is also category id {names[name]!r}; names must be unique")
        sup = cat.get("supercategory")
        description = sup.strip() if isinstance(sup, str) and sup.strip() and sup.strip() != name else None
        spec = LabelSpec(name=name, description=description)
        if cid in known and known[cid].name != name:
            raise ManifestError(f"{where}: category id {cid!r} is {name!r} here but {known[cid].name!r} in an earlier file; "
                                "files imported together must share their categories")
        out[cid] = spec
        names[name] = cid
    return out


def import_coco(sources: list[Path], root: ImageRoot | None, *, split: str | None = None, allow_outside: bool = False) -> Import:
    """Read one or more COCO JSON files (one per split) into an Import."""
    imp = Import("coco")
    imp.report.sources = list(sources)
    categories: dict[Any, LabelSpec] = {}
    for path in sources:
        doc = read_json(path, error=ManifestError, hint=None)
        if not isinstance(doc, dict):
            raise ManifestError(f"{path}: expected a COCO JSON object with images, annotations and categories, "
                                f"got a {type(doc).__name__} (a results list needs its ground-truth file)")
        here = _categories(path, doc, categories)
        categories.update(here)
        for spec in here.values():
            imp.specs.setdefault(spec.name, spec)
        file_split = split_of(path, split, len(sources) > 1)
        folder = path.stem.rsplit("_", 1)[-1] if "_" in path.stem else ""
        base = root or ImageRoot(path.parent, allow_outside=allow_outside)

        images: dict[Any, tuple[str, list[str], list[str]]] = {}
        for k, img in enumerate(_list(doc, "images", path)):
            where = f"{path} images[{k}]"
            if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str) or not img["file_name"]:
                raise ManifestError(f"{where}: an image needs 'id' and 'file_name', got {str(img)[:80]}")
            iid = _int_id(img["id"], where, "id")
            if iid in images:
                raise ManifestError(f"{where}: image id {iid!r} is given twice")
            negs = []
            for cid in img.get("neg_category_ids") or []:
                if cid not in here:
                    raise ManifestError(f"{where}: neg_category_ids names category {cid!r}, which is not in 'categories'")
                negs.append(here[cid].name)
            images[iid] = (img["file_name"], [], negs)
        for k, ann in enumerate(_list(doc, "annotations", path, required=False)):
            where = f"{path} annotations[{k}]"
            if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
                raise ManifestError(f"{where}: an annotation needs 'image_id' and 'category_id', got {str(ann)[:80]}")
            if ann["image_id"] not in images:
                raise ManifestError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
            if ann["category_id"] not in here:
                raise ManifestError(f"{where}: category_id {ann['category_id']!r} is not in 'categories'")
            labels = images[ann["image_id"]][1]
            name = here[ann["category_id"]].name
            if name not in labels:
                labels.append(name)
        for k, (iid, (file_name, labels, negs)) in enumerate(images.items()):
            where = f"{path} images[{k}] (id {iid!r})"
            found = base.find(file_name, where, also=[folder] if folder else [])
            if found is None:
                imp.report.drop("image not found", f"{where} {file_name}")
                continue
            imp.add(found, labels, negs, split=file_split, where=where)
    return imp
