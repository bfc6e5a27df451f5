"""Tests of the data layer: manifests, labels files, image decoding, transforms, datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mumic.data.dataset import ImageDataset, file_digest, make_loader
from mumic.data.images import load_image, random_resized_crop, resize_center_crop
from mumic.data.labels import LabelSpec, read_labels_file
from mumic.data.manifest import Manifest, read_manifest
from mumic.data.synthetic import make_shapes
from mumic.errors import ConfigError, ImageError, ManifestError

ROWS = [
    {"image": "a.png", "labels": ["cat", "dog"], "negatives": ["car"], "split": "train", "note": "x"},
    {"image": "sub/b.png", "labels": ["dog"], "negatives": [], "split": "val", "note": "y"},
    {"image": "/abs/c.png", "labels": ["bird", "cat"], "negatives": ["dog"], "split": "test", "note": "z"},
]


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_delimited(path: Path, sep: str, rows=ROWS) -> Path:
    lines = [sep.join(["image", "labels", "negatives", "split", "note"])]
    for r in rows:
        lines.append(sep.join([r["image"], "|".join(r["labels"]), "|".join(r["negatives"]), r["split"], r["note"]]))
    return write_text(path, "\n".join(lines) + "\n")


def write_jsonl(path: Path, rows=ROWS) -> Path:
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_parquet(path: Path, rows=ROWS) -> Path:
    pd.DataFrame(rows).to_parquet(path)
    return path


WRITERS = {
    "m.csv": lambda p: write_delimited(p, ","),
    "m.tsv": lambda p: write_delimited(p, "\t"),
    "m.jsonl": write_jsonl,
    "m.ndjson": write_jsonl,
    "m.parquet": write_parquet,
}


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("name", list(WRITERS))
def test_manifest_round_trip(tmp_path: Path, name: str) -> None:
    path = WRITERS[name](tmp_path / name)
    m = read_manifest(path, allow_outside=True)
    assert len(m) == 3
    assert m.images == [tmp_path / "a.png", tmp_path / "sub" / "b.png", Path("/abs/c.png")]
    assert m.labels == [r["labels"] for r in ROWS]
    assert m.negatives == [r["negatives"] for r in ROWS]
    assert m.splits == ["train", "val", "test"]
    assert list(m.frame["note"]) == ["x", "y", "z"]
    assert list(m.frame.columns) == ["image", "labels", "negatives", "split", "note"]
    assert m.label_names() == ["bird", "car", "cat", "dog"]
    expected_lines = [2, 3, 4] if name.endswith(("csv", "tsv")) else [1, 2, 3]
    assert m.lines == expected_lines


def test_manifest_strip_dedup_and_optional_columns(tmp_path: Path) -> None:
    path = write_text(tmp_path / "m.csv", "image,labels\n a.png , cat | dog|cat \n\nb.png,dog\n")
    m = read_manifest(path)
    assert m.labels == [["cat", "dog"], ["dog"]]
    assert m.images[0] == tmp_path / "a.png"
    assert m.negatives is None and m.splits is None
    assert m.lines == [2, 4]  # the blank line is skipped but still counted


def test_manifest_jsonl_accepts_pipe_string_and_quoted_csv_multiline(tmp_path: Path) -> None:
    m = read_manifest(write_text(tmp_path / "m.jsonl", '{"image": "a.png", "labels": "cat|dog"}\n'))
    assert m.labels == [["cat", "dog"]]
    # A quoted field spanning two lines: the next row is on line 4, not 3.
    path = write_text(tmp_path / "q.csv", 'image,labels,note\na.png,cat,"two\nlines"\nb.png,,x\n')
    with pytest.raises(ManifestError, match=r"q\.csv line 4: empty label list"):
        read_manifest(path, allow_untagged=False)
    assert read_manifest(path).labels == [["cat"], []]  # by default an untagged image: a negative for every label


def test_manifest_without_labels_when_not_required(tmp_path: Path) -> None:
    m = read_manifest(write_text(tmp_path / "m.csv", "image\na.png\nb.png\n"), require_labels=False)
    assert m.labels == [[], []]
    m = read_manifest(write_text(tmp_path / "n.csv", "image,labels\na.png,\n"), require_labels=False)
    assert m.labels == [[]]


def expect_error(path: Path, line: int | None, fragment: str, cls=ManifestError, **kw) -> str:
    with pytest.raises(cls) as info:
        read_manifest(path, **kw)
    msg = str(info.value)
    assert path.name in msg
    if line is not None:
        assert f"line {line}:" in msg, msg
    assert fragment in msg, msg
    assert "\n" not in msg
    return msg


def test_manifest_errors(tmp_path: Path) -> None:
    expect_error(tmp_path / "missing.csv", None, "file not found")
    expect_error(write_text(tmp_path / "m.txt", "image\n"), None, ".csv, .tsv, .jsonl")
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"image,labels\na.png,cat\nb.png,d\xffog\n")
    expect_error(bad, 3, "not valid UTF-8")
    expect_error(write_text(tmp_path / "bad.jsonl", '{"image": "a", "labels": ["x"]}\n{"image": \n'), 2, "invalid JSON")
    expect_error(write_text(tmp_path / "arr.jsonl", '["a.png"]\n'), 1, "expected a JSON object")
    msg = expect_error(write_text(tmp_path / "noimg.csv", "path,labels\na,b\n"), None, "missing 'image' column")
    assert "columns found: path, labels" in msg
    expect_error(write_text(tmp_path / "nolab.csv", "image,tags\na,b\n"), None, "missing 'labels' column")
    expect_error(write_text(tmp_path / "emptyimg.csv", "image,labels\na.png,cat\n  ,cat\n"), 3, "empty image path")
    expect_error(write_text(tmp_path / "type.jsonl", '{"image": "a", "labels": ["x"]}\n{"image": "b", "labels": 5}\n'), 2, "labels must be")
    expect_error(write_text(tmp_path / "type2.jsonl", '{"image": "a", "labels": ["x", 3]}\n'), 1, "only strings")
    expect_error(write_text(tmp_path / "blank.csv", "image,labels\na.png,cat||dog\n"), 2, "empty label")
    expect_error(write_text(tmp_path / "ws.jsonl", '{"image": "a", "labels": ["x", "  "]}\n'), 1, "empty label")
    expect_error(write_text(tmp_path / "nolabels.csv", "image,labels\na.png,cat\nb.png,\n"), 3, "line 3: empty label list",
                 allow_untagged=False)
    expect_error(write_text(tmp_path / "nolabels.jsonl", '{"image": "a", "labels": []}\n'), 1, "empty label list",
                 allow_untagged=False)
    expect_error(write_text(tmp_path / "header.csv", "image,labels\n"), None, "empty manifest (no rows)")
    expect_error(write_text(tmp_path / "empty.jsonl", "\n"), None, "missing 'image' column")
    expect_error(write_text(tmp_path / "zero.csv", ""), None, "empty manifest")
    expect_error(write_text(tmp_path / "fields.csv", "image,labels\na.png,cat,extra\n"), 2, "expected 2 fields")
    expect_error(write_text(tmp_path / "both.csv", "image,labels,negatives\na.png,cat,cat\n"), 2, "both labels and negatives")
    (tmp_path / "dir.csv").mkdir()
    expect_error(tmp_path / "dir.csv", None, "is a directory")
    write_text(tmp_path / "bad.parquet", "not parquet")
    expect_error(tmp_path / "bad.parquet", None, "not a readable Parquet file")
    pq = write_parquet(tmp_path / "rows.parquet", [{"image": "a", "labels": ["x"]}, {"image": "b", "labels": []}])
    msg = expect_error(pq, None, "row 2: empty label list", allow_untagged=False)


def test_select_split_and_check_images(tmp_path: Path) -> None:
    m = read_manifest(WRITERS["m.csv"](tmp_path / "m.csv"), allow_outside=True)
    sub = m.select([2, 0])
    assert [p.name for p in sub.images] == ["c.png", "a.png"]
    assert sub.lines == [4, 2] and list(sub.frame["note"]) == ["z", "x"]
    assert len(m.select(np.array([True, False, True]))) == 2
    assert len(m.select([])) == 0
    val = m.split("val")
    assert val.labels == [["dog"]] and val.lines == [3]
    with pytest.raises(ManifestError, match=r"m\.csv: no rows with split 'dev'; splits present: test, train, val"):
        m.split("dev")
    nosplit = read_manifest(write_text(tmp_path / "n.csv", "image,labels\na.png,cat\n"))
    with pytest.raises(ManifestError, match=r"n\.csv: no 'split' column"):
        nosplit.split("train")
    # check_images_exist: a.png exists, sub/b.png and /abs/c.png do not.
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match=r"m\.csv line 3: image not found: .*b\.png \(2 of 3 images are missing\)"):
        m.check_images_exist()
    m.select([0]).check_images_exist()


def test_targets(tmp_path: Path) -> None:
    m = read_manifest(WRITERS["m.jsonl"](tmp_path / "m.jsonl"), allow_outside=True)
    names = ["cat", "dog", "bird", "car"]
    y, known = m.targets(names)
    assert y.dtype == np.float32 and known.dtype == bool and y.shape == (3, 4)
    np.testing.assert_array_equal(y, [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0]])
    assert known.all()
    y2, known2 = m.targets(names, unlisted="unknown")
    np.testing.assert_array_equal(y2, y)
    # positives and explicit negatives are known, the rest is masked
    np.testing.assert_array_equal(known2, [[1, 1, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0]])
    with pytest.raises(ManifestError, match=r"m\.jsonl line 3: label 'bird' is not one of the 3 known labels"):
        m.targets(["cat", "dog", "car"])
    y3, known3 = m.targets(["cat", "dog"], ignore_unknown=True)
    np.testing.assert_array_equal(y3, [[1, 1], [0, 1], [1, 0]])
    assert known3.all()
    with pytest.raises(ConfigError):
        m.targets(names, unlisted="maybe")


# --------------------------------------------------------------------------- labels files


def test_labels_file_forms(tmp_path: Path) -> None:
    specs, templates = read_labels_file(write_text(tmp_path / "a.yaml", "- cat\n- dog\n"))
    assert [s.name for s in specs] == ["cat", "dog"] and templates is None
    assert specs[0] == LabelSpec("cat")

    text = "cat:\n  prompts: [a photo of a cat]\n  description: feline\ndog:\nfox:\n  seen: false\n"
    specs, templates = read_labels_file(write_text(tmp_path / "b.yml", text))
    assert specs == [
        LabelSpec("cat", ["a photo of a cat"], "feline", True),
        LabelSpec("dog"),
        LabelSpec("fox", seen=False),
    ]
    assert templates is None

    doc = {
        "labels": ["cat", {"name": "fox", "prompts": ["a fox"], "seen": False}],
        "templates": ["a photo of a {}.", "a {label} drawing"],
    }
    specs, templates = read_labels_file(write_text(tmp_path / "c.json", json.dumps(doc)))
    assert [s.name for s in specs] == ["cat", "fox"] and specs[1].seen is False
    assert templates == ["a photo of a {}.", "a {} drawing"]
    assert specs[0].texts(templates) == ["a photo of a cat.", "a cat drawing"]
    assert specs[1].texts(templates) == ["a fox"]
    assert LabelSpec("owl").texts() == ["owl"]

    specs, templates = read_labels_file(write_text(tmp_path / "c2.yaml", "labels:\n  cat: null\n  dog: {seen: false}\n"))
    assert [(s.name, s.seen) for s in specs] == [("cat", True), ("dog", False)] and templates is None



def test_labels_names_are_still_importable_from_manifest() -> None:
    from mumic.data import labels, manifest

    for name in ("LabelSpec", "read_labels_file", "fill_template", "SEPARATOR", "PLACEHOLDER"):
        assert getattr(manifest, name) is getattr(labels, name), name


@pytest.mark.parametrize(
    "name,text,fragment",
    [
        ("unknown.yaml", "cat:\n  promts: [x]\n", "unknown key 'promts'"),
        ("unknown2.yaml", "labels:\n  - {name: cat, colour: red}\n", "unknown key 'colour'"),
        ("top.yaml", "labels: [cat]\ntemplate: ['{}']\n", "unknown key 'template'"),
        ("dup.yaml", "- cat\n- dog\n- cat\n", "duplicate label name(s): cat"),
        ("dupkey.yaml", "cat: null\ncat: {seen: false}\n", "line 2: key 'cat' is given twice (first on line 1); keep one"),
        ("dupkey.json", '{"cat": null, "cat": null}', "duplicate key 'cat'; keep one"),
        ("tmpl.yaml", "labels: [cat]\ntemplates: ['a photo']\n", "exactly once"),
        ("tmpl2.yaml", "labels: [cat]\ntemplates: ['{} and {}']\n", "exactly once"),
        ("bool.yaml", "- yes\n- cat\n", "not a string"),
        ("seen.yaml", "cat: {seen: maybe}\n", "seen must be true or false"),
        ("empty.yaml", "", "empty"),
        ("syntax.yaml", "- cat\n- [dog\n", "line 3: not valid YAML"),
        ("syntax.json", '{"labels": [\n  "cat",\n}', "line 3: not valid JSON"),
        ("labels.txt", "cat\n", "unsupported labels file extension"),
        ("noname.yaml", "labels:\n  - {prompts: [x]}\n", "has no 'name'"),
    ],
)
def test_labels_file_errors(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    path = write_text(tmp_path / name, text)
    with pytest.raises(ManifestError) as info:
        read_labels_file(path)
    assert name in str(info.value) and fragment in str(info.value), str(info.value)


def test_labels_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="nope.yaml does not exist"):
        read_labels_file(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- images


def test_load_image_modes(tmp_path: Path) -> None:
    # RGBA: the transparent pixel becomes white, the opaque one keeps its colour.
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    rgba.save(tmp_path / "rgba.png")
    img = load_image(tmp_path / "rgba.png")
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 0)) == (10, 20, 30)

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "pal.png", transparency=0)
    img = load_image(tmp_path / "pal.png")
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 0)) == (200, 0, 0)

    la = Image.new("LA", (1, 1), (50, 0))
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)

    sixteen = Image.fromarray(np.array([[65535, 128 * 257, 0]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    sixteen.save(tmp_path / "g16.png")
    img = load_image(tmp_path / "g16.png")
    assert [img.getpixel((x, 0)) for x in range(3)] == [(255,) * 3, (128,) * 3, (0,) * 3]

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    img = load_image(tmp_path / "cmyk.jpg")
    r, g, b = img.getpixel((4, 4))
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60

    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(tmp_path / "i32.tif")
    img = load_image(tmp_path / "i32.tif")
    assert img.getpixel((0, 0)) == (0, 0, 0) and img.getpixel((1, 0)) == (255, 255, 255)
    Image.new("LAB", (2, 2), (255, 128, 128)).save(tmp_path / "lab.tif")  # L* = 100: white
    assert all(v >= 250 for v in load_image(tmp_path / "lab.tif").getpixel((0, 0)))

    Image.new("1", (3, 3), 1).save(tmp_path / "bw.png")
    assert load_image(tmp_path / "bw.png").getpixel((1, 1)) == (255, 255, 255)
    Image.new("L", (3, 3), 77).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").getpixel((1, 1)) == (77, 77, 77)


def test_load_image_exif_rotation_and_animation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (0, 128, 0)).save(tmp_path / "rot.jpg", exif=exif.tobytes())
    with Image.open(tmp_path / "rot.jpg") as raw:
        assert raw.size == (40, 20)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)

    frames = [Image.new("RGB", (6, 6), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(tmp_path / "anim.gif") as raw:
        assert getattr(raw, "n_frames", 1) == 2
    img = load_image(tmp_path / "anim.gif")
    r, g, b = img.getpixel((3, 3))
    assert img.mode == "RGB" and r > 200 and b < 50


def test_load_image_jpeg_draft_keeps_size_hint(tmp_path: Path) -> None:
    Image.new("RGB", (512, 384), (90, 90, 90)).save(tmp_path / "big.jpg")
    img = load_image(tmp_path / "big.jpg", size_hint=100)
    assert min(img.size) >= 100 and img.size[0] < 512
    assert load_image(tmp_path / "big.jpg").size == (512, 384)
    assert load_image(tmp_path / "big.jpg", size_hint=1000).size == (512, 384)


def test_load_image_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(path: Path, fragment: str, **kw) -> None:
        with pytest.raises(ImageError) as info:
            load_image(path, **kw)
        assert str(path) in str(info.value) and fragment in str(info.value), str(info.value)

    fails(tmp_path / "missing.png", "file not found")
    (tmp_path / "dir.png").mkdir()
    fails(tmp_path / "dir.png", "is a directory")
    (tmp_path / "zero.jpg").write_bytes(b"")
    fails(tmp_path / "zero.jpg", "empty file")
    write_text(tmp_path / "text.jpg", "this is not an image\n")
    fails(tmp_path / "text.jpg", "not an image")
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    fails(tmp_path / "trunc.png", "cannot decode")
    Image.new("RGB", (100, 100)).save(tmp_path / "large.png")
    fails(tmp_path / "large.png", "too many pixels", max_pixels=5000)
    assert load_image(tmp_path / "large.png", max_pixels=10_000).size == (100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own bomb check
    fails(tmp_path / "large.png", "too many pixels", max_pixels=10**9)
    monkeypatch.undo()
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    fails(tmp_path / "loop_a", "symlink loop")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    fails(tmp_path / "dangling.png", "broken symlink")


def test_resize_center_crop() -> None:
    img = Image.new("RGB", (120, 60), (12, 200, 99))
    out = resize_center_crop(img, 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    assert (out[0] == 12).all() and (out[1] == 200).all() and (out[2] == 99).all()
    # Center crop: a wide image with a red left third and blue right third shows only the middle.
    arr = np.zeros((60, 180, 3), dtype=np.uint8)
    arr[:, :60] = (255, 0, 0)
    arr[:, 60:120] = (0, 255, 0)
    arr[:, 120:] = (0, 0, 255)
    out = resize_center_crop(Image.fromarray(arr), 16)
    inner = out[:, :, 2:-2]  # the resampling filter may blend the outermost columns
    assert (inner[1] == 255).all() and (inner[0] == 0).all() and (inner[2] == 0).all()
    assert (out[1] > 200).all()
    assert resize_center_crop(Image.new("RGB", (8, 8), (1, 2, 3)), 24).shape == (3, 24, 24)


def test_random_resized_crop_deterministic() -> None:
    arr = np.random.default_rng(1).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    a = random_resized_crop(img, 24, np.random.default_rng(5))
    b = random_resized_crop(img, 24, np.random.default_rng(5))
    c = random_resized_crop(img, 24, np.random.default_rng(6))
    assert a.shape == (3, 24, 24) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    solid = random_resized_crop(Image.new("RGB", (30, 200), (5, 6, 7)), 16, np.random.default_rng(0))
    assert (solid == np.array([5, 6, 7])[:, None, None]).all()


# --------------------------------------------------------------------------- dataset, synthetic


def test_dataset_workers_identical_and_shapes(tmp_path: Path) -> None:
    manifest = read_manifest(make_shapes(tmp_path / "shapes", n=24, size=40, seed=3))
    paths = manifest.images

    def collect(num_workers: int, train: bool, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        ds = ImageDataset(paths, 32, train=train, seed=7, epoch=epoch)
        loader = make_loader(ds, 5, shuffle=True, seed=11, num_workers=num_workers)
        idx, imgs = zip(*list(loader))
        return torch.cat(idx), torch.cat(imgs)

    i0, x0 = collect(0, train=True)
    i2, x2 = collect(2, train=True)
    assert x0.dtype == torch.uint8 and x0.shape == (24, 3, 32, 32)
    assert sorted(i0.tolist()) == list(range(24))
    assert torch.equal(i0, i2) and torch.equal(x0, x2)
    _, x_next = collect(0, train=True, epoch=1)
    assert not torch.equal(x0, x_next)

    ds = ImageDataset(paths, 32)
    index, tensor = ds[3]
    assert index == 3
    assert torch.equal(tensor, torch.from_numpy(resize_center_crop(load_image(paths[3]), 32)))
    ds.set_epoch(4)
    assert ds.epoch == 4

    bad = ImageDataset([tmp_path / "nope.png"], 16)
    with pytest.raises(ImageError, match="nope.png"):
        bad[0]


def test_file_digest(tmp_path: Path) -> None:
    a = write_text(tmp_path / "a.bin", "hello")
    b = write_text(tmp_path / "b.bin", "hello")
    c = write_text(tmp_path / "c.bin", "hellO")
    assert file_digest(a) == file_digest(b) != file_digest(c)
    assert len(file_digest(a)) == 32
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    import hashlib

    assert file_digest(big) == hashlib.blake2b(big.read_bytes(), digest_size=16).hexdigest()
    with pytest.raises(ImageError, match="missing.bin"):
        file_digest(tmp_path / "missing.bin")


def test_make_shapes(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    path = make_shapes(out, n=60, size=48, seed=1)
    m = read_manifest(path)
    assert len(m) == 60 and m.split_names() == ["test", "train", "val"]
    assert [m.splits.count(s) for s in ("train", "val", "test")] == [42, 9, 9]
    m.check_images_exist()
    specs, templates = read_labels_file(out / "labels.yaml")
    names = [s.name for s in specs]
    assert set(m.label_names()) <= set(names)
    assert {s.name for s in specs if not s.seen} == {"yellow"}
    assert templates and all("{}" in t for t in templates)
    y, known = m.targets(names)
    assert known.all() and (y.sum(axis=0) > 0).all()  # every label has an image

    colours = {"red", "green", "blue", "yellow"}
    kinds = {"circle", "square", "triangle"}
    for i in range(len(m)):
        labels = set(m.labels[i])
        assert labels & colours and labels & kinds
        # re-check colours from the pixels: every listed colour has a shape of that hue
        arr = np.asarray(load_image(m.images[i])).astype(int)
        r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
        seen = {
            "red": ((r > 150) & (g < 90) & (b < 90)).any(),
            "green": ((g > 110) & (r < 90) & (b < 110)).any(),
            "blue": ((b > 150) & (r < 90) & (g < 120)).any(),
            "yellow": ((r > 190) & (g > 160) & (b < 90)).any(),
        }
        assert {c for c, present in seen.items() if present} == labels & colours, (i, labels)

    # The same parameters: a no-op (files untouched); others: regenerated.
    mtime = path.stat().st_mtime_ns
    first = path.read_bytes()
    assert make_shapes(out, n=60, size=48, seed=1) == path
    assert path.stat().st_mtime_ns == mtime
    make_shapes(out, n=20, size=48, seed=2)
    assert len(read_manifest(path)) == 20 and path.read_bytes() != first
    assert len(list((out / "images").glob("*.png"))) == 20
    # Deterministic given the seed.
    other = make_shapes(tmp_path / "again", n=20, size=48, seed=2)
    assert other.read_bytes() == path.read_bytes()
    a = read_manifest(other)
    with Image.open(a.images[5]) as x, Image.open(out / "images" / a.images[5].name) as z:
        assert np.array_equal(np.asarray(x), np.asarray(z))


@pytest.mark.parametrize("kw,fragment", [({"n": 0}, "-n"), ({"n": 2.5}, "-n"), ({"size": 8}, "size")])
def test_make_shapes_bad_arguments(tmp_path: Path, kw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        make_shapes(tmp_path / "shapes", **kw)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "shapes").exists()


def test_manifest_repr_is_short(tmp_path: Path) -> None:
    m = read_manifest(WRITERS["m.csv"](tmp_path / "m.csv"), allow_outside=True)
    assert isinstance(m, Manifest) and len(repr(m)) < 200 and "rows=3" in repr(m)
