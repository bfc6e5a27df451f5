"""What the inputs of `predict`, `embed` and `index` stand for: image files, manifests,
folders of images and shell-style patterns of those (given quoted, so the shell left them)."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mumic.data.manifest import Manifest, read_manifest, where_row
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


def inputs_manifest(inputs: Sequence[str | os.PathLike[str]], *, allow_outside: bool = False,
                    allow_duplicates: bool = False) -> Manifest:
    """Image files, folders of images, manifests (told apart by their suffix) and shell-style
    patterns of those (:func:`mumic.data.inputs.expand_inputs`) as one unlabelled manifest,
    in the order given; the manifests' other columns are kept. One manifest alone is read
    as it is (:func:`read_manifest`)."""
    given = expand_inputs(inputs)
    if len(given) == 1 and is_manifest(given[0]):
        return read_manifest(given[0], require_labels=False, allow_outside=allow_outside, allow_duplicates=allow_duplicates)
    paths: list[Path] = []
    sources: list[Path] = []
    lines: list[int] = []
    frames: list[pd.DataFrame] = []
    for x in given:
        if is_manifest(x):
            m = read_manifest(x, require_labels=False, allow_outside=allow_outside, allow_duplicates=allow_duplicates)
            paths, sources, lines = paths + m.images, sources + [m.path.absolute()] * len(m), lines + m.lines
            frames.append(m.frame.drop(columns=["image"], errors="ignore").reset_index(drop=True))
        else:  # a run of bare images is one frame of no columns
            paths.append(Path(x).resolve())
            sources.append(paths[-1])
            lines.append(0)
            if frames and frames[-1].empty and not len(frames[-1].columns):
                frames[-1] = pd.DataFrame(index=range(len(frames[-1]) + 1))
            else:
                frames.append(pd.DataFrame(index=range(1)))
    frame = pd.concat(frames, ignore_index=True)
    frame.insert(0, "image", [str(p) for p in paths])
    return InputsManifest(path=Path(given[0]), images=paths, labels=[[] for _ in paths], frame=frame, lines=lines, sources=sources)


@dataclass(eq=False, repr=False)
class InputsManifest(Manifest):
    """What :func:`inputs_manifest` returns for several inputs: ``sources`` holds each row's
    manifest (a bare image: the image itself, line 0), so a message names the row's own file."""

    sources: list[Path] = field(default_factory=list)

    def where(self, i: int) -> str:
        return str(self.sources[i]) if self.lines[i] == 0 else where_row(self.sources[i], self.lines[i])
