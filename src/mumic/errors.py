"""Errors a user can act on. The CLI prints their message on one line and exits 2."""

import reprlib
from typing import Any

SHOWN_CHARS = 80
"""The most characters of a user's value that an error message repeats."""

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = _repr.maxother = _repr.maxlong = 2 * SHOWN_CHARS + 8  # then cut at the end, by shown
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = _repr.maxfrozenset = 8


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters (cut with '…'):
    a value from a file can be megabytes (or, through YAML aliases, far more), and its
    repr is built only as far as it is shown."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cut(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` itself, cut to at most ``limit`` characters with '…'."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class MumicError(Exception):
    """Base class of every error mumic raises on purpose."""


class ManifestError(MumicError):
    """A manifest or labels file is missing, malformed, or names unknown labels."""


class ImageError(MumicError):
    """An image file is missing, unreadable, not an image, or too large."""


class ConfigError(MumicError):
    """A configuration key is unknown or has the wrong type or value."""


class BackboneError(MumicError):
    """A backbone could not be found, loaded or verified."""


class RunError(MumicError):
    """A run directory is missing, incomplete, tampered with, or would be overwritten."""


class OutputError(MumicError):
    """An output could not be written (a full disk, a read-only or foreign folder); the
    message names the path and the system's reason. Nothing old was replaced."""


class ExportError(MumicError):
    """A model could not be exported to ONNX, or the exported graphs disagree with PyTorch."""


class ServiceError(MumicError):
    """A request the service refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class UploadError(ImageError):
    """An uploaded image that cannot be used: 413 (too large) or 422 (not decodable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class EmojiSourceError(MumicError):
    """An EmojiTags source package could not be fetched, failed its integrity check, or
    has an unexpected layout."""


class IndexFolderError(MumicError):
    """An index folder is missing, incomplete, or does not belong to the run in use."""
