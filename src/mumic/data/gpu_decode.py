"""Optional GPU JPEG decoding: workers only read bytes, the GPU decodes and resizes.

On a CUDA machine with torchvision, ``decode="gpu"`` moves the costliest step of the
input pipeline (JPEG decode + resize) from the CPU workers to nvjpeg and the GPU. The
workers read each file and look at its header only; a file the GPU path would decode
differently from :func:`~mumic.data.images.load_image` (not a baseline RGB/grey JPEG, an
EXIF rotation, over the pixel limit, unreadable) is decoded on the CPU by the normal path
in the worker instead, so every image gets the same checks and the same orientation.

The resize is the eval transform of the CPU path (shorter side to ``size``, center crop),
done as bicubic with antialiasing on the central square; it differs from Pillow's by a few
grey levels (``tests/test_gpu_decode.py`` bounds it).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from mumic.data.images import MAX_PIXELS, load_image, resize_center_crop
from mumic.errors import ConfigError, ImageError

DECODE_CHOICES = ("cpu", "gpu", "nvimgcodec")
"""``--decode``: CPU workers, nvjpeg through torchvision, or the hardware JPEG engines through
nvImageCodec (:mod:`mumic.data.nvimgcodec_decode`)."""

_JPEG_SOI = b"\xff\xd8\xff"
_ORIENTATION = 0x0112


def gpu_decode_available() -> str | None:
    """None when GPU decoding can run here, else the reason it cannot."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as e:  # ImportError, or a torchvision built against another torch
        return f"torchvision is not importable ({e.__class__.__name__}: {e})"
    return None


def check_decode(decode: str, device: torch.device | str) -> None:
    """Raise ConfigError naming the problem when ``decode`` cannot run on ``device``."""
    if decode not in DECODE_CHOICES:
        raise ConfigError(f"decode must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
    if decode == "nvimgcodec":
        check_nvimgcodec(device)
    if decode == "gpu":
        if torch.device(device).type != "cuda":
            raise ConfigError(f"decode 'gpu' needs a CUDA device, but the model runs on {device}")
        why = gpu_decode_available()
        if why:
            raise ConfigError(f"decode 'gpu' is not available: {why}; install torchvision built for this torch, or use decode 'cpu'")


# nvImageCodec (decode "nvimgcodec", mumic.data.nvimgcodec_decode): checked here, next to the
# other decode paths, so that choosing a path never imports more than its check.
EXTRA = "pip install 'mumic[gpu]'"
"""How to install the optional dependency this path needs."""


def import_nvimgcodec() -> Any:
    """The ``nvidia.nvimgcodec`` module (ImportError when it is not installed)."""
    from nvidia import nvimgcodec

    return nvimgcodec


def nvimgcodec_missing() -> str | None:
    """None when nvImageCodec imports here, else why not."""
    try:
        import_nvimgcodec()
    except Exception as e:  # ImportError, or a library that fails to load
        return f"{e.__class__.__name__}: {e}"
    return None


def check_nvimgcodec(device: torch.device | str) -> None:
    """Raise ConfigError naming the problem when ``decode="nvimgcodec"`` cannot run on ``device``."""
    if torch.device(device).type != "cuda":
        raise ConfigError(f"decode 'nvimgcodec' needs a CUDA device, but the model runs on {device}; use decode 'cpu'")
    if not torch.cuda.is_available():
        raise ConfigError("decode 'nvimgcodec' needs a CUDA device, but torch sees none; use decode 'cpu'")
    why = nvimgcodec_missing()
    if why:
        raise ConfigError(f"decode 'nvimgcodec' needs nvImageCodec, which is not importable ({why}); "
                          f"install it with {EXTRA}, or use decode 'cpu'")


def gpu_decodable(img: Image.Image) -> bool:
    """True when nvjpeg gives the same image as the CPU path: a baseline JPEG in RGB or
    grey with no EXIF rotation."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return False
    if img.info.get("progressive") or img.info.get("progression"):
        return False
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:
        return False
    return orientation in (None, 1)


class JpegBytesDataset(Dataset):
    """Items are ``(index, kind, payload, reason)``.

    kind 0: payload is the file's bytes, for the GPU decoder.
    kind 1: payload is the CPU path's uint8 array [3, size, size] (non-JPEG, rotated, ...).
    kind 2: the image is unreadable; payload is None and ``reason`` says why (raised
    as ImageError unless ``skip_bad``).

    Payloads are plain Python/NumPy objects, pickled by value between processes: a batch
    of a thousand tensors would need a thousand shared-memory file descriptors.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], size: int, *, max_pixels: int = MAX_PIXELS,
                 skip_bad: bool = False) -> None:
        self.paths = [Path(p) for p in paths]
        self.size = int(size)
        self.max_pixels = int(max_pixels)
        self.skip_bad = bool(skip_bad)

    def __len__(self) -> int:
        return len(self.paths)

    def _cpu(self, index: int) -> tuple:
        try:
            img = load_image(self.paths[index], size_hint=self.size, max_pixels=self.max_pixels)
        except ImageError as e:
            if not self.skip_bad:
                raise
            return index, 2, None, str(e) or "unreadable image"
        return index, 1, resize_center_crop(img, self.size), ""

    def __getitem__(self, index: int) -> tuple:
        index = int(index)
        path = self.paths[index]
        try:
            with open(path, "rb") as f:
                head = f.read(3)
                if head != _JPEG_SOI:
                    return self._cpu(index)
                data = head + f.read()
            with Image.open(io.BytesIO(data)) as img:  # header only
                w, h = img.size
                if w * h > self.max_pixels or not gpu_decodable(img):
                    return self._cpu(index)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return self._cpu(index)  # gives the CPU path's error and reason
        return index, 0, data, ""


class RawBatch(list):
    """A batch of JpegBytesDataset items, kept as a list (byte strings differ in length).
    Its ``pin_memory`` is a no-op: the DataLoader's pinning would otherwise walk every
    item, and nothing in it is a tensor."""

    def pin_memory(self, device=None) -> RawBatch:
        return self


def collate_raw(items: list[tuple]) -> RawBatch:
    return RawBatch(items)


def resize_center_crop_tensor(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] or [N, 3, H, W] (any device) -> uint8 [..., 3, size, size]: the
    central square, resized with antialiased bicubic (the eval transform of the CPU path)."""
    h, w = int(img.shape[-2]), int(img.shape[-1])
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    sq = img[..., top : top + s, left : left + s]
    if s == size:
        return sq.contiguous()
    x = sq.unsqueeze(0) if sq.dim() == 3 else sq
    x = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x[0] if sq.dim() == 3 else x


def decode_batch(items: list[tuple], dataset: JpegBytesDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(indices, uint8 [N, 3, size, size] on ``device``, reasons) from a batch of
    ``dataset``. Unreadable images give zero pixels and a non-empty reason (with
    ``skip_bad``; else ImageError). A file nvjpeg rejects is decoded again by the CPU
    path, so one bad file never costs its batch."""
    from torchvision.io import ImageReadMode, decode_jpeg

    size = dataset.size
    n = len(items)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    reasons = [""] * n

    def put(r: int, item: tuple) -> None:
        _, kind, payload, reason = item
        if kind == 1:
            out[r].copy_(torch.from_numpy(payload))
        else:
            out[r].zero_()
            reasons[r] = reason

    gpu_rows = []
    for r, it in enumerate(items):
        if it[1] == 0:
            gpu_rows.append(r)
        else:
            put(r, it)
    if gpu_rows:
        with warnings.catch_warnings():  # read-only bytes: decode_jpeg never writes its input
            warnings.simplefilter("ignore", UserWarning)
            data = [torch.frombuffer(items[r][2], dtype=torch.uint8) for r in gpu_rows]
        decoded: list[torch.Tensor | None]
        try:
            decoded = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the whole call: retry one by one
            decoded = []
            for d in data:
                try:
                    decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        groups: dict[tuple[int, int], list[int]] = {}  # equal shapes are resized in one call
        for j, img in enumerate(decoded):
            if img is None:  # nvjpeg refused it: the CPU path decides
                r = gpu_rows[j]
                put(r, dataset._cpu(int(items[r][0])))
            else:
                groups.setdefault((int(img.shape[1]), int(img.shape[2])), []).append(j)
        for js in groups.values():
            sq = resize_center_crop_tensor(torch.stack([decoded[j] for j in js]), size)  # type: ignore[misc]
            out[torch.tensor([gpu_rows[j] for j in js], device=device)] = sq
    idx = torch.tensor([int(it[0]) for it in items], dtype=torch.long)
    return idx, out, reasons
