"""The HTTP service under abuse, as a real server process on a loopback port: bodies over
the limit (declared and chunked), slow and silent clients, a full request-body budget,
and many concurrent clients mixing good and bad requests. Every client gets a bounded
answer (4xx, or 503 when busy; never another 5xx), and /health keeps answering
throughout.

The clients speak HTTP/1.1 over raw asyncio streams, so that they can do what ordinary
clients never do (stop half-way, trickle bytes, lie about the length)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import struct
import time
import zlib

import pytest
from PIL import Image

from serving import Server

HOST = "127.0.0.1"
MAX_REQUEST = 1_000_000
BUDGET = 3_000_000
HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 2.0
KEEP_ALIVE = 1.0
SERVER_ARGS = {
    "--max-images": 4, "--max-image-bytes": 200_000, "--max-request-bytes": MAX_REQUEST, "--max-pixels": 1_000_000,
    "--max-buffered-bytes": BUDGET, "--header-timeout": HEADER_TIMEOUT, "--body-timeout": BODY_TIMEOUT,
    "--keep-alive-timeout": KEEP_ALIVE, "--max-connections": 200, "--max-wait-ms": 5,
}
HEALTH_PATIENCE_S = 30.0  # a probe that gets no answer in this long counts as unanswered (a hang, not a slow answer)


# ----------------------------------------------------------------------------- a raw HTTP client


@dataclasses.dataclass
class Answer:
    status: int | None  # None: no answer within the client's limit; 0: closed without an answer
    seconds: float
    body: bytes = b""


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    line = await reader.readline()
    if not line:
        return 0, b""
    status = int(line.split()[1])
    length = 0
    while True:
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, (await reader.readexactly(length) if length else b"")


async def call(port: int, head: bytes, parts: list[bytes] | tuple = (), gap: float = 0.0, limit: float = 10.0) -> Answer:
    """Send `head`, then `parts` with `gap` seconds before each, while reading the answer;
    give up after `limit` seconds. Sending stops quietly when the server closes."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), limit)
    except (OSError, asyncio.TimeoutError):
        return Answer(0, time.monotonic() - t0)

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
        status, body = await asyncio.wait_for(_read_response(reader), max(limit - (time.monotonic() - t0), 0.01))
    except asyncio.TimeoutError:
        status, body = None, b""
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        status, body = 0, b""
    finally:
        feeder.cancel()
        writer.close()
    return Answer(status, time.monotonic() - t0, body)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()


def post_head(path: str, ctype: str, length: int | None) -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {ctype}\r\n{size}\r\nConnection: close\r\n\r\n".encode()


BOUNDARY = "abuseboundary"
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


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A PNG whose header claims width x height pixels, in a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def png(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


async def probe_health(port: int, stop: asyncio.Event, period: float = 0.05) -> list[Answer]:
    """GET /health on a new connection every `period` s until `stop` is set."""
    answers = []
    while not stop.is_set():
        answers.append(await call(port, get("/health"), limit=HEALTH_PATIENCE_S))
        await asyncio.sleep(period)
    return answers


def assert_health_answered(answers: list[Answer]) -> None:
    """Every /health call during the abuse got a 200 (a call stuck behind the abusive
    requests would end without one); how fast it answered is for benchmarks/abuse_load.py,
    not for a test on a shared machine."""
    assert answers, "the health probe never ran"
    bad = [a.status for a in answers if a.status != 200]
    assert not bad, f"{len(bad)} of {len(answers)} /health calls failed: {bad[:5]}"


async def with_health_probe(port: int, clients) -> tuple[list, list[Answer]]:
    """Run the coroutines made by `clients()` together while probing /health."""
    stop = asyncio.Event()
    probe = asyncio.create_task(probe_health(port, stop))
    await asyncio.sleep(0.2)  # a few probes before the abuse starts
    try:
        results = await asyncio.gather(*clients())
    finally:
        stop.set()
    return results, await probe


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def abuse_run(page_run):  # conftest's tiny run, shared with the page's and the guards' tests
    return page_run


@pytest.fixture(scope="module")
def server(abuse_run, tmp_path_factory):
    srv = Server(abuse_run, tmp_path_factory.mktemp("abuse_server") / "server.log", *(x for kv in SERVER_ARGS.items() for x in kv))
    yield srv
    srv.stop()
    assert srv.proc.returncode == 0, srv.log()  # a clean shutdown on SIGINT, even after all this
    assert "Traceback" not in srv.log(), srv.log()


# ----------------------------------------------------------------------------- tests


def test_declared_oversized_body_is_refused_unread(server):
    a = asyncio.run(call(server.port, post_head("/predict", MULTIPART, 10**12), limit=BODY_TIMEOUT + 3))
    assert a.status == 413, a
    assert b"over the limit of 1,000,000 bytes" in a.body
    assert a.seconds < BODY_TIMEOUT  # answered from the header, not after waiting for the body


def test_chunked_body_growing_past_the_limit_is_cut_off(server):
    """A chunked body is cut off once it passes the limit, and the client, still sending,
    reads the 413: the server drops the rest of the body for a moment before closing,
    since closing on unread input resets the connection and can lose the answer (without
    that, about one such request in ten here ends in a reset)."""

    async def clients():
        return [await call(server.port, post_head("/predict", MULTIPART, None), chunked(5 * MAX_REQUEST), limit=BODY_TIMEOUT + 3)
                for _ in range(30)]

    answers = asyncio.run(clients())
    assert [a.status for a in answers] == [413] * 30, [a.status for a in answers]
    assert b"over the limit" in answers[0].body


def test_slow_bodies_get_408_and_do_not_slow_health(server):
    """Clients that send their head, then one byte every 0.2 s: each is answered 408 once
    the body deadline passes, and /health keeps answering meanwhile."""
    length = 10_000
    def clients():
        return [call(server.port, post_head("/predict", MULTIPART, length), [b"x"] * length, gap=0.2, limit=BODY_TIMEOUT + 4)
                for _ in range(8)]

    answers, health = asyncio.run(with_health_probe(server.port, clients))
    assert [a.status for a in answers] == [408] * 8, answers
    assert all(BODY_TIMEOUT - 0.1 <= a.seconds <= BODY_TIMEOUT + 2 for a in answers), [a.seconds for a in answers]
    assert b"did not arrive within 2 s" in answers[0].body
    assert_health_answered(health)


def test_silent_and_trickling_request_heads_are_cut_off(server):
    """uvicorn alone holds such connections forever; here each is closed with a 408 once
    its head deadline passes, so they cannot pile up to the connection limit."""
    trickle = [bytes([c]) for c in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200]

    def clients():
        return [
            *[call(server.port, b"", limit=HEADER_TIMEOUT + 4) for _ in range(8)],  # connect, say nothing
            *[call(server.port, trickle[0], trickle[1:], gap=0.1, limit=HEADER_TIMEOUT + 4) for _ in range(8)],
        ]

    answers, health = asyncio.run(with_health_probe(server.port, clients))
    assert [a.status for a in answers] == [408] * 16, answers
    assert all(a.seconds <= HEADER_TIMEOUT + 2 for a in answers), [a.seconds for a in answers]
    assert_health_answered(health)


def test_idle_keep_alive_connection_is_closed(server):
    async def work():
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        status, _ = await _read_response(reader)
        t0 = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), KEEP_ALIVE + 3)  # b"" once the server closes
        writer.close()
        return status, rest, time.monotonic() - t0

    status, rest, waited = asyncio.run(work())
    assert status == 200 and rest == b"" and waited <= KEEP_ALIVE + 2


def test_request_bodies_share_a_memory_budget(server):
    """Twelve clients each declare a 900 kB body, send all but its last byte and wait: the
    3 MB budget admits three; the others are answered 503 at once instead of each holding
    almost a megabyte (or, with a large request limit, far more)."""
    length = 900_000
    body = b"x" * (length - 1)
    def clients():
        return [call(server.port, post_head("/embed/image", MULTIPART, length), [body], limit=BODY_TIMEOUT + 4) for _ in range(12)]

    answers, health = asyncio.run(with_health_probe(server.port, clients))
    statuses = sorted(a.status for a in answers)
    assert statuses.count(503) >= 12 - BUDGET // length and set(statuses) <= {408, 503}, statuses
    busy = [a for a in answers if a.status == 503]
    assert all(a.seconds < BODY_TIMEOUT for a in busy), [a.seconds for a in busy]
    assert b"retry shortly" in busy[0].body
    assert_health_answered(health)


@pytest.mark.slow
def test_many_concurrent_clients_mixing_good_and_abusive_requests(server):
    """64 connections at once, eight of each kind, twice over. Every request gets an answer
    in its expected set (503 is allowed anywhere: busy is a bounded answer), no other 5xx,
    /health answers throughout, and the server's peak memory stays bounded."""
    good = multipart(png())
    kinds = {
        "predict": (lambda: call(server.port, post("/predict", good), limit=20), {200, 503}),
        "embed_text": (lambda: call(server.port, post("/embed/text", b'{"texts": ["a red square"]}', "application/json"), limit=20),
                       {200, 503}),
        "declared_oversize": (lambda: call(server.port, post_head("/predict", MULTIPART, 50 * MAX_REQUEST), limit=10), {413}),
        "chunked_oversize": (lambda: call(server.port, post_head("/predict", MULTIPART, None), chunked(2 * MAX_REQUEST), limit=10),
                             {413, 503}),
        "slow_body": (lambda: call(server.port, post_head("/predict", MULTIPART, 5000), [b"x"] * 5000, gap=0.2,
                                   limit=BODY_TIMEOUT + 4),
                      {408, 503}),
        "silent": (lambda: call(server.port, b"", limit=HEADER_TIMEOUT + 4), {408}),
        "garbage_image": (lambda: call(server.port, post("/predict", multipart(os.urandom(5000))), limit=20), {422, 503}),
        "bomb_image": (lambda: call(server.port, post("/predict", multipart(bomb_png())), limit=20), {413, 503}),
    }
    rss_before = server.memory_kib("VmRSS")

    async def client(kind: str) -> list[tuple[str, Answer]]:
        make, _ = kinds[kind]
        return [(kind, await make()) for _ in range(2)]

    rounds, health = asyncio.run(with_health_probe(server.port, lambda: [client(k) for k in kinds for _ in range(8)]))
    answers = [x for r in rounds for x in r]
    assert len(answers) == 128
    unexpected = [(k, a.status, a.body[:120]) for k, a in answers if a.status not in kinds[k][1]]
    assert not unexpected, unexpected
    assert not [a for _, a in answers if a.status is not None and a.status >= 500 and a.status != 503]
    assert sum(a.status == 200 for k, a in answers if k == "predict") >= 1  # good requests still get through
    assert_health_answered(health)
    peak = server.memory_kib("VmHWM")
    if rss_before is not None and peak is not None:
        assert (peak - rss_before) / 1024 < 300, f"peak memory grew by {(peak - rss_before) / 1024:.0f} MiB"
    assert asyncio.run(call(server.port, get("/health"))).status == 200


def test_new_limits_are_validated():
    from mumic.errors import ConfigError
    from mumic.serve import Limits

    for bad in ({"header_timeout_s": 0}, {"body_timeout_s": -1.0}, {"keep_alive_s": float("inf")}, {"max_buffered_bytes": 0},
                {"body_timeout_s": True}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            Limits.from_kwargs(**bad)
    assert Limits().max_buffered_bytes >= Limits().max_request_bytes


def test_a_response_goes_out_in_one_send():
    """uvicorn writes a response's head and body separately (two syscalls, two packets, per
    answer: much of what a flood of small refusals costs); the guarded protocol joins them."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from mumic.serve.limits import protocol_class, send_json

    async def app(scope, receive, send):
        await send_json(send, 503, "busy")

    class Transport:
        def __init__(self):
            self.writes, self.closed = [], False

        def write(self, data):
            self.writes.append(bytes(data))

        def close(self):
            self.closed = True

        def is_closing(self):
            return self.closed

        def get_extra_info(self, name, default=None):
            return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

        def pause_reading(self):
            pass

        def resume_reading(self):
            pass

    async def go():
        config = Config(app, http=protocol_class(5.0), lifespan="off", access_log=False)
        config.load()
        proto = protocol_class(5.0)(config, ServerState(), {}, asyncio.get_running_loop())
        transport = Transport()
        proto.connection_made(transport)
        proto.data_received(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(100):
            await asyncio.sleep(0)
            if transport.closed:
                break
        proto.connection_lost(None)
        return transport

    transport = asyncio.run(go())
    assert transport.closed and len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and json.loads(body) == {"detail": "busy"}
