"""Guards against slow and abusive clients: the service limits, the request-body
guard (content type, size, deadline, shared memory budget) and uvicorn's h11 protocol
with a deadline for every request head.

Torch- and FastAPI-free: the CLI reads `Limits` while building its --help.
"""

import asyncio
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from mumic.errors import ConfigError

MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def model_threads_default() -> int:
    """Threads for the image batches by default: the usable CPUs but one (kept for the
    event loop), at least one."""
    return max(1, usable_cpus() - 1)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Request limits and batching settings of the service (all per request unless noted).

    Decoding an upload holds at most `max_decoded_bytes` of pixels (its width x height x
    the bytes per pixel of its mode, after JPEG draft reduction; checked before decoding);
    the decodes running at once hold at most `max_decoding_bytes` together (a larger one
    runs alone), `decode_threads` at once (by default one per usable CPU), one of which
    is kept for small images; large ones decode in decode_threads - 1 worker processes
    (see serve.decoding.DecodeGate). A decode holds
    about five times its decoded bytes at its peak (the image, its RGB conversion, the
    resample), so decoding holds about 5 x max_decoding_bytes at most. Model work is admitted in image-equivalents, each kind on its own
    budget: images count 1 each, over `max_pending_images` queued 503; texts (the prompts
    of zero-shot labels, /embed/text entries) 1 per started `text_chars_per_image`
    characters of a request's texts together (measured: on a CPU a text tower takes about
    as long for 32 characters of text as the image tower for one image, and small models
    pay the most per character), over `max_pending_texts` queued 503. Text
    work runs in jobs of about `text_job_images` image-equivalents on a text thread of its
    own, so that an image batch never waits behind it, on `text_threads` threads of the
    `lite` text tower's onnxruntime session (small jobs gain nothing from more, and lose
    much on a busy CPU; a PyTorch text tower uses torch's threads), and takes at most
    `text_share_pct` percent of that thread's time; a request of more than one job's
    worth runs its jobs on a bulk thread at the lowest priority instead, on a budget of
    max_pending_texts of their own (see MicroBatcher). An image batch runs on
    `model_threads` threads (onnxruntime's image session; `mumic serve` sets torch's to
    the same), by default one per usable CPU but one: with all of them, every batch
    would take the event loop's CPU away, and a batch's threads would wait for each
    other whenever one of them lost its CPU.
    """

    max_request_bytes: int = 64 * 2**20
    max_image_bytes: int = 16 * 2**20
    max_pixels: int = 50_000_000
    max_decoded_bytes: int = 128 * 2**20
    max_decoding_bytes: int = 128 * 2**20
    max_images: int = 16
    max_labels: int = 64
    max_label_chars: int = 200
    max_texts: int = 64
    max_text_chars: int = 1000
    max_k: int = 100
    #: batching (whole service)
    batching: bool = True
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_pending_images: int = 512
    max_pending_texts: int = 64
    text_chars_per_image: int = 32
    text_job_images: int = 8
    text_threads: int = 1
    text_share_pct: int = 50
    label_cache_size: int = 4096
    decode_threads: int = dataclasses.field(default_factory=usable_cpus)
    model_threads: int = dataclasses.field(default_factory=model_threads_default)
    #: slow and abusive clients (whole service: bodies held in memory at once; per connection: timeouts)
    max_buffered_bytes: int = 256 * 2**20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 5.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "batching":
                if not isinstance(value, bool):
                    raise ConfigError(f"batching must be true or false, got {value!r}")
            elif f.name == "max_wait_ms":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                    raise ConfigError(f"max_wait_ms must be a finite number >= 0, got {value!r}")
            elif f.name.endswith("_s"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                    raise ConfigError(f"{f.name} must be a finite number of seconds > 0, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{f.name} must be a positive integer, got {value!r}")
        if self.text_share_pct > 100:
            raise ConfigError(f"text_share_pct is a percentage of the text thread's time, at most 100; got {self.text_share_pct}")

    @classmethod
    def from_kwargs(cls, **kw: Any) -> "Limits":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise ConfigError(f"unknown service limit(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**kw)


class BodyBudget:
    """Bytes of request bodies held in memory at once, over all requests (one event loop,
    so no lock): a request reserves what it holds and returns it when it is answered."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    def take(self, n: int) -> bool:
        if n > 0 and self.used + n > self.limit:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def give(self, n: int) -> None:
        self.used -= n


class RequestGuard:
    """ASGI middleware: content type per route (415), a body size limit (413), a deadline
    for the body (408) and a memory budget shared by all bodies (503).

    The body is read here, up to max_bytes, and replayed to the app, so no route ever
    sees more than the limit; a declared Content-Length over it is refused unread. A
    declared length is reserved from the budget before reading, a chunked body as it
    grows; a request that does not fit is answered 503 at once instead of queueing
    memory. The reservation is returned when the request has been answered. A route in
    `busy` whose check gives a reason (its work could not be admitted now, whatever the
    body says) is answered 503 with it from the headers alone, its body never parsed. A
    multipart body with more parts than its route's `max_parts` is answered 422 once
    read, from a count of its boundary lines, before any part is parsed.

    A refusal closes the connection. If the client is still sending, closing a socket
    with unread input makes the kernel reset the connection, and the client may never
    see the answer; so the rest of the body is first read and dropped for a short,
    bounded while (never when the client waits for "100 Continue": it has sent nothing).
    """

    #: reading and dropping a refused body: at most this long, this long without data,
    #: and this many times max_bytes
    DRAIN_S = 1.0
    DRAIN_IDLE_S = 0.25
    DRAIN_FACTOR = 4

    def __init__(
        self,
        app: Any,
        *,
        max_bytes: int,
        content_types: dict[str, tuple[str, ...]],
        budget: BodyBudget | None = None,
        body_timeout_s: float = 60.0,
        busy: dict[str, Callable[[], str | None]] | None = None,
        max_parts: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.busy = busy or {}
        self.max_parts = max_parts or {}
        self.max_bytes = max_bytes
        self.content_types = content_types
        self.budget = budget or BodyBudget(4 * max_bytes)
        self.body_timeout_s = body_timeout_s

    async def _drain(self, receive: Callable) -> None:
        """Read and drop what is left of the body, within DRAIN_S / DRAIN_IDLE_S / DRAIN_FACTOR."""
        await drain_body(receive, self.DRAIN_FACTOR * self.max_bytes, self.DRAIN_S, self.DRAIN_IDLE_S)

    async def _refuse(self, receive: Callable, send: Callable, status: int, detail: str, *, drain: bool,
                      headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        if drain:
            await self._drain(receive)
        await send_json(send, status, detail, headers)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        # a client that asked for "100 Continue" sends its body only when invited: reading
        # (draining) would invite it, so a refusal before reading does not drain
        sending = headers.get("expect", "").strip().lower() != "100-continue"
        allowed = self.content_types.get(scope["path"]) if scope["method"] == "POST" else None
        if allowed is not None:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in allowed:
                got = f"'{ctype}'" if ctype else "no content type"
                await self._refuse(receive, send, 415, f"{scope['path']} takes {' or '.join(allowed)}, got {got}", drain=sending)
                return
        declared = headers.get("content-length")
        size = 0
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                await send_json(send, 400, "malformed Content-Length header")
                return
            if size > self.max_bytes:
                await self._refuse(receive, send, 413, f"request body of {size:,} bytes is over the limit of {self.max_bytes:,} bytes",
                                   drain=sending)
                return
        check = self.busy.get(scope["path"]) if scope["method"] == "POST" else None
        reason = check() if check is not None else None
        if reason is not None:
            await self._refuse(receive, send, 503, reason, drain=sending, headers=[(b"retry-after", b"1")])
            return
        if not self.budget.take(size):
            await self._refuse(receive, send, 503, _busy(self.budget), drain=sending, headers=[(b"retry-after", b"1")])
            return
        reserved = size
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.body_timeout_s
            chunks: list[bytes] = []
            received = 0
            more = True
            while more:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
                except asyncio.TimeoutError:
                    await send_json(send, 408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                                f"({received:,} bytes came); send it faster, or a smaller one")
                    return
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                received += len(chunk)
                more = message.get("more_body", False)
                if received > self.max_bytes:
                    chunks.clear()
                    self.budget.give(reserved)
                    reserved = 0
                    await self._refuse(receive, send, 413, f"request body is over the limit of {self.max_bytes:,} bytes",
                                       drain=more)
                    return
                if received > reserved:
                    if not self.budget.take(received - reserved):
                        chunks.clear()
                        self.budget.give(reserved)
                        reserved = 0
                        await self._refuse(receive, send, 503, _busy(self.budget), drain=more, headers=[(b"retry-after", b"1")])
                        return
                    reserved = received
                if chunk:
                    chunks.append(chunk)
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            del chunks
            most = self.max_parts.get(scope["path"])
            if most is not None and (parts := multipart_parts(headers.get("content-type", ""), body)) > most:
                await send_json(send, 422, f"the form has {parts:,} parts; {scope['path']} takes at most {most:,}")
                return
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.budget.give(reserved)


def multipart_parts(content_type: str, body: bytes) -> int:
    """An upper bound on the parts of a multipart body (0 for any other kind): its
    delimiter lines (a line starting with "--" and the boundary), less the closing one.
    A delimiter never occurs inside a part, so no real part is missed."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != MULTIPART:
        return 0
    boundary = ""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        return 0
    delimiter = b"--" + boundary.encode("latin-1")
    lines = body.count(b"\n" + delimiter) + body.startswith(delimiter)
    return max(lines - 1, 0)


async def drain_body(receive: Callable, max_bytes: int, seconds: float = 1.0, idle_s: float = 0.25) -> None:
    """Read and drop what is left of a refused request's body: at most `max_bytes`, for at
    most `seconds`, and no longer than `idle_s` without data (so that the client reads
    the refusal instead of a connection reset)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    dropped = 0
    while dropped <= max_bytes:
        wait = min(end - loop.time(), idle_s)
        if wait <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), wait)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        dropped += len(message.get("body", b""))


def _busy(budget: BodyBudget) -> str:
    return (f"the service is busy receiving other requests ({budget.used:,} of {budget.limit:,} bytes of request "
            "bodies in memory); retry shortly")


async def send_json(send: Callable, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), (b"connection", b"close"),
        *headers,
    ]})
    await send({"type": "http.response.body", "body": payload})


_HEAD_TIMEOUT_TEXT = b"the request head did not arrive in time\n"
_HEAD_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                          b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_HEAD_TIMEOUT_TEXT), _HEAD_TIMEOUT_TEXT))


class OneSend:
    """A response's transport that sends its head with the first part of its body: uvicorn
    writes the status line and headers, then the body, as two sends (two syscalls and two
    packets); here the head is held until the next write, or until the end of the loop's
    current turn, or until close. A large part is sent after the head rather than copied
    onto it. Everything else is the transport's."""

    JOIN_BYTES = 64 * 1024

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._handle: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._held is None:
            self._held = bytes(data)
            self._handle = self._loop.call_soon(self.flush)
            return
        head = self._take()
        if len(data) <= self.JOIN_BYTES:
            self._transport.write(head + data)
        else:
            self._transport.write(head)
            self._transport.write(data)

    def _take(self) -> bytes:
        held, self._held = self._held or b"", None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        return held

    def flush(self) -> None:
        held = self._take()
        if held and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def protocol_class(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol, with a deadline for every request head.

    uvicorn times out idle keep-alive connections, but a connection that sends nothing,
    or trickles its request line and headers, is held forever: enough of them take every
    connection slot (`--max-connections`), and then the service answers nobody. Here each
    connection must deliver a complete request head within `header_timeout_s` of opening
    (or of its previous response); otherwise it gets a 408 and is closed. Bodies are
    bounded by RequestGuard. Each response's head and body go out in one send (OneSend).
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _head_timer: Any = None

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not self._waiting_for_head():
                return
            self.transport.write(_HEAD_TIMEOUT_RESPONSE)
            self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a complete request head arrived
                self._cancel_head_timer()
                if self.cycle is not None:  # its answer goes out in one send (its task has not started yet)
                    self.cycle.transport = OneSend(self.transport, self.loop)  # type: ignore[assignment]

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self._waiting_for_head():
                self._arm_head_timer()  # the next request on this keep-alive connection

    GuardedH11Protocol.__name__ = GuardedH11Protocol.__qualname__ = "GuardedH11Protocol"
    return GuardedH11Protocol

