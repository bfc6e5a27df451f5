"""A `mumic serve` process on a free loopback port, and the helpers of the tests that talk to it over HTTP."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
from PIL import Image

HOST = "127.0.0.1"


def traced_peak(fn, *args):
    """(fn(*args), the peak bytes Python's allocators (numpy's included) held while it ran)."""
    import tracemalloc

    tracemalloc.start()
    try:
        out = fn(*args)
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`python -m mumic serve RUN ...` on 127.0.0.1, stopped with SIGINT."""

    def __init__(self, run: Path, log: Path, *args: str, timeout: float = 120.0) -> None:
        self.log_path = log
        for _attempt in range(3):  # another process may take the free port first
            self.port = free_port()
            self.url = f"http://{HOST}:{self.port}"
            cmd = [sys.executable, "-m", "mumic", "serve", str(run), "--host", HOST, "--port", str(self.port),
                   "--device", "cpu", "--log-level", "warning", *map(str, args)]
            with open(log, "wb") as fh:
                self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            if self._wait(timeout):
                return
            if "address already in use" not in self.log().lower():
                break
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2.0) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self._healthy():
                return True
            time.sleep(0.2)
        self.stop()
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def memory_kib(self, key: str) -> int | None:
        """VmRSS / VmHWM (peak) of the server process, in KiB (None off Linux)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def files_of(paths):
    return [("images", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths]


def assert_error(r: httpx.Response, status: int, *needles: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert "detail" in body
    for n in needles:
        assert n in str(body["detail"]), (n, body)
    return body


def case_with_decisions_past_top_k(model, test_images):
    """(image, apply_thresholds, k): a case where more labels are decided than the k best."""
    p = model.predict_proba(test_images)
    for calibrated in (True, False):
        decided = model.decide(p) if calibrated else p >= 0.5
        for i in range(len(test_images)):
            if decided[i].sum() >= 2:
                return i, calibrated, int(decided[i].sum()) - 1
    raise AssertionError("no test image has two decided labels: a top_k case on them would test nothing")
