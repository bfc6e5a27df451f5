"""Load test of `mumic serve`: POST /predict from N concurrent clients on loopback, with
micro-batching on and off (the baseline), on the same run.

    python benchmarks/serve_load.py [--run RUN] [--quick] [--clients N] [--duration S]

Without --run it trains a small `lite` run at 64 px on generated shapes first. Each mode
starts its own server process on 127.0.0.1, warms it up, then sends one-image requests
from N clients for a bounded time and count. Prints requests/s and p50/p99 latency per
mode, and ends with one line `ratio=<batched/unbatched requests per second>`.
The clients share the machine with the server, so absolute numbers are pessimistic;
the ratio is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from _common import ServeProcess, train_small_run


def batching_stats(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()["batching"]


def predict_request(port: int, image: bytes) -> bytes:
    """A complete HTTP/1.1 POST /predict with one image, as bytes (built once, sent many times)."""
    boundary = "mumicbenchboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode()
    return head + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
    """Send one request on a keep-alive connection; (status, server keeps the connection)."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("connection", "").lower() != "close"


async def load(port: int, images: list[bytes], clients: int, duration: float, max_requests: int) -> dict:
    """N clients, each on its own keep-alive connection, send one-image /predict requests
    back to back until `duration` seconds or `max_requests` requests in total; returns
    throughput and latency percentiles. The client is a few lines over asyncio streams, so
    that it takes little of the CPU it shares with the server."""
    requests = [predict_request(port, img) for img in images]
    latencies: list[float] = []
    errors = 0
    sent = 0
    stop_at = time.perf_counter() + duration

    async def client(i: int) -> None:
        nonlocal errors, sent
        conn = None
        j = i
        while time.perf_counter() < stop_at and sent < max_requests:
            sent += 1
            j += 1
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", port)
                status, keep = await asyncio.wait_for(_exchange(*conn, requests[j % len(requests)]), timeout=60)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError, IndexError):
                status, keep = 0, False
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
            if not keep and conn is not None:
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*[client(i) for i in range(clients)])
    elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"requests": len(latencies), "errors": errors, "seconds": elapsed, "rps": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="run directory (default: train a small lite run at 64 px)")
    p.add_argument("--quick", action="store_true", help="short phases: the whole benchmark in under a minute on CPU")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default: 32; quick: 16)")
    p.add_argument("--duration", type=float, default=None, help="seconds of load per mode (default: 20; quick: 6)")
    p.add_argument("--max-requests", type=int, default=20000, help="upper bound on requests per mode")
    p.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto", help="the service's --engine (default: auto)")
    a = p.parse_args(argv)
    clients = a.clients or (16 if a.quick else 32)
    duration = a.duration or (6.0 if a.quick else 20.0)
    warmup = 1.0 if a.quick else 3.0
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mumic-serve-load-") as tmp:
        work = Path(tmp)
        if a.run:
            from mumic.data.synthetic import make_shapes

            run = Path(a.run)
            paths = sorted((make_shapes(work / "shapes", n=8, size=64, seed=0).parent / "images").glob("*.png"))
        else:
            run, paths = train_small_run(work)
        images = [Path(x).read_bytes() for x in paths]
        results = {}
        for mode, batching in (("batched", True), ("unbatched", False)):
            server = ServeProcess(run, work / f"{mode}.log", "--max-connections", 1024, "--engine", a.engine,
                                  *([] if batching else ["--no-batching"]))
            try:
                asyncio.run(load(server.port, images, clients, warmup, 10 * clients))
                before = batching_stats(server.url)
                res = asyncio.run(load(server.port, images, clients, duration, a.max_requests))
                after = batching_stats(server.url)
                done = after["batches"] - before["batches"]
                res["mean_batch"] = (after["images"] - before["images"]) / done if done else float("nan")
                results[mode] = res
            finally:
                server.stop()
    print(f"run: {run if a.run else 'lite @ 64 px, trained here'}; engine {a.engine}; "
          f"{clients} clients, {duration:g} s per mode, one image per request, 127.0.0.1")
    print(f"{'mode':<10} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'images/batch':>12}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['requests']:>8} {r['errors']:>6} {r['rps']:>8.1f} "
              f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['mean_batch']:>12.1f}")
    ratio = results["batched"]["rps"] / results["unbatched"]["rps"] if results["unbatched"]["rps"] else float("inf")
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    print(f"ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
