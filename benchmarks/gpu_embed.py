"""GPU embedding throughput, end to end: a folder of 640x480 JPEGs -> embeddings on disk,
against the model alone, for the CLIP ViT-B/32 and ViT-B/16 vision architectures.

End to end is mumic's input pipeline: ImageDataset + make_loader with N worker processes
(JPEG draft decoding at the model's resolution, uint8 tensors between processes, pinned
memory), non-blocking copies to the GPU, bf16 autocast, embeddings gathered on the GPU and
written to a .npy file. Model only is the same forward (uint8 -> normalise -> tower ->
projection -> L2 norm) on random uint8 batches already on the GPU, same batch size. The
report gives images/s for each and the fraction of the model-only rate that end to end
reaches; a low fraction means the input pipeline, not the GPU, sets the pace. A
loader-only pass (decode + copy, no model) shows the pipeline's own ceiling.

The models have random weights: each is built from a transformers CLIPConfig, saved with
save_pretrained to a temporary folder, and loaded through mumic's `hf:<folder>` path.
The JPEGs are drawn by the script (smooth colour fields, shapes and noise, about 90 KiB
each, like real photos). Nothing is downloaded.

Decode paths: `cpu` (DataLoader workers), `gpu` (nvjpeg through torchvision) and
`nvimgcodec` (the hardware JPEG engines, `pip install 'mumic[gpu]'`); each one that can run
is timed (loader alone and end to end), and each GPU path's pixels and embeddings are
compared with the CPU path's. `--profile` breaks the CPU path's main-process time into
receive / pin / copy (benchmarks/_loader_profile.py); `--train` adds the training benchmark
(benchmarks/gpu_train.py). The figures of the first model and the fastest decode path go to
`--json-out` (default docs/benchmarks/gpu.json on a CUDA machine), with the command.

On the project's device machine (one H200, 16 CPU cores; its python3 has torch 2.11,
torchvision and transformers, and no package index), from the repository root. nvImageCodec
travels as wheels (25 MB + the 4 MB nvJPEG runtime), fetched once beside the repository:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.2.3.58

then one command, carrying `.whl` (about 4 to 5 minutes; give it a 360 s limit, which
leaves room for a second try inside a 15-minute device budget):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit;
    set -o pipefail; PYTHONPATH=src:benchmarks:/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_embed.py \
        --compile --channels-last --models vit-b32 --profile --train 2>&1 | tee $OUT/log;
    cp docs/benchmarks/gpu.json $OUT/

(NVIDIA DALI's wheel, 199 MB, is over what a device call carries, so DALI is not an option
there; its `mixed` decoder drives the same hardware engines through nvImageCodec.)

Without CUDA it runs on the CPU (batch 32, no autocast, no pinned memory); `--quick` there
uses tiny vision towers of the same patch sizes and 64 images, so the script is tested on
any machine:

    python benchmarks/gpu_embed.py --quick

Ends with one line `ratio=<end-to-end / model-only>` for the first model of --models.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _common import (
    VIT_B16,
    VIT_B32,
    VIT_B_PROJECTION,
    add_threads_option,
    apply_threads,
    folder_bytes,
    machine_line,
    make_photos,
    n_params,
    quiet_transformers,
    save_clip,
    tiny_vision,
)
from mumic.backbones import load_backbone
from mumic.data.dataset import pixel_batches
from mumic.data.gpu_decode import gpu_decode_available
from mumic.data.nvimgcodec_decode import nvimgcodec_missing
from mumic.io import atomic_write_json

DECODES = ("cpu", "gpu", "nvimgcodec")
DEFAULT_JSON = Path("docs/benchmarks/gpu.json")

ARCHS = {"vit-b32": VIT_B32, "vit-b16": VIT_B16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def make_encoder(bb, *, compile_: bool, channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 [N,3,H,W] on the device -> L2-normalised float32 embeddings [N, D]."""
    if channels_last:
        bb.image_tower.to(memory_format=torch.channels_last)

    def encode(px: torch.Tensor) -> torch.Tensor:
        return F.normalize(bb.encode_image(px).float(), dim=-1)

    return torch.compile(encode) if compile_ else encode


def prepare(px: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    px = px.to(device, non_blocking=True)
    return px.contiguous(memory_format=torch.channels_last) if channels_last else px


@torch.inference_mode()
def warm_up(encode, batches: set[int], size: int, device: torch.device, amp: bool, channels_last: bool) -> None:
    """Run (and compile) the forward once at each batch shape."""
    with autocast(device, amp):
        for b in batches:
            encode(prepare(torch.zeros(b, 3, size, size, dtype=torch.uint8), device, channels_last))
    sync(device)


@torch.inference_mode()
def model_only(encode, size: int, batch: int, device: torch.device, amp: bool, channels_last: bool,
               min_seconds: float) -> float:
    """images/s of the forward alone on random uint8 batches already on the device."""
    px = prepare(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device), device, channels_last)
    with autocast(device, amp):
        for _ in range(3):
            encode(px)
        sync(device)
        t = time.perf_counter()
        encode(px)
        sync(device)
        one = time.perf_counter() - t
        iters = int(min(200, max(5, math.ceil(min_seconds / max(one, 1e-6)))))
        t = time.perf_counter()
        for _ in range(iters):
            encode(px)
        sync(device)
        dt = time.perf_counter() - t
    return iters * batch / dt


@torch.inference_mode()
def loader_only(paths: list[Path], size: int, batch: int, workers: int, device: torch.device, decode: str) -> float:
    """images/s of decode + crop + copy to the device (pinned memory on CUDA), no model."""
    t = time.perf_counter()
    last = None
    for _, px, _ in pixel_batches(paths, size, batch, device=device, num_workers=workers, decode=decode):
        last = px
    sync(device)
    del last
    return len(paths) / (time.perf_counter() - t)


@torch.inference_mode()
def end_to_end(encode, dim: int, paths: list[Path], size: int, batch: int, workers: int, device: torch.device,
               amp: bool, channels_last: bool, out_file: Path, decode: str) -> float:
    """images/s from JPEG files to a .npy of embeddings, worker start-up and writing included."""
    t = time.perf_counter()
    out = torch.empty((len(paths), dim), dtype=torch.float32, device=device)
    pos = 0
    with autocast(device, amp):
        for _, px, _ in pixel_batches(paths, size, batch, device=device, num_workers=workers, decode=decode):
            e = encode(prepare(px, device, channels_last))
            out[pos : pos + len(e)] = e
            pos += len(e)
    np.save(out_file, out.cpu().numpy())
    return len(paths) / (time.perf_counter() - t)


@torch.inference_mode()
def decode_agreement(encode, paths: list[Path], size: int, device: torch.device, amp: bool,
                     channels_last: bool, decode: str) -> tuple[float, float, float]:
    """(mean |pixel difference|, its 99th percentile, min embedding cosine) of a GPU
    decode path against the CPU path on the same images."""
    px = {d: next(pixel_batches(paths, size, len(paths), device=device, decode=d))[1] for d in ("cpu", decode)}
    diff = (px["cpu"].int() - px[decode].int()).abs().float()
    with autocast(device, amp):
        e = {d: encode(prepare(x, device, channels_last)).float() for d, x in px.items()}
    return float(diff.mean()), float(torch.quantile(diff.flatten()[:1 << 24], 0.99)), float((e["cpu"] * e[decode]).sum(-1).min())


def available_decodes(device: torch.device) -> dict[str, str | None]:
    """Each decode path -> None where it can run here, else why not."""
    nv = nvimgcodec_missing()
    return {"cpu": None, "gpu": gpu_decode_available(),
            "nvimgcodec": "no CUDA device" if device.type != "cuda" else (f"nvImageCodec not importable ({nv})" if nv else None)}


def the_command() -> str:
    return "python3 " + " ".join(shlex.quote(a) for a in sys.argv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fewer images (4096 on GPU, 64 on CPU); on CPU also tiny towers")
    ap.add_argument("-n", type=int, default=None, help="number of JPEGs (default 16384 on GPU, 256 on CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 1024 on GPU, 32 on CPU")
    ap.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="DataLoader worker processes (default: CPUs - 1)")
    ap.add_argument("--models", default="vit-b32,vit-b16", help=f"comma-separated, from {', '.join(ARCHS)}")
    ap.add_argument("--tiny", action="store_true", help="tiny towers (width 64, 2 layers) with the same patch sizes")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward")
    ap.add_argument("--channels-last", action="store_true", help="channels_last input and patch embedding")
    ap.add_argument("--no-amp", action="store_true", help="no bf16 autocast on GPU (it is always off on CPU)")
    ap.add_argument("--out", help="folder for the embedding .npy files (default: a temporary folder, removed)")
    ap.add_argument("--decode", default=None,
                    help="comma-separated decode paths to time end to end, from cpu, gpu, nvimgcodec "
                         "(default: every one that can run here)")
    ap.add_argument("--profile", action="store_true",
                    help="also break the CPU decode path's main-process time into receive / pin / copy (a table)")
    ap.add_argument("--train", action="store_true",
                    help="also time training (benchmarks/gpu_train.py: tuned vs plain loop, tower full and frozen)")
    ap.add_argument("--train-batch-size", type=int, default=None, help="training batch (default 512 on GPU)")
    ap.add_argument("--json-out", default=None,
                    help=f"write the figures here (default {DEFAULT_JSON} with CUDA; none without)")
    ap.add_argument("--seconds", type=float, default=None, help="model-only timing length (default 2 GPU, 1 CPU)")
    add_threads_option(ap)
    a = ap.parse_args()
    apply_threads(a.threads)

    quiet_transformers()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tiny = a.tiny or (a.quick and not cuda)
    n = a.n or ((4096 if a.quick else 16384) if cuda else (64 if a.quick else 256))
    batch = a.batch_size or (1024 if cuda else 32)
    amp = cuda and not a.no_amp
    seconds = a.seconds or (2.0 if cuda else 1.0)
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    why = available_decodes(device)
    decodes = [d.strip() for d in (a.decode or ",".join(d for d in DECODES if why[d] is None)).split(",") if d.strip()]
    if any(d not in DECODES for d in decodes) or not decodes:
        raise SystemExit(f"unknown decode path in {a.decode!r}: choose from {', '.join(DECODES)}")
    for d in decodes:
        if why[d]:
            raise SystemExit(f"decode {d} is not available here: {why[d]}")
    skipped = {d: w for d, w in why.items() if w and d not in decodes}
    unknown = [m for m in names if m not in ARCHS]
    if unknown or not names:
        raise SystemExit(f"unknown model {unknown[0] if unknown else a.models!r}: choose from {', '.join(ARCHS)}")

    print(machine_line())
    print(f"device: {device}; batch {batch}; workers {a.num_workers}; pinned memory {'yes' if cuda else 'no'}; "
          f"bf16 autocast {'on' if amp else 'off'}; compile {'on' if a.compile else 'off'}; "
          f"channels_last {'on' if a.channels_last else 'off'}")
    if not cuda:
        print("no CUDA device: running on the CPU" + (" with tiny towers" if tiny else ""))
    for d, w in skipped.items():
        print(f"decode {d} not timed: {w}")
    record: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "machine": machine_line().splitlines()[0],
                    "date": datetime.date.today().isoformat(), "command": the_command(), "images": n, "batch_size": batch,
                    "workers": a.num_workers, "compile": a.compile, "channels_last": a.channels_last, "bf16": amp,
                    "decodes": decodes}

    tmp = Path(tempfile.mkdtemp(prefix="mumic-bench-gpu-"))
    out_dir = Path(a.out) if a.out else tmp / "embeddings"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        paths = make_photos(tmp / "images", n, size=(640, 480), workers=os.cpu_count() or 1)
        print(f"images: {n} JPEGs 640x480, {folder_bytes(paths) / n / 1024:.0f} KiB each on average "
              f"(drawn in {time.perf_counter() - t:.1f} s)")
        size = 224
        loaders: dict[str, float] = {}
        for d in decodes:
            rate_loader = loader_only(paths, size, batch, a.num_workers, device, d)
            loaders[d] = rate_loader
            print(f"loader only, decode {d} (decode + crop + copy, {a.num_workers} workers): {rate_loader:9.1f} images/s")
        record["loader_images_per_s_by_decode"] = {d: round(v, 1) for d, v in loaders.items()}
        if a.profile:
            from _loader_profile import profile_report

            record["profile_cpu"] = profile_report(paths, size, batch, a.num_workers, device)

        ratios: dict[str, float] = {}
        for name in names:
            vision = tiny_vision(ARCHS[name]["patch_size"]) if tiny else ARCHS[name]
            folder = save_clip(tmp / name, vision, projection_dim=64 if tiny else VIT_B_PROJECTION)
            bb = load_backbone(f"hf:{folder}", device=device)
            encode = make_encoder(bb, compile_=a.compile, channels_last=a.channels_last)
            t = time.perf_counter()
            try:
                warm_up(encode, {batch, n % batch or batch}, size, device, amp, a.channels_last)
            except Exception as e:  # a compiler failure must not cost the whole measurement
                if not a.compile:
                    raise
                print(f"{name}: torch.compile failed ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); eager instead")
                encode = make_encoder(bb, compile_=False, channels_last=a.channels_last)
                warm_up(encode, {batch, n % batch or batch}, size, device, amp, a.channels_last)
            warm = time.perf_counter() - t
            rate_model = model_only(encode, size, batch, device, amp, a.channels_last, seconds)
            label = f"{name}{' (tiny)' if tiny else ''}"
            print(f"{label}: {n_params(bb.image_tower) / 1e6:.1f} M vision weights, warm-up {warm:.1f} s")
            print(f"  model only : {rate_model:9.1f} images/s")
            best, best_decode, e2e = 0.0, decodes[0], {}
            for d in decodes:
                out_file = out_dir / f"{name}-{d}.npy"
                rate_e2e = end_to_end(encode, bb.embed_dim, paths, size, batch, a.num_workers, device, amp,
                                      a.channels_last, out_file, d)
                emb = np.load(out_file, mmap_mode="r")
                assert emb.shape == (n, bb.embed_dim) and np.isfinite(emb[:16]).all()
                e2e[d] = round(rate_e2e, 1)
                if rate_e2e > best:
                    best, best_decode = rate_e2e, d
                print(f"  end to end, decode {d}: {rate_e2e:9.1f} images/s -> {out_file.name} {list(emb.shape)}, "
                      f"{100 * rate_e2e / rate_model:.1f}% of the model-only rate")
            agreement = {}
            for d in decodes:
                if d == "cpu":
                    continue
                mean, p99, cos = decode_agreement(encode, paths[:min(batch, n)], size, device, amp, a.channels_last, d)
                agreement[d] = {"mean_abs_pixel_diff": round(mean, 3), "p99_abs_pixel_diff": p99, "min_cosine": round(cos, 5)}
                print(f"  decode {d} vs cpu on {min(batch, n)} images: mean |pixel diff| {mean:.2f}, 99th percentile {p99:.0f}, "
                      f"min embedding cosine {cos:.4f}")
            ratios[name] = best / rate_model
            if name == names[0]:
                record.update({"model": label, "model_images_per_s": round(rate_model, 1), "best_decode": best_decode,
                               "e2e_images_per_s": round(best, 1), "loader_images_per_s": round(loaders[best_decode], 1),
                               "e2e_images_per_s_by_decode": e2e, "decode_agreement": agreement})
            else:
                record.setdefault("other_models", {})[label] = {"model_images_per_s": round(rate_model, 1), "e2e_images_per_s": e2e}
            del bb, encode
            if cuda:
                torch.cuda.empty_cache()
        if a.train:
            from gpu_train import run_train_benchmark

            record.update(run_train_benchmark(quick=a.quick, batch=a.train_batch_size, compile_=a.compile,
                                              channels_last=a.channels_last or cuda))
        first = names[0]
        record["ratio"] = round(ratios[first], 4)
        json_out = Path(a.json_out) if a.json_out else (DEFAULT_JSON if cuda else None)
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(json_out, record)
            print(f"figures written to {json_out}")
        print(f"ratio below: {first} end to end (fastest decode path) / model only")
        print(f"ratio={ratios[first]:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
