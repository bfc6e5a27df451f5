"""Building EmojiTags: the images, manifest, labels file, attribution and counts, resumable."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mumic.data.emoji.cldr import (
    MIN_COUNT,
    SPLITS,
    UNSEEN_FRACTION,
    Emoji,
    _norm,
    choose_unseen,
    label_vocabulary,
    load_base_emoji,
    stratified_split,
)
from mumic.data.emoji.render import _datasource_index, _openmoji_authors, _openmoji_index, _prepare_image_dir, _write_images
from mumic.data.emoji.sources import SOURCES, STYLES, _Archive, fetch_sources
from mumic.data.labels import SEPARATOR
from mumic.errors import ConfigError, EmojiSourceError
from mumic.io import atomic_write_text

log = logging.getLogger(__name__)

TEMPLATES = ["an emoji of {}.", "an icon showing {}.", "a cartoon {}."]
_VERSION = 1


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
    atomic_write_text(path, buf.getvalue())


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


def build_emoji(
    out_dir: str | os.PathLike[str],
    *,
    from_dir: str | os.PathLike[str] | None = None,
    size: int = 64,
    seed: int = 0,
    progress: bool = True,
    min_count: int = MIN_COUNT,
    cache_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Build the EmojiTags set in ``out_dir`` and return the path of its manifest.
    Without ``overwrite``, a finished set built with other settings is refused, not replaced.

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
    if not overwrite and (out / "params.json").is_file() and manifest_path.is_file():
        raise ConfigError(f"{out} holds an EmojiTags set built with other settings; pass --overwrite to replace it, "
                          "or choose another --out")
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
    atomic_write_text(out / "labels.yaml", yaml.safe_dump(labels_doc, sort_keys=False, allow_unicode=True))
    used_authors = sorted(
        {authors[_norm(e.hexcode)] for e in emoji if "openmoji" in e.art and _norm(e.hexcode) in authors}
    )
    atomic_write_text(out / "ATTRIBUTION.md", _attribution(size, used_authors))
    stats = _stats(emoji, splits, vocab, unseen, n_base, no_label, no_art, bad_tags, failed, min_count)
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(params_path, json.dumps(params, indent=2) + "\n")
    log.info(
        "EmojiTags: %d emoji, %d images (%d written now), %d labels (%d unseen) in %s",
        len(emoji), len(rows), written, len(vocab), len(unseen), out,
    )
    return manifest_path


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
