"""Errors a user can act on. The CLI prints their message on one line and exits 2."""


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


class ExportError(MumicError):
    """A model could not be exported to ONNX, or the exported graphs disagree with PyTorch."""


class EmojiSourceError(MumicError):
    """An EmojiTags source package could not be fetched, failed its integrity check, or
    has an unexpected layout."""
