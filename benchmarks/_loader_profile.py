"""Where the CPU decode path's time goes in the main process: a breakdown of
`mumic.data.dataset.pixel_batches(decode="cpu")` into its stages, timed batch by batch.

The loop is the CPU path's own (ImageDataset + make_loader in slices of LOADER_BATCH,
joined into model batches on the device), run twice:

- as mumic runs it (the DataLoader's pin-memory thread pins each slice): `receive` is the
  main thread's wait in `next()` (worker decode not yet done, unpickling the shared-memory
  handle, the pin thread's copy), `copy` the non-blocking upload, `join` the torch.cat on
  the device, `sync` the final wait for the device;
- split, with pinning moved into the main thread (pin_memory=False, `pin` timed on its own
  with Tensor.pin_memory()), so that receiving and pinning show separately.

Beside it: one process's decode rate (ImageDataset items in a loop, no workers), which
times the number of workers gives the pace the workers could reach.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mumic.data.dataset import LOADER_BATCH, ImageDataset


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_process_rate(paths: list[Path], size: int, n: int = 128) -> float:
    """images/s of decode + crop in this process alone (what one worker does)."""
    ds = ImageDataset(paths[:n], size)
    ds[0]
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return len(ds) / (time.perf_counter() - t)


@torch.inference_mode()
def profile_cpu_path(paths: list[Path], size: int, batch: int, workers: int, device: torch.device, *,
                     split_pinning: bool) -> dict[str, Any]:
    """Seconds per stage over the whole pass, and images/s."""
    parts = -(-batch // LOADER_BATCH)
    ds = ImageDataset(paths, size)
    pin_thread = device.type == "cuda" and not split_pinning
    loader = DataLoader(ds, batch_size=-(-batch // parts), num_workers=workers, pin_memory=pin_thread)
    stages = dict.fromkeys(("start", "receive", "pin", "copy", "join", "sync"), 0.0)
    slices = 0
    t0 = time.perf_counter()
    it = iter(loader)
    stages["start"] = time.perf_counter() - t0
    held: list[torch.Tensor] = []
    while True:
        t = time.perf_counter()
        try:
            _, px = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        stages["receive"] += t1 - t
        if split_pinning and device.type == "cuda":
            px = px.pin_memory()
        t2 = time.perf_counter()
        stages["pin"] += t2 - t1
        held.append(px.to(device, non_blocking=True))
        t3 = time.perf_counter()
        stages["copy"] += t3 - t2
        slices += 1
        if len(held) == parts:
            torch.cat(held) if parts > 1 else held[0]
            held = []
        stages["join"] += time.perf_counter() - t3
    t = time.perf_counter()
    _sync(device)
    stages["sync"] = time.perf_counter() - t
    wall = time.perf_counter() - t0
    return {"mode": "pinning in the main thread" if split_pinning else "as mumic runs it", "slices": slices,
            "slice_images": -(-batch // parts), "wall_s": round(wall, 4), "images_per_s": round(len(paths) / wall, 1),
            "stages_s": {k: round(v, 4) for k, v in stages.items()}}


def profile_report(paths: list[Path], size: int, batch: int, workers: int, device: torch.device, log=print) -> dict[str, Any]:
    """Both runs and the one-process rate, printed as a table; returns them."""
    one = one_process_rate(paths, size)
    runs = [profile_cpu_path(paths, size, batch, workers, device, split_pinning=s) for s in (False, True)]
    log(f"profile, decode cpu: one process decodes {one:.1f} images/s, so {workers} workers could give {one * workers:.0f}/s")
    log(f"  {'run':<28} {'images/s':>9} {'wall s':>7} " + " ".join(f"{k:>8}" for k in runs[0]["stages_s"]))
    for r in runs:
        log(f"  {r['mode']:<28} {r['images_per_s']:9.1f} {r['wall_s']:7.2f} "
            + " ".join(f"{v:8.3f}" for v in r["stages_s"].values()))
    log("  (seconds in the main thread over the pass; receive = waiting in next(): the workers' decode not ready, "
        "unpickling, and the pin thread's copy when it pins)")
    return {"one_process_images_per_s": round(one, 1), "workers": workers, "runs": runs}
