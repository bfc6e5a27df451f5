"""CPU embedding throughput of `lite`: mumic's batched path vs. the per-image loop a user
would write (open, preprocess, forward at batch 1 in PyTorch). Both run in this process, on
the same images, with the same backbone and resolution.

mumic's path is what `mumic embed` does on a CPU: the image tower runs in onnxruntime
(`--engine auto`; the graph is exported once and cached, and the export is not timed),
batches decoded by the DataLoader. `--engine torch` times the same path in PyTorch.

    python benchmarks/cpu_embed.py [--quick] [--images DIR_OR_MANIFEST] [--size 224]

Ends with one line `ratio=<ours/baseline>`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mumic.backbones import load_backbone
from mumic.data.manifest import LabelSpec, read_manifest
from mumic.data.synthetic import make_shapes
from mumic.predictor import Predictor


def per_image_loop(model: Predictor, paths: list[Path]) -> np.ndarray:
    """What a user writes first: PIL open, resize, normalise, forward one image at a time."""
    bb = model.backbone
    size = bb.image_size
    mean = torch.tensor(bb.mean).view(3, 1, 1)
    std = torch.tensor(bb.std).view(3, 1, 1)
    out = []
    with torch.no_grad():
        for p in paths:
            img = Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
            x = ((x - mean) / std)[None]
            feats = bb.image_tower.extract_features(x) if hasattr(bb.image_tower, "extract_features") else None
            if feats is None:
                raise SystemExit("the per-image baseline is written for the lite backbone")
            u = bb.image_head(feats.mean((2, 3)))
            out.append(F.normalize(u, dim=-1)[0].numpy())
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 images (under a minute)")
    ap.add_argument("--images", help="a manifest to read images from (default: a generated shapes set)")
    ap.add_argument("--size", type=int, default=None, help="resolution (default: the backbone's)")
    ap.add_argument("-n", type=int, default=None, help="number of images (default 64 quick, 512 otherwise)")
    ap.add_argument("--batch-size", type=int, default=32, help="as `mumic embed` (default: 32)")
    ap.add_argument("--num-workers", type=int, default=0, help="as `mumic embed` (default: 0)")
    ap.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto", help="as `mumic embed` (default: auto)")
    a = ap.parse_args()
    n = a.n or (64 if a.quick else 512)
    if a.images:
        paths = read_manifest(a.images, require_labels=False, allow_outside=True).images[:n]
    else:
        root = Path(tempfile.mkdtemp(prefix="mumic-bench-"))
        paths = read_manifest(make_shapes(root, n=n, size=256)).images[:n]
    bb = load_backbone("lite", image_size=a.size)
    model = Predictor(bb, [LabelSpec("x")], ["{}"]).eval()
    print(f"lite at {bb.image_size} px, {len(paths)} images, torch threads {torch.get_num_threads()}")
    t = time.perf_counter()
    model.set_engine(a.engine)
    print(f"engine {a.engine}: ready in {time.perf_counter() - t:.1f} s (an onnxruntime graph is exported once, then cached)")
    model.embed_images(paths[: a.batch_size], batch_size=a.batch_size)  # warm-up
    per_image_loop(model, paths[:4])

    t = time.perf_counter()
    base = per_image_loop(model, paths)
    t_base = time.perf_counter() - t
    t = time.perf_counter()
    ours = model.embed_images(paths, batch_size=a.batch_size, num_workers=a.num_workers)
    t_ours = time.perf_counter() - t
    cos = float(np.mean(np.sum(base * ours, axis=1)))
    print(f"per-image loop (baseline): {len(paths) / t_base:8.1f} images/s")
    print(f"mumic embed_images       : {len(paths) / t_ours:8.1f} images/s  (engine {a.engine}, batch {a.batch_size}, "
          f"workers {a.num_workers})")
    print(f"mean cosine between the two paths' embeddings: {cos:.4f}")
    print(f"ratio={t_base / t_ours:.2f}")


if __name__ == "__main__":
    main()
