"""Image decoding and the two geometric transforms (eval: resize + center crop; train:
random resized crop + flip).

The pixel arithmetic itself (RGB conversion, draft decoding, EXIF orientation, the eval
resample) lives in :mod:`mumic.data.preprocess`, which an ONNX export copies verbatim.

One decoder serves files and uploaded bytes: ``load_image`` turns a file Pillow can read
into an RGB image, or raises :class:`~mumic.errors.ImageError` with the path and the
reason; ``decode_image`` does the same for bytes a client sent (``ALLOWED_FORMATS`` only)
and raises :class:`~mumic.errors.UploadError` with an HTTP status. Transforms return
``uint8`` arrays ``[3, size, size]``; normalisation belongs to the backbone.
"""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mumic.data.preprocess import REDUCING_GAP, as_chw, crop_resize, decode_rgb, resize_center_crop, to_rgb
from mumic.errors import ImageError, UploadError

__all__ = [
    "ALLOWED_FORMATS", "MAX_PIXELS", "REDUCING_GAP", "REFUSED_FORMATS", "decode_image", "decoded_bytes", "image_pixels", "load_image",
    "random_resized_crop", "resize_center_crop", "to_rgb",
]

log = logging.getLogger(__name__)

MAX_PIXELS = 89_478_485
"""Default pixel limit (Pillow's own decompression-bomb limit)."""


REFUSED_FORMATS = {"EPS": "decoding it runs Ghostscript, an external interpreter"}
"""Formats Pillow can open but ``load_image`` refuses, with the reason (checked after the
header is read, before anything is decoded)."""

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
"""Pillow formats ``decode_image`` accepts from clients; others (EPS, PDF, ...) are
refused before anything is decoded."""

_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
"""Bytes Pillow holds per pixel of a decoded image, by mode; every other mode takes 4
(Pillow stores RGB, YCbCr and LAB in 4 bytes, and I and F are 32-bit)."""


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """Bytes a decoded ``width`` x ``height`` image of ``mode`` holds in Pillow."""
    return width * height * _BYTES_PER_PIXEL.get(mode, 4)


_BOMB_SIZE = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


def _check_file(path: Path) -> None:
    """Raise ImageError unless ``path`` is a non-empty regular file (no FIFO, device or
    directory: opening those could block or never end)."""
    try:
        st = os.stat(path)
    except ValueError as e:  # a NUL byte, or text that cannot be a file name
        reason = "contains a NUL byte" if "null" in str(e) else f"not a valid file name ({e})"
        raise ImageError(f"{str(path)!r}: invalid path: {reason}") from None
    except FileNotFoundError:
        reason = "broken symlink" if os.path.islink(path) else "file not found"
        raise ImageError(f"{path}: {reason}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(f"{path}: symlink loop") from None
        raise ImageError(f"{path}: cannot access: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{path}: is a directory, not an image")
    if not stat.S_ISREG(st.st_mode):
        mode = st.st_mode
        if stat.S_ISFIFO(mode):
            kind = "a FIFO"
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = "a device"
        elif stat.S_ISSOCK(mode):
            kind = "a socket"
        else:
            kind = "special"
        raise ImageError(f"{path}: not a regular file ({kind}); point to the image file itself")
    if st.st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")


def load_image(
    path: str | os.PathLike[str],
    *,
    size_hint: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Decode an image file to RGB (EXIF orientation applied, first frame of animations).

    ``size_hint`` lets JPEGs decode at a reduced scale whose sides stay >= ``size_hint``.
    Raises ImageError (with path and reason) for a missing path, a directory, a FIFO or
    device, an empty or non-image file, truncated data, a format in ``REFUSED_FORMATS``,
    or more than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    path = Path(path)
    _check_file(path)
    return _decode(path, str(path), upload=False, size_hint=size_hint, max_pixels=max_pixels)


def decode_image(
    data: bytes, *, max_pixels: int, size_hint: int | None = None, name: str = "image", max_decoded_bytes: int | None = None
) -> Image.Image:
    """Uploaded bytes -> RGB image, decoded as ``load_image`` decodes files.

    Only ``ALLOWED_FORMATS`` are opened. Raises UploadError: 413 over ``max_pixels``, or
    when the decoded image would hold more than ``max_decoded_bytes`` (``decoded_bytes``
    of its size and mode, after JPEG draft reduction; checked from the header, before
    decoding: a small float or 16-bit file can decode to far more bytes than its pixel
    count suggests); 422 when the bytes are empty or not a supported image; ``name``
    starts the message.
    """
    if not data:
        raise UploadError(422, f"{name}: empty upload (0 bytes)")
    return _decode(io.BytesIO(data), name, upload=True, size_hint=size_hint, max_pixels=max_pixels,
                   max_decoded_bytes=max_decoded_bytes)


def image_pixels(data: bytes, size: int, *, max_pixels: int, name: str = "image", max_decoded_bytes: int | None = None) -> np.ndarray:
    """Uploaded bytes -> uint8 array [3, size, size] (resize shorter side, center crop)."""
    img = decode_image(data, max_pixels=max_pixels, size_hint=size, name=name, max_decoded_bytes=max_decoded_bytes)
    return resize_center_crop(img, size)


def _decode(
    source: Path | io.BytesIO, where: str, *, upload: bool, size_hint: int | None, max_pixels: int,
    max_decoded_bytes: int | None = None,
) -> Image.Image:
    """The one decoder of files and uploads. ``where`` (a path or an upload's name) starts
    every message; an upload fails with UploadError (413 too large, 422 undecodable), a
    file with ImageError."""

    def fail(message: str, *, too_large: bool = False) -> ImageError:
        return UploadError(413 if too_large else 422, message) if upload else ImageError(message)

    def on_exif_error(e: Exception) -> None:  # a broken EXIF block must not lose the image
        log.log(logging.DEBUG if upload else logging.WARNING, "%s: ignoring unreadable EXIF orientation (%s)", where, e)

    try:
        with Image.open(source, formats=ALLOWED_FORMATS if upload else None) as img:
            # Only the header has been read so far: refuse here, before any pixel buffer
            # is allocated or any decoder runs.
            width, height = img.size
            if width * height > max_pixels:
                raise fail(
                    f"{where}: too many pixels ({width}x{height} = {width * height:,}, limit {max_pixels:,}); "
                    f"downscale the image{'' if upload else ' or raise max_pixels'}",
                    too_large=True,
                )
            refused = REFUSED_FORMATS.get(img.format or "")
            if refused:
                raise fail(f"{where}: {img.format} files are not accepted ({refused}); convert it to PNG or JPEG")
            if max_decoded_bytes is not None:
                _check_decoded_bytes(img, where, size_hint, max_decoded_bytes, fail)
            rgb = decode_rgb(img, size_hint, on_exif_error)
    except ImageError:
        raise
    except UnidentifiedImageError:
        accepted = f"in a supported format ({', '.join(ALLOWED_FORMATS)})" if upload else "(unrecognised format)"
        raise fail(f"{where}: not an image {accepted}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning, where warnings are errors
        found = _BOMB_SIZE.search(str(e))
        if upload:
            detail = "decompression bomb limit"
        else:
            detail = f"{int(found[1]):,} pixels, over the decompression-bomb limit of {int(found[2]):,}" if found else str(e)
        raise fail(f"{where}: too many pixels ({detail}); downscale the image", too_large=True) from None
    except MemoryError:
        raise
    except PermissionError:
        raise fail(f"{where}: permission denied") from None
    except Exception as e:  # decoders raise OSError, EOFError, SyntaxError, ValueError, struct.error, ...
        raise fail(_decode_failure(where, e, upload=upload)) from None
    return rgb


def _check_decoded_bytes(img: Image.Image, where: str, size_hint: int | None, limit: int, fail: Callable[..., ImageError]) -> None:
    """Refuse (413) an opened image whose decoded pixels would hold more than ``limit``
    bytes. A JPEG is first set to decode at its reduced scale (as decode_rgb would), so a
    large photo costs what its reduced size costs."""
    if size_hint is not None and img.format == "JPEG":
        img.draft("RGB", (size_hint, size_hint))  # decode_rgb's own draft call is then a no-op
    width, height = img.size
    need = decoded_bytes(width, height, img.mode)
    if need > limit:
        raise fail(f"{where}: a {width}x{height} {img.mode} image decodes to {need:,} bytes, over the limit of {limit:,}; "
                   "send it as 8-bit RGB or downscale it", too_large=True)


def _decode_failure(where: str, e: Exception, *, upload: bool) -> str:
    reason = str(e) or e.__class__.__name__
    if upload:
        return f"{where}: cannot decode the image ({reason})"
    if not isinstance(e, (OSError, EOFError)):
        return f"{where}: cannot decode: {e.__class__.__name__}: {e}"
    if "truncated" in reason.lower() or isinstance(e, EOFError):
        reason = f"truncated or corrupt data ({reason})"
    return f"{where}: cannot decode: {reason}"


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.7, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
) -> np.ndarray:
    """Train augmentation: a random crop of ``scale`` of the area and ``ratio`` aspect,
    resized to ``size`` x ``size``, flipped left-right with probability 1/2 when
    ``hflip``. Deterministic given the state of ``rng``. Returns uint8 [3, size, size]."""
    w, h = img.size
    area = float(w * h)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    box: tuple[float, float, float, float] | None = None
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            box = (left, top, left + cw, top + ch)
            break
    if box is None:  # fall back to the largest central crop within the ratio range
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            ch, cw = h, int(round(h * ratio[1]))
        else:
            cw, ch = w, h
        left, top = (w - cw) // 2, (h - ch) // 2
        box = (left, top, left + cw, top + ch)
    out = crop_resize(img, box, size)
    flip = rng.random() < 0.5
    if hflip and flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return as_chw(out)
