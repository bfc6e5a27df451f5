"""CPU engines for the `lite` image tower: eager PyTorch (the baseline), channels-last,
TorchScript freeze + optimize_for_inference, torch.compile (`--inductor`; needs a C++
compiler) and onnxruntime (mumic's `--engine auto` on CPUs), model only, on random uint8
batches; then frozen-feature extraction from image files (what training's feature cache
runs), torch vs. onnxruntime, the one-time ONNX export included.

    python benchmarks/cpu_engines.py [--quick] [--size 224] [--images MANIFEST] [--inductor]

Ends with one line `ratio=<onnxruntime / eager>` (model only, batch 8).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import add_threads_option, apply_threads, machine_line
from mumic.backbones import load_backbone
from mumic.backbones.onnx import OnnxImageTower
from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes
from mumic.features import extract_features


def rate(fn, batch: int, size: int, images: int) -> float:
    """images/s of fn on random uint8 batches, after two warm-up calls."""
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    with torch.inference_mode():
        fn(x)
        fn(x)
        t, done = time.perf_counter(), 0
        while done < images:
            fn(x)
            done += batch
    return done / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images per measurement (under a minute)")
    ap.add_argument("--size", type=int, default=224, help="resolution (default: 224, lite's own)")
    ap.add_argument("--images", help="manifest for the feature-extraction part (default: generated shapes)")
    ap.add_argument("--inductor", action="store_true", help="also time torch.compile (compiles for ~20 s per batch size)")
    add_threads_option(ap)
    a = ap.parse_args()
    apply_threads(a.threads)
    print(machine_line())
    n = 32 if a.quick else 128
    bb = load_backbone("lite", image_size=a.size).eval()
    batches = (1, 8) if a.quick else (1, 8, 32)

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bb = bb

        def forward(self, px: torch.Tensor) -> torch.Tensor:
            return self.bb.image_features(px)

    tower = Tower().eval()
    cache = Path(tempfile.mkdtemp(prefix="mumic-bench-engines-"))
    engines: dict[str, object] = {"eager (baseline)": tower}

    def channels_last(px: torch.Tensor) -> torch.Tensor:
        return tower(px.contiguous(memory_format=torch.channels_last))

    engines["channels-last"] = channels_last
    with torch.no_grad():
        example = torch.zeros((8, 3, a.size, a.size), dtype=torch.uint8)
        traced = torch.jit.trace(tower, example, check_trace=False)
        engines["torchscript freeze+optimize"] = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    if a.inductor:
        engines["torch.compile"] = torch.compile(tower)
    engines["onnxruntime"] = OnnxImageTower(bb, cache_dir=cache)

    print(f"lite image tower at {a.size} px, model only, images/s (random uint8 batches)")
    print(f"{'engine':<30}" + "".join(f"{'batch ' + str(b):>10}" for b in batches))
    rates: dict[str, dict[int, float]] = {}
    for name, fn in engines.items():
        if name == "channels-last":
            bb.image_tower.to(memory_format=torch.channels_last)
        rates[name] = {b: rate(fn, b, a.size, n) for b in batches}
        if name == "channels-last":
            bb.image_tower.to(memory_format=torch.contiguous_format)
        print(f"{name:<30}" + "".join(f"{rates[name][b]:>10.1f}" for b in batches), flush=True)

    if a.images:
        paths = read_manifest(a.images, require_labels=False, allow_outside=True).images[: n * 2]
    else:
        paths = read_manifest(make_shapes(cache / "shapes", n=n * 2, size=256)).images
    times = {}
    for engine in ("torch", "onnxruntime"):
        t = time.perf_counter()
        extract_features(bb, paths, batch_size=64, engine=engine, onnx_cache_dir=cache / "fresh", progress=False)
        times[engine] = time.perf_counter() - t
    print(f"feature extraction from {len(paths)} files: torch {len(paths) / times['torch']:.1f} images/s, "
          f"onnxruntime {len(paths) / times['onnxruntime']:.1f} images/s (its export included)")
    print("ratio below: onnxruntime / eager, model only, batch 8")
    print(f"ratio={rates['onnxruntime'][8] / rates['eager (baseline)'][8]:.2f}")


if __name__ == "__main__":
    main()
