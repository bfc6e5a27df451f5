"""The artwork of EmojiTags: where each style's image of an emoji is in its package, and
how it becomes a white-backed RGB PNG (PNGs resized, OpenMoji SVGs rendered with resvg)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from mumic.data.emoji.cldr import Emoji, _norm
from mumic.data.emoji.sources import STYLES, _Archive
from mumic.errors import EmojiSourceError
from mumic.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

_DATASOURCE_INDEX = "package/emoji.json"
_OPENMOJI_SVG_DIR = "package/color/svg/"
_OPENMOJI_DATA = "package/data/openmoji.json"


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
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


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
    atomic_write_text(marker, json.dumps(image_params, sort_keys=True))


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
