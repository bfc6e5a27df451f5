"""What a training run reads: splits (any case), untagged images, labels that only val/test
have, and a labels file that describes only some labels."""

import json
import logging

import numpy as np
import pytest

from mumic.config import load_config
from mumic.data.manifest import read_manifest
from mumic.data.training import resolve_labels, split_manifests
from mumic.errors import ManifestError
from mumic.train import fit


def _png(path):
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(path)
    return path.name


def _manifest(tmp_path, rows, name="m.csv"):
    for image, _, _ in rows:
        if not (tmp_path / image).exists():
            _png(tmp_path / image)
    text = "image,labels,split\n" + "".join(f"{i},{'|'.join(l)},{s}\n" for i, l, s in rows)
    (tmp_path / name).write_text(text)
    return tmp_path / name


def _cfg(tmp_path, manifest, **kw):
    return load_config(overrides={"manifest": str(manifest), "out": str(tmp_path / "run"), **kw})


def test_split_names_are_matched_without_case_and_a_missing_one_is_named(tmp_path):
    m = _manifest(tmp_path, [("a.png", ["cat"], "TRAIN"), ("b.png", ["dog"], "Validation"), ("c.png", ["cat"], "Test")])
    train, val, test = split_manifests(_cfg(tmp_path, m))
    assert [p.name for p in train.images] == ["a.png"] and [p.name for p in val.images] == ["b.png"]
    assert test is not None and [p.name for p in test.images] == ["c.png"]
    m = _manifest(tmp_path, [("a.png", ["cat"], "train"), ("b.png", ["dog"], "holdout")], name="n.csv")
    with pytest.raises(ManifestError, match=r"n\.csv: no validation data \(its split column holds 'holdout', 'train'\)"):
        split_manifests(_cfg(tmp_path, m))


def test_untagged_images_are_negatives_for_every_label(tmp_path):
    m = _manifest(tmp_path, [("a.png", ["cat"], "train"), ("b.png", [], "train"), ("c.png", ["dog"], "val")])
    train, _, _ = split_manifests(_cfg(tmp_path, m))
    y, known = train.targets(["cat", "dog"])
    np.testing.assert_array_equal(y, [[1, 0], [0, 0]])
    assert known.all()
    with pytest.raises(ManifestError, match=r"m\.csv line 3: empty label list .*--allow-untagged"):
        split_manifests(_cfg(tmp_path, m, allow_untagged=False))


def test_labels_only_in_val_or_test_are_unseen_with_one_warning(tmp_path, caplog):
    m = _manifest(tmp_path, [("a.png", ["cat"], "train"), ("b.png", ["dog"], "train"), ("c.png", ["cat", "night"], "val"),
                             ("d.png", ["owl"], "test")])
    cfg = _cfg(tmp_path, m)
    with caplog.at_level(logging.WARNING, logger="mumic.data.training"):
        specs, _ = resolve_labels(cfg, [x for x in split_manifests(cfg) if x is not None])
    assert [(s.name, s.seen) for s in specs] == [("cat", True), ("dog", True), ("night", False), ("owl", False)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "night, owl" in warnings[0]


def test_a_labels_file_may_describe_only_some_labels(tmp_path):
    m = _manifest(tmp_path, [("a.png", ["cat"], "train"), ("b.png", ["dog"], "train"), ("c.png", ["dog"], "val")])
    (tmp_path / "labels.yaml").write_text(
        "templates: ['a drawing of {}.']\nlabels:\n  dog: {prompts: ['a puppy']}\n  bird: {seen: false}\n")
    cfg = _cfg(tmp_path, m, labels_file=str(tmp_path / "labels.yaml"))
    specs, templates = resolve_labels(cfg, [x for x in split_manifests(cfg) if x is not None])
    assert [(s.name, s.seen, s.prompts) for s in specs] == [("dog", True, ["a puppy"]), ("bird", False, None), ("cat", True, None)]
    assert templates == ["a drawing of {}."]


def test_a_run_trains_with_untagged_images_and_a_val_only_label(tmp_path, tiny_clip_dir):
    rows = [(f"i{k}.png", [["cat"], ["dog"], []][k % 3], "train") for k in range(12)]
    rows += [("v0.png", ["cat"], "val"), ("v1.png", ["dog", "night"], "val"), ("t0.png", ["night"], "test")]
    m = _manifest(tmp_path, rows)
    run = fit(_cfg(tmp_path, m, backbone=f"hf:{tiny_clip_dir}", max_steps=2, eval_every=2, batch_size=4,
                   cache_dir=str(tmp_path / "cache"), majority_n=2), progress=False)
    labels = {x["name"]: x["seen"] for x in json.loads((run / "labels.json").read_text())["labels"]}
    assert labels == {"cat": True, "dog": True, "night": False}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_images"] == 12 and "zsl_map" in metrics["test"]
    assert len(read_manifest(m, allow_untagged=True)) == 15
