"""The four pinned npm packages EmojiTags is made from: fetched with ``npm pack`` (or
taken from a folder of tarballs), each checked against its npm ``dist.integrity``
(sha512) before anything is read from it, and read as archives without unpacking."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mumic.errors import EmojiSourceError
from mumic.io import file_digest

log = logging.getLogger(__name__)


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

_NPM_TIMEOUT_S = 1800


def integrity_of(path: str | os.PathLike[str]) -> str:
    """The npm-style integrity string (``sha512-<base64>``) of a file."""
    return "sha512-" + base64.b64encode(bytes.fromhex(file_digest(path, "sha512"))).decode("ascii")


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
            # held open for the archive's lifetime; closed by __exit__
            self._tar = tarfile.open(path, "r:gz")  # noqa: SIM115
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
