"""The pixels of an image as every mumic model sees them: decoded Pillow image -> RGB ->
one resample of the central square -> uint8 [3, size, size].

This module is the only implementation of that arithmetic: ``data.images`` decodes files
and uploads with it, and an ONNX export copies this file's source verbatim into its
``predict.py``, so it imports nothing but Pillow and numpy (and no mumic module) and
runs without ``from __future__`` imports.
"""

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

REDUCING_GAP = 3.0
"""Pillow's ``reducing_gap``: shrink by an integer factor first when downscaling a lot;
3.0 is indistinguishable from exact resampling and much faster on large photos."""

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_INT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_WHITE = (255, 255, 255)
_ORIENTATION = 0x0112
"""The EXIF Orientation tag; values 2-8 flip or turn the image (1: as stored)."""
_TURNED = frozenset(range(2, 9))


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, _WHITE)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


_CHUNK_PIXELS = 1 << 20
"""High-bit-depth images are converted this many pixels at a time, so that the float
arithmetic never holds a widened copy of the whole image."""


def _row_chunks(img: Image.Image):
    """(top, rows as a numpy array) of ``img``, about _CHUNK_PIXELS pixels at a time."""
    width, height = img.size
    step = max(1, _CHUNK_PIXELS // max(width, 1))
    for top in range(0, height, step):
        yield top, np.asarray(img.crop((0, top, width, min(top + step, height))))


def _grey8_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(grey, mode="L").convert("RGB")


def _int_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit integer grey -> 8-bit RGB, scaling the 16-bit range (Pillow would clip).

    round(clip(v, 0, 65535) / 257) in integers, chunk by chunk, in place on one int32
    copy of the chunk (2 x 65535 + 257 fits): never a float64 copy of the image (v / 257
    is never exactly halfway, so this equals the float rounding)."""
    width, height = img.size
    out = np.empty((height, width), dtype=np.uint8)
    for top, chunk in _row_chunks(img):
        v = chunk.astype(np.int32)
        np.clip(v, 0, 65535, out=v)
        v *= 2
        v += 257
        v //= 514
        out[top : top + len(v)] = v
    return _grey8_to_rgb(out)


def _float_to_rgb(img: Image.Image) -> Image.Image:
    """Float grey -> 8-bit RGB; values in [0, 1] are taken as fractions, else as 0..255
    (NaN as 0). Converted chunk by chunk: the float64 arithmetic holds one chunk at a time,
    in place on one copy of it."""
    width, height = img.size
    fractions = bool(width * height)  # no value over 1 (NaN counts as 0, +inf as over)
    for _, chunk in _row_chunks(img):
        if fractions and chunk.size and bool((chunk > 1.0).any()):
            fractions = False
    scale = 255.0 if fractions else 1.0
    out = np.empty((height, width), dtype=np.uint8)
    for top, chunk in _row_chunks(img):
        arr = chunk.astype(np.float64)
        np.nan_to_num(arr, copy=False)
        if scale != 1.0:
            arr *= scale
        np.clip(arr, 0, 255, out=arr)
        np.round(arr, out=arr)
        out[top : top + len(arr)] = arr
    return _grey8_to_rgb(out)


def _lab_to_rgb(img: Image.Image) -> Image.Image:
    """CIE L*a*b* -> sRGB through a colour transform (a plain convert copies channels)."""
    from PIL import ImageCms

    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    out = ImageCms.applyTransform(img, transform)
    assert out is not None
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited onto white."""
    mode = img.mode
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        return _composite_on_white(img)
    if mode == "RGB":
        return img
    if mode in _INT_MODES:
        return _int_to_rgb(img)
    if mode == "F":
        return _float_to_rgb(img)
    if mode == "LAB":
        return _lab_to_rgb(img)
    return img.convert("RGB")


def decode_rgb(
    img: Image.Image, size_hint: int | None = None, on_exif_error: Callable[[Exception], None] | None = None
) -> Image.Image:
    """An opened (header-only) image -> a loaded RGB image detached from its source.

    A JPEG decodes at the smallest reduced scale whose sides stay >= ``size_hint`` (Pillow's
    draft mode); EXIF orientation is applied (an unreadable EXIF block is passed to
    ``on_exif_error`` and ignored); the first frame of an animation is taken. Decoder
    errors (truncated data, ...) propagate from here."""
    if size_hint is not None and img.format == "JPEG":
        img.draft("RGB", (size_hint, size_hint))
    img.load()  # force the full decode here, so truncated data fails here
    try:
        # transposed only when the orientation says so: exif_transpose copies the whole image otherwise
        turned = img.getexif().get(_ORIENTATION, 1) in _TURNED
        oriented = ImageOps.exif_transpose(img) if turned else img
    except Exception as e:  # a broken EXIF block must not lose the image
        if on_exif_error is not None:
            on_exif_error(e)
        oriented = img
    rgb = to_rgb(oriented)
    if rgb is img:
        rgb = img.copy()  # detach from the source before it closes
    return rgb


def as_chw(img: Image.Image) -> np.ndarray:
    """An RGB image -> a contiguous uint8 array [3, height, width]."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def crop_resize(img: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    """The region ``box`` (left, top, right, bottom; fractional) of ``img`` resampled to
    ``size`` x ``size`` in one bicubic pass."""
    if img.mode != "RGB":
        img = to_rgb(img)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=REDUCING_GAP)


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size``, center-crop ``size`` x ``size``: uint8 [3, size, size].

    Done as one resample of the central square (same result, less work).
    """
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) / 2.0, (h - s) / 2.0
    return as_chw(crop_resize(img, (left, top, left + s, top + s), size))
