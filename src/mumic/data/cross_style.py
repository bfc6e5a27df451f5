"""The cross-style split of a manifest with a ``style`` column (EmojiTags): train and
validate on some artwork styles, test on another one, so the test images are drawn by
other artists than the training images (same emoji splits)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mumic.data.manifest import read_manifest
from mumic.errors import ManifestError
from mumic.io import atomic_write_text

TRAIN_STYLES = ("google", "twitter")
TEST_STYLE = "openmoji"


def cross_style_manifest(manifest: str | os.PathLike[str], out: str | os.PathLike[str],
                         train_styles: tuple[str, ...] = TRAIN_STYLES, test_style: str = TEST_STYLE, *,
                         allow_outside: bool = False) -> Path:
    """Write ``out``: the rows of ``manifest`` whose split is train or val and whose style
    is one of ``train_styles``, and its test rows of style ``test_style``, every column
    kept as written, images as absolute paths (train with ``allow_outside_paths``).

    A manifest without ``split`` and ``style`` columns, or without test rows of
    ``test_style``, is a ManifestError.
    """

    manifest, out = Path(manifest), Path(out)
    m = read_manifest(manifest, allow_outside=allow_outside)
    df = m.frame
    if "style" not in df.columns or m.splits is None:
        raise ManifestError(f"{manifest}: a cross-style split needs 'split' and 'style' columns (as EmojiTags has); "
                            f"columns found: {', '.join(map(str, df.columns))}")
    styles = df["style"].tolist()
    train = np.array([s in ("train", "val") and st in train_styles for s, st in zip(m.splits, styles)], bool)
    test = np.array([s == "test" and st == test_style for s, st in zip(m.splits, styles)], bool)
    if not test.any():
        raise ManifestError(f"{manifest}: no test rows of style '{test_style}' for a cross-style split")
    df = df.copy()
    df["image"] = [str((manifest.parent / p).resolve()) for p in df["image"]]
    atomic_write_text(out, df[train | test].to_csv(index=False))
    return out
