"""Labelling-tool exports in, pre-annotations out.

:func:`import_dataset` turns a COCO file, a Pascal VOC folder, Open Images label CSVs, a
Label Studio export or a folder of label folders into a normal manifest (and a labels
file where the format names its classes) and returns an :class:`ImportReport` of what
was kept and dropped. :mod:`mumic.data.importers.preannotate` writes predictions back as
Label Studio tasks or image-level COCO results. Each format's mapping rules are in its
module's docstring.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mumic.data.importers.common import ImageRoot, ImportReport, check_outputs, default_labels_path, write_import
from mumic.errors import ConfigError

__all__ = ["FORMATS", "ImportReport", "import_dataset", "default_labels_path"]

FORMATS = ("coco", "voc", "openimages", "labelstudio", "folders")
"""The formats ``mumic data import`` reads."""

_OPTIONS = {  # the options each format takes besides the shared ones
    "coco": ("split",),
    "voc": ("skip_difficult",),
    "openimages": ("split", "class_descriptions"),
    "labelstudio": ("split", "use_predictions", "from_name", "data_key", "taxonomy_paths"),
    "folders": ("split_folders",),
}
_ONE_SOURCE = ("voc", "folders")


def import_dataset(fmt: str, sources: str | os.PathLike[str] | list[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                   images_root: str | os.PathLike[str] | None = None, allow_outside_root: bool = False, overwrite: bool = False,
                   labels_out: str | os.PathLike[str] | None = None, **options: Any) -> ImportReport:
    """Import ``sources`` of format ``fmt`` into the manifest ``out`` (CSV, TSV or JSONL).

    ``images_root``: the folder image references are resolved against (default: per
    format, the source's own folder, VOC's JPEGImages/); a reference leading out of it is
    refused unless ``allow_outside_root``. An existing ``out`` (or labels file, by
    default ``OUT_STEM.labels.json``) is replaced only with ``overwrite``. Format options:
    coco ``split``; voc ``skip_difficult``; openimages ``split``, ``class_descriptions``;
    labelstudio ``split``, ``use_predictions``, ``from_name``, ``data_key``,
    ``taxonomy_paths``; folders ``split_folders``.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown import format {fmt!r}; choose one of {', '.join(FORMATS)}")
    given = {k: v for k, v in options.items() if v not in (None, False)}
    unknown = sorted(set(given) - set(_OPTIONS[fmt]))
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ConfigError(f"{flags} is not an option of the {fmt} import (its options: "
                          f"{', '.join('--' + k.replace('_', '-') for k in _OPTIONS[fmt]) or 'none'})")
    paths = [Path(s) for s in (sources if isinstance(sources, list) else [sources])]
    if not paths:
        raise ConfigError("no source given")
    if fmt in _ONE_SOURCE and len(paths) != 1:
        raise ConfigError(f"the {fmt} import reads one folder, got {len(paths)} sources")
    for p in paths:
        if not p.exists():
            raise ConfigError(f"{p}: no such file or folder")
        if fmt not in _ONE_SOURCE and not p.is_file():
            raise ConfigError(f"{p} is a folder; the {fmt} import reads {'CSV' if fmt == 'openimages' else 'JSON'} files")
    extra = [Path(given["class_descriptions"])] if "class_descriptions" in given else []
    out_path = Path(out)
    names_its_classes = fmt == "coco" or (fmt == "openimages" and bool(extra))
    labels_path = (Path(labels_out) if labels_out else default_labels_path(out_path)) if names_its_classes else None
    if labels_out and not names_its_classes:
        raise ConfigError(f"--labels-out: the {fmt} import writes no labels file (the format does not list its classes"
                          + ("; give --class-descriptions" if fmt == "openimages" else "") + ")")
    check_outputs(out_path, labels_path, paths + extra, overwrite)
    if fmt == "folders" and images_root is not None:
        raise ConfigError("--images-root is not an option of the folders import (the images are the source folder's)")
    root = ImageRoot(Path(images_root), allow_outside=allow_outside_root) if images_root is not None else None

    if fmt == "coco":
        from mumic.data.importers.coco import import_coco

        imp = import_coco(paths, root, split=given.get("split"), allow_outside=allow_outside_root)
    elif fmt == "voc":
        from mumic.data.importers.voc import import_voc

        imp = import_voc(paths[0], root, skip_difficult=bool(given.get("skip_difficult")), allow_outside=allow_outside_root)
    elif fmt == "openimages":
        from mumic.data.importers.openimages import import_openimages

        imp = import_openimages(paths, root, class_descriptions=extra[0] if extra else None, split=given.get("split"),
                                allow_outside=allow_outside_root)
    elif fmt == "labelstudio":
        from mumic.data.importers.labelstudio import import_labelstudio

        imp = import_labelstudio(paths, root, use_predictions=bool(given.get("use_predictions")), from_name=given.get("from_name"),
                                 data_key=given.get("data_key"), taxonomy_paths=bool(given.get("taxonomy_paths")),
                                 split=given.get("split"), allow_outside=allow_outside_root)
    else:
        from mumic.data.importers.folders import import_folders

        imp = import_folders(paths[0], split_folders=bool(given.get("split_folders")), allow_outside=allow_outside_root)
    return write_import(imp, out_path, labels_out=labels_path, write_labels=labels_path is not None)
