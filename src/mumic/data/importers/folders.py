"""One folder per label -> manifest.

Mapping: every image below ``SRC/LABEL/`` (at any depth) has the label ``LABEL``; an image
directly in ``SRC`` is an untagged row. One image under several label folders gets each
label: copies are joined when they are symbolic links to one file or have identical
contents (sha256), and the manifest names the first real file in sorted order. With
``split_folders`` the first level is the split (``SRC/train/LABEL/...``). Hidden files and
folders are skipped, other files that are not images are dropped and counted, and
symbolic links to folders are not followed.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from mumic.data.importers.common import SPLIT_WORDS, ImageRoot, Import, label_name
from mumic.data.inputs import IMAGE_SUFFIXES
from mumic.io import file_digest


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _files(folder: Path, imp: Import) -> list[Path]:
    """Every non-hidden file below ``folder``, sorted; links to folders are not entered."""
    out: list[Path] = []
    for here, dirs, files in os.walk(folder, followlinks=False):
        keep = []
        for d in sorted(dirs):
            if _hidden(d):
                continue
            if os.path.islink(os.path.join(here, d)):
                imp.report.drop("a symbolic link to a folder (not followed)", os.path.join(here, d))
                continue
            keep.append(d)
        dirs[:] = keep
        out += [Path(here) / f for f in sorted(files) if not _hidden(f)]
    return out


def import_folders(src: Path, *, split_folders: bool = False, allow_outside: bool = False) -> Import:
    """Read a folder of label folders (or of split folders of label folders) into an Import."""
    from mumic.errors import ConfigError

    if not src.is_dir():
        raise ConfigError(f"{src} is not a folder; give the folder that holds one sub-folder per label")
    imp = Import("folders")
    imp.report.sources = [src]
    root = ImageRoot(src, allow_outside=allow_outside)
    tops = [(src, "")]
    if split_folders:
        tops = [(d, SPLIT_WORDS.get(d.name.lower(), d.name)) for d in sorted(src.iterdir()) if d.is_dir() and not _hidden(d.name)]
        if not tops:
            raise ConfigError(f"{src}: no split folders (--split-folders expects SRC/SPLIT/LABEL/...)")
        for f in sorted(src.iterdir()):
            if f.is_file() and not _hidden(f.name):
                imp.report.drop("a file beside the split folders", str(f))
    entries: list[tuple[Path, str, str]] = []  # (file as found, label or "", split)
    for top, split in tops:
        for entry in sorted(top.iterdir()):
            if _hidden(entry.name):
                continue
            if entry.is_dir():
                root.check(Path(os.path.realpath(entry)), str(entry), entry.name)
                name = label_name(entry.name, str(entry))
                entries += [(f, name, split) for f in _files(entry, imp)]
            elif entry.is_file():
                entries.append((entry, "", split))
    # join: one key per file, by where it really is, then by contents among equal sizes
    real: dict[Path, Path] = {}
    for f, _, _ in entries:
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        real[f] = root.check(Path(os.path.realpath(f)), str(f), os.path.relpath(f, src))
    by_size: dict[int, set[Path]] = defaultdict(set)
    for r in set(real.values()):
        by_size[r.stat().st_size].add(r)
    same: dict[Path, Path] = {}
    for group in by_size.values():
        if len(group) > 1:
            by_hash: dict[str, list[Path]] = defaultdict(list)
            for r in sorted(group):
                by_hash[file_digest(r)].append(r)
            for members in by_hash.values():
                for r in members:
                    same[r] = members[0]
    key = {f: same.get(r, r) for f, r in real.items()}
    shown: dict[Path, Path] = {}  # key -> the path the manifest names: the first real (non-link) file
    for f in sorted(real, key=lambda p: (p.is_symlink(), str(p))):
        shown.setdefault(key[f], Path(os.path.normpath(f.absolute())))
    joined = 0
    for f, name, split in entries:
        if f not in real:
            imp.report.drop("not an image file", str(f))
            continue
        image = shown[key[f]]
        joined += image in imp.rows and Path(os.path.normpath(f.absolute())) != image
        imp.add(image, [name] if name else [], split=split, where=str(f))
    if joined:
        imp.report.note(f"{joined} files are links to or copies of an image found elsewhere; their labels are joined")
    return imp
