"""Pascal VOC: ``Annotations/*.xml`` plus ``ImageSets/Main/{train,val,test}.txt`` -> manifest.

Mapping: an image's labels are the ``<name>`` of its ``<object>`` elements (the names of
an object's ``<part>`` elements are not labels); an object marked ``<difficult>1`` counts
as a positive unless ``skip_difficult`` (then a label seen only on difficult objects is
left unlisted); an annotation without objects is an untagged row. The split files give
the splits (``trainval.txt`` alone is read as train); without ``ImageSets/Main`` every
annotation file is imported without a split. Images are ``<filename>`` under
``JPEGImages/`` (or the images root given), else ``ID.jpg``.

XML is parsed with defusedxml with document types refused, so an annotation file can
neither expand entities nor reach another file.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree as SafeET

from mumic.data.importers.common import ImageRoot, Import, label_name
from mumic.errors import ConfigError, ManifestError
from mumic.readers import read_text

SPLITS = ("train", "val", "test")


def read_xml(path: Path) -> Element:
    """The root element of an XML file; an unreadable, malformed or entity-declaring file
    is a ManifestError naming it."""
    try:
        root = SafeET.parse(str(path), forbid_dtd=True).getroot()
    except ParseError as e:
        line = getattr(e, "position", (None,))[0]
        raise ManifestError(f"{path}{f' line {line}' if line else ''}: not valid XML ({e})") from None
    except defusedxml.DefusedXmlException as e:
        raise ManifestError(f"{path}: refused: the file declares a document type or entities ({type(e).__name__}); "
                            "VOC annotations need neither, so remove the <!DOCTYPE> part") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e.strerror or e}") from None
    if root is None:
        raise ManifestError(f"{path}: empty XML document")
    return root


def _split_lists(src: Path) -> dict[str, list[str]] | None:
    main = src / "ImageSets" / "Main"
    if not main.is_dir():
        return None
    lists: dict[str, list[str]] = {}
    for name in SPLITS:
        if (main / f"{name}.txt").is_file():
            lists[name] = _ids(main / f"{name}.txt")
    if "train" not in lists and "val" not in lists and (main / "trainval.txt").is_file():
        lists["train"] = _ids(main / "trainval.txt")
    if not lists:
        raise ManifestError(f"{main}: none of {', '.join(s + '.txt' for s in SPLITS)} or trainval.txt; "
                            "add the split lists, or remove the empty ImageSets/Main folder to import without splits")
    return lists


def _ids(path: Path) -> list[str]:
    out = []
    for n, line in enumerate(read_text(path, error=ManifestError).splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 1:
            raise ManifestError(f"{path} line {n}: expected one image id, got {line.strip()!r} "
                                "(a per-class list like aeroplane_train.txt is not a split list)")
        out.append(parts[0])
    return out


def _objects(path: Path, root: Element, skip_difficult: bool, imp: Import) -> tuple[list[str], str | None]:
    if root.tag != "annotation":
        raise ManifestError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    labels: list[str] = []
    skipped: list[str] = []
    for k, obj in enumerate(root.findall("object"), start=1):
        where = f"{path} object {k}"
        name_el = obj.find("name")
        if name_el is None or not (name_el.text or "").strip():
            raise ManifestError(f"{where}: <object> without a <name>")
        name = label_name(name_el.text, where)
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise ManifestError(f"{where}: <difficult> is {difficult!r}, expected 0 or 1")
        if difficult == "1" and skip_difficult:
            skipped.append(name)
            continue
        if name not in labels:
            labels.append(name)
    for name in skipped:
        if name not in labels:
            imp.report.drop("only difficult objects of this label (--skip-difficult)", f"{path} {name}")
    filename = (root.findtext("filename") or "").strip() or None
    return labels, filename


def import_voc(src: Path, root: ImageRoot | None, *, skip_difficult: bool = False, allow_outside: bool = False) -> Import:
    """Read a VOC folder (the one holding Annotations/) into an Import."""
    imp = Import("voc")
    imp.report.sources = [src]
    ann = src / "Annotations"
    if not ann.is_dir():
        raise ConfigError(f"{src}: no Annotations/ folder; give the VOC folder that holds Annotations/ and ImageSets/ (e.g. VOC2012)")
    if root is None:
        images = src / "JPEGImages"
        if not images.is_dir():
            raise ConfigError(f"{src}: no JPEGImages/ folder; pass --images-root with the folder of the images")
        root = ImageRoot(images, allow_outside=allow_outside)
    lists = _split_lists(src)
    if lists is None:
        plan = [(p.stem, "") for p in sorted(ann.glob("*.xml"))]
        if not plan:
            raise ManifestError(f"{ann}: no .xml annotation files")
    else:
        plan = [(i, split) for split, ids in lists.items() for i in ids]
        listed = {i for i, _ in plan}
        for p in sorted(ann.glob("*.xml")):
            if p.stem not in listed:
                imp.report.drop("annotation in no split list", str(p))
    for image_id, split in plan:
        xml = ann / f"{image_id}.xml"
        where = f"{src / 'ImageSets' / 'Main' / (split + '.txt')} id {image_id}" if split else str(xml)
        if not xml.is_file():
            imp.report.drop("no annotation file", f"{where} ({xml.name})")
            continue
        labels, filename = _objects(xml, read_xml(xml), skip_difficult, imp)
        found = root.find(filename, str(xml)) if filename else None
        if found is None:
            found = root.find(f"{image_id}.jpg", str(xml))
        if found is None:
            imp.report.drop("image not found", f"{xml} {filename or image_id + '.jpg'}")
            continue
        imp.add(found, labels, split=split, where=str(xml))
    return imp
