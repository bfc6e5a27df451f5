"""Tests of the EmojiTags builder on tiny tarballs with the real packages' layouts."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import stat
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mumic.data import emoji as E
from mumic.data.emoji import sources as S
from mumic.data.labels import read_labels_file
from mumic.data.manifest import read_manifest
from mumic.errors import ConfigError, MumicError

SKIN = "1F3FB"
# hexcode (as emojibase writes it), name, tags, datasource "unified", openmoji file stem;
# None: no artwork in that source.
FIXTURE_EMOJI = [
    ("1F600", "grinning face", ["face", "grin", "happy", "smile"], "1F600", "1F600"),
    ("1F603", "grinning face with big eyes", ["face", "happy", "mouth", "smile"], "1F603", "1F603"),
    ("1F431", "cat face", ["animal", "cat", "face", "pet"], "1F431", "1F431"),
    ("1F408", "cat", ["animal", "cat", "pet"], "1F408", "1F408"),
    ("1F436", "dog face", ["animal", "dog", "face", "pet"], "1F436", "1F436"),
    ("1F415", "dog", ["animal", "dog", "pet"], "1F415", "1F415"),
    ("1F42D", "mouse face", ["animal", "face", "mouse"], "1F42D", "1F42D"),
    ("1F401", "mouse", ["animal", "mouse"], "1F401", "1F401"),
    # FE0F: emojibase without it, emoji-datasource with it (image name lower case).
    ("2764", "red heart", ["heart", "love", "red"], "2764-FE0F", "2764"),
    ("1F496", "sparkling heart", ["heart", "love", "Sparkle "], "1F496", "1F496"),
    # FE0F the other way round: emojibase with it, OpenMoji without it.
    ("1F3F3-FE0F-200D-1F308", "rainbow flag", ["flag", "pride", "rainbow"],
     "1F3F3-FE0F-200D-1F308", "1F3F3-200D-1F308"),
    ("1F1FA-1F1F8", "flag: United States", ["US", "flag"], "1F1FA-1F1F8", "1F1FA-1F1F8"),
    ("2600", "sun", ["bright", "sun", "weather"], "2600-FE0F", "2600"),
    ("1F31E", "sun with face", ["face", "sun", "weather"], "1F31E", "1F31E"),
    ("1F44B", "waving hand", ["hand", "wave", "a|b"], "1F44B", "1F44B"),
    ("1F44F", "clapping hands", ["hand", "clap", "a|b"], "1F44F", "1F44F"),
    # Only in OpenMoji (newer than the emoji-datasource release).
    ("1FACD", "orca", ["animal", "whale"], None, "1FACD"),
    # No tag that is on two emoji: dropped.
    ("1F9FF", "nazar amulet", ["amulet", "charm"], "1F9FF", "1F9FF"),
]
SKIN_PARENTS = {"1F44B", "1F44F"}
MIN_COUNT = 2
EXPECTED_LABELS = sorted(
    ["animal", "cat", "dog", "face", "flag", "hand", "happy", "heart", "love", "mouse", "pet", "smile",
     "sun", "weather"]
)  # "a|b" is frequent but has the separator; "us" and "sparkle" are on one emoji only
DROPPED = {"1F9FF"}
STYLES = ("google", "twitter", "openmoji")


def colour(style: str, hexcode: str) -> tuple[int, int, int]:
    """A distinct colour for each (style, artwork), so tests can tell which file was used."""
    d = hashlib.sha256(f"{style}:{hexcode.upper()}".encode()).digest()
    return (30 + d[0] % 190, 30 + d[1] % 190, 30 + d[2] % 190)


def png_bytes(rgb: tuple[int, int, int], side: int = 64) -> bytes:
    """A square of ``rgb`` in the middle of a fully transparent (black, alpha 0) canvas."""
    img = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    q = side // 4
    img.paste(Image.new("RGBA", (side - 2 * q, side - 2 * q), (*rgb, 255)), (q, q))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def svg_bytes(rgb: tuple[int, int, int]) -> bytes:
    """An OpenMoji-like 72x72 SVG: a square of ``rgb``, transparent elsewhere."""
    fill = "#{:02x}{:02x}{:02x}".format(*rgb)
    return (
        '<svg id="emoji" viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg">\n'
        f'  <g id="color"><rect x="18" y="18" width="36" height="36" fill="{fill}"/></g>\n'
        "</svg>\n"
    ).encode()


def write_tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def make_tarballs(folder: Path) -> dict[str, Path]:
    """The four source tarballs, with the real packages' member paths and JSON layouts."""
    folder.mkdir(parents=True, exist_ok=True)

    def pkg(key: str) -> bytes:
        return json.dumps({"name": E.SOURCES[key].package, "version": E.SOURCES[key].version}).encode()

    # emojibase-data: en/data.json, skin tones nested under "skins", components in group 2.
    data = []
    for order, (hexcode, name, tags, _, _) in enumerate(FIXTURE_EMOJI, start=1):
        entry = {"label": name, "hexcode": hexcode, "tags": tags, "emoji": "?", "text": "", "type": 1,
                 "order": order, "group": 0, "subgroup": 1, "version": 1}
        if hexcode in SKIN_PARENTS:
            entry["skins"] = [{"label": f"{name}: light skin tone", "hexcode": f"{hexcode}-{SKIN}", "emoji": "?",
                               "text": "", "type": 1, "order": order, "group": 0, "subgroup": 1, "version": 1,
                               "tone": 1}]
        data.append(entry)
    data.append({"label": "light skin tone", "hexcode": SKIN, "tags": ["light", "skin", "tone", "hand"],
                 "emoji": "?", "text": "", "type": 1, "order": 999, "group": 2, "subgroup": 1, "version": 1})
    data.append({"label": "regional indicator A", "hexcode": "1F1E6", "emoji": "?", "text": "", "type": 1,
                 "version": 0})
    paths = {
        "emojibase": write_tgz(folder / E.SOURCES["emojibase"].filename, {
            "package/package.json": pkg("emojibase"),
            "package/LICENSE": b"MIT License\n",
            "package/en/data.json": json.dumps(data).encode(),
            "package/en/compact.json": b"[]",
        })
    }

    # emoji-datasource-<style>: emoji.json + img/<style>/64/<image>; skin tones nested.
    for style in ("google", "twitter"):
        index, images = [], {}
        for _, name, _, unified, _ in FIXTURE_EMOJI + [(SKIN, "skin", [], SKIN, None)]:
            if unified is None:
                continue
            image = f"{unified.lower()}.png"
            entry = {"name": name.upper(), "unified": unified,
                     "non_qualified": unified.replace("-FE0F", "") if "FE0F" in unified else None,
                     "image": image, "sheet_x": 0, "sheet_y": 0, "short_name": name, "short_names": [name],
                     "category": "Smileys & Emotion", "sort_order": len(index), "added_in": "1.0",
                     "has_img_apple": True, "has_img_google": True, "has_img_twitter": True,
                     "has_img_facebook": False}
            images[f"package/img/{style}/64/{image}"] = png_bytes(colour(style, unified))
            if unified in SKIN_PARENTS:
                tone = f"{unified}-{SKIN}"
                entry["skin_variations"] = {SKIN: {"unified": tone, "non_qualified": None,
                                                   "image": f"{tone.lower()}.png", "has_img_google": True,
                                                   "has_img_twitter": True}}
                images[f"package/img/{style}/64/{tone.lower()}.png"] = png_bytes(colour(style, tone))
            index.append(entry)
        paths[style] = write_tgz(folder / E.SOURCES[style].filename, {
            "package/package.json": pkg(style),
            "package/LICENSE": b"The MIT License (MIT)\n",
            "package/emoji.json": json.dumps(index).encode(),
            **images,
            f"package/img/{style}/sheets/64.png": png_bytes((1, 2, 3), 128),
        })

    # openmoji: color/svg/<HEXCODE>.svg (+ black/svg, data/openmoji.json with the artists).
    members = {"package/package.json": pkg("openmoji"), "package/LICENSE.txt": b"CC BY-SA 4.0\n"}
    om = []
    for hexcode, name, _, _, stem in FIXTURE_EMOJI:
        members[f"package/color/svg/{stem}.svg"] = svg_bytes(colour("openmoji", stem))
        members[f"package/black/svg/{stem}.svg"] = svg_bytes((0, 0, 0))
        om.append({"emoji": "?", "hexcode": stem, "annotation": name, "openmoji_author": f"Artist {stem[-2:]}"})
        if hexcode in SKIN_PARENTS:
            members[f"package/color/svg/{hexcode}-{SKIN}.svg"] = svg_bytes(colour("openmoji", f"{hexcode}-{SKIN}"))
    members[f"package/color/svg/{SKIN}.svg"] = svg_bytes((9, 9, 9))
    members["package/data/openmoji.json"] = json.dumps(om).encode()
    members["../outside.svg"] = svg_bytes((5, 5, 5))  # an unsafe member: must be ignored
    paths["openmoji"] = write_tgz(folder / E.SOURCES["openmoji"].filename, members)
    return paths


@pytest.fixture
def tarballs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the four fixture tarballs; the pinned integrity constants point at them."""
    folder = tmp_path / "tarballs"
    for key, path in make_tarballs(folder).items():
        monkeypatch.setitem(E.SOURCES, key, dataclasses.replace(E.SOURCES[key], integrity=E.integrity_of(path)))
    return folder


def build(out: Path, tarballs: Path, **kw) -> Path:
    kw.setdefault("min_count", MIN_COUNT)
    return E.build_emoji(out, from_dir=tarballs, progress=False, **kw)


def read_rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def mtimes(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file's (mtime, inode): a file rewritten, even atomically, changes one of them."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- the build


def test_build_from_fixture_tarballs(tmp_path: Path, tarballs: Path) -> None:
    out = tmp_path / "emoji"
    manifest = build(out, tarballs, size=32)
    assert manifest == out / "manifest.csv"
    rows = read_rows(manifest)
    assert list(rows[0]) == ["image", "labels", "split", "style", "hexcode", "name"]

    # One row per (kept emoji, style with artwork); the orca only in OpenMoji.
    kept = [e for e in FIXTURE_EMOJI if e[0] not in DROPPED]
    expected = {(h, s) for h, _, _, uni, _ in kept for s in STYLES if s == "openmoji" or uni is not None}
    assert {(r["hexcode"], r["style"]) for r in rows} == expected
    assert len(rows) == len(expected) == 3 * len(kept) - 2
    for r in rows:
        assert r["image"] == f"images/{r['style']}/{r['hexcode']}.png"
        assert r["name"] == {h: n for h, n, *_ in FIXTURE_EMOJI}[r["hexcode"]]

    # Labels: lower-cased, stripped tags on >= MIN_COUNT emoji, without '|'.
    specs, templates = read_labels_file(out / "labels.yaml")
    assert [s.name for s in specs] == EXPECTED_LABELS
    assert templates and all("{}" in t for t in templates)
    by_hex = {r["hexcode"]: r["labels"].split("|") for r in rows}
    assert by_hex["1F431"] == ["animal", "cat", "face", "pet"]
    assert by_hex["1F1FA-1F1F8"] == ["flag"]  # "US" -> "us", on one emoji only
    assert by_hex["1F44B"] == ["hand"]  # "a|b" left out
    assert all(set(labels) <= set(EXPECTED_LABELS) for labels in by_hex.values())

    # The package's own readers accept the output.
    m = read_manifest(manifest)
    assert len(m) == len(rows)
    m.check_images_exist()
    assert set(m.label_names()) <= set(EXPECTED_LABELS)
    assert set(m.split_names()) <= {"train", "val", "test"} and "train" in m.split_names()

    # Splits are by emoji: every style of one emoji is in the same split.
    split_of: dict[str, set[str]] = {}
    for r in rows:
        split_of.setdefault(r["hexcode"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())

    # Unseen labels: a quarter, marked seen: false, still in the manifest's labels.
    unseen = sorted(s.name for s in specs if not s.seen)
    assert len(unseen) == math.floor(0.25 * len(EXPECTED_LABELS) + 0.5) == 4
    doc = yaml.safe_load((out / "labels.yaml").read_text(encoding="utf-8"))
    assert doc["labels"]["animal"] in ({"seen": True}, {"seen": False})
    assert set(unseen) <= {t for labels in by_hex.values() for t in labels}

    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["unseen_labels"] == unseen
    assert stats["labels"] == len(EXPECTED_LABELS)
    assert stats["emoji"] == len(kept)
    assert stats["per_style"] == {"google": len(kept) - 1, "twitter": len(kept) - 1, "openmoji": len(kept)}
    assert stats["dropped"]["no_label"] == 1 and stats["dropped"]["no_label_hexcodes"] == ["1F9FF"]
    assert stats["dropped"]["tags_with_separator"] == ["a|b"]
    assert sum(v["images"] for v in stats["per_split"].values()) == len(rows)
    split_counts = Counter(next(iter(s)) for s in split_of.values())
    assert {k: v["emoji"] for k, v in stats["per_split"].items()} == {
        k: split_counts.get(k, 0) for k in ("train", "val", "test")
    }
    assert stats["per_label"]["cat"]["emoji"] == 2 and stats["per_label"]["animal"]["emoji"] == 7

    attribution = (out / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for source in E.SOURCES.values():
        assert source.package in attribution and source.version in attribution
    for needed in ("CC BY-SA 4.0", "CC BY 4.0", "Apache License 2.0", "MIT", "Unicode", "Twitter, Inc",
                   "Google", "Artist 08"):
        assert needed in attribution
    assert "Artist FF" not in attribution  # the dropped emoji's artist


def test_images_are_rgb_on_white_and_joined_by_hexcode(tmp_path: Path, tarballs: Path) -> None:
    out = tmp_path / "emoji"
    rows = read_rows(build(out, tarballs, size=32))
    unified = {h: u for h, _, _, u, _ in FIXTURE_EMOJI}
    stem = {h: s for h, _, _, _, s in FIXTURE_EMOJI}
    for r in rows:
        with Image.open(out / r["image"]) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
            assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
            # The middle shows the artwork of exactly this emoji in this style (FE0F or not).
            art = stem[r["hexcode"]] if r["style"] == "openmoji" else unified[r["hexcode"]]
            got = np.array(img.getpixel((16, 16)))
            assert np.abs(got - np.array(colour(r["style"], art))).max() <= 2, (r["image"], art)
    # The FE0F joins worked in both directions.
    assert (out / "images/google/2764.png").is_file()
    assert (out / "images/openmoji/1F3F3-FE0F-200D-1F308.png").is_file()

    # No skin-tone variants, no components, no regional indicators, nothing written outside.
    files = [p.name for p in (out / "images").rglob("*.png")]
    assert len(files) == len(rows)
    assert not [f for f in files if SKIN in f or f.startswith("1F1E6")]
    assert not any("outside" in p.name for p in tmp_path.rglob("*"))


def test_default_size_is_64_and_openmoji_rendered_sharp(tmp_path: Path, tarballs: Path) -> None:
    out = tmp_path / "emoji"
    rows = read_rows(build(out, tarballs))
    for style in STYLES:
        r = next(r for r in rows if r["style"] == style)
        with Image.open(out / r["image"]) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
    with Image.open(out / "images/openmoji/1F600.png") as img:
        # The SVG's square spans 18..54 of 72 units: 16..48 px at 64 px.
        assert img.getpixel((15, 32)) == (255, 255, 255)
        assert img.getpixel((17, 32)) == colour("openmoji", "1F600")


def test_build_is_deterministic_and_seeded(tmp_path: Path, tarballs: Path) -> None:
    a = read_rows(build(tmp_path / "a", tarballs, seed=3))
    b = read_rows(build(tmp_path / "b", tarballs, seed=3))
    assert a == b
    assert (tmp_path / "a/labels.yaml").read_text() == (tmp_path / "b/labels.yaml").read_text()
    unseen = {
        seed: sorted(s.name for s in read_labels_file(build(tmp_path / f"s{seed}", tarballs, seed=seed).parent
                                                     / "labels.yaml")[0] if not s.seen)
        for seed in range(6)
    }
    assert len({tuple(u) for u in unseen.values()}) > 1  # the seed picks them


def test_second_run_keeps_everything_and_resumes(tmp_path: Path, tarballs: Path) -> None:
    out = tmp_path / "emoji"
    build(out, tarballs)
    before = mtimes(out)
    time.sleep(0.01)
    # A complete build with the same parameters is a no-op: it needs no sources (their
    # folder is gone) and rewrites, adds and removes no file.
    tarballs.rename(tmp_path / "away")
    assert build(out, tarballs) == out / "manifest.csv"
    (tmp_path / "away").rename(tarballs)
    assert mtimes(out) == before

    # An interrupted build (no params.json, one image missing) redoes only what is missing.
    (out / "params.json").unlink()
    (out / "images/twitter/1F408.png").unlink()
    build(out, tarballs)
    after = mtimes(out)
    assert (out / "images/twitter/1F408.png").is_file()
    images = {k for k in before if k.startswith("images/") and k.endswith(".png")}
    changed = {k for k in images if after[k] != before[k]}
    assert changed == {"images/twitter/1F408.png"}
    assert after.keys() == before.keys()

    # Another size: the images are made again at that size.
    build(out, tarballs, size=48)
    with Image.open(out / "images/google/1F600.png") as img:
        assert img.size == (48, 48)
    # Another min_count: images of emoji that left the set are removed.
    build(out, tarballs, min_count=3)
    rows = read_rows(out / "manifest.csv")
    on_disk = {str(p.relative_to(out)) for p in (out / "images").rglob("*.png")}
    assert on_disk == {r["image"] for r in rows}


def test_wrong_integrity_is_a_clear_error(tmp_path: Path, tarballs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tarballs / E.SOURCES["openmoji"].filename
    actual = E.integrity_of(path)
    pinned = "sha512-" + "A" * 86 + "=="
    monkeypatch.setitem(E.SOURCES, "openmoji", dataclasses.replace(E.SOURCES["openmoji"], integrity=pinned))
    with pytest.raises(MumicError) as err:
        build(tmp_path / "emoji", tarballs)
    message = str(err.value)
    assert str(path) in message and pinned in message and actual in message
    assert "openmoji@17.0.0" in message
    assert not (tmp_path / "emoji/manifest.csv").exists()


def test_tampered_tarball_after_a_build_is_caught(tmp_path: Path, tarballs: Path) -> None:
    out = tmp_path / "emoji"
    build(out, tarballs)
    path = tarballs / E.SOURCES["google"].filename
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    (out / "params.json").unlink()  # force a rebuild
    with pytest.raises(MumicError, match="integrity check failed"):
        build(out, tarballs)


def test_missing_tarball_in_from_dir(tmp_path: Path, tarballs: Path) -> None:
    (tarballs / E.SOURCES["twitter"].filename).unlink()
    expected = r"emoji-datasource-twitter-16\.0\.0\.tgz.*npm pack emoji-datasource-twitter@16\.0\.0"
    with pytest.raises(MumicError, match=expected):
        build(tmp_path / "emoji", tarballs)
    with pytest.raises(MumicError, match="no such folder"):
        build(tmp_path / "emoji", tmp_path / "nowhere")


def test_bad_arguments(tmp_path: Path, tarballs: Path) -> None:
    with pytest.raises(ConfigError, match="size"):
        build(tmp_path / "emoji", tarballs, size=4)
    with pytest.raises(ConfigError, match="min_count"):
        build(tmp_path / "emoji", tarballs, min_count=0)
    with pytest.raises(MumicError, match="lower min_count"):
        build(tmp_path / "emoji", tarballs, min_count=100)


# --------------------------------------------------------------------------- npm


def fake_npm(folder: Path, tarballs: Path | None, exit_code: int = 0) -> Path:
    """An ``npm`` that copies the fixture tarball into --pack-destination (or fails)."""
    script = folder / "npm"
    script.write_text(
        f"#!{sys.executable}\n"
        "import shutil, sys\n"
        "args = sys.argv[1:]\n"
        f"if {exit_code}:\n"
        "    sys.stderr.write('npm error code E404\\nnpm error 404 Not Found - ' + args[1] + '\\n')\n"
        f"    sys.exit({exit_code})\n"
        "assert args[0] == 'pack', args\n"
        "name, version = args[1].rsplit('@', 1)\n"
        "dest = args[args.index('--pack-destination') + 1]\n"
        f"shutil.copy({str(tarballs)!r} + '/' + name + '-' + version + '.tgz', dest)\n"
        "print(name + '-' + version + '.tgz')\n",
        encoding="utf-8",
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.mark.skipif(os.name == "nt", reason="the fake npm is a POSIX script")
def test_fetch_with_npm_into_cache(tmp_path: Path, tarballs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npm = fake_npm(tmp_path, tarballs)
    monkeypatch.setattr(S.shutil, "which", lambda name: str(npm) if name == "npm" else None)
    out = tmp_path / "emoji"
    manifest = E.build_emoji(out, min_count=MIN_COUNT, progress=False)
    assert read_manifest(manifest)
    cached = sorted(p.name for p in (out / "_sources").iterdir())
    assert cached == sorted(s.filename for s in E.SOURCES.values())
    # A damaged cached file is downloaded again.
    (out / "_sources" / E.SOURCES["emojibase"].filename).write_bytes(b"garbage")
    (out / "params.json").unlink()
    E.build_emoji(out, min_count=MIN_COUNT, progress=False)
    assert E.integrity_of(out / "_sources" / E.SOURCES["emojibase"].filename) == E.SOURCES["emojibase"].integrity


def test_npm_missing_or_failing_is_a_clear_error(tmp_path: Path, tarballs: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S.shutil, "which", lambda name: None)
    with pytest.raises(MumicError, match=r"`npm` was not found.*install Node\.js.*--from"):
        E.build_emoji(tmp_path / "a", progress=False)
    if os.name != "nt":
        npm = fake_npm(tmp_path, None, exit_code=1)
        monkeypatch.setattr(S.shutil, "which", lambda name: str(npm))
        with pytest.raises(MumicError, match=r"npm pack emojibase-data@17\.0\.0` failed \(exit code 1\).*404.*--from"):
            E.build_emoji(tmp_path / "b", progress=False)


# --------------------------------------------------------------------------- pieces


def test_label_vocabulary_counts_each_emoji_once() -> None:
    vocab, bad = E.label_vocabulary([["a", "b", "x|y"], ["a", "a"], ["b", "x|y"], ["c"]], min_count=2)
    assert vocab == ["a", "b"] and bad == ["x|y"]


def test_choose_unseen_is_a_seeded_quarter() -> None:
    labels = [f"l{i}" for i in range(160)]
    u = E.choose_unseen(labels, 0.25, seed=0)
    assert len(u) == 40 and u == sorted(u) and set(u) <= set(labels)
    assert E.choose_unseen(list(reversed(labels)), 0.25, seed=0) == u
    assert E.choose_unseen(labels, 0.25, seed=1) != u
    assert E.choose_unseen(labels[:7], 0.25, seed=0).__len__() == 2


def test_stratified_split_spreads_every_label() -> None:
    rng = np.random.default_rng(0)
    n, c = 1000, 30
    y = rng.random((n, c)) < rng.uniform(0.02, 0.2, size=c)
    y[~y.any(axis=1), 0] = True
    splits = E.stratified_split(y, E.SPLITS, seed=0)
    assert splits == E.stratified_split(y, E.SPLITS, seed=0)
    counts = Counter(splits)
    for name, frac in E.SPLITS:
        assert abs(counts[name] / n - frac) < 0.03, counts
    s = np.array(splits)
    for name, frac in E.SPLITS:
        share = y[s == name].sum(axis=0) / y.sum(axis=0)
        assert np.all(np.abs(share - frac) < 0.06), (name, share)
    with pytest.raises(MumicError, match="too few"):
        E.stratified_split(y[:2], E.SPLITS, seed=0)


def test_safe_member_names() -> None:
    assert S._safe_member_name("package/color/svg/1F600.svg")
    for bad in ("/etc/passwd", "../x.svg", "package/../../x", "C:/x", "\\x", ""):
        assert not S._safe_member_name(bad)


def test_integrity_of_matches_npm_format(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    # echo -n abc | openssl dgst -sha512 -binary | base64
    assert E.integrity_of(p) == (
        "sha512-3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw=="
    )


# --------------------------------------------------------------------------- the real build


@pytest.mark.slow
def test_real_build_with_npm(tmp_path: Path) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not on PATH: the real EmojiTags build downloads its sources with `npm pack`")
    out = tmp_path / "emoji"
    t0 = time.perf_counter()
    manifest = E.build_emoji(out, progress=False)
    cold = time.perf_counter() - t0
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert 1500 <= stats["emoji"] <= 2000
    assert 140 <= stats["labels"] <= 180
    assert len(stats["unseen_labels"]) == math.floor(0.25 * stats["labels"] + 0.5)
    for style in STYLES:
        assert stats["per_style"][style] >= 1500
    m = read_manifest(manifest)
    assert len(m) == stats["images"]
    specs, templates = read_labels_file(out / "labels.yaml")
    assert len(specs) == stats["labels"] and templates
    assert {"cat", "face", "flag", "heart", "animal"} <= {s.name for s in specs}
    rows = read_rows(manifest)
    split_of: dict[str, set[str]] = {}
    for r in rows:
        split_of.setdefault(r["hexcode"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    n = Counter(next(iter(s)) for s in split_of.values())
    assert abs(n["train"] / len(split_of) - 0.7) < 0.03 and abs(n["test"] / len(split_of) - 0.2) < 0.03
    assert not [r for r in rows if SKIN in r["hexcode"]]
    with Image.open(out / rows[0]["image"]) as img:
        assert img.mode == "RGB" and img.size == (64, 64)
    before = mtimes(out)
    E.build_emoji(out, progress=False)
    assert mtimes(out) == before  # the second build is a no-op
    print(f"real EmojiTags build: {cold:.1f} s")
