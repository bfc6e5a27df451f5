"""JPEG decoding on the GPU's hardware JPEG engines, through nvImageCodec (``decode="nvimgcodec"``).

A100/H100/H200-class GPUs carry dedicated JPEG decoders (NVJPG engines) beside the SMs;
nvImageCodec drives them for a whole batch from one call, with its own thread pool for
the parsing, and falls back to its CUDA decoder for what the engines do not take. It is
an optional dependency: ``pip install 'mumic[gpu]'`` (``nvidia-nvimgcodec-cu13`` and the
nvJPEG runtime it loads).

Which files reach it is decided exactly as for ``decode="gpu"`` (:mod:`mumic.data.gpu_decode`):
the DataLoader workers read each file and look at its header; a file whose GPU decode could
differ from :func:`~mumic.data.images.load_image` (not a baseline RGB/grey JPEG, an EXIF
rotation, over the pixel limit, unreadable) is decoded on the CPU in the worker, and a file
the decoder refuses is decoded again by the CPU path, which gives its usual pixels or its
usual error. The eval transform is the same tensor resize as the ``gpu`` path.

The workers send each batch as one packed uint8 tensor of file bytes plus offsets, and the
CPU-decoded rows as one uint8 tensor: two shared-memory blocks per batch instead of a
thousand pickled byte strings through the result pipe.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mumic.data.gpu_decode import (  # noqa: F401  (EXTRA, check_nvimgcodec and nvimgcodec_missing are this path's too)
    EXTRA,
    JpegBytesDataset,
    check_nvimgcodec,
    import_nvimgcodec,
    nvimgcodec_missing,
    resize_center_crop_tensor,
)
from mumic.errors import ImageError

RESIZE_CHUNK = 256
"""Images resized in one call (bounds the float copy of a batch of full-size images)."""


@dataclass
class PackedBatch:
    """A batch of :class:`JpegBytesDataset` items in a few tensors.

    ``index[r]`` is row r's dataset index. Rows with ``kind[r] == 0`` are JPEG bytes for
    the GPU: ``data[offsets[r] : offsets[r + 1]]`` (other rows have empty spans). Rows of
    kind 1 were decoded on the CPU: ``cpu_rows`` lists them and ``cpu_pixels`` holds their
    uint8 [3, size, size] pixels in that order. Kind 2 is unreadable; ``reasons[r]`` says why.
    """

    index: torch.Tensor
    kind: torch.Tensor
    offsets: torch.Tensor
    data: torch.Tensor
    cpu_rows: torch.Tensor
    cpu_pixels: torch.Tensor
    reasons: list[str]

    def pin_memory(self, device: Any = None) -> PackedBatch:
        """No pinning: the decoder reads the bytes from host memory itself, and the
        CPU-decoded rows are few (copying the whole batch into pinned memory costs more)."""
        return self

    def __len__(self) -> int:
        return int(self.index.numel())


def collate_packed(items: list[tuple]) -> PackedBatch:
    """Join ``(index, kind, payload, reason)`` items (see :class:`JpegBytesDataset`) into one
    :class:`PackedBatch`; runs in the DataLoader worker."""
    n = len(items)
    lengths = [len(it[2]) if it[1] == 0 else 0 for it in items]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.empty(int(offsets[-1]), np.uint8)
    cpu_rows: list[int] = []
    cpu_px: list[np.ndarray] = []
    for r, (_, kind, payload, _) in enumerate(items):
        if kind == 0:
            data[offsets[r] : offsets[r + 1]] = np.frombuffer(payload, np.uint8)
        elif kind == 1:
            cpu_rows.append(r)
            cpu_px.append(payload)
    pixels = torch.from_numpy(np.stack(cpu_px)) if cpu_px else torch.zeros((0, 0, 0, 0), dtype=torch.uint8)
    return PackedBatch(
        index=torch.tensor([int(it[0]) for it in items], dtype=torch.long),
        kind=torch.tensor([int(it[1]) for it in items], dtype=torch.uint8),
        offsets=torch.from_numpy(offsets),
        data=torch.from_numpy(data),
        cpu_rows=torch.tensor(cpu_rows, dtype=torch.long),
        cpu_pixels=pixels,
        reasons=[str(it[3]) for it in items],
    )


class NvImgCodecDecoder:
    """Decodes :class:`PackedBatch` es on ``device`` with nvImageCodec.

    ``backends`` names nvImageCodec backend kinds, most preferred first (default: the
    hardware engines, then the CUDA decoder, then the hybrid CPU/GPU one; no CPU-only
    backend, so what the GPU cannot decode goes to mumic's own CPU path). The tests run
    the real library with its CPU backend on machines without CUDA.
    """

    DEFAULT_BACKENDS = ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU")

    def __init__(self, device: torch.device | str, *, backends: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        nv = import_nvimgcodec()
        self.nv = nv
        self.device = torch.device(device)
        kinds = list(backends or self.DEFAULT_BACKENDS)
        cpu_only = self.device.type != "cuda"
        if cpu_only:
            device_id = nv.NVIMGCODEC_DEVICE_CPU_ONLY
        else:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.decoder = nv.Decoder(
            device_id=device_id,
            max_num_cpu_threads=int(threads or max(1, min(8, os.cpu_count() or 1))),
            backends=[nv.Backend(getattr(nv.BackendKind, k)) for k in kinds],
            options=":fancy_upsampling=1",  # chroma upsampling as libjpeg (Pillow) does it
        )
        self.params = nv.DecodeParams(apply_exif_orientation=True, color_spec=nv.ColorSpec.SRGB,
                                      sample_format=nv.SampleFormat.I_RGB)

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def _to_tensor(self, img: Any) -> torch.Tensor:
        """An nvImageCodec image (H, W, 3) -> uint8 [3, H, W] on the device, without a copy
        where the image is already there (DLPack, ordered on the current stream). A host
        image (the CPU backend) is read through the array interface: its DLPack export
        needs the CUDA runtime."""
        t = torch.from_dlpack(img) if self.device.type == "cuda" else torch.from_numpy(np.asarray(img))
        return t.permute(2, 0, 1).to(self.device, non_blocking=True)

    def decode(self, batch: PackedBatch, dataset: JpegBytesDataset) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(indices, uint8 [N, 3, size, size] on the device, reasons) for one batch. An
        unreadable image gives zero pixels and a non-empty reason (with ``skip_bad``; else
        :class:`~mumic.errors.ImageError`, as the CPU path raises it)."""
        size = dataset.size
        n = len(batch)
        out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=self.device)
        reasons = list(batch.reasons)
        kind = batch.kind.tolist()
        for r, k in enumerate(kind):
            if k == 2:
                if not dataset.skip_bad:  # a worker with skip_bad=False raises itself; kept for safety
                    raise ImageError(reasons[r] or "unreadable image")
                out[r].zero_()
        if len(batch.cpu_rows):
            out[batch.cpu_rows.to(self.device)] = batch.cpu_pixels.to(self.device, non_blocking=True)
        gpu_rows = [r for r, k in enumerate(kind) if k == 0]
        if gpu_rows:
            self._decode_rows(batch, gpu_rows, dataset, out, reasons)
        return batch.index, out, reasons

    def _decode_rows(self, batch: PackedBatch, rows: list[int], dataset: JpegBytesDataset, out: torch.Tensor,
                     reasons: list[str]) -> None:
        nv = self.nv
        data = batch.data.numpy()
        off = batch.offsets.tolist()
        streams: list[Any] = []
        keep: list[int] = []
        refused: list[int] = []
        for r in rows:
            try:
                streams.append(nv.CodeStream(data[off[r] : off[r + 1]]))
                keep.append(r)
            except Exception:  # the parser refuses the header: the CPU path decides
                refused.append(r)
        images = self.decoder.decode(streams, params=self.params, cuda_stream=self._stream()) if streams else []
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for r, img in zip(keep, images):
            if img is None:
                refused.append(r)
                continue
            t = self._to_tensor(img)
            groups.setdefault((int(t.shape[1]), int(t.shape[2])), []).append((r, t))
        for members in groups.values():
            for s in range(0, len(members), RESIZE_CHUNK):
                part = members[s : s + RESIZE_CHUNK]
                sq = resize_center_crop_tensor(torch.stack([t for _, t in part]), dataset.size)
                out[torch.tensor([r for r, _ in part], device=self.device)] = sq
        for r in sorted(refused):
            _, k, payload, reason = dataset._cpu(int(batch.index[r]))  # the CPU path's pixels or its error
            if k == 1:
                out[r].copy_(torch.from_numpy(payload))
            else:
                out[r].zero_()
                reasons[r] = reason
