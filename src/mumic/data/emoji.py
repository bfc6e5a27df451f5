"""EmojiTags: a real multi-label image set built from openly licensed emoji artwork.

Every emoji carries the English Unicode CLDR keywords ("cat", "face", "pet", ...) and
was drawn independently by several artists, so the same label set is seen in three
visual styles: Noto Emoji (``google``), Twemoji (``twitter``) and OpenMoji
(``openmoji``). Apple and Facebook artwork is never used: their licences do not allow it.

The sources are four npm packages, pinned by version and checked against their npm
``dist.integrity`` (sha512) before anything is read from them:

- ``emojibase-data`` (``en/data.json``): names and CLDR keywords (the labels);
- ``emoji-datasource-google`` / ``emoji-datasource-twitter``: 64 px PNGs
  (``img/<style>/64/``) and ``emoji.json``, which maps code points to file names;
- ``openmoji``: colour SVGs (``color/svg/<HEXCODE>.svg``), rendered with resvg.

They are fetched with ``npm pack`` into a cache folder, or taken from a folder of
tarballs downloaded beforehand (``from_dir``; file names as ``npm pack`` writes them).

What :func:`build_emoji` writes to ``out_dir``:

- ``images/<style>/<hexcode>.png``: base emoji only (no skin-tone variants), composited
  onto white, RGB, ``size`` x ``size`` pixels;
- ``manifest.csv``: ``image, labels, split, style, hexcode, name``; all styles of one
  emoji share its split (train/val/test 70/10/20, multi-label stratified by emoji);
- ``labels.yaml``: prompt templates and the label vocabulary (CLDR keywords on at least
  ``min_count`` emoji); a fixed 25 % of the labels are ``seen: false``, held out from
  training to measure zero-shot prediction;
- ``ATTRIBUTION.md`` (sources, versions, licences, authors), ``stats.json`` (counts) and
  ``params.json`` (written last: a build with the same parameters returns at once).

Building is resumable: images already written for the same size and sources are kept.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tarfile
import textwrap
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from tqdm.auto import tqdm

from mumic.errors import ConfigError, MumicError

log = logging.getLogger(__name__)


class EmojiSourceError(MumicError):
    """A source package could not be fetched, failed its integrity check, or has an
    unexpected layout."""


@dataclass(frozen=True)
class Source:
    """One pinned npm package: its name, version and npm ``dist.integrity``."""

    package: str
    version: str
    integrity: str

    @property
    def spec(self) -> str:
        """``name@version``, as npm takes it."""
        return f"{self.package}@{self.version}"

    @property
    def filename(self) -> str:
        """The tarball's file name, as ``npm pack`` writes it."""
        return f"{self.package}-{self.version}.tgz"


SOURCES: dict[str, Source] = {
    "emojibase": Source(
        "emojibase-data",
        "17.0.0",
        "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
    ),
    "google": Source(
        "emoji-datasource-google",
        "16.0.0",
        "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    ),
    "twitter": Source(
        "emoji-datasource-twitter",
        "16.0.0",
        "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    ),
    "openmoji": Source(
        "openmoji",
        "17.0.0",
        "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w==",
    ),
}
"""The pinned sources, by key. The keys of the artwork packages are the style names."""

STYLES = ("google", "twitter", "openmoji")
SPLITS = (("train", 0.70), ("val", 0.10), ("test", 0.20))
UNSEEN_FRACTION = 0.25
MIN_COUNT = 10
TEMPLATES = ["an emoji of {}.", "an icon showing {}.", "a cartoon {}."]
SEPARATOR = "|"

_VERSION = 1
_EMOJIBASE_DATA = "package/en/data.json"
_DATASOURCE_INDEX = "package/emoji.json"
_OPENMOJI_SVG_DIR = "package/color/svg/"
_OPENMOJI_DATA = "package/data/openmoji.json"
_COMPONENT_GROUP = 2  # emojibase group of skin-tone and hair-style swatches
_SKIN_TONES = frozenset({"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"})
_HEXCODE = re.compile(r"^[0-9A-F]{1,6}(-[0-9A-F]{1,6})*$")
_NPM_TIMEOUT_S = 1800


# --------------------------------------------------------------------------- sources


def integrity_of(path: str | os.PathLike[str]) -> str:
    """The npm-style integrity string (``sha512-<base64>``) of a file."""
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def _check_integrity(path: Path, source: Source) -> None:
    actual = integrity_of(path)
    if actual != source.integrity:
        raise EmojiSourceError(
            f"{path}: integrity check failed for {source.spec}: expected {source.integrity}, "
            f"got {actual}; the file is damaged or a different release; delete it and fetch "
            f"it again with `npm pack {source.spec}`"
        )


def _npm_pack(source: Source, cache: Path) -> Path:
    """Download ``source`` with ``npm pack`` into ``cache`` and return the tarball's path."""
    npm = shutil.which("npm")
    if npm is None:
        raise EmojiSourceError(
            f"cannot download {source.spec}: `npm` was not found on PATH; install Node.js "
            "(which includes npm), or download the tarballs elsewhere with "
            f"`npm pack {source.spec}` (and the other sources) and pass their folder with --from"
        )
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [npm, "pack", source.spec, "--pack-destination", str(cache), "--silent"]
    log.info("downloading %s with npm pack", source.spec)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_NPM_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise EmojiSourceError(
            f"`npm pack {source.spec}` did not finish within {_NPM_TIMEOUT_S} s; check the network "
            "connection and npm's registry setting, or download the tarballs elsewhere and pass "
            "their folder with --from"
        ) from None
    except OSError as e:
        raise EmojiSourceError(f"cannot run npm ({npm}): {e}; reinstall Node.js/npm or use --from") from None
    path = cache / source.filename
    if done.returncode != 0 or not path.is_file():
        detail = " ".join((done.stderr or done.stdout or "").strip().splitlines()[-3:]) or "no output"
        raise EmojiSourceError(
            f"`npm pack {source.spec}` failed (exit code {done.returncode}): {detail}; check the "
            "network connection and npm's registry setting, or download the tarballs elsewhere "
            "and pass their folder with --from"
        )
    return path


def fetch_sources(cache_dir: Path, from_dir: Path | None = None) -> dict[str, Path]:
    """The verified tarball of every source, by key.

    With ``from_dir`` the tarballs must already be there; otherwise they are taken from
    ``cache_dir`` when present and intact, and downloaded with ``npm pack`` when not.
    """
    paths: dict[str, Path] = {}
    for key, source in SOURCES.items():
        if from_dir is not None:
            path = from_dir / source.filename
            if not path.is_file():
                raise EmojiSourceError(
                    f"{from_dir}: no {source.filename}; download it with `npm pack {source.spec}` "
                    "into that folder, or leave out --from to download the sources with npm"
                )
            _check_integrity(path, source)
        else:
            path = cache_dir / source.filename
            if not (path.is_file() and integrity_of(path) == source.integrity):
                if path.is_file():
                    log.warning("%s fails its integrity check; downloading it again", path)
                    path.unlink()
                path = _npm_pack(source, cache_dir)
                _check_integrity(path, source)
        log.debug("%s verified: %s", source.spec, path)
        paths[key] = path
    return paths


def _safe_member_name(name: str) -> bool:
    """True for a relative member path without ``..`` (never written to disk, but
    anything else marks an archive that is not what it claims to be)."""
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return False
    return ".." not in re.split(r"[/\\]", name)


class _Archive:
    """Read-only access to the regular files of a verified .tgz, by member name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tar = tarfile.open(path, "r:gz")
            members = self._tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise EmojiSourceError(f"{path}: not a readable .tgz archive: {e}") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            if not m.isfile():
                continue
            if not _safe_member_name(m.name):
                log.warning("%s: ignoring unsafe member path %r", path, m.name)
                continue
            self.members[m.name] = m

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tar.close()

    def read(self, name: str) -> bytes:
        member = self.members.get(name)
        if member is None:
            raise EmojiSourceError(f"{self.path}: has no {name}; is it the right package and version?")
        f = self._tar.extractfile(member)
        if f is None:
            raise EmojiSourceError(f"{self.path}: cannot read {name}")
        return f.read()

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EmojiSourceError(f"{self.path}: {name} is not valid JSON: {e}") from None

    def read_many(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """``(name, data)`` for each name, in archive order (a gzip stream seeks forward
        cheaply but rewinds from the start)."""
        ordered = sorted(set(names), key=lambda n: self.members[n].offset_data)
        for name in ordered:
            yield name, self.read(name)


# --------------------------------------------------------------------------- emoji data


def _norm(hexcode: str) -> str:
    """A hexcode for joining sources: upper case, without the FE0F variation selector."""
    return "-".join(p for p in hexcode.strip().upper().replace("_", "-").split("-") if p and p != "FE0F")


@dataclass
class Emoji:
    """One base emoji: its emojibase hexcode and name, cleaned CLDR tags, and artwork."""

    hexcode: str
    name: str
    tags: list[str]
    order: int
    art: dict[str, str] = field(default_factory=dict)  # style -> archive member
    labels: list[str] = field(default_factory=list)


def _clean_tags(raw: Any) -> list[str]:
    out: list[str] = []
    for t in raw or ():
        if isinstance(t, str):
            t = t.strip().lower()
            if t and t not in out:
                out.append(t)
    return out


def load_base_emoji(archive: _Archive) -> list[Emoji]:
    """Base emoji from emojibase ``en/data.json``: neither skin-tone variants (emojibase
    nests those under ``skins``) nor components (tone and hair swatches) nor the bare
    regional indicators (which have no group)."""
    data = archive.read_json(_EMOJIBASE_DATA)
    if not isinstance(data, list):
        raise EmojiSourceError(f"{archive.path}: {_EMOJIBASE_DATA} is not a list of emoji")
    out: list[Emoji] = []
    seen: set[str] = set()
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("hexcode"), str):
            raise EmojiSourceError(f"{archive.path}: {_EMOJIBASE_DATA} entry {i} has no hexcode")
        hexcode = entry["hexcode"].strip().upper()
        group = entry.get("group")
        if group is None or group == _COMPONENT_GROUP or "tone" in entry:
            continue
        if not _HEXCODE.match(hexcode) or _SKIN_TONES & set(hexcode.split("-")):
            continue
        if _norm(hexcode) in seen:
            continue
        seen.add(_norm(hexcode))
        order = entry.get("order")
        out.append(
            Emoji(
                hexcode=hexcode,
                name=str(entry.get("label") or hexcode),
                tags=_clean_tags(entry.get("tags")),
                order=int(order) if isinstance(order, (int, float)) else len(data) + i,
            )
        )
    out.sort(key=lambda e: e.order)
    return out


class _ArtIndex:
    """Hexcode -> archive member of one style; exact hexcode first, then without FE0F."""

    def __init__(self) -> None:
        self.exact: dict[str, str] = {}
        self.loose: dict[str, str] = {}

    def add(self, hexcode: str, member: str) -> None:
        self.exact.setdefault(hexcode.strip().upper(), member)
        self.loose.setdefault(_norm(hexcode), member)

    def find(self, hexcode: str) -> str | None:
        return self.exact.get(hexcode.upper()) or self.loose.get(_norm(hexcode))

    def __len__(self) -> int:
        return len(self.exact)


def _datasource_index(archive: _Archive, style: str) -> _ArtIndex:
    """The 64 px PNGs of an emoji-datasource package, from its ``emoji.json`` (base
    entries only: skin-tone variants are under ``skin_variations``, not read)."""
    data = archive.read_json(_DATASOURCE_INDEX)
    if not isinstance(data, list):
        raise EmojiSourceError(f"{archive.path}: {_DATASOURCE_INDEX} is not a list of emoji")
    index = _ArtIndex()
    for entry in data:
        if not isinstance(entry, dict) or not entry.get(f"has_img_{style}", True):
            continue
        image = entry.get("image")
        member = f"package/img/{style}/64/{image}"
        if not isinstance(image, str) or member not in archive.members:
            continue
        for key in ("unified", "non_qualified"):
            code = entry.get(key)
            if isinstance(code, str) and code:
                index.add(code, member)
    if not index:
        raise EmojiSourceError(f"{archive.path}: no {style} images found under package/img/{style}/64/")
    return index


def _openmoji_index(archive: _Archive) -> _ArtIndex:
    index = _ArtIndex()
    for name in archive.members:
        if name.startswith(_OPENMOJI_SVG_DIR) and name.lower().endswith(".svg"):
            stem = name[len(_OPENMOJI_SVG_DIR) : -4]
            if "/" not in stem:
                index.add(stem, name)
    if not index:
        raise EmojiSourceError(f"{archive.path}: no SVGs found under {_OPENMOJI_SVG_DIR}")
    return index


def _openmoji_authors(archive: _Archive) -> dict[str, str]:
    """Hexcode (normalised) -> the OpenMoji artist, where ``data/openmoji.json`` says."""
    if _OPENMOJI_DATA not in archive.members:
        return {}
    out: dict[str, str] = {}
    for entry in archive.read_json(_OPENMOJI_DATA):
        if isinstance(entry, dict) and isinstance(entry.get("hexcode"), str):
            author = entry.get("openmoji_author")
            if isinstance(author, str) and author.strip():
                out.setdefault(_norm(entry["hexcode"]), author.strip())
    return out


# --------------------------------------------------------------------------- labels, splits


def label_vocabulary(tag_lists: Iterable[Sequence[str]], min_count: int = MIN_COUNT) -> tuple[list[str], list[str]]:
    """The sorted labels that occur in at least ``min_count`` tag lists, and the sorted
    frequent tags left out because they contain the manifest separator ``|``."""
    counts: Counter[str] = Counter()
    for tags in tag_lists:
        counts.update(set(tags))
    frequent = {t for t, n in counts.items() if n >= min_count}
    bad = sorted(t for t in frequent if SEPARATOR in t)
    return sorted(frequent - set(bad)), bad


def choose_unseen(labels: Sequence[str], fraction: float = UNSEEN_FRACTION, seed: int = 0) -> list[str]:
    """A deterministic, seeded choice of ``round(fraction * len(labels))`` labels (sorted)."""
    names = sorted(labels)
    k = int(math.floor(fraction * len(names) + 0.5))
    rng = np.random.default_rng([seed, 2])
    pick = rng.choice(len(names), size=k, replace=False) if k else []
    return sorted(names[i] for i in pick)


def stratified_split(
    y: np.ndarray, fractions: Sequence[tuple[str, float]] = SPLITS, seed: int = 0
) -> list[str]:
    """A split name per row of the multi-label indicator matrix ``y`` [N, C], by
    iterative stratification (Sechidis et al. 2011), so every label's positives are
    spread over the splits in about the given fractions. Deterministic given ``seed``."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    names = [n for n, _ in fractions]
    weights = np.array([w for _, w in fractions], dtype=float)
    if len(names) < 2 or np.any(weights <= 0):
        raise ValueError(f"need at least two splits with positive fractions, got {fractions}")
    y = np.asarray(y, dtype=bool)
    n = y.shape[0]
    if n < len(names):
        raise EmojiSourceError(f"only {n} emoji with labels: too few for the splits {', '.join(names)}")
    if y.shape[1] < 2:  # the splitter wants a multi-label matrix
        y = np.concatenate([y, np.zeros((n, 2 - y.shape[1]), dtype=bool)], axis=1)
    out = np.array([names[0]] * n, dtype=object)
    remaining = np.arange(n)
    rest = float(weights.sum())
    # Peel off the last split, then the one before, from what is left ...
    for k in range(len(names) - 1, 0, -1):
        share = float(weights[k]) / rest
        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=share, random_state=seed + k)
        keep, take = next(splitter.split(np.zeros((len(remaining), 1)), y[remaining]))
        out[remaining[take]] = names[k]
        remaining = remaining[keep]
        rest -= float(weights[k])
    return [str(s) for s in out]


# --------------------------------------------------------------------------- images


def _to_rgb(img: Image.Image, size: int) -> Image.Image:
    """``img`` composited onto white, padded to a square (centred), resized to ``size``."""
    img.load()
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    w, h = rgb.size
    if w != h:
        side = max(w, h)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(rgb, ((side - w) // 2, (side - h) // 2))
        rgb = square
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return rgb


def _decode_png(data: bytes, size: int) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return _to_rgb(img, size)


def _render_svg(data: bytes, size: int) -> Image.Image:
    """An SVG rendered with resvg straight at ``size`` px (sharper than resizing)."""
    import resvg_py

    png = resvg_py.svg_to_bytes(
        svg_string=data.decode("utf-8"), width=size, height=size, skip_system_fonts=True
    )
    return _decode_png(bytes(png), size)


def _save_png(img: Image.Image, path: Path) -> None:
    """Write atomically: a crash never leaves a half-written image under the final name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _prepare_image_dir(image_dir: Path, image_params: dict[str, Any]) -> None:
    """Keep the images of an interrupted build with the same size and sources; clear
    them when those changed (or are unknown)."""
    marker = image_dir / ".params.json"
    try:
        same = json.loads(marker.read_text(encoding="utf-8")) == image_params
    except (OSError, ValueError):
        same = False
    if not same:
        for style in STYLES:
            old = list((image_dir / style).glob("*.png"))
            if old:
                log.info("removing %d %s images made with another size or other sources", len(old), style)
            for path in old:
                path.unlink()
    image_dir.mkdir(parents=True, exist_ok=True)
    for style in STYLES:
        (image_dir / style).mkdir(exist_ok=True)
        for tmp in (image_dir / style).glob(".*.tmp"):
            tmp.unlink()
    _write_text_atomic(marker, json.dumps(image_params, sort_keys=True))


# --------------------------------------------------------------------------- outputs


def _attribution(size: int, openmoji_authors: list[str]) -> str:
    s = SOURCES
    if openmoji_authors:
        authors = textwrap.fill(
            ", ".join(openmoji_authors), width=88, initial_indent="  ", subsequent_indent="  "
        ).lstrip()
    else:
        authors = "listed in the OpenMoji package's data/openmoji.json"
    return f"""# EmojiTags: attribution and licences

The images in `images/` are third-party artwork, changed only as follows: composited onto
a white background, converted to RGB and resized (or, for OpenMoji, rendered from SVG)
to {size} x {size} pixels. The labels are English Unicode CLDR emoji keywords. Each
image keeps the licence of its source; redistribute them under those terms.

## Labels and names: npm package `{s['emojibase'].package}` {s['emojibase'].version}

- Licence: MIT. Copyright (c) Miles Johnson.
- The keywords and names come from the Unicode Common Locale Data Repository (CLDR),
  Copyright (c) Unicode, Inc., under the Unicode License v3
  (https://www.unicode.org/license.txt).

## `images/google/`: Noto Emoji, from npm package `{s['google'].package}` {s['google'].version}

- Artwork: Noto Emoji, Copyright Google Inc., under the Apache License 2.0
  (https://www.apache.org/licenses/LICENSE-2.0).
- Packaging (emoji-datasource): MIT, Copyright (c) Cal Henderson.

## `images/twitter/`: Twemoji, from npm package `{s['twitter'].package}` {s['twitter'].version}

- Artwork: Twemoji graphics, Copyright Twitter, Inc and other contributors, under
  CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/).
- Packaging (emoji-datasource): MIT, Copyright (c) Cal Henderson.

## `images/openmoji/`: OpenMoji, from npm package `{s['openmoji'].package}` {s['openmoji'].version}

- All emojis designed by OpenMoji, the open-source emoji and icon project
  (https://openmoji.org/). Licence: CC BY-SA 4.0
  (https://creativecommons.org/licenses/by-sa/4.0/).
- Share-alike: these rendered images are adaptations and are licensed under CC BY-SA 4.0
  as well; anything you make from them and share must carry the same licence.
- Artists of the images included here:
  {authors}.

Apple and Facebook emoji artwork is deliberately not used: its licences do not allow it.
"""


def _write_manifest(path: Path, rows: list[list[str]]) -> None:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "labels", "split", "style", "hexcode", "name"])
    writer.writerows(rows)
    _write_text_atomic(path, buf.getvalue())


def _up_to_date(out: Path, params: dict[str, Any]) -> bool:
    manifest_path = out / "manifest.csv"
    needed = [manifest_path, out / "labels.yaml", out / "stats.json", out / "ATTRIBUTION.md"]
    try:
        if json.loads((out / "params.json").read_text(encoding="utf-8")) != params:
            return False
        if not all(p.is_file() for p in needed):
            return False
        with open(manifest_path, newline="", encoding="utf-8") as f:
            return all((out / row["image"]).is_file() for row in csv.DictReader(f))
    except (OSError, ValueError, KeyError):
        return False


# --------------------------------------------------------------------------- build


def build_emoji(
    out_dir: str | os.PathLike[str],
    *,
    from_dir: str | os.PathLike[str] | None = None,
    size: int = 64,
    seed: int = 0,
    progress: bool = True,
    min_count: int = MIN_COUNT,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Build the EmojiTags set in ``out_dir`` and return the path of its manifest.

    ``from_dir``: a folder with the four source tarballs (as ``npm pack`` names them);
    without it they are downloaded with ``npm pack`` into ``cache_dir`` (default
    ``out_dir/_sources``). ``size``: image side in pixels. ``seed``: fixes the splits and
    the unseen labels. ``min_count``: a CLDR keyword becomes a label when at least this
    many emoji carry it. Returns at once when ``out_dir`` already holds a complete build
    with the same parameters; images from an interrupted build are reused.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ConfigError(f"size must be a whole number of pixels, at least 16; got {size!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ConfigError(f"min_count must be a whole number of at least 1; got {min_count!r}")
    out = Path(out_dir)
    manifest_path = out / "manifest.csv"
    params_path = out / "params.json"
    sources = {k: {"package": s.package, "version": s.version, "integrity": s.integrity} for k, s in SOURCES.items()}
    params = {"version": _VERSION, "size": size, "seed": int(seed), "min_count": min_count, "sources": sources}
    if _up_to_date(out, params):
        log.info("EmojiTags in %s is up to date", out)
        return manifest_path
    from_path = None if from_dir is None else Path(from_dir)
    if from_path is not None and not from_path.is_dir():
        raise EmojiSourceError(f"{from_path}: no such folder (the folder of source tarballs, --from)")
    if size > 64:
        log.warning("the Noto and Twemoji artwork is 64 px: at size %d it is upscaled", size)

    out.mkdir(parents=True, exist_ok=True)
    params_path.unlink(missing_ok=True)  # incomplete until everything is written
    tarballs = fetch_sources(Path(cache_dir) if cache_dir is not None else out / "_sources", from_path)

    with _Archive(tarballs["emojibase"]) as archive:
        emoji = load_base_emoji(archive)
    with contextlib.ExitStack() as stack:
        archives = {style: stack.enter_context(_Archive(tarballs[style])) for style in STYLES}
        indexes = {
            "google": _datasource_index(archives["google"], "google"),
            "twitter": _datasource_index(archives["twitter"], "twitter"),
            "openmoji": _openmoji_index(archives["openmoji"]),
        }
        authors = _openmoji_authors(archives["openmoji"])
        for e in emoji:
            for style in STYLES:
                member = indexes[style].find(e.hexcode)
                if member is not None:
                    e.art[style] = member
        n_base = len(emoji)
        no_art = [e for e in emoji if not e.art]
        emoji = [e for e in emoji if e.art]

        vocab, bad_tags = label_vocabulary((e.tags for e in emoji), min_count)
        if bad_tags:
            log.warning("left out %d frequent tags containing %r: %s", len(bad_tags), SEPARATOR, ", ".join(bad_tags))
        if not vocab:
            raise EmojiSourceError(f"no CLDR keyword is on {min_count} or more emoji; lower min_count")
        in_vocab = set(vocab)
        for e in emoji:
            e.labels = [t for t in e.tags if t in in_vocab]
        no_label = [e for e in emoji if not e.labels]
        emoji = [e for e in emoji if e.labels]
        log.info(
            "%d base emoji: %d labels; dropped %d without a label and %d without artwork",
            n_base, len(vocab), len(no_label), len(no_art),
        )

        column = {name: c for c, name in enumerate(vocab)}
        y = np.zeros((len(emoji), len(vocab)), dtype=bool)
        for i, e in enumerate(emoji):
            y[i, [column[t] for t in e.labels]] = True
        splits = stratified_split(y, SPLITS, seed)
        unseen = choose_unseen(vocab, UNSEEN_FRACTION, seed)

        image_dir = out / "images"
        _prepare_image_dir(image_dir, {"version": _VERSION, "size": size, "sources": sources})
        written, failed = _write_images(emoji, archives, image_dir, size, progress)

    rows: list[list[str]] = []
    kept: set[str] = set()
    for e, split in zip(emoji, splits):
        for style in STYLES:
            if style in e.art:
                image = f"images/{style}/{e.hexcode}.png"
                kept.add(image)
                rows.append([image, SEPARATOR.join(e.labels), split, style, e.hexcode, e.name])
    if not rows:
        raise EmojiSourceError("no emoji images could be made from the sources")
    for style in STYLES:  # images of emoji no longer in the set (other min_count, ...)
        for old in (image_dir / style).glob("*.png"):
            if f"images/{style}/{old.name}" not in kept:
                old.unlink()

    _write_manifest(manifest_path, rows)
    labels_doc = {
        "templates": list(TEMPLATES),
        "labels": {name: {"seen": name not in unseen} for name in vocab},
    }
    _write_text_atomic(out / "labels.yaml", yaml.safe_dump(labels_doc, sort_keys=False, allow_unicode=True))
    used_authors = sorted(
        {authors[_norm(e.hexcode)] for e in emoji if "openmoji" in e.art and _norm(e.hexcode) in authors}
    )
    _write_text_atomic(out / "ATTRIBUTION.md", _attribution(size, used_authors))
    stats = _stats(emoji, splits, vocab, unseen, n_base, no_label, no_art, bad_tags, failed, min_count)
    _write_text_atomic(out / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    _write_text_atomic(params_path, json.dumps(params, indent=2) + "\n")
    log.info(
        "EmojiTags: %d emoji, %d images (%d written now), %d labels (%d unseen) in %s",
        len(emoji), len(rows), written, len(vocab), len(unseen), out,
    )
    return manifest_path


def _write_images(
    emoji: list[Emoji], archives: dict[str, _Archive], image_dir: Path, size: int, progress: bool
) -> tuple[int, list[str]]:
    """Write every missing image; return how many were written and the ones that failed
    (which are removed from their emoji's artwork)."""
    todo: dict[str, dict[str, list[Emoji]]] = {s: {} for s in STYLES}
    for e in emoji:
        for style, member in e.art.items():
            if not (image_dir / style / f"{e.hexcode}.png").is_file():
                todo[style].setdefault(member, []).append(e)
    total = sum(len(es) for members in todo.values() for es in members.values())
    written = 0
    failed: list[str] = []
    if total:
        log.info("writing %d emoji images to %s", total, image_dir)
    with tqdm(total=total, desc="emoji images", unit="img", disable=not progress or not total) as bar:
        for style in STYLES:
            convert = _render_svg if style == "openmoji" else _decode_png
            for member, data in archives[style].read_many(todo[style]):
                try:
                    img = convert(data, size)
                except Exception as e:  # a broken file in a verified package: skip it, say so
                    log.warning("%s: cannot convert %s: %s", archives[style].path, member, e)
                    img = None
                for em in todo[style][member]:
                    if img is None:
                        failed.append(f"{style}/{em.hexcode}")
                        del em.art[style]
                    else:
                        _save_png(img, image_dir / style / f"{em.hexcode}.png")
                        written += 1
                    bar.update(1)
    return written, failed


def _stats(
    emoji: list[Emoji],
    splits: list[str],
    vocab: list[str],
    unseen: list[str],
    n_base: int,
    no_label: list[Emoji],
    no_art: list[Emoji],
    bad_tags: list[str],
    failed: list[str],
    min_count: int,
) -> dict[str, Any]:
    split_names = [n for n, _ in SPLITS]
    per_split = {n: {"emoji": 0, "images": 0} for n in split_names}
    per_style = {s: 0 for s in STYLES}
    per_label: dict[str, dict[str, Any]] = {
        name: {"seen": name not in unseen, "emoji": 0, **{n: 0 for n in split_names}} for name in vocab
    }
    for e, split in zip(emoji, splits):
        if not e.art:
            continue
        per_split[split]["emoji"] += 1
        per_split[split]["images"] += len(e.art)
        for style in e.art:
            per_style[style] += 1
        for t in e.labels:
            per_label[t]["emoji"] += 1
            per_label[t][split] += 1
    return {
        "emoji": sum(1 for e in emoji if e.art),
        "images": sum(per_style.values()),
        "labels": len(vocab),
        "min_count": min_count,
        "unseen_labels": unseen,
        "per_split": per_split,
        "per_style": per_style,
        "per_label": per_label,
        "base_emoji": n_base,
        "dropped": {
            "no_label": len(no_label),
            "no_artwork": len(no_art),
            "no_label_hexcodes": [e.hexcode for e in no_label],
            "no_artwork_hexcodes": [e.hexcode for e in no_art],
            "tags_with_separator": bad_tags,
            "failed_images": failed,
        },
    }
