"""CPU embedding throughput of an `hf:` CLIP backbone on a folder of 640x480 JPEGs:
mumic's batched path (MuMIC.embed_images: a DataLoader worker decoding JPEGs in draft mode,
uint8 batches, the tower in onnxruntime as `mumic embed` runs it on a CPU; `--engine torch`
for PyTorch) against two baselines measured in the same run, on the same images and
model:

  (a) the per-image loop a user would write: PIL open, resize the shorter side, center
      crop, normalise, forward one image at a time;
  (b) transformers' own path: the CLIP image processor on a batch of PIL images
      (processor(images=..., return_tensors="pt")) then get_image_features, batched.

The model is a small CLIP (ViT, 224 px, patch 32, width 256, 4 layers by default) with
random weights, built from a config and saved to a temporary folder; nothing is downloaded.

    python benchmarks/cpu_embed_hf.py [--quick] [-n 512] [--batch-size 64] [--num-workers 1]

Ends with one line `ratio=<ours/baseline (a)>`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from _common import (
    add_threads_option,
    apply_threads,
    folder_bytes,
    machine_line,
    make_photos,
    n_params,
    quiet_transformers,
    save_clip,
)
from mumic.backbones import load_backbone
from mumic.data.manifest import LabelSpec
from mumic.predictor import Predictor


def per_image_loop(model: Predictor, paths: list[Path]) -> np.ndarray:
    """Baseline (a): PIL open, resize shorter side + center crop, normalise, batch of 1."""
    bb = model.backbone
    size = bb.image_size
    mean = torch.tensor(bb.mean).view(3, 1, 1)
    std = torch.tensor(bb.std).view(3, 1, 1)
    out = []
    with torch.no_grad():
        for p in paths:
            img = Image.open(p).convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
            x = ((x - mean) / std)[None]
            feats = bb.image_tower(pixel_values=x).pooler_output
            out.append(F.normalize(bb.image_head(feats), dim=-1)[0].numpy())
    return np.stack(out)


def image_processor(folder: Path):
    """transformers' CLIP image processor for the saved folder (its PIL backend: no
    torchvision here)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers: the PIL processor is the default one
        from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(folder)


def processor_path(clip, processor, paths: list[Path], batch_size: int) -> np.ndarray:
    """Baseline (b): CLIPImageProcessor on PIL images, then get_image_features, batched."""
    out = []
    with torch.no_grad():
        for s in range(0, len(paths), batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[s : s + batch_size]]
            inputs = processor(images=images, return_tensors="pt")
            feats = clip.get_image_features(pixel_values=inputs["pixel_values"])
            if not torch.is_tensor(feats):  # transformers >= 5 returns an output object
                feats = feats.pooler_output
            out.append(F.normalize(feats, dim=-1).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 images (under a minute)")
    ap.add_argument("-n", type=int, default=None, help="number of images (default 64 quick, 512 otherwise)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=1, help="DataLoader workers of mumic's path")
    ap.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                    help="what runs mumic's image tower, as `mumic embed --engine` (default: auto, onnxruntime on CPUs)")
    ap.add_argument("--width", type=int, default=256, help="vision tower width")
    ap.add_argument("--layers", type=int, default=4, help="vision tower depth")
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None,
                    help="time each path this many times and keep the best (default 1 quick, 3 otherwise)")
    add_threads_option(ap)
    a = ap.parse_args()
    apply_threads(a.threads)
    n = a.n or (64 if a.quick else 512)
    repeats = a.repeats or (1 if a.quick else 3)

    quiet_transformers()
    tmp = Path(tempfile.mkdtemp(prefix="mumic-bench-hf-"))
    try:
        vision = dict(hidden_size=a.width, intermediate_size=4 * a.width, num_hidden_layers=a.layers,
                      num_attention_heads=max(1, a.width // 64), image_size=224, patch_size=a.patch)
        folder = save_clip(tmp / "clip", vision, projection_dim=128)
        paths = make_photos(tmp / "images", n, size=(640, 480), workers=2)
        bb = load_backbone(f"hf:{folder}")
        model = Predictor(bb, [LabelSpec("x")], ["{}"]).eval().set_engine(a.engine, cache_dir=tmp / "engine")
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
        processor = image_processor(folder)

        print(machine_line())
        print(f"timing: best of {repeats}")
        print(f"model: CLIP ViT {bb.image_size} px, patch {a.patch}, width {a.width}, {a.layers} layers, "
              f"{n_params(bb.image_tower) / 1e6:.1f} M vision weights (random)")
        print(f"images: {len(paths)} JPEGs 640x480, {folder_bytes(paths) / len(paths) / 1024:.0f} KiB each on average")

        # warm-up of every path
        model.embed_images(paths[: a.batch_size], batch_size=a.batch_size)
        per_image_loop(model, paths[:4])
        processor_path(clip, processor, paths[:8], a.batch_size)

        t_loop = t_proc = t_ours = float("inf")
        for _ in range(repeats):  # interleaved, so a burst of other load hits every path alike
            t = time.perf_counter()
            loop = per_image_loop(model, paths)
            t_loop = min(t_loop, time.perf_counter() - t)
            t = time.perf_counter()
            proc = processor_path(clip, processor, paths, a.batch_size)
            t_proc = min(t_proc, time.perf_counter() - t)
            t = time.perf_counter()
            ours = model.embed_images(paths, batch_size=a.batch_size, num_workers=a.num_workers)
            t_ours = min(t_ours, time.perf_counter() - t)

        cos_loop = float(np.mean(np.sum(loop * ours, axis=1)))
        cos_proc = float(np.mean(np.sum(proc * ours, axis=1)))
        print(f"(a) per-image loop (baseline)        : {n / t_loop:8.1f} images/s")
        print(f"(b) CLIPImageProcessor + batched fwd : {n / t_proc:8.1f} images/s  (batch {a.batch_size})")
        print(f"mumic embed_images                   : {n / t_ours:8.1f} images/s  "
              f"(engine {a.engine}, batch {a.batch_size}, workers {a.num_workers}, JPEG draft decoding)")
        others = (ours @ ours.T)[~np.eye(n, dtype=bool)].mean()
        print(f"mean cosine, mumic vs (a): {cos_loop:.4f}; mumic vs (b): {cos_proc:.4f} "
              f"(between different images: {others:.4f}, random weights)")
        print(f"ours / (b) processor path: {t_proc / t_ours:.2f}")
        print(f"ours / (a) per-image loop: {t_loop / t_ours:.2f}")
        print(f"ratio={t_loop / t_ours:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
