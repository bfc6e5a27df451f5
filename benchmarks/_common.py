"""Helpers shared by the benchmarks: the machine line, synthetic photo-like JPEGs, and
CLIP models with random weights saved to a local folder (loadable as `hf:<folder>`).

Nothing here touches the network: models are built from configs, images are drawn.
"""

from __future__ import annotations

import csv
import json
import os
import platform
from collections.abc import Sequence
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

#: Vision towers of the public CLIP ViT-B/32 and ViT-B/16 architectures (random weights here).
VIT_B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=32)
VIT_B16 = dict(VIT_B32, patch_size=16)
#: Their projection size.
VIT_B_PROJECTION = 512

_WORDS = "a photo picture of the an cat dog car tree house red blue green".split()
_PAD, _UNK, _BOS, _EOS = "<pad>", "<unk>", "<bos>", "<eos>"
_TEXT_LENGTH = 16


# ----------------------------------------------------------------------------- machine

def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def gpu_name() -> str | None:
    """The first CUDA device's name, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


#: The 1-minute load average when the benchmark started (before its own work), since other
#: work on the machine slows every path.
_START_LOAD = _load_average()


def machine_line() -> str:
    """A line naming the machine a benchmark ran on (and a note when it was busy)."""
    gpu = gpu_name() or "none"
    cpus = os.cpu_count() or 1
    avg = _START_LOAD
    line = (
        f"machine: {cpu_model()}, {cpus} logical CPUs"
        f"{'' if avg is None else f', load average at start {avg:.2f}'}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, GPU {gpu}"
    )
    if avg is not None and avg > cpus and torch.get_num_threads() > 1:
        line += (f"\nnote: the machine is busy (load {avg:.1f} on {cpus} CPUs); multi-threaded torch "
                 f"figures are noisy, --threads 1 is steadier")
    return line


def add_threads_option(ap) -> None:
    """--threads: torch's intra-op threads (default: torch's own choice)."""
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice; 1 is steadier on a busy machine)")


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def quiet_transformers() -> None:
    """No per-file progress bars and no info chatter from transformers in benchmark output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# ----------------------------------------------------------------------------- images

def _photo(seed: int, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: smooth colour field, a few shapes, sensor-like noise
    (so that JPEG sizes are those of real photos, about 90 KiB at 640x480, quality 90)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(-width // 4, width)), int(rng.integers(-height // 4, height))
        x1 = x0 + int(rng.integers(width // 10, width // 2))
        y1 = y0 + int(rng.integers(height // 10, height // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + 6.0 * rng.standard_normal((height, width, 1), dtype=np.float32)
    arr = arr + 3.0 * rng.standard_normal((height, width, 3), dtype=np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _write_photo(job: tuple[str, int, int, int, str, int]) -> None:
    path, seed, width, height, fmt, quality = job
    img = _photo(seed, width, height)
    if fmt == "JPEG":
        img.save(path, format="JPEG", quality=quality)
    else:
        img.save(path, format=fmt)


def make_photos(
    folder: str | os.PathLike[str],
    n: int,
    *,
    size: tuple[int, int] = (640, 480),
    seed: int = 0,
    fmt: str = "JPEG",
    quality: int = 90,
    workers: int = 1,
) -> list[Path]:
    """Write `n` photo-like images (width x height = `size`) to `folder`; returns their paths.

    Deterministic given `seed`; `workers` > 1 draws them in that many processes.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    ext = {"JPEG": "jpg", "PNG": "png"}.get(fmt, fmt.lower())
    width = max(5, len(str(n - 1)))
    paths = [out / f"photo_{i:0{width}d}.{ext}" for i in range(n)]
    jobs = [(str(p), seed * 1_000_003 + i, size[0], size[1], fmt, quality) for i, p in enumerate(paths)]
    if workers > 1 and n > 64:
        with get_context("fork" if hasattr(os, "fork") else "spawn").Pool(workers) as pool:
            pool.map(_write_photo, jobs, chunksize=32)
    else:
        for job in jobs:
            _write_photo(job)
    return paths


def folder_bytes(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


# ----------------------------------------------------------------------------- models

def tiny_tokenizer():
    """A word-level tokenizer (<bos> words <eos>) and its vocabulary size: enough for a
    CLIP text tower that the image benchmarks never use but a saved model must have."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([_PAD, _UNK, _BOS, _EOS, *_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=_UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A {_EOS}", special_tokens=[(_BOS, vocab[_BOS]), (_EOS, vocab[_EOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=_BOS, eos_token=_EOS, pad_token=_PAD, unk_token=_UNK,
        model_max_length=_TEXT_LENGTH,
    )
    return fast, len(vocab)


def write_preprocessor(folder: Path, image_size: int, mean: list[float] = CLIP_MEAN, std: list[float] = CLIP_STD) -> None:
    """preprocessor_config.json as CLIPImageProcessor saves it (resize the shorter side,
    bicubic, center crop, rescale, normalise)."""
    cfg = {
        "image_processor_type": "CLIPImageProcessor",
        "crop_size": {"height": image_size, "width": image_size},
        "size": {"shortest_edge": image_size},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "resample": 3,
        "rescale_factor": 1 / 255, "image_mean": list(mean), "image_std": list(std),
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


def tiny_vision(patch_size: int, image_size: int = 224) -> dict:
    """A small vision tower with the given patch and image size (for CPU smoke runs)."""
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                image_size=image_size, patch_size=patch_size)


def save_clip(folder: str | os.PathLike[str], vision: dict, projection_dim: int, *, seed: int = 0) -> Path:
    """Build a CLIPModel with random weights (seeded) from `vision` (a CLIPVisionConfig's
    keyword arguments) and a small text tower, and save it with a tokenizer and a
    preprocessor config to `folder`; returns the folder."""
    from transformers import CLIPConfig, CLIPModel

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab_size = tiny_tokenizer()
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=_TEXT_LENGTH,
                pad_token_id=0, bos_token_id=2, eos_token_id=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(vision), projection_dim=projection_dim)).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_preprocessor(out, int(vision["image_size"]))
    return out


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------- a served run, for load tests


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def train_small_run(work: Path) -> tuple[Path, list[Path]]:
    """A small `lite` run (64 px, 4 steps) on generated shapes, and 8 of its images."""
    from mumic.config import load_config
    from mumic.data.manifest import read_manifest
    from mumic.data.synthetic import make_shapes
    from mumic.train import fit

    manifest = make_shapes(work / "shapes", n=60, size=64, seed=0)
    cfg = load_config(overrides={
        "manifest": str(manifest), "labels_file": str(manifest.parent / "labels.yaml"), "out": str(work / "run"),
        "cache_dir": str(work / "cache"), "backbone": "lite", "image_size": 64, "batch_size": 16, "max_steps": 4,
        "eval_every": 4, "warmup_steps": 1, "patience": 100, "majority_n": 3, "device": "cpu",
    })
    run = fit(cfg, progress=False)
    return run, read_manifest(manifest).images[:8]


class ServeProcess:
    """`python -m mumic serve RUN ...ARGS` on a free loopback port, waited for on /health,
    stopped with SIGINT."""

    def __init__(self, run: Path, log: Path, *args: str, timeout: float = 180.0) -> None:
        import subprocess
        import sys
        import time
        import urllib.error
        import urllib.request

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mumic", "serve", str(run), "--host", "127.0.0.1", "--port", str(self.port),
               "--device", "cpu", "--log-level", "warning", *map(str, args)]
        self.log = log
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log.read_text(errors='replace')}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout:.0f} s:\n{log.read_text(errors='replace')}")

    def pids(self) -> list[int]:
        """The server process and its descendants (its decode worker processes), Linux; else the server alone."""
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
        return out

    def memory_mib(self, key: str) -> float:
        """VmRSS / VmHWM (peak resident memory) of the server process and its worker
        processes together, in MiB (nan off Linux): the peaks are summed, an upper bound
        of the peak they held at once."""
        total, found = 0.0, False
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(key + ":"):
                        total += int(line.split()[1]) / 1024
                        found = True
            except OSError:
                pass
        return total if found else float("nan")

    def stop(self) -> int | None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def without_test(manifest: Path) -> Path:
    """The Shapes manifest less its test rows (fit would evaluate them at the end), as bench.csv beside it."""
    out = manifest.with_name("bench.csv")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] != "test"]
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "labels", "split"])
        w.writeheader()
        w.writerows(rows)
    return out
