"""A training process killed with SIGKILL at an arbitrary step resumes to the same weights."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mumic.data.synthetic import make_shapes


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path, tiny_clip_dir):
    root = make_shapes(tmp_path / "shapes", n=80, size=48, seed=7).parent
    common = ["--manifest", root / "manifest.csv", "--labels-file", root / "labels.yaml", "--backbone", f"hf:{tiny_clip_dir}",
              "--image-tower", "last", "--lr-tower", "1e-3", "--max-steps", 60, "--eval-every", 4, "--batch-size", 8,
              "--cache-dir", tmp_path / "cache", "--no-progress", "--seed", 3]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "mumic", "train", *map(str, common)]
    subprocess.run(cmd + ["--out", str(tmp_path / "full")], check=True, env=env, capture_output=True, timeout=600)

    run = tmp_path / "cut"
    proc = subprocess.Popen(cmd + ["--out", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoint.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.5))  # somewhere after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model.safetensors").exists(), "the run finished before it could be killed; make it longer"
    state = load_file(str(run / "checkpoint.safetensors"))  # whatever the kill hit, the checkpoint is whole
    assert (run / ".lock").read_text().strip() == str(proc.pid)  # the dead writer's lock file stays; it must not block
    assert "rng.torch" in state
    p = subprocess.run([sys.executable, "-m", "mumic", "train", "--resume", str(run), "--no-progress"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert not (run / ".lock").exists()
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "full", run))
    assert ma["test"] == mb["test"] and ma["best_step"] == mb["best_step"]
