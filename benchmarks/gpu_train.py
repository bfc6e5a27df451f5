"""Training throughput of an `hf:` CLIP ViT-B/32 (random weights, built locally): mumic's
training step, tuned, against a plain PyTorch loop over the same model, in the same run;
and the same two with the image tower frozen (heads on cached tower features).

Tuned is mumic's own step (`mumic.train.Trainer.step`, the model, loss and parameter
groups `fit` builds from a config) with: bf16 autocast (the run's `amp`), the patch
embedding and the input in channels_last, fused AdamW over the Trainer's parameter groups,
the image tower through `torch.compile` (`--compile`), and the model wrapped in
DistributedDataParallel on one process (as under torchrun). Trainer.step reads its loss
with one `float()` per step, a synchronisation the tuned path keeps. Batches come from
pinned host memory with non-blocking copies.

Plain is what a user writes first over the same model (a second Trainer from the same
config, so the same weights): fp32 (TF32 off, PyTorch's default), AdamW with its defaults,
pageable host batches copied synchronously, `loss.item()` every step, no DDP.

Model FLOP utilisation (MFU) counts the FLOPs of one forward + backward with
torch.utils.flop_counter on the real model (matrix products, attention, convolution)
and divides the achieved FLOP/s by `--peak-tflops` (default: 989.4 for H100/H200, the
datasheet's dense bf16 rate; 312 for A100; none on other devices). Both paths are measured
against the same bf16 peak, so their MFUs compare directly.

    python benchmarks/gpu_train.py [--quick] [--batch-size 512] [--steps 30] [--compile]

On a CPU `--quick` uses a tiny tower of the same patch size at 64 px (tested on any machine).
`benchmarks/gpu_embed.py --train` runs this too and records it in docs/benchmarks/gpu.json.
Ends with one line `ratio=<tuned images/s / plain images/s>` (image tower tuned).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import VIT_B32, VIT_B_PROJECTION, machine_line, quiet_transformers, save_clip, tiny_vision, without_test

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
"""Dense bf16 tensor-core peaks (vendor datasheets, SXM parts), TFLOP/s."""


def default_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def small_manifest(folder: Path, size: int) -> tuple[Path, Path]:
    """A small Shapes set without its test split: the Trainer's manifests (its labels, the
    validation split it checks, the images the bias initialisation and the feature cache
    read). Training batches index its rows with replacement, so any batch size works."""
    from mumic.data.synthetic import make_shapes

    manifest = make_shapes(folder, n=40, size=max(size, 32))
    out = without_test(manifest)
    return out, manifest.parent / "labels.yaml"


def make_trainer(model_dir: Path, manifest: Path, labels: Path, work: Path, *, image_tower: str, batch: int,
                 size: int, device: torch.device, amp: bool) -> Any:
    """A prepared mumic Trainer (model, data, optimizer) for an `hf:` model folder."""
    from mumic.config import load_config
    from mumic.data.training import saved_config
    from mumic.train import Trainer, _load_inputs

    cfg = load_config(overrides={
        "manifest": str(manifest), "labels_file": str(labels), "out": str(work / "run"), "cache_dir": str(work / "cache"),
        "backbone": f"hf:{model_dir}", "image_size": size, "image_tower": image_tower, "batch_size": batch,
        "max_steps": 10**6, "warmup_steps": 0, "device": str(device), "amp": amp, "num_workers": 0, "seed": 0,
    })
    inputs = _load_inputs(cfg)
    cfg = saved_config(cfg, inputs.templates)
    trainer = Trainer(cfg, work / "run", inputs, progress=False)
    trainer.prepare(resume=False)
    return trainer


def host_batches(batch: int, size: int, n: int, *, pinned: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = [torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g) for _ in range(n)]
    return [b.pin_memory() for b in out] if pinned else out


def _init_one_process_group(device: torch.device) -> bool:
    """A process group of one (DDP as under torchrun); False where one already exists."""
    import torch.distributed as td

    if td.is_initialized():
        return False
    store = td.HashStore()
    td.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    return True


def tune(trainer: Any, *, compile_: bool, channels_last: bool, ddp: bool) -> None:
    """Fused AdamW over the Trainer's parameter groups, channels_last, compile, DDP."""
    from torch.nn.parallel import DistributedDataParallel

    device = trainer.device
    groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"], "name": g["name"]}
              for g in trainer.opt.param_groups]
    trainer.opt = torch.optim.AdamW(groups, fused=True)
    trainer.sched = torch.optim.lr_scheduler.LambdaLR(trainer.opt, lambda step: 1.0)
    tower = trainer.backbone.image_tower
    if channels_last:
        tower.to(memory_format=torch.channels_last)
    if compile_:
        tower.compile()
    if ddp:
        _init_one_process_group(device)
        trainer.net = DistributedDataParallel(trainer.model, device_ids=[device.index or 0] if device.type == "cuda" else None)


def flops_per_image(model: Any, batch: int, size: int, device: torch.device, *, features: torch.Tensor | None = None) -> float:
    """FLOPs of one forward + backward per image, counted on the model (fp32, eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    n = min(batch, 32)
    counter = FlopCounterMode(display=False)
    with counter:
        if features is None:
            z = model(pixels=torch.zeros((n, 3, size, size), dtype=torch.uint8, device=device))
        else:
            z = model(features=features[:n].to(device))
        z.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / n


def time_tuned(trainer: Any, batches: list[torch.Tensor], steps: int, warm: int, channels_last: bool) -> float:
    """images/s of Trainer.step (pixels from pinned host batches, or cached features)."""
    device, batch = trainer.device, trainer.cfg.batch_size
    n = len(trainer.train.y)
    g = torch.Generator().manual_seed(1)

    def feed():
        k = 0
        while True:
            px = batches[k % len(batches)].to(device, non_blocking=True)
            if channels_last:
                px = px.contiguous(memory_format=torch.channels_last)
            k += 1
            yield None, px

    loader = feed() if trainer.train.features is None else None
    trainer.model.train()
    for _ in range(warm):
        trainer.step([torch.randint(0, n, (batch,), generator=g)], loader)
    sync(device)
    groups = [[torch.randint(0, n, (batch,), generator=g)] for _ in range(steps)]
    t = time.perf_counter()
    for group in groups:
        trainer.step(group, loader)
    sync(device)
    return steps * batch / (time.perf_counter() - t)


def time_plain(trainer: Any, batches: list[torch.Tensor], steps: int, warm: int) -> float:
    """images/s of the plain loop: fp32, default AdamW, synchronous copies, .item() per step."""
    model, device, batch, train = trainer.model, trainer.device, trainer.cfg.batch_size, trainer.train
    loss_fn = trainer.loss.fn
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=trainer.cfg.lr_tower)
    g = torch.Generator().manual_seed(1)
    n = len(train.y)
    model.train()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        def one(k: int) -> None:
            idx = torch.randint(0, n, (batch,), generator=g)
            if train.features is None:
                z = model(pixels=batches[k % len(batches)].to(device))
            else:
                z = model(features=train.features[idx].to(device))
            loss = loss_fn(z, train.y[idx].to(device), train.known[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()

        for k in range(warm):
            one(k)
        sync(device)
        t = time.perf_counter()
        for k in range(steps):
            one(k)
        sync(device)
        return steps * batch / (time.perf_counter() - t)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def run_train_benchmark(*, quick: bool = False, batch: int | None = None, steps: int | None = None, compile_: bool = False,
                        channels_last: bool = True, ddp: bool = True, peak_tflops: float | None = None,
                        log=print) -> dict[str, Any]:
    """Both modes (image tower full / frozen), tuned vs plain; returns the figures."""
    quiet_transformers()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tiny = quick and not cuda
    size = 64 if tiny else 224
    batch = batch or (8 if tiny else 512)
    steps = steps or (3 if tiny else 30)
    warm = 1 if tiny else 5
    plain_steps = max(2, steps // 3)
    peak = peak_tflops if peak_tflops is not None else default_peak(device)
    vision = tiny_vision(VIT_B32["patch_size"], image_size=size) if tiny else VIT_B32
    tmp = Path(tempfile.mkdtemp(prefix="mumic-bench-train-gpu-"))
    res: dict[str, Any] = {"train_batch_size": batch, "train_image_size": size, "train_model": "vit-b32" + (" (tiny)" if tiny else ""),
                           "train_compile": compile_, "train_peak_tflops": peak}
    try:
        folder = save_clip(tmp / "model", vision, projection_dim=64 if tiny else VIT_B_PROJECTION)
        manifest, labels = small_manifest(tmp / "shapes", size)
        pinned = host_batches(batch, size, 2, pinned=cuda)
        pageable = host_batches(batch, size, 2, pinned=False)
        for mode, key in (("full", "train"), ("frozen", "train_frozen")):
            tuned = make_trainer(folder, manifest, labels, tmp / f"{mode}-tuned", image_tower=mode, batch=batch, size=size,
                                 device=device, amp=True)
            flops = flops_per_image(tuned.model, batch, size, device, features=tuned.train.features)
            tune(tuned, compile_=compile_ and mode == "full", channels_last=channels_last, ddp=ddp)
            t = time.perf_counter()
            rate = time_tuned(tuned, pinned, steps if mode == "full" else 5 * steps, warm, channels_last)
            wall = time.perf_counter() - t
            del tuned
            plain = make_trainer(folder, manifest, labels, tmp / f"{mode}-plain", image_tower=mode, batch=batch, size=size,
                                 device=device, amp=False)
            rate_plain = time_plain(plain, pageable, plain_steps if mode == "full" else 5 * plain_steps, warm)
            del plain
            if cuda:
                torch.cuda.empty_cache()
            res[f"{key}_images_per_s"] = round(rate, 1)
            res[f"{key}_plain_images_per_s"] = round(rate_plain, 1)
            res[f"{key}_speedup"] = round(rate / rate_plain, 3)
            res[f"{key}_gflop_per_image"] = round(flops / 1e9, 4)
            if peak:
                res[f"{key}_mfu"] = round(flops * rate / (peak * 1e12), 4)
                res[f"{key}_plain_mfu"] = round(flops * rate_plain / (peak * 1e12), 4)
            mfu = f", MFU {100 * res[f'{key}_mfu']:.1f}% vs {100 * res[f'{key}_plain_mfu']:.1f}%" if peak else ""
            log(f"train, image tower {mode}: tuned {rate:9.1f} images/s, plain {rate_plain:9.1f} images/s "
                f"({rate / rate_plain:.2f}x; {flops / 1e9:.2f} GFLOP per image fwd+bwd{mfu}; tuned timing incl. warm-up {wall:.1f} s)")
    finally:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="on a CPU: a tiny tower at 64 px, batch 8, 3 steps")
    ap.add_argument("--batch-size", type=int, default=None, help="default 512 on GPU")
    ap.add_argument("--steps", type=int, default=None, help="timed tuned steps (default 30 GPU; frozen runs 5x as many)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the image tower of the tuned path")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--no-ddp", action="store_true", help="do not wrap the tuned model in DDP on one process")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU (default: by GPU name)")
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(machine_line())
    res = run_train_benchmark(quick=a.quick, batch=a.batch_size, steps=a.steps, compile_=a.compile,
                              channels_last=not a.no_channels_last, ddp=not a.no_ddp, peak_tflops=a.peak_tflops)
    print(f"ratio={res['train_speedup']:.2f}")


if __name__ == "__main__":
    main()
