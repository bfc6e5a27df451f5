"""HTTP service over a trained run: label probabilities, embeddings, labels, search.

`create_app(run_dir)` builds a FastAPI app (OpenAPI at /docs and /openapi.json);
`mumic serve RUN` runs it on uvicorn. Endpoints:

    POST /predict        uploaded images -> label probabilities and calibrated decisions
    POST /embed/image    uploaded images -> normalised image embeddings
    POST /embed/text     {"texts": [...]} -> normalised text embeddings (image space)
    POST /search         a text or image query -> nearest indexed images (with --index)
    GET  /labels         the run's labels, seen / unseen, thresholds
    GET  /health         liveness and batching counters

One model thread owns the model. Image requests are queued and run together
(micro-batching: up to `max_batch_size` images, waiting at most `max_wait_ms` for
company), so concurrent clients share forward passes. The run's class embeddings are
computed once at start; extra (zero-shot) labels are embedded on first use and kept in a
bounded LRU cache.

The service reads only the bytes clients upload: it never opens a file or URL a client
names. Limits answer with JSON {"detail": ...}: 408 for a body that does not arrive in
time, 413 for a body, image or pixel count over its limit or too many images, 415 for a
wrong content type, 422 for an undecodable image or invalid fields, 503 when the queue or
the memory for request bodies is full.

Slow or abusive clients are bounded in time and memory: a connection must deliver each
request head within `header_timeout_s` (uvicorn itself never times out a request head),
an idle keep-alive connection is closed after `keep_alive_s`, a body must arrive within
`body_timeout_s`, and all request bodies held at once share `max_buffered_bytes`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at
# run time, and the request models are defined inside create_app.

import asyncio
import collections
import concurrent.futures
import dataclasses
import io
import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Callable

from mumic.errors import ConfigError, ImageError, MumicError

log = logging.getLogger(__name__)

#: Pillow formats accepted from clients; others (EPS, PDF, ...) are refused before decoding.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")

MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"


@dataclasses.dataclass(frozen=True)
class Limits:
    """Request limits and batching settings of the service (all per request unless noted)."""

    max_request_bytes: int = 64 * 2**20
    max_image_bytes: int = 16 * 2**20
    max_pixels: int = 50_000_000
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
    label_cache_size: int = 4096
    decode_threads: int = 4
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
                if not isinstance(value, (int, float)) or value < 0:
                    raise ConfigError(f"max_wait_ms must be a number >= 0, got {value!r}")
            elif f.name.endswith("_s"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                    raise ConfigError(f"{f.name} must be a number of seconds > 0, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{f.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_kwargs(cls, **kw: Any) -> "Limits":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise ConfigError(f"unknown service limit(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**kw)


class ServiceError(MumicError):
    """A request the service refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class UploadError(ImageError):
    """An uploaded image that cannot be used: 413 (too large) or 422 (not decodable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- images


def decode_image(data: bytes, *, max_pixels: int, size_hint: int | None = None, name: str = "image") -> Any:
    """Uploaded bytes -> RGB PIL image, as mumic.data.images.load_image decodes files.

    EXIF orientation applied, first frame of animations, transparency onto white (the
    shared `to_rgb`); JPEGs decode at a reduced scale whose sides stay >= size_hint.
    Raises UploadError: 413 over max_pixels, 422 when the bytes are not a supported image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    from mumic.data.images import to_rgb

    if not data:
        raise UploadError(422, f"{name}: empty upload (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise UploadError(
                    413, f"{name}: too many pixels ({width}x{height} = {width * height:,}, limit {max_pixels:,}); downscale the image"
                )
            if size_hint is not None and img.format == "JPEG":
                img.draft("RGB", (size_hint, size_hint))
            img.load()
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception as e:  # a broken EXIF block must not lose the image
                log.debug("%s: ignoring unreadable EXIF orientation (%s)", name, e)
                oriented = img
            rgb = to_rgb(oriented)
            if rgb is img:
                rgb = img.copy()
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning, where warnings are errors
        raise UploadError(413, f"{name}: too many pixels (decompression bomb limit); downscale the image") from None
    except UnidentifiedImageError:
        raise UploadError(422, f"{name}: not an image in a supported format ({', '.join(ALLOWED_FORMATS)})") from None
    except MemoryError:
        raise
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        reason = str(e) or e.__class__.__name__
        raise UploadError(422, f"{name}: cannot decode the image ({reason})") from None
    return rgb


def image_pixels(data: bytes, size: int, *, max_pixels: int, name: str = "image") -> Any:
    """Uploaded bytes -> uint8 array [3, size, size] (resize shorter side, center crop)."""
    from mumic.data.images import resize_center_crop

    return resize_center_crop(decode_image(data, max_pixels=max_pixels, size_hint=size, name=name), size)


# ----------------------------------------------------------------------------- batching


class _Job:
    __slots__ = ("pixels", "fn", "future", "n")

    def __init__(self, pixels: Any, fn: Callable[[], Any] | None, n: int) -> None:
        self.pixels = pixels
        self.fn = fn
        self.n = n
        self.future: concurrent.futures.Future = concurrent.futures.Future()


_STOP = object()


class MicroBatcher:
    """One worker thread that owns the model.

    Image jobs ([n, 3, S, S] uint8 each) waiting together are concatenated into one batch
    of at most max_batch_size images; the first job of a batch waits at most max_wait_ms
    for others. Other model work (text embeddings) runs on the same thread between
    batches, so the model is never used from two threads. With enabled=False every job
    runs alone (the one-at-a-time baseline). At most max_pending images wait; beyond that
    submit raises ServiceError 503.
    """

    def __init__(
        self,
        run_images: Callable[[Any], Any],
        *,
        enabled: bool = True,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_pending: int = 512,
        name: str = "mumic-model",
    ) -> None:
        self._run_images = run_images
        self.enabled = enabled
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_pending = max_pending
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self._stopped = False
        self.batches = 0
        self.images = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled, "max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait * 1000.0,
            "batches": self.batches, "images": self.images, "largest_batch": self.largest_batch, "pending_images": self._pending,
        }

    def _admit(self, n: int) -> None:
        with self._lock:
            if self._stopped:
                raise ServiceError(503, "the service is shutting down; retry on another instance")
            if self._pending > 0 and self._pending + n > self.max_pending:
                raise ServiceError(503, f"the service is busy ({self._pending} images queued); retry shortly", {"Retry-After": "1"})
            self._pending += n

    def submit(self, pixels: Any) -> concurrent.futures.Future:
        """Queue uint8 pixels [n, 3, S, S]; the future gives the unnormalised embeddings [n, D]."""
        n = int(pixels.shape[0])
        self._admit(n)
        job = _Job(pixels, None, n)
        self._queue.put(job)
        return job.future

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn() on the model thread (between batches)."""
        self._admit(0)
        job = _Job(None, fn, 0)
        self._queue.put(job)
        return job.future

    def _loop(self) -> None:
        carry: Any = None
        while True:
            job = carry if carry is not None else self._queue.get()
            carry = None
            if job is _STOP:
                break
            if job.fn is not None:
                self._run_call(job)
                continue
            batch, n = [job], job.n
            if self.enabled:
                deadline = time.monotonic() + self.max_wait
                while n < self.max_batch_size:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        try:
                            nxt = self._queue.get(timeout=remaining)
                        except queue.Empty:
                            break
                    if nxt is _STOP or nxt.fn is not None or n + nxt.n > self.max_batch_size:
                        carry = nxt
                        break
                    batch.append(nxt)
                    n += nxt.n
            self._run_batch(batch)
        self._fail_leftovers()

    def _run_call(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except BaseException as e:  # handed to the waiting request
            job.future.set_exception(e)

    def _run_batch(self, batch: list[_Job]) -> None:
        import torch

        live = [j for j in batch if j.future.set_running_or_notify_cancel()]  # skip requests whose client left
        try:
            if live:
                px = live[0].pixels if len(live) == 1 else torch.cat([j.pixels for j in live])
                out = self._run_images(px)
                self.batches += 1
                self.images += len(px)
                self.largest_batch = max(self.largest_batch, len(px))
                pos = 0
                for j in live:
                    j.future.set_result(out[pos : pos + j.n])
                    pos += j.n
        except BaseException as e:
            log.exception("a model batch failed")
            for j in live:
                if not j.future.done():
                    j.future.set_exception(e)
        finally:
            with self._lock:
                self._pending -= sum(j.n for j in batch)

    def _fail_leftovers(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(ServiceError(503, "the service is shutting down"))


# ----------------------------------------------------------------------------- labels


class LabelBank:
    """Class embeddings v and biases b: the run's labels (computed once) and extra
    zero-shot labels (an LRU cache of at most `capacity` names).

    compute() runs on the model thread; lookups and inserts happen on the event loop.
    """

    def __init__(self, model: Any, capacity: int) -> None:
        self.model = model
        self.capacity = capacity
        self.linear = model.classifier is not None
        # a linear head scores only its trained labels
        self.run_specs = list(model.seen) if self.linear else list(model.labels)
        self.run_names = [s.name for s in self.run_specs]
        self.run_v, self.run_b = (None, None) if self.linear else self.compute(self.run_specs)
        self._lru: collections.OrderedDict[str, tuple[Any, Any]] = collections.OrderedDict()

    def compute(self, specs: list[Any]) -> tuple[Any, Any]:
        """([C, D] normalised class embeddings, [C] biases); leaves the model's own text
        cache empty so that memory stays bounded by the LRU."""
        import torch

        with torch.inference_mode():
            v = self.model.class_embeddings(specs).float().cpu()
            b = self.model.label_biases(specs).detach().float().cpu()
        self.model.clear_text_cache()
        return v, b

    def extra_specs(self, names: list[str]) -> list[Any]:
        """Specs of the requested names that are not already scored run labels."""
        run = set(self.run_names)
        return self.model.resolve_labels([n for n in names if n not in run])

    def missing(self, specs: list[Any]) -> list[Any]:
        return [s for s in specs if s.name not in self._lru]

    def put(self, specs: list[Any], v: Any, b: Any) -> None:
        for i, s in enumerate(specs):
            self._lru[s.name] = (v[i], b[i])
            self._lru.move_to_end(s.name)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def get(self, specs: list[Any]) -> tuple[Any, Any]:
        import torch

        vs, bs = [], []
        for s in specs:
            v, b = self._lru[s.name]
            self._lru.move_to_end(s.name)
            vs.append(v)
            bs.append(b)
        return torch.stack(vs), torch.stack(bs)

    def __len__(self) -> int:
        return len(self._lru)


# ----------------------------------------------------------------------------- the guard


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
    memory. The reservation is returned when the request has been answered.

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
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.content_types = content_types
        self.budget = budget or BodyBudget(4 * max_bytes)
        self.body_timeout_s = body_timeout_s

    async def _drain(self, receive: Callable) -> None:
        """Read and drop what is left of the body, within DRAIN_S / DRAIN_IDLE_S / DRAIN_FACTOR."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.DRAIN_S
        dropped = 0
        while dropped <= self.DRAIN_FACTOR * self.max_bytes:
            wait = min(end - loop.time(), self.DRAIN_IDLE_S)
            if wait <= 0:
                return
            try:
                message = await asyncio.wait_for(receive(), wait)
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            dropped += len(message.get("body", b""))

    async def _refuse(self, receive: Callable, send: Callable, status: int, detail: str, *, drain: bool,
                      headers: list[tuple[bytes, bytes]] = ()) -> None:
        if drain:
            await self._drain(receive)
        await _send_json(send, status, detail, headers)

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
                await _send_json(send, 400, "malformed Content-Length header")
                return
            if size > self.max_bytes:
                await self._refuse(receive, send, 413, f"request body of {size:,} bytes is over the limit of {self.max_bytes:,} bytes",
                                   drain=sending)
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
                    await _send_json(send, 408, f"the request body did not arrive within {self.body_timeout_s:g} s "
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


def _busy(budget: BodyBudget) -> str:
    return (f"the service is busy receiving other requests ({budget.used:,} of {budget.limit:,} bytes of request "
            "bodies in memory); retry shortly")


async def _send_json(send: Callable, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), (b"connection", b"close"),
        *headers,
    ]})
    await send({"type": "http.response.body", "body": payload})


# ----------------------------------------------------------------------------- the protocol


_HEAD_TIMEOUT_TEXT = b"the request head did not arrive in time\n"
_HEAD_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                          b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_HEAD_TIMEOUT_TEXT), _HEAD_TIMEOUT_TEXT))


def protocol_class(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol, with a deadline for every request head.

    uvicorn times out idle keep-alive connections, but a connection that sends nothing,
    or trickles its request line and headers, is held forever: enough of them take every
    connection slot (`--max-connections`), and then the service answers nobody. Here each
    connection must deliver a complete request head within `header_timeout_s` of opening
    (or of its previous response); otherwise it gets a 408 and is closed. Bodies are
    bounded by RequestGuard.
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

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
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

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self._waiting_for_head():
                self._arm_head_timer()  # the next request on this keep-alive connection

    GuardedH11Protocol.__name__ = GuardedH11Protocol.__qualname__ = "GuardedH11Protocol"
    return GuardedH11Protocol


# ----------------------------------------------------------------------------- the app


def create_app(run_dir: str | Path, index: str | Path | None = None, *, device: str = "auto", engine: str = "auto",
               **limits: Any) -> Any:
    """The FastAPI app serving `run_dir` (and the index folder `index`, for /search).
    `engine` runs the image tower (see MuMIC.set_engine: onnxruntime on CPUs by default).

    `limits` are the fields of Limits (sizes, counts, batching). The model, the run's class
    embeddings and the index are loaded here, so a bad run or index fails before serving.
    """
    import contextlib

    import numpy as np
    import torch
    import torch.nn.functional as F
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field

    import mumic
    from mumic import heads
    from mumic.export import public_spec
    from mumic.predictor import Predictor

    lim = Limits.from_kwargs(**limits)
    t0 = time.perf_counter()
    model = Predictor.from_run(run_dir, device=device)
    model.eval()
    model.set_engine(engine)
    size = model.backbone.image_size
    dim = model.backbone.embed_dim
    bank = LabelBank(model, lim.label_cache_size)
    inv_tau = model.inv_tau.detach().float().cpu()
    search_index = None
    if index is not None:
        from mumic.search import Index

        search_index = Index.load(index)
        search_index.check_run(run_dir)
        if search_index.dim != dim:
            raise MumicError(f"index {index} holds {search_index.dim}-d vectors, the run {dim}-d; rebuild the index with this run")

    @torch.inference_mode()
    def run_images(px: Any) -> Any:
        return model.image_embeddings(px).float().cpu()

    batcher = MicroBatcher(
        run_images, enabled=lim.batching, max_batch_size=lim.max_batch_size, max_wait_ms=lim.max_wait_ms,
        max_pending=lim.max_pending_images,
    )
    batcher.start()
    decode_slots = asyncio.Semaphore(lim.decode_threads)
    log.info(
        "serving run %s: %d labels%s; batching %s; ready in %.1f s", Path(run_dir).name, len(bank.run_names),
        f", index of {search_index.count} images" if search_index else "",
        f"on (max {lim.max_batch_size}, wait {lim.max_wait_ms:g} ms)" if lim.batching else "off", time.perf_counter() - t0,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        yield
        batcher.stop()

    # ------------------------------------------------------------------ schemas
    class ErrorBody(BaseModel):
        detail: str | list[dict[str, Any]] = Field(description="what was wrong with the request")

    class ImagePrediction(BaseModel):
        index: int = Field(description="position of the image in the request")
        filename: str | None = Field(None, description="the upload's file name, as sent")
        scores: dict[str, float] = Field(description="label -> probability, highest first (top_k of them if asked)")
        predicted: list[str] = Field(description="labels at or above their threshold, highest probability first")
        embedding: list[float] | None = Field(None, description="L2-normalised image embedding (return_embedding)")

    class PredictResponse(BaseModel):
        labels: list[str] = Field(description="all labels scored: the run's, then the extra ones")
        thresholds: str = Field(description="'calibrated' (the run's per-label thresholds) or 'fixed-0.5'")
        results: list[ImagePrediction]

    class EmbeddingsResponse(BaseModel):
        dim: int
        embeddings: list[list[float]] = Field(description="one L2-normalised row per input")
        filenames: list[str | None] | None = None

    class TextsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[Annotated[str, Field(max_length=lim.max_text_chars)]] = Field(
            min_length=1, max_length=lim.max_texts, description=f"texts to embed into the image space (at most {lim.max_texts})"
        )

    class LabelInfo(BaseModel):
        name: str
        seen: bool = Field(description="trained on (true) or zero-shot only (false)")
        scored: bool = Field(description="scored by /predict by default")
        threshold: float = Field(description="calibrated decision threshold")
        prompts: list[str] = Field(description="the texts whose embeddings are averaged into the class embedding")

    class LabelsResponse(BaseModel):
        labels: list[LabelInfo]
        default_threshold: float = Field(description="threshold of labels without a calibrated one (extra labels)")
        tau: float
        embed_dim: int
        backbone: str
        zero_shot: bool = Field(description="whether extra labels can be scored (false for a linear-head run)")

    class HealthResponse(BaseModel):
        status: str
        version: str
        run: str
        labels: int
        image_size: int
        embed_dim: int
        index_items: int | None
        label_cache: int
        batching: dict[str, Any]

    class SearchHit(BaseModel):
        model_config = ConfigDict(extra="allow")
        rank: int
        score: float = Field(description="cosine similarity")
        id: int = Field(description="row of the index")
        image: str

    class SearchResponse(BaseModel):
        query: str = Field(description="'text' or 'image'")
        exact: bool
        results: list[SearchHit]

    errors = {code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "malformed body"), (408, "the body did not arrive in time"),
        (413, "body, image, pixel count or number of images over the limit"),
        (415, "wrong content type"), (422, "invalid field or undecodable image"),
        (503, "queue or request-body memory full, or shutting down"),
    )}

    app = FastAPI(
        title="mumic",
        version=mumic.__version__,
        summary="Multi-label image classification with image-text embeddings (MuMIC)",
        description=(
            f"Run `{Path(run_dir).name}`: {len(bank.run_names)} labels, {size} px images, {dim}-d embeddings. "
            f"Limits: {lim.max_images} images and {lim.max_labels} extra labels per request, "
            f"{lim.max_image_bytes:,} bytes per image, {lim.max_pixels:,} pixels per image, "
            f"{lim.max_request_bytes:,} bytes per request."
        ),
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.model = model
    app.state.limits = lim
    app.state.body_budget = body_budget = BodyBudget(max(lim.max_buffered_bytes, lim.max_request_bytes))

    # ------------------------------------------------------------------ errors
    def _json_error(status: int, detail: Any, headers: dict[str, str] | None = None) -> Any:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Any:
        return _json_error(exc.status, str(exc), exc.headers)

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError) -> Any:
        return _json_error(exc.status, str(exc))

    @app.exception_handler(MumicError)
    async def _mumic_error(request: Request, exc: MumicError) -> Any:
        return _json_error(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Any:
        # the location and reason only: client input is not echoed back
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in exc.errors()]
        return _json_error(422, detail)

    # ------------------------------------------------------------------ helpers
    async def read_images(images: list[UploadFile]) -> tuple[Any, list[str | None]]:
        if len(images) > lim.max_images:
            raise ServiceError(413, f"{len(images)} images in one request; the limit is {lim.max_images}")
        names, blobs = [], []
        for i, up in enumerate(images):
            data = await up.read(lim.max_image_bytes + 1)
            label = f"image {i}" + (f" ({up.filename})" if up.filename else "")
            if len(data) > lim.max_image_bytes:
                raise ServiceError(413, f"{label} is over the limit of {lim.max_image_bytes:,} bytes")
            names.append(up.filename)
            blobs.append((label, data))
        arrays = []
        for label, data in blobs:
            async with decode_slots:
                arrays.append(await run_in_threadpool(image_pixels, data, size, max_pixels=lim.max_pixels, name=label))
        return torch.from_numpy(np.stack(arrays)), names

    async def embed_pixels(px: Any) -> Any:
        return await asyncio.wrap_future(batcher.submit(px))

    async def on_model_thread(fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(batcher.call(fn))

    def clean_labels(labels: list[str] | None) -> list[str]:
        names: list[str] = []
        for raw in labels or []:
            name = raw.strip()
            if not name:
                continue  # empty form entries are ignored
            if len(name) > lim.max_label_chars:
                raise ServiceError(422, f"label '{name[:40]}...' has {len(name)} characters; the limit is {lim.max_label_chars}")
            if name not in names:
                names.append(name)
        if len(names) > lim.max_labels:
            raise ServiceError(422, f"{len(names)} extra labels; the limit is {lim.max_labels}")
        return names

    async def label_params(names: list[str]) -> tuple[list[Any], Any, Any]:
        """Specs, [C, D] class embeddings and [C] biases: the run's labels, then extras."""
        extra = bank.extra_specs(names)
        if bank.linear:
            if extra:
                raise ServiceError(422, "this run has a linear head: it scores only its trained labels, not extra labels")
            return list(bank.run_specs), None, None
        specs = list(bank.run_specs)
        v, b = bank.run_v, bank.run_b
        if extra:
            todo = bank.missing(extra)
            if todo:
                tv, tb = await on_model_thread(lambda: bank.compute(todo))
                bank.put(todo, tv, tb)
            ev, eb = bank.get(extra)
            specs += extra
            v, b = torch.cat([v, ev]), torch.cat([b, eb])
        return specs, v, b

    def probabilities(u_raw: Any, specs: list[Any], v: Any, b: Any) -> Any:
        with torch.inference_mode():
            if bank.linear:
                return torch.sigmoid(model.logits(u_raw.to(model.device), specs).float()).cpu().numpy()
            return heads.tempered_probabilities(u_raw, v, inv_tau, b).numpy()

    # ------------------------------------------------------------------ routes
    @app.post("/predict", response_model=PredictResponse, responses=errors, summary="Label probabilities of uploaded images")
    async def predict(
        images: list[UploadFile] = File(description=f"image files (JPEG, PNG, GIF, BMP, WebP, TIFF), at most {lim.max_images}"),
        labels: list[str] | None = Form(None, description="extra labels to score zero-shot, repeated field; empty entries are ignored"),
        top_k: int | None = Form(None, ge=1, description="keep the k highest scores per image"),
        apply_thresholds: bool = Form(True, description="decide with the run's calibrated thresholds (false: at 0.5)"),
        return_embedding: bool = Form(False, description="also return each image's normalised embedding"),
    ) -> Any:
        names = clean_labels(labels)
        specs, v, b = await label_params(names)
        px, filenames = await read_images(images)
        u_raw = await embed_pixels(px)
        probs = probabilities(u_raw, specs, v, b)
        decided = model.decide(probs, specs) if apply_thresholds else probs >= 0.5
        u = F.normalize(u_raw, dim=-1).numpy() if return_embedding else None
        label_names = [s.name for s in specs]
        results = []
        for r in range(len(probs)):
            order = np.argsort(-probs[r], kind="stable")
            kept = order[:top_k] if top_k else order
            results.append({
                "index": r,
                "filename": filenames[r],
                "scores": {label_names[j]: round(float(probs[r, j]), 6) for j in kept},
                "predicted": [label_names[j] for j in order if decided[r, j]],
                "embedding": u[r].tolist() if u is not None else None,
            })
        return {"labels": label_names, "thresholds": "calibrated" if apply_thresholds else "fixed-0.5", "results": results}

    @app.post("/embed/image", response_model=EmbeddingsResponse, responses=errors, summary="Normalised embeddings of uploaded images")
    async def embed_image(
        images: list[UploadFile] = File(description=f"image files, at most {lim.max_images}"),
    ) -> Any:
        px, filenames = await read_images(images)
        u = F.normalize(await embed_pixels(px), dim=-1)
        return {"dim": dim, "embeddings": u.numpy().tolist(), "filenames": filenames}

    @app.post("/embed/text", response_model=EmbeddingsResponse, responses=errors, summary="Normalised embeddings of texts, in the image space")
    async def embed_text(body: TextsRequest) -> Any:
        def work() -> Any:
            try:
                return model.embed_texts(list(body.texts))
            finally:
                model.clear_text_cache()

        emb = await on_model_thread(work)
        return {"dim": dim, "embeddings": np.asarray(emb).tolist(), "filenames": None}

    @app.get("/labels", response_model=LabelsResponse, summary="The run's labels, seen / unseen, and thresholds")
    async def labels_info() -> Any:
        th = getattr(model, "thresholds", None) or {"per_label": {}, "default": 0.5}
        scored = set(bank.run_names)
        return {
            "labels": [
                {"name": l.name, "seen": l.seen, "scored": l.name in scored,
                 "threshold": float(th["per_label"].get(l.name, th["default"])), "prompts": l.texts(model.templates)}
                for l in model.labels
            ],
            "default_threshold": float(th["default"]),
            "tau": model.tau,
            "embed_dim": dim,
            "backbone": public_spec(model.backbone.spec),
            "zero_shot": not bank.linear,
        }

    @app.get("/health", response_model=HealthResponse, summary="Liveness and batching counters")
    async def health() -> Any:
        return {
            "status": "ok", "version": mumic.__version__, "run": Path(run_dir).name, "labels": len(bank.run_names),
            "image_size": size, "embed_dim": dim, "index_items": search_index.count if search_index else None,
            "label_cache": len(bank), "batching": batcher.stats(),
        }

    content_types = {"/predict": (MULTIPART,), "/embed/image": (MULTIPART,), "/embed/text": (JSON_TYPE,)}
    if search_index is not None:
        content_types["/search"] = (MULTIPART, URLENCODED)

        @app.post("/search", response_model=SearchResponse, responses=errors, summary="Nearest indexed images of a text or an image")
        async def search(
            text: str | None = Form(None, max_length=lim.max_text_chars, description="query text (give text or image)"),
            image: UploadFile | None = File(None, description="query image (give text or image)"),
            k: int = Form(10, ge=1, le=lim.max_k, description="number of results"),
            exact: bool = Form(False, description="exact search over all vectors instead of the HNSW graph"),
        ) -> Any:
            has_text = text is not None and text.strip() != ""
            if has_text == (image is not None):
                raise ServiceError(422, "give exactly one query: a non-empty 'text' or one 'image'")
            if has_text:
                def work() -> Any:
                    try:
                        return model.embed_texts([text])
                    finally:
                        model.clear_text_cache()

                q = np.asarray(await on_model_thread(work), dtype=np.float32)
            else:
                px, _ = await read_images([image])
                q = F.normalize(await embed_pixels(px), dim=-1).numpy()
            scores, ids = await run_in_threadpool(search_index.search, q, k, exact=exact)
            return {"query": "text" if has_text else "image", "exact": bool(exact or search_index.ann is None),
                    "results": search_index.results(scores[0], ids[0])}

    # outermost user middleware; the app stays a FastAPI instance (routes, state, OpenAPI)
    app.add_middleware(RequestGuard, max_bytes=lim.max_request_bytes, content_types=content_types, budget=body_budget,
                       body_timeout_s=lim.body_timeout_s)
    return app


