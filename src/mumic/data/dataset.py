"""A torch Dataset of decoded, cropped images, a seeded DataLoader, and file digests.

Train-time randomness comes from a generator seeded by (seed, epoch, index), so a
batch is the same whatever the number of workers or the order items are fetched in.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mumic import io
from mumic.data import gpu_decode
from mumic.data.gpu_decode import JpegBytesDataset, collate_raw, decode_batch
from mumic.data.images import MAX_PIXELS, load_image, random_resized_crop, resize_center_crop
from mumic.errors import ImageError


class ImageDataset(Dataset):
    """Items are ``(index, uint8 tensor [3, size, size])``.

    Eval (``train=False``): resize the shorter side to ``size`` and center-crop.
    Train: random resized crop + flip, deterministic given (seed, epoch, index).
    Unreadable images raise ImageError; with ``skip_bad=True`` items are instead
    ``(index, tensor, reason)``, where a bad image gives a zero tensor and its reason
    (empty for good images), so one bad file never stops a long job.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        size: int,
        *,
        train: bool = False,
        seed: int = 0,
        epoch: int = 0,
        max_pixels: int = MAX_PIXELS,
        skip_bad: bool = False,
    ) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.paths = [Path(p) for p in paths]
        self.size = int(size)
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.max_pixels = int(max_pixels)
        self.skip_bad = bool(skip_bad)

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Change the train augmentation for a new epoch (workers see it on the next
        iterator, since loaders from :func:`make_loader` do not keep workers alive)."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The augmentation generator of item ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> tuple:
        index = int(index)
        try:
            img = load_image(self.paths[index], size_hint=self.size, max_pixels=self.max_pixels)
        except ImageError as e:
            if not self.skip_bad:
                raise
            return index, torch.zeros((3, self.size, self.size), dtype=torch.uint8), str(e) or "unreadable image"
        arr = random_resized_crop(img, self.size, self.rng(index)) if self.train else resize_center_crop(img, self.size)
        if self.skip_bad:
            return index, torch.from_numpy(arr), ""
        return index, torch.from_numpy(arr)


def find_bad_images(paths: Sequence[str | os.PathLike[str]], size: int, *, num_workers: int = 0,
                    batch_size: int = 64) -> list[tuple[int, str]]:
    """(row, reason) of every image that cannot be decoded, found by decoding each once."""
    ds = ImageDataset(paths, size, skip_bad=True)
    bad: list[tuple[int, str]] = []
    for idx, _, reasons in make_loader(ds, batch_size, num_workers=num_workers):
        bad.extend((int(i), r) for i, r in zip(idx, reasons) if r)
    return bad


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    collate_fn=None,
) -> DataLoader:
    """A DataLoader whose shuffle order is fixed by ``seed``; workers are not persistent
    (so ``set_epoch`` reaches them) and memory is pinned when CUDA is available."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_fn,
    )


LOADER_BATCH = 64
"""The most images one DataLoader worker decodes into one slice of a batch."""


def pixel_batches(
    paths: Sequence[str | os.PathLike[str]],
    size: int,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    skip_bad: bool = False,
    decode: str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str] | None]]:
    """Eval-transformed images in file order: ``(indices, uint8 [B, 3, size, size] on
    device, reasons)``. ``reasons`` is None unless ``skip_bad``; then an unreadable image
    has zero pixels and a non-empty reason instead of raising ImageError.

    ``decode="cpu"`` decodes and resizes in the DataLoader workers (JPEG draft mode, one
    resize, uint8 across processes, pinned memory, non-blocking copies); ``"gpu"`` lets
    the workers read bytes only and decodes JPEGs with nvjpeg on ``device`` (CUDA and
    torchvision needed; see :mod:`mumic.data.gpu_decode`); ``"nvimgcodec"`` decodes them on
    the GPU's hardware JPEG engines (CUDA and ``mumic[gpu]``; :mod:`mumic.data.nvimgcodec_decode`)."""

    device = torch.device(device)
    gpu_decode.check_decode(decode, device)  # looked up at call time (tests stand in a CPU check)
    if decode == "nvimgcodec":
        from mumic.data.nvimgcodec_decode import NvImgCodecDecoder, collate_packed

        raw = JpegBytesDataset(paths, size, skip_bad=skip_bad)
        decoder = NvImgCodecDecoder(device)
        for packed in make_loader(raw, batch_size, num_workers=num_workers, collate_fn=collate_packed):
            idx, px, reasons = decoder.decode(packed, raw)
            yield idx, px, reasons if skip_bad else None
        return
    if decode == "gpu":
        raw = JpegBytesDataset(paths, size, skip_bad=skip_bad)
        for items in make_loader(raw, batch_size, num_workers=num_workers, collate_fn=collate_raw):
            idx, px, reasons = decode_batch(items, raw, device)
            yield idx, px, reasons if skip_bad else None
        return
    # Workers each build whole loader batches: with large model batches (1024 on a GPU)
    # only a few workers would have work and the first batch would come late, so the
    # workers deliver slices of the batch and the slices are joined on the device.
    parts = -(-batch_size // LOADER_BATCH)
    ds = ImageDataset(paths, size, skip_bad=skip_bad)
    held: list[tuple] = []
    for batch in make_loader(ds, -(-batch_size // parts), num_workers=num_workers):
        held.append((batch[0], batch[1].to(device, non_blocking=True), list(batch[2]) if skip_bad else None))
        if len(held) == parts:
            yield _joined(held)
            held = []
    if held:
        yield _joined(held)


def _joined(held: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    if len(held) == 1:
        return held[0]
    reasons = None if held[0][2] is None else [r for h in held for r in h[2]]
    return torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held]), reasons


def file_digest(path: str | os.PathLike[str]) -> str:
    """Hex blake2b-128 of the file's bytes (feature-cache keys); an unreadable file is an
    ImageError naming it."""
    try:
        return io.file_digest(path, "blake2b", digest_size=16)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not a file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror or e}") from None
