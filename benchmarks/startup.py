"""Start-up cost of the `mumic` command: wall time of `mumic --help`, `mumic predict RUN
one.png`, `mumic search INDEX --image one.png` and `mumic search INDEX --text q` with this
checkout (now) against another commit (the baseline, checked out into a temporary git
worktree), on the same tiny `lite` run and index, in the same run of this script.

    python benchmarks/startup.py [--baseline REF] [--repeats 5]

The run is trained once with this checkout; both sides read it (its extra
class_embeddings.safetensors is ignored by a baseline that predates it). Each command runs
once to warm the caches (the ONNX graph of the image tower, the page cache), then
`--repeats` times; the table shows medians. Ends with one line
`ratio=<baseline / now, mumic predict>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_line

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "abb0177"  # the last commit before the one-home-per-concern layout


def mumic(src: Path, args: list[str], env: dict[str, str]) -> float:
    """Seconds of one `python -m mumic ARGS` with the package taken from `src`."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "mumic", *args], env={**env, "PYTHONPATH": str(src)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"mumic {' '.join(args)} failed with {src}:\n{p.stderr[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default=DEFAULT_BASELINE, help=f"git ref of the baseline (default: {DEFAULT_BASELINE})")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mumic-startup-") as d:
        tmp = Path(d)
        base = tmp / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), a.baseline], check=True)
        try:
            env = {**os.environ, "MUMIC_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            now = ROOT / "src"
            mumic(now, ["data", "shapes", "--out", str(tmp / "shapes"), "-n", "48"], env)
            run, idx, image = tmp / "run", tmp / "index", next(iter(sorted((tmp / "shapes" / "images").iterdir())))
            mumic(now, ["train", "--manifest", str(tmp / "shapes" / "manifest.csv"), "--labels-file", str(tmp / "shapes" / "labels.yaml"),
                        "--out", str(run), "--backbone", "lite", "--image-size", "128", "--max-steps", "4", "--eval-every", "2",
                        "--no-progress"], env)
            mumic(now, ["index", str(run), str(tmp / "shapes" / "manifest.csv"), "--out", str(idx), "--no-progress"], env)
            commands = {
                "mumic --help": ["--help"],
                "mumic predict RUN one.png": ["predict", str(run), str(image)],
                "mumic search INDEX --image one.png": ["search", str(idx), "--image", str(image), "-k", "3"],
                "mumic search INDEX --text q": ["search", str(idx), "--text", "a red circle", "-k", "3"],
            }
            print(machine_line())
            print(f"baseline {a.baseline} vs. now, median of {a.repeats} (seconds)\n")
            print("| command | baseline | now | baseline / now |\n|---|---|---|---|")
            ratios = {}
            for name, args in commands.items():
                times = {}
                for side, src in (("baseline", base / "src"), ("now", now)):
                    mumic(src, args, env)  # warm-up
                    times[side] = statistics.median(mumic(src, args, env) for _ in range(a.repeats))
                ratios[name] = times["baseline"] / times["now"]
                print(f"| `{name}` | {times['baseline']:.2f} | {times['now']:.2f} | {ratios[name]:.1f}x |", flush=True)
            print(f"\nratio={ratios['mumic predict RUN one.png']:.2f}")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)


if __name__ == "__main__":
    main()
