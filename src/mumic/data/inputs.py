"""What the inputs of `predict`, `embed` and `index` stand for: image files, manifests,
folders of images and shell-style patterns of those (given quoted, so the shell left them)."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from mumic.data.tables import FORMATS
from mumic.errors import ManifestError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""What a folder given as an input contributes: its files with these suffixes (any case)."""

MANIFEST_SUFFIXES = tuple(FORMATS)


def is_manifest(path: str) -> bool:
    return path.lower().endswith(MANIFEST_SUFFIXES) and not os.path.isdir(path)


def folder_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Every image file in `folder` and below, sorted; none is a ManifestError."""
    folder = Path(folder)
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise ManifestError(f"{folder}: no image files in this folder or below ({' '.join(IMAGE_SUFFIXES)}); "
                            "give a folder of images, image files or a manifest")
    return found


def _matches(pattern: str) -> list[str]:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    usable = [m for m in matches if os.path.isdir(m) or m.lower().endswith(MANIFEST_SUFFIXES + IMAGE_SUFFIXES)]
    if not usable:
        other = f" (only {len(matches)} other files, not images or manifests)" if matches else ""
        raise ManifestError(f"{pattern}: the pattern matches no image, folder or manifest{other}")
    return usable


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The inputs in the order given, each pattern replaced by its matches (sorted) and each
    folder by its image files (sorted, recursively); image files and manifests stay as given
    (a missing one is reported where it is read)."""
    if not inputs:
        raise ManifestError("no inputs: give image files, folders of images or manifests")
    out: list[str] = []
    for x in map(str, inputs):
        given = _matches(x) if any(c in x for c in "*?[") and not os.path.exists(x) else [x]
        for g in given:
            out += [str(p) for p in folder_images(g)] if os.path.isdir(g) else [g]
    return out
