"""Bad input, made here: image files, manifests, configs and run artifacts that are broken,
hostile or odd. Each is either used correctly or refused with a one-line MumicError that
names the file (and line or key) and says what to do; nothing crashes, hangs, decodes a
decompression bomb, leaves the manifest's folder unasked, unpickles, or runs model code.

(Image cases already covered in test_data.py — empty file, text named .jpg, truncated PNG,
CMYK JPEG, palette + transparency, 16-bit grey, grey + alpha, EXIF rotation by size,
animated GIF, missing path, directory, symlink loop, broken symlink — are not repeated.)
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from mumic.config import load_config
from mumic.data.images import load_image, random_resized_crop, resize_center_crop
from mumic.data.labels import read_labels_file
from mumic.data.manifest import read_manifest
from mumic.errors import BackboneError, ConfigError, ImageError, ManifestError, MumicError, RunError

SRC = Path(__file__).resolve().parents[1] / "src" / "mumic"


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


# ============================================================================ images


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG written by hand: any header (even a lying one) and any pixel bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _png16(channels: int, colour_type: int, values: np.ndarray) -> bytes:
    """A 16-bit PNG (RGB, RGBA or grey + alpha) of the big-endian uint16 array [H, W, C]."""
    h, w, _ = values.shape
    rows = values.astype(">u2").reshape(h, w * channels)
    return _png(w, h, 16, colour_type, b"".join(b"\0" + r.tobytes() for r in rows))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _oriented(orientation: int) -> bytes:
    """A 40x20 JPEG with a red 8x8 block in its stored top-left corner and an EXIF orientation."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(arr), "JPEG", quality=100, exif=exif.tobytes())


def _palette() -> Image.Image:
    img = Image.new("P", (6, 6), 1)
    img.putpalette([0, 0, 0, 0, 90, 200] + [0] * 762)
    return img


def _red_at(img: Image.Image, x: int, y: int) -> bool:
    r, g, b = img.getpixel((x, y))
    return r > 200 and g < 60 and b < 60


@dataclass
class Case:
    """One bad input: `make(folder)` writes it and returns its path. `got` is what
    load_image must give: "RGB" (checked further by `check`, then put through both
    transforms) or an ImageError whose message contains `got`."""

    name: str
    make: Callable[[Path], Path | str]
    got: str
    check: Callable[[Image.Image], bool] | None = None
    before_decode: bool = False  # refused from the header alone: no decoder may run


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name
    return make


def _cut(name: str, data: bytes, keep: float) -> Callable[[Path], Path]:
    return _write(name, data[: int(len(data) * keep)])


def _flip_in_idat(data: bytes) -> bytes:
    out = bytearray(data)
    out[out.index(b"IDAT") + 12] ^= 0xFF
    return bytes(out)


def _fifo(folder: Path) -> Path:
    os.mkfifo(folder / "fifo.png")
    return folder / "fifo.png"


def _to_dev_zero(folder: Path) -> Path:
    os.symlink("/dev/zero", folder / "zero.png")
    return folder / "zero.png"


_RGB16 = np.stack([np.full((3, 4), v, np.uint16) for v in (65535, 32896, 0)], axis=-1)  # (255, 128, 0) in 8 bits
_JPEG = _save(_noise(64, 64), "JPEG", quality=90)
_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke showpage\n"

IMAGE_CASES = [
    Case("truncated JPEG (half)", _cut("half.jpg", _JPEG, 0.5), "truncated"),
    Case("truncated JPEG (header only)", _cut("head.jpg", _JPEG, 0.1), "truncated"),
    Case("truncated GIF", _cut("half.gif", _save(_noise(64, 64).convert("P"), "GIF"), 0.5), "truncated"),
    Case("truncated WebP", _cut("half.webp", _save(_noise(64, 64), "WEBP"), 0.5), "cannot decode"),
    Case("PNG with a flipped byte in its pixel data", _write("crc.png", _flip_in_idat(_save(_noise(16, 16), "PNG"))), "cannot decode"),
    Case("random bytes named .png", _write("random.png", np.random.default_rng(1).bytes(3000)), "not an image"),
    Case("PNG named .jpg", _write("png.jpg", _save(Image.new("RGB", (5, 4), (1, 2, 3)), "PNG")), "RGB",
         lambda im: im.size == (5, 4) and im.getpixel((2, 2)) == (1, 2, 3)),
    Case("palette PNG, no transparency", _write("pal.png", _save(_palette(), "PNG")), "RGB",
         lambda im: im.getpixel((3, 3)) == (0, 90, 200)),
    Case("16-bit RGB PNG", _write("rgb16.png", _png16(3, 2, _RGB16)), "RGB",
         lambda im: im.size == (4, 3) and im.getpixel((1, 1)) == (255, 128, 0)),
    Case("16-bit RGBA PNG, fully transparent", _write("rgba16.png", _png16(4, 6, np.zeros((3, 4, 4), np.uint16))), "RGB",
         lambda im: im.getpixel((0, 0)) == (255, 255, 255)),
    Case("16-bit grey + alpha PNG, opaque black",
         _write("la16.png", _png16(2, 4, np.stack([np.zeros((3, 4)), np.full((3, 4), 65535)], -1))), "RGB",
         lambda im: im.getpixel((0, 0)) == (0, 0, 0)),
    Case("EXIF orientation 3 (180°), checked by pixel", _write("o3.jpg", _oriented(3)), "RGB",
         lambda im: im.size == (40, 20) and _red_at(im, 37, 17) and not _red_at(im, 2, 2)),
    Case("EXIF orientation 8 (90° anticlockwise), checked by pixel", _write("o8.jpg", _oriented(8)), "RGB",
         lambda im: im.size == (20, 40) and _red_at(im, 2, 37) and not _red_at(im, 2, 2)),
    Case("1x1 image", _write("one.png", _save(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG")), "RGB",
         lambda im: im.size == (1, 1)),
    Case("20000x20 image", _write("wide.png", _save(Image.new("RGB", (20000, 20), (9, 8, 7)), "PNG")), "RGB",
         lambda im: im.size == (20000, 20)),
    Case("20x20000 JPEG", _write("tall.jpg", _save(Image.new("RGB", (20, 20000), (9, 8, 7)), "JPEG")), "RGB",
         lambda im: im.size == (20, 20000)),
    Case("bomb: PNG header 30000x30000 in 70 bytes", _write("bomb.png", _png(30000, 30000, 8, 2, b"\0" * 64)),
         "too many pixels", before_decode=True),
    Case("bomb: PNG header 10000x10000 (over our limit, under Pillow's error limit)",
         _write("bomb2.png", _png(10000, 10000, 8, 2, b"\0" * 64)), "too many pixels (10000x10000", before_decode=True),
    Case("bomb: GIF logical screen 65535x65535",
         _write("bomb.gif", b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\0\0\0,\0\0\0\0" + struct.pack("<HH", 65535, 65535)
                + b"\0\x02\x02D\x01\0;"), "too many pixels", before_decode=True),
    Case("EPS named .png (would run Ghostscript)", _write("doc.png", _EPS), "EPS files are not accepted", before_decode=True),
    Case("FIFO named .png (opening it would block)", _fifo, "not a regular file"),
    Case("symlink to /dev/zero", _to_dev_zero, "not a regular file"),
    Case("path with a NUL byte", lambda folder: str(folder / "a\x00b.png"), "NUL"),
    Case("path with a lone surrogate", lambda folder: str(folder / "a\ud800.png"), "invalid path"),
]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c.name for c in IMAGE_CASES])
def test_bad_image_corpus(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = case.make(tmp_path)
    decoded: list[str] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):  # any decoder run (and pixel buffer) goes through here
        decoded.append(self.format)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    if case.before_decode:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # our own check, not Pillow's, must refuse
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(load_image(path, size_hint=32 if str(path).endswith(".jpg") else None))
        except BaseException as e:  # reported below
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), f"{case.name}: load_image blocked"
    got = outcome[0]
    if case.got == "RGB":
        assert isinstance(got, Image.Image), f"{case.name}: {got!r}"
        assert got.mode == "RGB", got.mode
        if case.check is not None:
            assert case.check(got), case.name
        for out in (resize_center_crop(got, 32), random_resized_crop(got, 32, np.random.default_rng(0))):
            assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    else:
        assert isinstance(got, ImageError), f"{case.name}: {got!r}"
        msg = one_line(got)
        assert case.got in msg, msg
        assert Path(path).name.split("\x00")[0][:1] in msg and re.search(r"\.(png|jpg|gif|webp)", msg), msg  # names the file
        if case.before_decode:
            assert decoded == [], f"{case.name}: a decoder ran ({decoded})"


def test_bomb_is_refused_where_warnings_are_errors(tmp_path: Path) -> None:
    """Pillow warns (DecompressionBombWarning) before our own check runs; where warnings are
    errors (e.g. python -W error) that warning must still end as a clear ImageError."""
    import warnings

    path = tmp_path / "bomb.png"
    path.write_bytes(_png(10000, 10000, 8, 2, b"\0" * 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match=r"bomb\.png: too many pixels \(100,000,000 pixels, over the decompression-bomb limit"):
            load_image(path)


def test_resize_keeps_a_square_for_extreme_shapes() -> None:
    """No crop box of zero width for 1-pixel sides, at any output size."""
    for size in ((1, 1), (20000, 20), (20000, 1), (1, 20000), (3, 2)):
        img = Image.new("RGB", size, (1, 2, 3))
        for s in (1, 7, 224):
            assert resize_center_crop(img, s).shape == (3, s, s)
            assert random_resized_crop(img, s, np.random.default_rng(1)).shape == (3, s, s)


# ============================================================================ manifests


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def manifest_error(path: Path, fragment: str, line: int | None = None, **kw) -> str:
    with pytest.raises(ManifestError) as info:
        read_manifest(path, **kw)
    msg = one_line(info.value)
    assert path.name in msg, msg
    if line is not None:
        assert f"line {line}:" in msg, msg
    assert fragment in msg, msg
    return msg


@pytest.mark.parametrize("image", ["../x.png", "sub/../../x.png", "/elsewhere/x.png", "~/x.png"])
def test_paths_outside_the_manifest_folder_need_the_flag(tmp_path: Path, image: str) -> None:
    m = write(tmp_path / "data" / "m.csv", f"image,labels\nok.png,cat\n{image},dog\n")
    msg = manifest_error(m, "outside the manifest's folder", line=3)
    assert repr(image) in msg and "allow_outside_paths: true" in msg and "--allow-outside-paths" in msg
    got = read_manifest(m, allow_outside=True)
    assert got.images[1] == Path(os.path.normpath(os.path.join(tmp_path / "data", os.path.expanduser(image))))


def test_paths_inside_the_folder_stay_allowed(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (tmp_path / "elsewhere").mkdir()
    folder.mkdir()
    os.symlink(tmp_path / "elsewhere", folder / "linked")  # by name, a link inside is inside
    rows = [str(folder / "abs.png"), "sub/../a.png", "./b.png", "linked/c.png", "deep/er/d.png"]
    m = write(folder / "m.jsonl", "".join(json.dumps({"image": r, "labels": ["cat"]}) + "\n" for r in rows))
    got = read_manifest(m)
    assert got.images == [folder / "abs.png", folder / "a.png", folder / "b.png", folder / "linked" / "c.png", folder / "deep/er/d.png"]
    # a manifest given by a relative path that climbs (../data/m.jsonl) is still its own folder
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "elsewhere")
        assert read_manifest(Path("..") / "data" / "m.jsonl").images == got.images
    finally:
        os.chdir(cwd)


def test_exact_duplicate_rows_are_an_error_naming_both_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # the same row, spelled differently: ./a.png and a.png, labels in another order
    m = write(tmp_path / "m.csv", "image,labels,note\na.png,cat|dog,x\nb.png,cat,x\n./a.png,dog|cat,x\n")
    msg = manifest_error(m, "duplicate of line 2", line=4)
    assert "allow_duplicate_rows: true" in msg and "--allow-duplicate-rows" in msg
    with caplog.at_level("WARNING"):
        kept = read_manifest(m, allow_duplicates=True)
    assert len(kept) == 3 and "repeat an earlier row exactly" in caplog.text
    # not exact duplicates: another label, another split, another value in an extra column
    caplog.clear()
    other = write(tmp_path / "o.csv",
                  "image,labels,split,note\na.png,cat,train,x\na.png,dog,train,x\na.png,cat,test,x\na.png,cat,train,y\n")
    with caplog.at_level("WARNING"):
        assert len(read_manifest(other)) == 4
    assert "3 row(s) name an image that an earlier row also names" in caplog.text
    pq = tmp_path / "d.parquet"
    pd.DataFrame([{"image": "a.png", "labels": ["cat"]}, {"image": "a.png", "labels": ["cat"]}]).to_parquet(pq)
    manifest_error(pq, "row 2: duplicate of row 1")
    # without labels (prediction inputs), the same image twice is a duplicate too
    manifest_error(write(tmp_path / "p.csv", "image\na.png\nb.png\na.png\n"), "duplicate of line 2", line=4, require_labels=False)


@pytest.mark.parametrize(
    "name,text,line,fragment",
    [
        ("nul.jsonl", '{"image": "a.png", "labels": ["cat"]}\n{"image": "b\\u0000.png", "labels": ["cat"]}\n', 2, "NUL"),
        ("surrogate.jsonl", '{"image": "a\\ud800.png", "labels": ["cat"]}\n', 1, "lone surrogate"),
        ("label_surrogate.jsonl", '{"image": "a.png", "labels": ["c\\udc00t"]}\n', 1, "lone surrogate"),
        ("deep.jsonl", '{"image": "a.png", "labels": ' + "[" * 100_000 + "]" * 100_000 + "}\n", 1, "invalid JSON"),
        ("bigint.jsonl", '{"image": "a.png", "labels": ["cat"], "n": ' + "9" * 5000 + "}\n", 1, "invalid JSON"),
        ("ws.csv", "image,labels\na.png,cat\nb.png,  |  \n", 3, "empty label"),
        ("split.jsonl", '{"image": "a.png", "labels": ["cat"], "split": "tr\\u0000ain"}\n', 1, "NUL"),
    ],
)
def test_odd_text_in_manifests(tmp_path: Path, name: str, text: str, line: int, fragment: str) -> None:
    manifest_error(write(tmp_path / name, text), fragment, line=line)


def test_jsonl_lines_are_split_at_newlines_only(tmp_path: Path) -> None:
    # U+2028 and U+0085 are valid inside JSON strings; str.splitlines() would cut there
    rows = [{"image": "a.png", "labels": ["cat"], "note": "one\u2028two\x85three"}, {"image": "b.png", "labels": []}]
    m = write(tmp_path / "m.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    manifest_error(m, "empty label list", line=2, allow_untagged=False)
    assert read_manifest(m, require_labels=False).frame["note"][0] == "one\u2028two\x85three"


def test_labels_file_nested_too_deeply(tmp_path: Path) -> None:
    for name, text in (("deep.json", "[" * 100_000 + "]" * 100_000), ("deep.yaml", "[" * 5000 + "]" * 5000)):
        with pytest.raises(ManifestError, match=re.escape(name)) as info:
            read_labels_file(write(tmp_path / name, text))
        one_line(info.value)


# --------------------------------------------------------------------------- property-based

_CELL = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(list(',"|\t\r\n\\ \x00\u2028')), max_size=12)
_PLAUSIBLE = st.sampled_from([
    "a.png", "b.png", "sub/c.png", "./a.png", "../up.png", "/abs/x.png", "~/h.png", "a\x00.png",
    "cat", "dog", "cat|dog", "dog| cat", "cat||dog", " | ", "", "  ", "train", "val", "test",
])
_VALUE = _PLAUSIBLE | _PLAUSIBLE | _CELL  # mostly plausible, so that many files parse and reach the later checks
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _VALUE | st.sampled_from(["\ud800", "a\udc00", "\ud83d\ude00"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_CELL, inner, max_size=3),
    max_leaves=8,
)
_ODD = st.sampled_from(["a\ud800.png", "\udc00", ["cat", "d\ud83dg"], "\ud83d\ude00", 12, None, True, {"a": 1}, ["x", ["y"]]])
_BASE_COLUMNS = st.sampled_from(
    [["image", "labels"], ["image"], ["image", "labels", "split"], ["labels", "image", "negatives", "split"], []])
_EXTRA_COLUMNS = st.lists(st.sampled_from(["note", "image", "labels", "", " image", "split"]) | _CELL, max_size=2)


@st.composite
def _manifest_file(draw) -> tuple[str, bytes]:
    """Random bytes, or CSV / TSV / JSONL text with random columns, values, quotes, newlines
    and Unicode, biased towards files that parse far enough to reach the row checks."""
    kind = draw(st.sampled_from(["bytes", "csv", "tsv", "jsonl", "jsonl"]))
    if kind == "bytes":
        return draw(st.sampled_from(["m.csv", "m.tsv", "m.jsonl", "m.parquet"])), draw(st.binary(max_size=400))
    columns = draw(_BASE_COLUMNS) + draw(_EXTRA_COLUMNS)
    n = len(columns)
    row = st.lists(_VALUE, min_size=n, max_size=n) if n else st.just([])
    rows = draw(st.lists(row | st.lists(_VALUE, max_size=n + 1), min_size=1, max_size=6))
    if kind == "jsonl":
        lines = []
        for values in rows:
            record = {}
            for c, v in zip(columns, values):
                pick = draw(st.integers(0, 5))
                record[c] = v if pick < 2 else v.split("|") if pick < 4 else draw(_ODD) if pick < 5 else draw(_JSON)
            lines.append(json.dumps(record, ensure_ascii=draw(st.integers(0, 3)) > 0) if draw(st.integers(0, 9)) else draw(_CELL))
        return "m.jsonl", "\n".join(lines).encode("utf-8", "surrogatepass")
    sep = "," if kind == "csv" else "\t"
    buf = io.StringIO()
    if draw(st.booleans()):
        writer = csv.writer(buf, delimiter=sep, quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])))
        writer.writerow(columns)
        writer.writerows(rows)
    else:  # hand-joined: unbalanced quotes, stray separators and newlines stay in
        buf.write("\n".join(sep.join(r) for r in [columns, *rows]))
    return f"m.{kind}", buf.getvalue().encode("utf-8", "surrogatepass")


@given(case=_manifest_file(), flags=st.tuples(st.booleans(), st.booleans(), st.booleans()))
@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_generated_manifests_parse_or_raise_a_mumic_error(tmp_path_factory, case, flags) -> None:
    name, data = case
    folder = tmp_path_factory.getbasetemp() / "generated"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    require_labels, allow_outside, allow_duplicates = flags
    try:
        m = read_manifest(path, require_labels=require_labels, allow_outside=allow_outside, allow_duplicates=allow_duplicates)
    except MumicError as e:
        one_line(e)
        return
    names = m.label_names()
    y, known = m.targets(names)
    assert y.shape == known.shape == (len(m), len(names))
    assert len(m.frame) == len(m.images) == len(m.lines)
    folder_abs = os.path.normpath(folder.absolute())
    assert allow_outside or all(str(p) == folder_abs or str(p).startswith(folder_abs + os.sep) for p in m.images)


# ============================================================================ configs


@pytest.mark.parametrize(
    "text,line,fragment",
    [
        ("epochs: 3\nlr_hed: 0.1\n", 2, "unknown key 'lr_hed' (did you mean 'lr_head'?)"),
        ("epochs: 3\ncolour: red\n", 2, "unknown key 'colour' (remove it"),
        ("seed: 1\n\nepochs: many\n", 3, "key 'epochs' must be an integer, got 'many'"),
        ("batch_size: [1, 2]\n", 1, "key 'batch_size' must be an integer"),
        ("manifest: {a: 1}\n", 1, "key 'manifest' must be a string"),
        ("allow_outside_paths: sometimes\n", 1, "key 'allow_outside_paths' must be true or false"),
        ("epochs: 3\nseed: 1\nepochs: 4\n", 3, "key 'epochs' is given twice (first on line 1)"),
        ("epochs: 3\nloss: [tempered_sigmoid\n", 3, "not valid YAML"),
        ("epochs: !!python/object/apply:os.system ['echo pwned']\n", 1, "not valid YAML"),
    ],
)
def test_bad_config_names_file_line_key_and_fix(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    p = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = one_line(info.value)
    assert msg.startswith(f"{p} line {line}:"), msg
    assert fragment in msg, msg


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"epochs: 3\ntemplates: ['une photo d\xe9j\xe0 {}']\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml line 2: not valid UTF-8 \(byte 0xe9\); save the file as UTF-8"):
        load_config(p)


def test_config_flags_for_outside_paths_and_duplicates(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "c.yaml", "allow_outside_paths: true\n"), {"allow_duplicate_rows": "yes"})
    assert cfg.allow_outside_paths is True and cfg.allow_duplicate_rows is True
    assert load_config().allow_outside_paths is False and load_config().allow_duplicate_rows is False


# ============================================================================ run artifacts


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, tiny_clip_dir):
    from mumic.data.synthetic import make_shapes
    from mumic.train import fit

    tmp = tmp_path_factory.mktemp("reliability_run")
    shapes = make_shapes(tmp / "shapes", n=40, size=48, seed=3).parent
    cfg = load_config(overrides={
        "manifest": str(shapes / "manifest.csv"), "labels_file": str(shapes / "labels.yaml"), "out": str(tmp / "run"),
        "cache_dir": str(tmp / "cache"), "backbone": f"hf:{tiny_clip_dir}", "batch_size": 16, "eval_every": 2,
        "max_steps": 2, "warmup_steps": 1, "patience": 100, "majority_n": 3,
    })
    return fit(cfg, progress=False)


@pytest.fixture
def run_copy(good_run, tmp_path):
    return Path(shutil.copytree(good_run, tmp_path / "run"))


def load_run(run: Path):
    from mumic.predictor import Predictor

    return Predictor.from_run(run, device="cpu")


def run_error(run: Path, fragment: str, cls: type = RunError) -> str:
    with pytest.raises(cls) as info:
        load_run(run)
    msg = one_line(info.value)
    assert fragment in msg, msg
    return msg


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def _rewrite(run: Path, state: dict[str, torch.Tensor]) -> None:
    """Write weights with a valid digest, so that only the checks of their content can refuse them."""
    from mumic.io import save_tensors

    save_tensors(run / "model.safetensors", state)


def test_the_good_run_loads(good_run) -> None:
    assert load_run(good_run).labels


@pytest.mark.parametrize("name", ["model.pt", "extra.pkl", "EVIL.PTH", "opt.pickle", "weights.bin"])
def test_a_run_with_a_pickle_file_is_refused(run_copy: Path, name: str) -> None:
    (run_copy / name).write_bytes(b"\x80\x04K\x01.")  # a pickle of the int 1
    msg = run_error(run_copy, "holds pickle files")
    assert name in msg and "remove them" in msg


def _truncate(run: Path) -> None:
    p = run / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])


def _garbage_header(run: Path) -> None:
    p = run / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:40] = b"#" * 32
    p.write_bytes(bytes(data))


def _huge_header_length(run: Path) -> None:
    p = run / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 2**62) + p.read_bytes()[8:])


def _flip_body_byte(run: Path) -> None:
    p = run / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01  # a float in the last tensor: still a valid file
    p.write_bytes(bytes(data))


def _wrong_shape(run: Path) -> None:
    state = _weights(run)
    state["log_inv_tau"] = torch.zeros(3)
    _rewrite(run, state)


def _extra_unknown_key(run: Path) -> None:
    _rewrite(run, {**_weights(run), "evil": torch.zeros(1)})


def _extra_frozen_backbone_key(run: Path) -> None:
    # a real parameter of the frozen backbone: the run must not overwrite pretrained weights
    model = load_run(run)
    key = next(k for k in model.state_dict() if k.startswith("backbone.") and k not in model.trained_state())
    _rewrite(run, {**_weights(run), key: model.state_dict()[key].clone()})


def _missing_key(run: Path) -> None:
    state = _weights(run)
    state.pop("log_inv_tau")
    _rewrite(run, state)


def _nan_values(run: Path) -> None:
    state = _weights(run)
    state["log_inv_tau"] = torch.tensor(float("nan"))
    _rewrite(run, state)


def _integer_dtype(run: Path) -> None:
    state = _weights(run)
    state["log_inv_tau"] = state["log_inv_tau"].to(torch.int64)
    _rewrite(run, state)


@pytest.mark.parametrize(
    "tamper,fragment",
    [
        (_truncate, "not a readable safetensors file"),
        (_garbage_header, "not a readable safetensors file"),
        (_huge_header_length, "not a readable safetensors file"),
        (_flip_body_byte, "do not match the sha256 recorded"),
        (_wrong_shape, "'log_inv_tau' has shape (3,), the model expects ()"),
        (_extra_unknown_key, "unexpected keys ['evil']"),
        (_extra_frozen_backbone_key, "unexpected keys ['backbone."),
        (_missing_key, "missing keys ['log_inv_tau']"),
        (_nan_values, "NaN or infinite"),
        (_integer_dtype, "has dtype torch.int64"),
    ],
    ids=lambda x: x.__name__.strip("_") if callable(x) else None,
)
def test_tampered_weights_are_refused(run_copy: Path, tamper, fragment: str) -> None:
    tamper(run_copy)
    msg = run_error(run_copy, fragment)
    assert "model.safetensors" in msg


def test_weights_without_a_digest_still_load(run_copy: Path) -> None:
    """Files written by other tools (or before digests) carry none: they are read as they are."""
    from safetensors.torch import save_file

    state = _weights(run_copy)
    save_file(state, str(run_copy / "model.safetensors"), metadata={"format": "mumic-run-1"})
    model = load_run(run_copy)
    assert torch.equal(model.state_dict()["log_inv_tau"], state["log_inv_tau"])


def _edit_labels(run: Path, edit) -> None:
    p = run / "labels.json"
    meta = json.loads(p.read_text())
    out = edit(meta)
    p.write_text(out if isinstance(out, str) else json.dumps(meta if out is None else out))


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda m: '{"labels": [', "line 1: not valid JSON"),
        (lambda m: "[" * 100_000 + "]" * 100_000, "not valid JSON"),
        (lambda m: [m], "expected a JSON object, got list"),
        (lambda m: m.pop("labels") and None, "the key 'labels' is missing"),
        (lambda m: m.update(labels=[]), "'labels' must be a non-empty list"),
        (lambda m: m["labels"][0].pop("name") and None, "label #1 has no name"),
        (lambda m: m["labels"][0].update(seen="yes"), "'seen' must be true or false"),
        (lambda m: m["labels"][0].update(prompts="a photo"), "'prompts' must be a list of strings"),
        (lambda m: m["labels"].append(dict(m["labels"][0])), "duplicate label names"),
        (lambda m: m.update(templates=[1, 2]), "'templates' must be a list of strings"),
        (lambda m: m["model"]["backbone"].update(trust_remote_code=True), "found trust_remote_code"),
        (lambda m: m["model"].update(backbone="hf:x"), "'model' must be an object with a 'backbone' object"),
        (lambda m: m["model"].update(tau="hot"), "'model.tau' must be a finite number"),
        (lambda m: m["model"].update(tau=-1), "'model.tau' must be > 0"),
        (lambda m: m.update(format="mumic-run-9"), "written by another version of mumic"),
    ],
)
def test_malformed_labels_json_is_a_run_error(run_copy: Path, edit, fragment: str) -> None:
    _edit_labels(run_copy, edit)
    msg = run_error(run_copy, fragment)
    assert "labels.json" in msg


@pytest.mark.parametrize(
    "thresholds,fragment",
    [
        ({"per_label": [0.5], "default": 0.5}, "'per_label' must map label names to numbers in [0, 1]"),
        ({"per_label": {"red": 7}, "default": 0.5}, "'per_label' must map label names to numbers in [0, 1]"),
        ({"per_label": {}, "default": "half"}, "'default' must be a number in [0, 1]"),
        ({"per_label": {}}, "expected keys per_label and default"),
    ],
)
def test_malformed_thresholds_are_a_run_error(run_copy: Path, thresholds, fragment: str) -> None:
    (run_copy / "thresholds.json").write_text(json.dumps(thresholds))
    msg = run_error(run_copy, fragment)
    assert "thresholds.json" in msg


def test_run_config_is_read_with_the_safe_loader(run_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cfg = run_copy / "config.yaml"
    text = cfg.read_text()
    assert "\nseed: " in text  # replaced, not given twice (a key given twice is refused before any tag is built)
    cfg.write_text(re.sub(r"(?m)^seed: .*$", f"seed: !!python/object/apply:os.system ['touch {marker}']", text))
    msg = run_error(run_copy, "not valid YAML", ConfigError)
    assert "config.yaml" in msg and not marker.exists()


# ============================================================================ the hf: backbone never runs model code


def _model_copy(src: Path, dst: Path, config_edit=None, tokenizer_edit=None) -> Path:
    shutil.copytree(src, dst)
    for name, edit in (("config.json", config_edit), ("tokenizer_config.json", tokenizer_edit)):
        if edit is not None:
            data = json.loads((dst / name).read_text())
            edit(data)
            (dst / name).write_text(json.dumps(data))
    return dst


def _backbone_error(folder: Path, fragment: str) -> str:
    from mumic.backbones import load_backbone

    with pytest.raises(BackboneError) as info:
        load_backbone(f"hf:{folder}")
    msg = one_line(info.value)
    assert fragment in msg, msg
    return msg


def test_hf_folder_asking_for_custom_code_is_refused(tiny_clip_dir: Path, tmp_path: Path) -> None:
    auto_map = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "configuration_evil.EvilConfig"}
    (code := tmp_path / "payload.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    # a CLIP config that also names custom code
    clip = _model_copy(tiny_clip_dir, tmp_path / "clip_auto_map", lambda c: c.update(auto_map=auto_map))
    shutil.copy(code, clip / "modeling_evil.py")
    shutil.copy(code, clip / "configuration_evil.py")
    assert "config.json asks for code from the model folder (auto_map" in _backbone_error(clip, "never runs model code")
    # a custom model type with its code
    custom = _model_copy(tiny_clip_dir, tmp_path / "custom_type", lambda c: c.update(model_type="evil", auto_map=auto_map))
    shutil.copy(code, custom / "configuration_evil.py")
    _backbone_error(custom, "auto_map")
    # a custom model type alone
    _backbone_error(_model_copy(tiny_clip_dir, tmp_path / "custom_only", lambda c: c.update(model_type="evil")),
                    "model_type 'evil'; supported model types: clip, siglip")
    # a tokenizer that names custom code
    tok = _model_copy(tiny_clip_dir, tmp_path / "tok", tokenizer_edit=lambda c: c.update(auto_map={"AutoTokenizer": ["tok_evil.T", None]}))
    assert "tokenizer_config.json" in _backbone_error(tok, "auto_map")
    assert not (tmp_path / "ran").exists()


def test_hf_folder_with_pickled_weights_only_is_refused(tiny_clip_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = shutil.copytree(tiny_clip_dir, tmp_path / "bin_only")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert "pytorch_model.bin" in _backbone_error(folder, "mumic loads safetensors only")


def test_source_never_enables_remote_code() -> None:
    """No transformers call in mumic may pass trust_remote_code other than False, and every
    from_pretrained of the hf: adapter passes it explicitly (so transformers never asks)."""
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"trust_remote_code\s*=\s*(\w+)", text):
            assert m.group(1) == "False", f"{path}: trust_remote_code={m.group(1)}"
    hf = (SRC / "backbones" / "hf.py").read_text(encoding="utf-8")
    calls = dict(re.findall(r"(\w+)\.from_pretrained\((.*?)\)\n", hf, flags=re.S))
    assert set(calls) == {"AutoConfig", "model_cls", "AutoTokenizer"}, calls
    assert all("trust_remote_code=False" in args for args in calls.values()), calls
    assert "use_safetensors=True" in calls["model_cls"]  # weights from safetensors only, never a pickle
