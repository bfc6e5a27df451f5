"""Training speed of `lite` by image-tower mode: frozen (heads on cached tower features)
against fine-tuning the tower's last stage (`image_tower=last`) and all of it (`full`),
all through `mumic.train.fit` on the same generated Shapes set, in the same run.

Timing. Feature extraction for the frozen mode is timed on its own first
(mumic.features.cached_features into a fresh cache), so every fit below finds a warm
cache. Inside each fit, the training loop is timed between its step callbacks: steps that
end with a validation pass (the last step of each epoch, and the final step) and the first
step (its start-up) are left out, so steps/s is the optimizer-step rate alone; images/s is
steps/s times the batch size (the steps kept all have full batches). Each fit's wall time,
model loading and validation included, is reported too.

    python benchmarks/train_speed.py [--quick] [-n 400] [--size 224] [--batch-size 32] [--steps 30]
                                     [--frozen-steps 150] [--num-workers 0] [--threads N]

Ends with one line `ratio=<frozen steps/s / full-tune steps/s>`.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

from _common import add_threads_option, apply_threads, machine_line, quiet_transformers, without_test
from mumic.backbones import load_backbone
from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes
from mumic.features import cached_features
from mumic.train import fit

MODES = ("frozen", "last", "full")


def timed_fit(mode: str, manifest: Path, labels: Path, run: Path, cache: Path, a: argparse.Namespace,
              steps_per_epoch: int) -> dict[str, float]:
    steps = a.frozen_steps if mode == "frozen" else a.steps
    stamps: dict[int, float] = {}
    t = time.perf_counter()
    fit(
        manifest=str(manifest), labels_file=str(labels), out=str(run), backbone="lite",
        image_size=a.size, image_tower=mode, max_steps=steps, batch_size=a.batch_size,
        eval_every=10**9, patience=10**9, warmup_steps=0, cache_dir=str(cache),
        num_workers=a.num_workers, seed=0,
        overwrite=True, progress=False, on_step=lambda s: stamps.__setitem__(s, time.perf_counter()),
    )
    wall = time.perf_counter() - t
    evals = {s for s in range(1, steps + 1) if s % steps_per_epoch == 0 or s == steps}
    kept = [stamps[s] - stamps[s - 1] for s in range(2, steps + 1) if s not in evals and s - 1 in stamps]
    if not kept:
        raise SystemExit("no training step could be timed on its own: raise --steps or -n")
    rate = len(kept) / sum(kept)
    return {"steps_per_s": rate, "images_per_s": rate * a.batch_size, "timed_steps": len(kept), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="80 images at 96 px, batch 8, 8 tuned and 40 frozen steps (under a minute)")
    ap.add_argument("-n", type=int, default=None, help="images in the Shapes set (default 80 quick, 400 otherwise)")
    ap.add_argument("--size", type=int, default=None, help="image and model resolution (default 96 quick, 224 otherwise)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 quick, 32 otherwise")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of each tuned fit (default 8 quick, 30 otherwise)")
    ap.add_argument("--frozen-steps", type=int, default=None,
                    help="steps of the frozen fit, whose steps take milliseconds (default 5 x --steps)")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (fit's default: 0)")
    add_threads_option(ap)
    a = ap.parse_args()
    apply_threads(a.threads)
    a.n = a.n or (80 if a.quick else 400)
    a.size = a.size or (96 if a.quick else 224)
    a.batch_size = a.batch_size or (8 if a.quick else 32)
    a.steps = a.steps or (8 if a.quick else 30)
    a.frozen_steps = a.frozen_steps or 5 * a.steps
    quiet_transformers()

    tmp = Path(tempfile.mkdtemp(prefix="mumic-bench-train-"))
    try:
        shapes = make_shapes(tmp / "shapes", n=a.n, size=a.size)
        manifest = without_test(shapes)
        labels = shapes.parent / "labels.yaml"
        m = read_manifest(manifest)
        train_paths = m.split("train").images
        val_paths = m.split("val").images
        steps_per_epoch = math.ceil(len(train_paths) / a.batch_size)
        cache = tmp / "cache"

        import torch

        print(machine_line())
        print(f"lite at {a.size} px; Shapes: {len(train_paths)} train + {len(val_paths)} val images; "
              f"batch {a.batch_size}; {a.frozen_steps} steps frozen, {a.steps} tuned ({steps_per_epoch} per epoch); "
              f"workers {a.num_workers}; device {'cuda' if torch.cuda.is_available() else 'cpu'}")

        bb = load_backbone("lite", image_size=a.size, device="cuda" if torch.cuda.is_available() else "cpu")
        t = time.perf_counter()
        cached_features(bb, train_paths + val_paths, cache_dir=cache, batch_size=max(a.batch_size, 32),
                        num_workers=a.num_workers, device=bb.device, progress=False)
        t_feat = time.perf_counter() - t
        n_feat = len(train_paths) + len(val_paths)
        del bb
        print(f"frozen-tower feature extraction (once, cached): {t_feat:.2f} s, {n_feat / t_feat:.1f} images/s")

        results = {}
        for mode in MODES:
            r = timed_fit(mode, manifest, labels, tmp / "runs" / mode, cache, a, steps_per_epoch)
            results[mode] = r
            print(f"image_tower={mode:<6}: {r['steps_per_s']:8.2f} steps/s {r['images_per_s']:9.1f} images/s "
                  f"({r['timed_steps']} steps timed; whole fit {r['wall_s']:.1f} s)")
        for mode in ("last", "full"):
            print(f"frozen / {mode}: {results['frozen']['steps_per_s'] / results[mode]['steps_per_s']:.1f}x steps/s")
        print(f"ratio={results['frozen']['steps_per_s'] / results['full']['steps_per_s']:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
