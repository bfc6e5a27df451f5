"""Load test of `mumic serve` under abuse: good clients and abusive ones at once, on loopback.

    python benchmarks/abuse_load.py [--run RUN] [--quick] [--good N] [--abusive N] [--duration S] [--kinds REGEX]
                                    [--model-threads N]

Without --run it trains a small `lite` run at 64 px on generated shapes first. The server
runs as its own process on 127.0.0.1 with tight limits (printed); this process is the
client. First /health and /predict are timed on the idle server; then, for a bounded time
and request count, good clients send /predict and /embed/text while abusive clients send
bodies over the limit (declared and chunked), trickle bodies and request heads, open
silent connections, hog the request-body memory, and upload garbage, truncated and
decompression-bomb images, wrong content types, broken multipart and deeply nested JSON;
and the costly-but-small attacks: decode amplification (a 7000x7000 float TIFF of a few
hundred KB, and float / 16-bit images just under the decoded-bytes limit), label floods
(the most new zero-shot labels a request may carry, with a garbage image, with a good
one, and sent by clients that hang up at once) and text floods (/embed/text with the most
and longest texts). A probe times GET /health throughout. The good clients and the probe
run in a process of their own, so that their latencies are the server's and not those of
a client event loop busy with the abusive clients' bodies (they share the CPUs all the same).
`--kinds REGEX` keeps only the attacks whose names match (e.g. `flood` or `tiff`: what one
kind of attack costs on its own); `--abusive 0` measures the good clients' own load.

Reports the requests sent and the answers per kind, the count of server errors (5xx other
than 503 "busy": must be 0) and of requests left unanswered (must be 0), p50/p99 latency of
/health and of good /predict (idle and under abuse), and the server's RSS on the idle
server and its peak (VmHWM from /proc/<pid>/status; the server process and its decode
worker processes summed), the share of the abuse phase in which the server's event loop
thread ran and in which it waited, runnable, for a CPU (Linux schedstat), with the targets: 0 server errors,
good /predict p99 under abuse within 5x of idle, peak memory within 1.5x of idle: for
each, the value under abuse, the idle baseline measured in the same run on the same server
(with the good clients' own mix, /embed/text included), the ratio and met / not met, and
the load average. The last line, `ratio=`, is the /predict one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import os
import random
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from _common import ServeProcess, train_small_run

HOST = "127.0.0.1"
LIMITS = {
    "--max-request-bytes": 2_000_000, "--max-image-bytes": 1_000_000, "--max-images": 4, "--max-pixels": 50_000_000,
    "--max-decoded-bytes": 16_000_000, "--max-buffered-bytes": 8_000_000, "--header-timeout": 2.0, "--body-timeout": 3.0,
    "--keep-alive-timeout": 2.0, "--max-connections": 256,
}
MAX_LABELS = 64  # the service's default --max-labels
TARGETS = {"server_errors": 0, "predict_p99_ratio": 5.0, "memory_ratio": 1.5}
MAX_REQUEST = LIMITS["--max-request-bytes"]
BODY_TIMEOUT = LIMITS["--body-timeout"]


# ----------------------------------------------------------------------------- raw HTTP


async def _read_response(reader: asyncio.StreamReader) -> int:
    line = await reader.readline()
    if not line:
        return 0
    status = int(line.split()[1])
    length = 0
    while True:
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def call(port: int, head: bytes, parts: list[bytes] | tuple = (), gap: float = 0.0, limit: float = 10.0) -> tuple[int | None, float]:
    """(status, seconds): send `head`, then `parts` `gap` seconds apart, while reading the
    answer. Status None: no answer within `limit`; 0: the server closed without one."""
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), limit)
    except (OSError, asyncio.TimeoutError):
        return 0, time.perf_counter() - t0

    async def feed() -> None:
        try:
            writer.write(head)
            await writer.drain()
            for part in parts:
                if gap:
                    await asyncio.sleep(gap)
                writer.write(part)
                await writer.drain()
        except (OSError, RuntimeError):
            pass

    feeder = asyncio.create_task(feed())
    try:
        status: int | None = await asyncio.wait_for(_read_response(reader), max(limit - (time.perf_counter() - t0), 0.01))
    except asyncio.TimeoutError:
        status = None
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        status = 0
    finally:
        feeder.cancel()
        writer.close()
    return status, time.perf_counter() - t0


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()


def post_head(path: str, ctype: str, length: int | None) -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {ctype}\r\n{size}\r\nConnection: close\r\n\r\n".encode()


BOUNDARY = "abuseloadboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(image: bytes, name: str = "x.png") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()


def post(path: str, body: bytes, ctype: str = MULTIPART) -> bytes:
    return post_head(path, ctype, len(body)) + body


def chunked(total: int, size: int = 65_536) -> list[bytes]:
    out = []
    while total > 0:
        n = min(size, total)
        out.append(b"%x\r\n" % n + b"x" * n + b"\r\n")
        total -= n
    return out + [b"0\r\n\r\n"]


@functools.cache
def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@functools.cache
def tiff(mode: str, width: int, height: int) -> bytes:
    """A deflate-compressed TIFF of one value: a few hundred KB at most, however large
    (built once per process: abusive_kinds is called to check --kinds, by each side, and
    for the report)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height), 0.25 if mode == "F" else 300).save(buf, "TIFF", compression="tiff_adobe_deflate")
    return buf.getvalue()


def form_fields(name: str, values: list[str]) -> bytes:
    return b"".join(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{v}\r\n".encode() for v in values)


def label_flood(image: bytes, rng: random.Random) -> bytes:
    """/predict with the most new zero-shot labels allowed (never seen before: no cache helps) and `image`."""
    labels = [f"flood label {rng.getrandbits(48):x} {i}" for i in range(MAX_LABELS)]
    return form_fields("extra_labels", labels) + multipart(image)


def text_flood() -> bytes:
    texts = [f"{i} " + "a long text to embed " * 48 for i in range(64)]  # 64 texts of about 1000 characters
    return json.dumps({"texts": [t[:1000] for t in texts]}).encode()


def abusive_kinds(port: int, image: bytes) -> dict:
    """name -> (a coroutine factory, the answers that count as correct)."""
    slow_limit = BODY_TIMEOUT + 4
    trickle_head = [bytes([c]) for c in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100]
    nested = b'{"texts": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    hog = MAX_REQUEST - 10
    rng = random.Random(1)
    float_bomb = tiff("F", 7000, 7000)
    side = int((LIMITS["--max-decoded-bytes"] / 4) ** 0.5) - 8
    float_large, sixteen_large = tiff("F", side, side), tiff("I;16", int(side * 1.41), int(side * 1.41))
    texts = text_flood()
    return {
        "declared_oversize": (lambda: call(port, post_head("/predict", MULTIPART, 100 * MAX_REQUEST)), {413}),
        "chunked_oversize": (lambda: call(port, post_head("/predict", MULTIPART, None), chunked(2 * MAX_REQUEST)), {413, 503}),
        "slow_body": (lambda: call(port, post_head("/predict", MULTIPART, 4000), [b"x"] * 4000, gap=0.25, limit=slow_limit), {408, 503}),
        "slow_head": (lambda: call(port, trickle_head[0], trickle_head[1:], gap=0.1, limit=slow_limit), {408}),
        "silent": (lambda: call(port, b"", limit=slow_limit), {408}),
        "memory_hog": (lambda: call(port, post_head("/embed/image", MULTIPART, hog), [b"x" * (hog - 1)], limit=slow_limit), {408, 503}),
        "garbage_image": (lambda: call(port, post("/predict", multipart(os.urandom(20_000)))), {422, 503}),
        "truncated_image": (lambda: call(port, post("/predict", multipart(image[: len(image) // 2]))), {422, 503}),
        "bomb_image": (lambda: call(port, post("/predict", multipart(bomb_png()))), {413, 503}),
        "wrong_type": (lambda: call(port, post("/predict", b'{"images": ["/etc/passwd"]}', "application/json")), {415}),
        "broken_multipart": (lambda: call(port, post("/predict", b"--" + BOUNDARY.encode() + b"\r\ngarbage")), {400, 422, 503}),
        "nested_json": (lambda: call(port, post("/embed/text", nested, "application/json")), {400, 422, 503}),
        # decode amplification: a few hundred KB that decode to 196 MB (refused from the header), and images just
        # under the decoded-bytes limit (decoded, converted without a widened copy)
        "float_tiff_bomb": (lambda: call(port, post("/predict", multipart(float_bomb, "bomb.tif"))), {413, 503}),
        "float_tiff_large": (lambda: call(port, post("/predict", multipart(float_large, "f.tif")), limit=30), {200, 503}),
        "tiff16_large": (lambda: call(port, post("/predict", multipart(sixteen_large, "i16.tif")), limit=30), {200, 503}),
        # label and text floods: admitted by cost on the text budget (503 when full), labels embedded after the images decode
        "label_flood_bad": (lambda: call(port, post("/predict", label_flood(os.urandom(2000), rng)), limit=30), {422, 503}),
        "label_flood": (lambda: call(port, post("/predict", label_flood(image, rng)), limit=30), {200, 503}),
        "label_flood_left": (lambda: call(port, post("/predict", label_flood(image, rng)), limit=0.05), {None, 0, 200, 503}),
        "text_flood": (lambda: call(port, post("/embed/text", texts, "application/json"), limit=30), {200, 503}),
    }


def reset_peak(pid: int) -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux: clear_refs 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def percentiles(seconds: list[float]) -> tuple[float, float]:
    if not seconds:
        return float("nan"), float("nan")
    ms = np.array(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


GOOD_TEXT = b'{"texts": ["a red circle"]}'


async def idle_phase(port: int, image: bytes, seconds: float) -> tuple[list[float], list[float], list[float]]:
    """Health and predict latencies on the idle server, one request at a time, with the
    good clients' own mix: a short /embed/text after every third /predict (so the idle
    server has loaded what normal traffic uses, the text tower included)."""
    health, predict, texts = [], [], []
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end:
        status, t = await call(port, get("/health"))
        if status == 200:
            health.append(t)
        status, t = await call(port, post("/predict", multipart(image)), limit=30)
        if status == 200:
            predict.append(t)
        i += 1
        if i % 3 == 0:
            status, t = await call(port, post("/embed/text", GOOD_TEXT, "application/json"), limit=30)
            if status == 200:
                texts.append(t)
    return health, predict, texts


def selected_kinds(port: int, image: bytes, pattern: str | None) -> dict:
    """abusive_kinds, only those whose names match the regular expression `pattern` (all without one)."""
    import re

    kinds = abusive_kinds(port, image)
    chosen = {name: kind for name, kind in kinds.items() if pattern is None or re.search(pattern, name)}
    if not chosen:
        raise SystemExit(f"--kinds {pattern!r} matches none of: {', '.join(kinds)}")
    return chosen


async def clients_phase(port: int, images: list[bytes], side: str, clients: int, duration: float, max_requests: int,
                        pattern: str | None = None) -> dict:
    """One side of the abuse phase, for `duration` s or `max_requests` requests: `clients`
    good clients (/predict, and /embed/text every fourth request) and the /health probe,
    or `clients` abusive clients (sending the attacks that match `pattern`)."""
    kinds = selected_kinds(port, images[0], pattern)
    names = list(kinds)
    answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    wrong: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    predict_t: list[float] = []
    text_t: list[float] = []
    health_t: list[float] = []
    health_bad = 0
    sent = 0
    stop_at = time.perf_counter() + duration
    rng = random.Random(0)

    def more() -> bool:
        return time.perf_counter() < stop_at and sent < max_requests

    async def good_client(i: int) -> None:
        nonlocal sent
        j = i
        while more():
            sent += 1
            j += 1
            if j % 4:
                status, t = await call(port, post("/predict", multipart(images[j % len(images)])), limit=30)
                answers["good_predict"][status] += 1
                if status == 200:
                    predict_t.append(t)
                if status not in (200, 503):
                    wrong["good_predict"][status] += 1
            else:
                status, t = await call(port, post("/embed/text", GOOD_TEXT, "application/json"), limit=30)
                answers["good_embed_text"][status] += 1
                if status == 200:
                    text_t.append(t)
                if status not in (200, 503):
                    wrong["good_embed_text"][status] += 1

    async def abusive_client(i: int) -> None:
        nonlocal sent
        k = i
        while more():
            sent += 1
            name = names[k % len(names)]
            k += rng.randint(1, len(names))
            make, ok = kinds[name]
            status, _ = await make()
            answers[name][status] += 1
            if status not in ok:
                wrong[name][status] += 1

    async def probe() -> None:
        nonlocal health_bad
        while time.perf_counter() < stop_at:
            status, t = await call(port, get("/health"), limit=10)
            if status == 200:
                health_t.append(t)
            else:
                health_bad += 1
            await asyncio.sleep(0.05)

    t0 = time.perf_counter()
    if side == "good":
        await asyncio.gather(probe(), *[good_client(i) for i in range(clients)])
    else:
        await asyncio.gather(*[abusive_client(i) for i in range(clients)])
    return {"answers": answers, "wrong": wrong, "predict": predict_t, "text": text_t, "health": health_t, "health_bad": health_bad,
            "sent": sent, "seconds": time.perf_counter() - t0}


def _good_side(conn, *args) -> None:
    conn.send(asyncio.run(clients_phase(*args)))
    conn.close()


def abuse_phase(port: int, images: list[bytes], good: int, abusive: int, duration: float, max_requests: int,
                pattern: str | None = None) -> dict:
    """Good clients and the probe in a process of their own, abusive clients in this one,
    at once: a good client's latency is then the server's, not the wait of a client event
    loop busy building the abusive clients' megabyte bodies."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_good_side, args=(send, port, images, "good", good, duration, max_requests // 4), daemon=True)
    child.start()
    res = asyncio.run(clients_phase(port, images, "abusive", abusive, duration, max_requests - max_requests // 4, pattern))
    good_res = recv.recv()
    child.join(30)
    for name, c in good_res["answers"].items():
        res["answers"][name].update(c)
    for name, c in good_res["wrong"].items():
        res["wrong"][name].update(c)
    for key in ("predict", "text", "health", "health_bad", "sent"):
        res[key] += good_res[key]
    res["seconds"] = max(res["seconds"], good_res["seconds"])
    return res


def _schedstat(pid: int) -> tuple[float, float] | None:
    """(seconds run, seconds waited runnable for a CPU) of the thread `pid` (a process's
    main thread: its event loop, for the server), Linux; None elsewhere."""
    try:
        run_ns, wait_ns = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="run directory (default: train a small lite run at 64 px)")
    p.add_argument("--quick", action="store_true", help="short phases: the whole benchmark in under a minute on CPU")
    p.add_argument("--good", type=int, default=None, help="good clients (default: 8; quick: 4)")
    p.add_argument("--abusive", type=int, default=None, help="abusive clients (default: 56; quick: 48)")
    p.add_argument("--duration", type=float, default=None, help="seconds of abuse (default: 30; quick: 10)")
    p.add_argument("--model-threads", type=int, default=None, help="the server's --model-threads (default: its own)")
    p.add_argument("--max-requests", type=int, default=20_000, help="upper bound on requests in the abuse phase")
    p.add_argument("--kinds", metavar="REGEX", help="only the attacks whose names match (default: all)")
    a = p.parse_args(argv)
    good = a.good if a.good is not None else (4 if a.quick else 8)
    abusive = a.abusive if a.abusive is not None else (48 if a.quick else 56)
    duration = a.duration or (10.0 if a.quick else 30.0)
    selected_kinds(0, b"", a.kinds)  # a pattern that matches nothing fails here, before any training
    idle = 2.0 if a.quick else 5.0
    t_start = time.perf_counter()
    load_start = _load()
    with tempfile.TemporaryDirectory(prefix="mumic-abuse-load-") as tmp:
        work = Path(tmp)
        if a.run:
            from mumic.data.synthetic import make_shapes

            run = Path(a.run)
            paths = sorted((make_shapes(work / "shapes", n=8, size=64, seed=0).parent / "images").glob("*.png"))
        else:
            run, paths = train_small_run(work)
        images = [Path(x).read_bytes() for x in paths]
        threads = ("--model-threads", a.model_threads) if a.model_threads is not None else ()
        server = ServeProcess(run, work / "server.log", *(x for kv in LIMITS.items() for x in kv), *threads)
        try:
            asyncio.run(idle_phase(server.port, images[0], 1.0))  # warm-up
            health_idle, predict_idle, text_idle = asyncio.run(idle_phase(server.port, images[0], idle))
            rss_before = server.memory_mib("VmRSS")
            peak_idle = server.memory_mib("VmHWM")
            reset = all([reset_peak(pid) for pid in server.pids()])  # from here VmHWM is the peak under abuse
            sched_before, abuse_s = _schedstat(server.proc.pid), time.perf_counter()
            res = abuse_phase(server.port, images, good, abusive, duration, a.max_requests, a.kinds)
            sched_after, abuse_s = _schedstat(server.proc.pid), time.perf_counter() - abuse_s
            health_after = asyncio.run(call(server.port, get("/health")))[0]
            peak = server.memory_mib("VmHWM")
        finally:
            code = server.stop()
        log = (work / "server.log").read_text(errors="replace")
    answers, wrong = res["answers"], res["wrong"]
    server_errors = sum(n for c in answers.values() for s, n in c.items() if s is not None and s >= 500 and s != 503)
    hang_ups = {name for name, (_, ok) in abusive_kinds(0, b"").items() if None in ok}  # clients that leave on purpose
    unanswered = sum(c.get(None, 0) + c.get(0, 0) for name, c in answers.items() if name not in hang_ups)
    busy = sum(c.get(503, 0) for c in answers.values())
    h_idle, h_abuse = percentiles(health_idle), percentiles(res["health"])
    p_idle, p_abuse = percentiles(predict_idle), percentiles(res["predict"])
    t_idle, t_abuse = percentiles(text_idle), percentiles(res["text"])

    print(f"run: {run if a.run else 'lite @ 64 px, trained here'}; server on {HOST}, one process, CPU")
    print("limits: " + " ".join(f"{k} {v}" for k, v in LIMITS.items()))
    print(f"abuse phase: {good} good + {abusive} abusive clients + 1 health probe, {res['seconds']:.1f} s"
          f"{f', attacks matching {a.kinds!r}' if a.kinds else ''}, "
          f"{res['sent']} requests sent (bounded by {duration:g} s and {a.max_requests} requests)")
    print(f"{'kind':<18} {'sent':>6}  answers (status: count; 0 = closed without answer, None = none in time)")
    for name in sorted(answers):
        c = answers[name]
        by_status = sorted(c.items(), key=lambda x: (x[0] is None, x[0] or 0))
        print(f"{name:<18} {sum(c.values()):>6}  " + ", ".join(f"{s}: {n}" for s, n in by_status))
    print(f"server errors (5xx other than 503): {server_errors}   503 busy: {busy}   unanswered: {unanswered}   "
          f"answers outside the expected set: {sum(sum(c.values()) for c in wrong.values())}"
          + (f" {dict((k, dict(v)) for k, v in wrong.items())}" if wrong else ""))
    print(f"/health  idle: p50 {h_idle[0]:.1f} ms, p99 {h_idle[1]:.1f} ms ({len(health_idle)} calls)   "
          f"under abuse: p50 {h_abuse[0]:.1f} ms, p99 {h_abuse[1]:.1f} ms, max {max(res['health'], default=float('nan')) * 1000:.1f} ms "
          f"({len(res['health'])} calls, {res['health_bad']} failed)")
    print(f"/predict idle: p50 {p_idle[0]:.1f} ms, p99 {p_idle[1]:.1f} ms ({len(predict_idle)} calls)   "
          f"under abuse: p50 {p_abuse[0]:.1f} ms, p99 {p_abuse[1]:.1f} ms ({len(res['predict'])} answered 200)")
    print(f"/embed/text (good, one short text) idle: p50 {t_idle[0]:.1f} ms, p99 {t_idle[1]:.1f} ms ({len(text_idle)} calls)   "
          f"under abuse: p50 {t_abuse[0]:.1f} ms, p99 {t_abuse[1]:.1f} ms ({len(res['text'])} answered 200)")
    print(f"server memory: RSS {rss_before:.0f} MiB on the idle server (peak so far {peak_idle:.0f} MiB), "
          f"peak under abuse (VmHWM{' reset before the abuse' if reset else ', since start'}) {peak:.0f} MiB; "
          f"health after the abuse: {health_after}; exit code on SIGINT: {code}; tracebacks in its log: {log.count('Traceback')}")
    if sched_before and sched_after:
        ran, waited = (after - before for after, before in zip(sched_after, sched_before))
        print(f"server event loop thread under abuse: ran {ran / abuse_s:.0%} of the time, waited runnable for a CPU "
              f"{waited / abuse_s:.0%}")
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    p_ratio, m_ratio, h_ratio = p_abuse[1] / p_idle[1], peak / rss_before, h_abuse[1] / h_idle[1]
    checks = [  # (what, under abuse, idle baseline of this run, ratio or count, target, met)
        ("server errors (5xx other than 503)", f"{server_errors}", "-", f"{server_errors}", f"{TARGETS['server_errors']}",
         server_errors <= TARGETS["server_errors"]),
        ("good /predict p99 latency", f"{p_abuse[1]:.1f} ms", f"{p_idle[1]:.1f} ms", f"{p_ratio:.2f}x",
         f"<= {TARGETS['predict_p99_ratio']:g}x", p_ratio <= TARGETS["predict_p99_ratio"]),
        ("server RSS (peak / idle)", f"{peak:.0f} MiB", f"{rss_before:.0f} MiB", f"{m_ratio:.2f}x", f"<= {TARGETS['memory_ratio']:g}x",
         m_ratio <= TARGETS["memory_ratio"]),
    ]
    print(f"{'target':<36} {'under abuse':>12} {'idle':>10} {'ratio':>8} {'target':>8}")
    for what, got, base, ratio, target, ok in checks:
        print(f"{what:<36} {got:>12} {base:>10} {ratio:>8} {target:>8}  {'met' if ok else 'NOT met'}")
    print(f"load average (1, 5, 15 min) at the start: {load_start}, at the end: {_load()}")
    print(f"health_ratio={h_ratio:.2f}  (p99 of GET /health under abuse / idle)")
    print(f"memory_ratio={m_ratio:.2f}")
    print("ratio = p99 latency of a good POST /predict under abuse / p99 on the idle server (same server, this run)")
    print(f"ratio={p_ratio:.2f}")
    return 0 if server_errors == 0 and unanswered == 0 and res["health_bad"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
