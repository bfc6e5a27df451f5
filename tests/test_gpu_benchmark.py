"""benchmarks/gpu_embed.py, the one script a GPU machine runs, in its CPU --quick form:
every stage it times on a GPU (loader, the CPU path's profile, model, end to end,
training tuned vs plain, tower full and frozen) runs here on tiny towers, and the figures
file has what the README's speed table is read from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_embed_quick_writes_the_figures(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")]), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_embed.py"), "--quick", "-n", "24", "--models", "vit-b32",
           "--num-workers", "0", "--profile", "--train", "--json-out", str(out)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1].startswith("ratio=")
    rec = json.loads(out.read_text())
    for key in ("e2e_images_per_s", "loader_images_per_s", "model_images_per_s", "train_images_per_s",
                "train_plain_images_per_s", "train_frozen_images_per_s", "train_frozen_plain_images_per_s"):
        assert rec[key] > 0, key
    assert rec["device"] == "cpu" and rec["best_decode"] == "cpu" and rec["images"] == 24
    assert rec["command"].startswith("python3 ") and "--json-out" in rec["command"]
    assert rec["train_peak_tflops"] is None and "train_mfu" not in rec  # no known peak on a CPU: no MFU claimed
    assert rec["train_gflop_per_image"] > rec["train_frozen_gflop_per_image"]  # the tower's backward is counted
    runs = rec["profile_cpu"]["runs"]
    assert [r["slices"] for r in runs] == [1, 1] and all(r["stages_s"]["receive"] > 0 for r in runs)
    assert not (tmp_path / "docs").exists()  # a CPU run writes only where it is told
