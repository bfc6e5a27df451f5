"""`mumic data import`: each format's real layout, built by hand with its quirks, checked row by row."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mumic.cli import main
from mumic.cli.data import IMPORT_FORMATS
from mumic.data.importers import FORMATS, import_dataset
from mumic.data.importers.labelstudio import candidates
from mumic.data.labels import read_labels_file
from mumic.data.manifest import read_manifest
from mumic.errors import ConfigError, ManifestError


def touch(path: Path, content: bytes | None = None) -> Path:
    """An image file (its bytes are its path unless given: importers never decode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if content is not None else str(path).encode())
    return path


def rows(manifest_path: Path) -> list[tuple]:
    """(image relative to the manifest's folder, labels, negatives, split) per row, read back
    through the manifest reader training uses."""
    m = read_manifest(manifest_path, allow_outside=True)
    out = []
    for i in range(len(m)):
        rel = os.path.relpath(m.images[i], manifest_path.parent).replace(os.sep, "/")
        out.append((rel, m.labels[i], m.negatives[i] if m.negatives is not None else [], m.splits[i] if m.splits else ""))
    return out


def test_cli_lists_every_format():
    assert IMPORT_FORMATS == FORMATS


# --------------------------------------------------------------------------- COCO


def coco_doc(images, annotations, categories=None):
    cats = categories or [{"id": 1, "name": "cat", "supercategory": "animal"}, {"id": 3, "name": "dog", "supercategory": "animal"},
                          {"id": 7, "name": "car", "supercategory": "vehicle"}, {"id": 9, "name": "person", "supercategory": "person"}]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": cats}


def test_coco_instances_untagged_image_and_report(tmp_path, capsys):
    for name in ("a.jpg", "b.jpg", "empty.jpg"):
        touch(tmp_path / "images" / name)
    images = [{"id": 10, "file_name": "a.jpg", "width": 4, "height": 4}, {"id": 11, "file_name": "b.jpg"},
              {"id": 12, "file_name": "empty.jpg"}, {"id": 13, "file_name": "gone.jpg"}]
    anns = [  # two boxes of one class are one tag; boxes and crowd flags are ignored
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [0, 0, 2, 2], "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": 0},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [2, 2, 1, 1], "iscrowd": 1},
        {"id": 4, "image_id": 11, "category_id": 7, "segmentation": [[0, 0, 1, 1, 1, 0]]},
        {"id": 5, "image_id": 13, "category_id": 7},
    ]
    src = tmp_path / "annotations" / "instances.json"
    src.parent.mkdir()
    src.write_text(json.dumps(coco_doc(images, anns)))
    out = tmp_path / "train.csv"
    assert main(["data", "import", "coco", str(src), "--images-root", str(tmp_path / "images"), "--out", str(out)]) == 0
    assert rows(out) == [("images/a.jpg", ["dog", "cat"], [], ""), ("images/b.jpg", ["car"], [], ""), ("images/empty.jpg", [], [], "")]
    assert out.read_text().splitlines() == ["image,labels", "images/a.jpg,dog|cat", "images/b.jpg,car", "images/empty.jpg,"]
    specs, _ = read_labels_file(tmp_path / "train.labels.json")  # every category, supercategory as description
    assert [(s.name, s.description) for s in specs] == [("cat", "animal"), ("dog", "animal"), ("car", "vehicle"), ("person", None)]
    printed = capsys.readouterr().out
    assert "coco: kept 3 images (1 untagged), 3 labels, 3 positive and 0 negative tags" in printed
    assert "dropped 1: image not found (1)" in printed
    assert f"e.g. {src} images[3] (id 13) gone.jpg: image not found" in printed

    # an existing manifest is never replaced without --overwrite
    assert main(["data", "import", "coco", str(src), "--images-root", str(tmp_path / "images"), "--out", str(out)]) == 2
    assert f"mumic: error: {out} already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["data", "import", "coco", str(src), "--images-root", str(tmp_path / "images"), "--out", str(out), "--overwrite"]) == 0


def test_coco_one_file_per_split_and_lvis_negatives(tmp_path):
    touch(tmp_path / "train2017" / "1.jpg")
    touch(tmp_path / "train2017" / "2.jpg")
    touch(tmp_path / "val2017" / "3.jpg")
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "instances_train2017.json").write_text(json.dumps(coco_doc(
        [{"id": 1, "file_name": "1.jpg", "neg_category_ids": [7]}, {"id": 2, "file_name": "2.jpg"}],
        [{"image_id": 1, "category_id": 1}])))  # image-level: no boxes at all
    val = coco_doc([{"id": 1, "file_name": "3.jpg"}], [{"image_id": 1, "category_id": 9}])
    (ann / "instances_val2017.json").write_text(json.dumps(val))
    out = tmp_path / "all.jsonl"
    report = import_dataset("coco", [ann / "instances_train2017.json", ann / "instances_val2017.json"], out, images_root=tmp_path)
    assert rows(out) == [("train2017/1.jpg", ["cat"], ["car"], "train"), ("train2017/2.jpg", [], [], "train"),
                         ("val2017/3.jpg", ["person"], [], "val")]
    assert report.splits == {"train": 2, "val": 1} and report.negatives == 1


def test_coco_refuses_broken_entries(tmp_path):
    touch(tmp_path / "a.jpg")
    src = tmp_path / "c.json"
    src.write_text(json.dumps(coco_doc([{"id": 1, "file_name": "a.jpg"}], [{"id": 5, "image_id": 2, "category_id": 1}])))
    with pytest.raises(ManifestError) as e:
        import_dataset("coco", src, tmp_path / "m.csv")
    assert str(e.value) == f"{src} annotations[0]: image_id 2 is not in 'images'"
    src.write_text(json.dumps(coco_doc([{"id": 1, "file_name": "a.jpg"}], [], [{"id": 1, "name": "a|b"}])))
    with pytest.raises(ManifestError, match=r"categories\[0\]: label 'a\|b' contains '\|'"):
        import_dataset("coco", src, tmp_path / "m.csv")
    src.write_text(json.dumps(coco_doc([{"id": 1, "file_name": "../../etc/passwd"}], [])))
    with pytest.raises(ManifestError, match=r"images\[0\] \(id 1\): image '../../etc/passwd' leads out of the images root"):
        import_dataset("coco", src, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists() and not (tmp_path / "m.labels.json").exists()


# --------------------------------------------------------------------------- Pascal VOC


def voc_xml(filename, *objects):
    objs = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>3</xmax><ymax>3</ymax></bndbox>{parts}</object>"
        for name, d, parts in objects)
    return (f"<annotation><folder>VOC2012</folder><filename>{filename}</filename><source><database>The VOC2007 Database</database>"
            f"</source><size><width>4</width><height>4</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>")


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    person_parts = "<part><name>head</name><bndbox/></part><part><name>hand</name><bndbox/></part>"
    files = {
        "2008_000001": voc_xml("2008_000001.jpg", ("person", 0, person_parts), (" dog\n", 1, ""), ("person", 0, "")),
        "2008_000002": voc_xml("2008_000002.jpg", ("cat", 0, ""), ("dog", 1, ""), ("dog", 0, "")),
        "2008_000003": voc_xml("2008_000003.jpg"),
        "2008_000004": voc_xml("2008_000004.jpg", ("bird", 0, "")),  # in no split list
    }
    for stem, text in files.items():
        touch(root / "Annotations" / f"{stem}.xml", text.encode())
        touch(root / "JPEGImages" / f"{stem}.jpg")
    main_dir = root / "ImageSets" / "Main"
    touch(main_dir / "train.txt", b"2008_000001\n2008_000003\n")
    touch(main_dir / "val.txt", b"2008_000002\n\n")
    touch(main_dir / "trainval.txt", b"2008_000001\n2008_000002\n2008_000003\n")
    touch(main_dir / "dog_train.txt", b"2008_000001  1\n2008_000003 -1\n")  # per-class lists are not read
    return root


def test_voc_difficult_kept_parts_ignored_splits(voc, tmp_path):
    out = tmp_path / "voc.csv"
    report = import_dataset("voc", voc, out)
    assert rows(out) == [
        ("VOCdevkit/VOC2012/JPEGImages/2008_000001.jpg", ["person", "dog"], [], "train"),
        ("VOCdevkit/VOC2012/JPEGImages/2008_000003.jpg", [], [], "train"),
        ("VOCdevkit/VOC2012/JPEGImages/2008_000002.jpg", ["cat", "dog"], [], "val"),
    ]
    assert dict(report.dropped) == {"annotation in no split list": 1}
    assert not (tmp_path / "voc.labels.json").exists()  # VOC does not list its classes


def test_voc_skip_difficult(voc, tmp_path):
    out = tmp_path / "voc.csv"
    report = import_dataset("voc", voc, out, skip_difficult=True)
    assert [r[1] for r in rows(out)] == [["person"], [], ["cat", "dog"]]  # the dog of 000002 is also a plain object
    assert report.dropped["only difficult objects of this label (--skip-difficult)"] == 1


def test_voc_refuses_entities_and_broken_xml(voc, tmp_path):
    bomb = voc / "Annotations" / "2008_000003.xml"
    bomb.write_text('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
                    "<annotation><filename>&lol2;</filename></annotation>")
    with pytest.raises(ManifestError) as e:
        import_dataset("voc", voc, tmp_path / "voc.csv")
    assert str(e.value).startswith(f"{bomb}: refused: the file declares a document type or entities")
    bomb.write_text("<annotation>\n<object><name>cat</name></object>\n<object>")
    with pytest.raises(ManifestError, match=rf"^{bomb} line 3: not valid XML"):
        import_dataset("voc", voc, tmp_path / "voc.csv")
    bomb.write_text("<annotation><object><pose>Left</pose></object></annotation>")
    with pytest.raises(ManifestError, match=rf"^{bomb} object 1: <object> without a <name>$"):
        import_dataset("voc", voc, tmp_path / "voc.csv")


# --------------------------------------------------------------------------- Open Images


def test_openimages_verified_negatives_and_class_names(tmp_path):
    for i in ("000a1", "000b2", "000c3"):
        touch(tmp_path / "images" / f"{i}.jpg")
    labels = tmp_path / "train-annotations-human-imagelabels.csv"
    labels.write_text("ImageID,Source,LabelName,Confidence\n"
                      "000a1,verification,/m/01yrx,1\n"
                      "000a1,verification,/m/0bt9lr,0\n"
                      "000a1,crowdsource-verification,/m/01yrx,1\n"  # the same tag twice is one tag
                      "000b2,verification,/m/0k4j,1\n"
                      "000b2,machine,/m/0bt9lr,0.7\n"
                      "000c3,verification,/m/01yrx,0\n"  # only a verified negative: an untagged row with a negative
                      "000d4,verification,/m/01yrx,1\n"  # image not downloaded
                      "000b2,verification,/m/0xxxx,1\n")  # class not in the descriptions
    classes = tmp_path / "oidv7-class-descriptions.csv"  # old style: no header; a name with a comma; a shared name
    classes.write_text('/m/01yrx,Cat\n/m/0bt9lr,Dog\n/m/0k4j,"Car, sports"\n/m/0dog2,Dog\n')
    out = tmp_path / "oi.csv"
    report = import_dataset("openimages", labels, out, images_root=tmp_path / "images", class_descriptions=classes)
    assert rows(out) == [
        ("images/000a1.jpg", ["Cat"], ["Dog (/m/0bt9lr)"], ""),
        ("images/000b2.jpg", ["Car, sports"], [], ""),
        ("images/000c3.jpg", [], ["Cat"], ""),
    ]
    assert dict(report.dropped) == {"confidence neither 0 nor 1 (a machine-generated label)": 1, "image not found": 1,
                                    "class id not in the class descriptions": 1}
    specs, _ = read_labels_file(tmp_path / "oi.labels.json")  # only the labels used
    assert [s.name for s in specs] == ["Cat", "Dog (/m/0bt9lr)", "Car, sports"]
    # the manifest says what training reads: Cat is known negative for 000c3
    y, known = read_manifest(out).targets(["Cat", "Car, sports", "Dog (/m/0bt9lr)"], unlisted="unknown")
    assert y[2].tolist() == [0, 0, 0] and known[2].tolist() == [True, False, False]


def test_openimages_ids_split_folders_and_bad_confidence(tmp_path):
    touch(tmp_path / "validation" / "ff01.jpg")
    csv_path = tmp_path / "validation-annotations-human-imagelabels.csv"
    csv_path.write_text("ImageID,Source,LabelName,Confidence\nff01,verification,/m/01yrx,1\n")
    out = tmp_path / "v.csv"
    report = import_dataset("openimages", [csv_path], out, images_root=tmp_path, split="val")
    assert rows(out) == [("validation/ff01.jpg", ["/m/01yrx"], [], "val")]
    assert report.notes == ["no --class-descriptions: the labels are the class ids (/m/...)"]
    csv_path.write_text("ImageID,Source,LabelName,Confidence\nff01,verification,/m/01yrx,yes\n")
    with pytest.raises(ManifestError, match=rf"^{csv_path} line 2: Confidence 'yes' is not a number$"):
        import_dataset("openimages", [csv_path], tmp_path / "w.csv", images_root=tmp_path)


# --------------------------------------------------------------------------- Label Studio


def ls_choices(*names, from_name="choice"):
    return {"id": "r1", "type": "choices", "from_name": from_name, "to_name": "image", "origin": "manual",
            "value": {"choices": list(names)}}


def test_labelstudio_export_url_prefixes_and_annotation_choice(tmp_path, capsys):
    root = tmp_path / "media"
    touch(root / "upload" / "3" / "1a2b3c4d-cat.jpg")
    touch(root / "photos" / "dog 1.jpg")
    touch(root / "tabby.jpg")  # an upload whose original name is what the user kept
    touch(root / "plain.jpg")
    tasks = [
        {"id": 1, "data": {"image": "/data/upload/3/1a2b3c4d-cat.jpg"}, "annotations": [
            {"id": 11, "result": [ls_choices("cat", "indoor")], "was_cancelled": False, "ground_truth": False,
             "created_at": "2024-05-01T10:00:00.000000Z", "updated_at": "2024-05-01T10:00:00.000000Z"},
            {"id": 12, "result": [ls_choices("cat")], "was_cancelled": False, "ground_truth": False,
             "created_at": "2024-05-01T09:00:00.000000Z", "updated_at": "2024-05-02T09:00:00.000000Z"},  # updated last: wins
            {"id": 13, "result": [ls_choices("dog")], "was_cancelled": True, "updated_at": "2024-06-01T00:00:00Z"},
        ], "predictions": []},
        {"id": 2, "data": {"image": "http://localhost:8080/data/local-files/?d=photos/dog%201.jpg"}, "annotations": [
            {"id": 21, "result": [{"type": "taxonomy", "from_name": "tax", "to_name": "image",
                                   "value": {"taxonomy": [["animal", "dog"], ["scene", "outdoor"]]}},
                                  {"type": "rectanglelabels", "from_name": "box", "to_name": "image",
                                   "value": {"x": 1, "y": 1, "width": 2, "height": 2, "rectanglelabels": ["dog"]}}]}]},
        {"id": 3, "data": {"image": "/data/upload/3/0badf00d-tabby.jpg"}, "annotations": [{"id": 31, "result": []}]},
        {"id": 4, "data": {"image": "plain.jpg"}, "annotations": [], "predictions": [
            {"model_version": "v1", "result": [ls_choices("cat")]}]},
        {"id": 5, "data": {"image": "https://example.invalid/x.jpg"}, "annotations": [{"id": 51, "result": [ls_choices("cat")]}]},
        {"id": 6, "data": {"image": "/data/local-files/?d=photos/missing.jpg"}, "annotations": [{"id": 61, "result": []}]},
        {"id": 7, "data": {"image": "/data/upload/3/1a2b3c4d-cat.jpg"}, "annotations": [
            {"id": 71, "result": [{"type": "taxonomy", "from_name": "tax", "to_name": "image", "value": {"taxonomy": [["pet"]]}}]}]},
    ]
    src = tmp_path / "project-3-at-2024-05-03.json"
    src.write_text(json.dumps(tasks))
    out = tmp_path / "ls.csv"
    assert main(["data", "import", "labelstudio", str(src), "--images-root", str(root), "--out", str(out)]) == 0
    assert rows(out) == [
        ("media/upload/3/1a2b3c4d-cat.jpg", ["cat", "pet"], [], ""),  # tasks 1 and 7 name one image: joined
        ("media/photos/dog 1.jpg", ["dog", "outdoor"], [], ""),
        ("media/tabby.jpg", [], [], ""),  # submitted with nothing chosen: untagged
    ]
    printed = capsys.readouterr().out
    assert "dropped 3: " in printed and "a remote URL (images are not fetched) (1)" in printed and "image not found (1)" in printed
    assert f"e.g. {src} task 4: no annotation (not labelled yet); --use-predictions" in printed
    assert "note: 1 result(s) of type rectanglelabels ignored" in printed

    out2 = tmp_path / "ls2.jsonl"
    import_dataset("labelstudio", src, out2, images_root=root, use_predictions=True, from_name="choice")
    assert rows(out2) == [("media/upload/3/1a2b3c4d-cat.jpg", ["cat"], [], ""), ("media/photos/dog 1.jpg", [], [], ""),
                          ("media/tabby.jpg", [], [], ""), ("media/plain.jpg", ["cat"], [], "")]


def test_labelstudio_refuses_paths_out_of_root_and_ambiguous_leaves(tmp_path):
    root = tmp_path / "root"
    touch(tmp_path / "secret.jpg")
    touch(root / "a.jpg")
    src = tmp_path / "ls.json"
    src.write_text(json.dumps([{"id": 9, "data": {"image": "/data/local-files/?d=../secret.jpg"}, "annotations": [{"result": []}]}]))
    with pytest.raises(ManifestError, match=r"task 9: image '../secret.jpg' leads out of the images root"):
        import_dataset("labelstudio", src, tmp_path / "m.csv", images_root=root)
    report = import_dataset("labelstudio", src, tmp_path / "m.csv", images_root=root, allow_outside_root=True)
    assert rows(tmp_path / "m.csv") == [("secret.jpg", [], [], "")] and report.rows == 1

    tax = [{"type": "taxonomy", "from_name": "t", "to_name": "image", "value": {"taxonomy": [["animal", "bat"], ["sport", "bat"]]}}]
    src.write_text(json.dumps([{"id": 1, "data": {"image": "a.jpg"}, "annotations": [{"result": tax}]}]))
    with pytest.raises(ManifestError, match="taxonomy leaf 'bat' is both animal/bat and sport/bat; pass --taxonomy-paths"):
        import_dataset("labelstudio", src, tmp_path / "n.csv", images_root=root)
    import_dataset("labelstudio", src, tmp_path / "n.csv", images_root=root, taxonomy_paths=True)
    assert rows(tmp_path / "n.csv")[0][1] == ["animal/bat", "sport/bat"]

    # an export of an old Label Studio calls annotations "completions"
    src.write_text(json.dumps([{"id": 1, "data": {"image": "a.jpg"}, "completions": [{"result": [ls_choices("cat")]}]}]))
    import_dataset("labelstudio", src, tmp_path / "o.csv", images_root=root)
    assert rows(tmp_path / "o.csv") == [("root/a.jpg", ["cat"], [], "")]


def test_labelstudio_reference_forms():
    assert candidates("/data/upload/12/5d2f1a3b-my%20cat.jpg") == ["12/5d2f1a3b-my cat.jpg", "upload/12/5d2f1a3b-my cat.jpg",
                                                                  "5d2f1a3b-my cat.jpg", "my cat.jpg"]
    assert candidates("/data/local-files/?d=a/b%2Bc.jpg") == ["a/b+c.jpg"]
    assert candidates("s3://bucket/x.jpg") is None and candidates("https://host/x.jpg") is None
    assert candidates("sub/x.jpg") == ["sub/x.jpg"]


# --------------------------------------------------------------------------- label folders


def test_folders_joins_links_and_copies(tmp_path):
    src = tmp_path / "photos"
    touch(src / "cat" / "a.png", b"AAAA")
    touch(src / "cat" / "b.png", b"BBBB")
    touch(src / "dog" / "a-copy.png", b"AAAA")  # identical contents: one image with both labels
    (src / "dog" / "old").mkdir()
    os.symlink(src / "cat" / "b.png", src / "dog" / "old" / "b-link.png")  # a link, in a nested folder
    touch(src / "dog" / "notes.txt", b"not an image")
    touch(src / ".thumbs" / "a.png", b"hidden")
    touch(src / "top.jpg", b"top")  # directly in SRC: untagged
    out = src / "manifest.csv"
    report = import_dataset("folders", src, out)
    assert rows(out) == [("cat/a.png", ["cat", "dog"], [], ""), ("cat/b.png", ["cat", "dog"], [], ""), ("top.jpg", [], [], "")]
    assert dict(report.dropped) == {"not an image file": 1}
    assert report.notes == ["2 files are links to or copies of an image found elsewhere; their labels are joined"]


def test_folders_split_folders_and_links_out_of_root(tmp_path):
    src = tmp_path / "set"
    touch(src / "train" / "cat" / "1.jpg", b"1")
    touch(src / "val" / "dog" / "2.jpg", b"2")
    out = tmp_path / "m.tsv"
    import_dataset("folders", src, out, split_folders=True)
    assert rows(out) == [("set/train/cat/1.jpg", ["cat"], [], "train"), ("set/val/dog/2.jpg", ["dog"], [], "val")]
    touch(tmp_path / "elsewhere.jpg", b"3")
    os.symlink(tmp_path / "elsewhere.jpg", src / "train" / "cat" / "3.jpg")
    with pytest.raises(ManifestError, match=r"3.jpg: image 'train/cat/3.jpg' leads out of the images root"):
        import_dataset("folders", src, out, split_folders=True, overwrite=True)
    touch(src / "val" / "cat" / "1-again.jpg", b"1")  # the train image again, under val: it would leak
    with pytest.raises(ManifestError, match="is also in split 'train'"):
        import_dataset("folders", src, out, split_folders=True, overwrite=True, allow_outside_root=True)


def test_options_and_outputs_are_checked(tmp_path):
    touch(tmp_path / "a" / "x.jpg")
    with pytest.raises(ConfigError, match=r"^--skip-difficult is not an option of the folders import"):
        import_dataset("folders", tmp_path / "a", tmp_path / "m.csv", skip_difficult=True)
    with pytest.raises(ConfigError, match=r"a manifest is written as .csv, .tsv, .jsonl"):
        import_dataset("folders", tmp_path / "a", tmp_path / "m.parquet")
    src = touch(tmp_path / "c.json", b"[]")
    with pytest.raises(ConfigError, match="is an input of the import"):
        import_dataset("coco", src, tmp_path / "x.csv", labels_out=src)
    with pytest.raises(ManifestError, match=r"nothing to import \(the source lists no images\)"):
        import_dataset("labelstudio", src, tmp_path / "x.csv")
