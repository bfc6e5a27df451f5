"""A `mumic serve` process on a free loopback port, for the tests that talk to it over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


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
