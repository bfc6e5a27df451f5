"""Peak memory of `mumic embed` as the manifest grows: a small manifest against one ten
times larger (the same images repeated, each row distinct), each embedded by a fresh
`mumic embed` process; the peak resident memory of each comes from the OS
(the rusage of each finished child).

    python benchmarks/embed_memory.py RUN [--rows 10000] [--factor 10] [--images MANIFEST] [mumic embed options]

RUN is a run directory (e.g. runs/demo/mumic from `mumic demo`); images default to
data/emoji/manifest.csv. Streaming keeps memory bounded by a shard (4,096 rows) and a
batch, so the larger job should need about the same memory. `--quick` uses 1,000 and
3,000 rows. Ends with one line `ratio=<peak large / peak small>` (1.0 is flat).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_manifest(src: Path, rows: int, out: Path) -> None:
    with open(src, newline="", encoding="utf-8") as f:
        images = [str((src.parent / r["image"]).resolve()) for r in csv.DictReader(f)]
    if not images:
        raise SystemExit(f"{src}: no rows")
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "row"])
        for i in range(rows):
            w.writerow([images[i % len(images)], i])


def peak_of_embed(run: str, manifest: Path, out: Path, extra: list[str]) -> tuple[float, float]:
    """(peak resident MiB, wall seconds) of one `mumic embed` child process."""
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "mumic", "embed", run, str(manifest), "--out", str(out), "--allow-outside-paths", *extra]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"mumic embed failed:\n{err.read().decode(errors='replace')[-2000:]}")
    return usage.ru_maxrss / 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory")
    ap.add_argument("--images", default="data/emoji/manifest.csv", help="manifest whose images are repeated")
    ap.add_argument("--rows", type=int, default=10_000, help="rows of the small manifest (default 10,000)")
    ap.add_argument("--factor", type=int, default=10, help="the large manifest has rows x factor rows (default 10)")
    ap.add_argument("--quick", action="store_true", help="1,000 and 3,000 rows")
    a, extra = ap.parse_known_args()  # anything else goes to `mumic embed`
    small, factor = (1_000, 3) if a.quick else (a.rows, a.factor)
    tmp = Path(tempfile.mkdtemp(prefix="mumic-bench-mem-"))
    print(f"machine: {os.cpu_count()} CPUs; run {a.run}; images from {a.images}; embed options {extra or '(defaults)'}")
    peaks = []
    for rows in (small, small * factor):
        m = tmp / f"m{rows}.csv"
        write_manifest(Path(a.images), rows, m)
        peak, wall = peak_of_embed(a.run, m, tmp / f"e{rows}.parquet", extra)
        peaks.append(peak)
        print(f"{rows:>9,} rows: {wall:7.1f} s, {rows / wall:7.1f} images/s, peak resident memory {peak:8.1f} MiB")
    print("ratio below: peak memory of the larger manifest / the smaller")
    print(f"ratio={peaks[1] / peaks[0]:.2f}")


if __name__ == "__main__":
    main()
