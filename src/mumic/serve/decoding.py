"""Decoding uploads without letting large images crowd out small ones or pile up memory:
the cost of a decode read from its header, a gate that admits decodes by bytes and
threads, large decodes in worker processes of their own, and giving freed memory back to
the system after a large decode.

Large decodes run in separate processes (spawned on the first one, as background work)
rather than on threads: a decode holds Python's GIL for part of its work
(Pillow's conversions, the high-bit-depth arithmetic), and a lower-priority thread that
holds it when the scheduler takes its core stalls the event loop and the model thread
with it. A worker process shares no lock with the service, so the scheduler's priority
is the whole story; and a decoder that crashes on a hostile file takes down its worker,
not the service.

A decode holds a few times its decoded bytes while it runs (the decoded image, its RGB
conversion, the resample), and glibc keeps what a worker thread freed in that thread's
arena unless told otherwise, so the process would stay at its peak. `tune_malloc` (called
by `mumic serve` before any thread starts) makes large buffers come from, and go back to,
the system directly; `trim_memory` returns what is left after a large decode.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import functools
import io
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NamedTuple

from mumic.errors import ServiceError, UploadError

log = logging.getLogger(__name__)

#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: allocations of at least this many bytes are mapped from the system and unmapped when freed
MMAP_THRESHOLD = 1 << 20


def _libc() -> Any:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


def tune_malloc() -> bool:
    """Make glibc map buffers of MMAP_THRESHOLD bytes or more from the system and unmap
    them when freed (instead of raising its threshold to the largest buffer freed so far
    and keeping them in per-thread arenas), and trim the heap top sooner. Process-wide;
    False where the C library is not glibc."""
    lib = _libc()
    if lib is None:
        return False
    ok = bool(lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(lib.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD))
    log.debug("malloc tuned for serving: %s", ok)
    return ok


def trim_memory() -> None:
    """Give the memory the C allocator holds free back to the system (glibc; else nothing)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


#: large decodes run this much nicer than the rest of the service (in their worker
#: processes) where background scheduling is not available
LARGE_DECODE_NICE = 10


def lower_priority(by: int = LARGE_DECODE_NICE) -> None:
    """Lower the calling thread's CPU priority by `by` nice levels (Linux, where a thread
    has its own; elsewhere nothing). It cannot be raised again without privileges."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except (AttributeError, OSError):
        pass


def run_in_background(nice: int = LARGE_DECODE_NICE) -> bool:
    """Make the calling thread background work: Linux's SCHED_IDLE policy, under which it
    runs only on CPU time that no ordinary thread wants, and an ordinary thread that wakes
    takes its CPU at once (a nice level still leaves a waking thread waiting for the
    running one's time slice, and that wait is what an event loop's latency is made of).
    Where SCHED_IDLE is not available, `nice` levels lower instead. True when
    SCHED_IDLE was set. Neither can be undone without privileges."""
    lower_priority(nice)  # also the fallback; threads started from here inherit both
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None:
        return False
    try:
        os.sched_setscheduler(threading.get_native_id(), policy, os.sched_param(0))
    except OSError:
        return False
    return True


def _worker_start(nice: int) -> None:
    """A decode worker process starts here: Ctrl-C is the service's to handle (it stops
    the workers), the allocator gives large buffers back, and it runs as background work."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_malloc()
    run_in_background(nice)


class _Refused(NamedTuple):
    """An UploadError raised in a worker process, sent back as plain values (it does not pickle)."""

    status: int
    message: str


def decode_pixels(data: bytes, name: str, size: int, max_pixels: int, max_decoded_bytes: int) -> Any:
    """image_pixels of an upload, as a decode worker process runs it; what it held is
    given back to the system afterwards."""
    from mumic.data.images import image_pixels

    try:
        return image_pixels(data, size, max_pixels=max_pixels, name=name, max_decoded_bytes=max_decoded_bytes)
    except UploadError as e:
        return _Refused(e.status, str(e))
    finally:
        trim_memory()


def decode_cost(data: bytes, size: int, *, max_pixels: int, max_decoded_bytes: int) -> int:
    """Bytes the decoded upload will hold, from its header (a JPEG at the reduced scale
    it decodes at for `size`); 0 for bytes that are not an image, or an image over the
    limits: the decoder refuses those at once, from the same header."""
    from PIL import Image

    from mumic.data.images import ALLOWED_FORMATS, decoded_bytes

    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                return 0
            if img.format == "JPEG":
                img.draft("RGB", (size, size))
                width, height = img.size
            need = decoded_bytes(width, height, img.mode)
    except Exception:  # not an image (or a broken header): the decoder says why
        return 0
    return need if need <= max_decoded_bytes else 0


class DecodeGate:
    """Admits decodes (on the event loop; no lock) by their bytes and by threads.

    A decode of at most `small_bytes` is small (the service: an eighth of the largest
    allowed decode): small decodes share `threads` slots and budget / 8 bytes. Larger
    ones share the other 7/8 of the budget and threads - 1 slots (at least one), so one
    thread is always left for small decodes, and an ordinary photo never waits behind a
    queue of huge images. Each kind waits in arrival order; a decode larger than its
    kind's bytes runs when no other of its kind runs. At most `queue_factor` x its
    threads decodes of a kind wait; beyond that, 503 with Retry-After (the client holds
    its upload instead of the service). Large decodes run in worker processes of their
    own as background work (`run_large`, run_in_background): on a busy CPU an ordinary
    request does not wait for the event loop or the model thread while a huge image decodes.
    """

    def __init__(self, budget: int, threads: int, small_bytes: int, queue_factor: dict[str, int] | None = None) -> None:
        self.budget = budget
        self.small_bytes = max(1, small_bytes)
        self.queue_factor = {"small": 16, "large": 2, **(queue_factor or {})}
        small_share = max(1, budget // 8)
        self._limits = {"small": (max(1, threads), small_share), "large": (max(1, threads - 1), max(1, budget - small_share))}
        self._running = {"small": 0, "large": 0}
        self._bytes = {"small": 0, "large": 0}
        self._waiting: dict[str, collections.deque[tuple[int, asyncio.Future]]] = {"small": collections.deque(),
                                                                                    "large": collections.deque()}
        self.peak_bytes = 0
        self.large = 0  # large decodes admitted so far
        self.refused = 0  # decodes refused because too many of their kind waited
        self._large_pool: concurrent.futures.ProcessPoolExecutor | None = None

    async def run_large(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in a large-decode worker process (background work; started on
        the first call): `fn` and `args` must pickle, an UploadError comes back as itself.
        A worker that dies (a decoder crash, the kernel's OOM killer) fails the decodes it
        held with 503; the next call starts new workers."""
        pool = self._large_pool
        if pool is None:
            pool = self._large_pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self._limits["large"][0], mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_start, initargs=(LARGE_DECODE_NICE,))
        try:
            out = await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))
        except BrokenProcessPool:
            if self._large_pool is pool:
                self._large_pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            log.warning("a large-decode worker process stopped; starting new ones")
            raise ServiceError(503, "the image decoder stopped while decoding this upload; retry shortly",
                               {"Retry-After": "1"}) from None
        if isinstance(out, _Refused):
            raise UploadError(out.status, out.message)
        return out

    def close(self) -> None:
        if self._large_pool is not None:
            self._large_pool.shutdown(wait=False, cancel_futures=True)
            self._large_pool = None

    def kind(self, cost: int) -> str:
        return "large" if cost > self.small_bytes else "small"

    def stats(self) -> dict[str, Any]:
        return {"running": dict(self._running), "bytes": dict(self._bytes), "waiting": {k: len(v) for k, v in self._waiting.items()},
                "peak_bytes": self.peak_bytes, "large": self.large, "refused": self.refused}

    def _fits(self, kind: str, cost: int) -> bool:
        threads, limit = self._limits[kind]
        return self._running[kind] < threads and (self._running[kind] == 0 or self._bytes[kind] + cost <= limit)

    def _take(self, kind: str, cost: int) -> None:
        self._running[kind] += 1
        self._bytes[kind] += cost
        self.large += kind == "large"
        self.peak_bytes = max(self.peak_bytes, self._bytes["small"] + self._bytes["large"])

    def _release(self, kind: str, cost: int) -> None:
        self._running[kind] -= 1
        self._bytes[kind] -= cost
        waiting = self._waiting[kind]
        while waiting and self._fits(kind, waiting[0][0]):
            n, fut = waiting.popleft()
            if fut.done():  # its request was cancelled while waiting
                continue
            self._take(kind, n)
            fut.set_result(None)

    @contextlib.asynccontextmanager
    async def slot(self, cost: int) -> AsyncIterator[None]:
        """Hold a decode slot of `cost` bytes (from decode_cost) for the block."""
        kind = self.kind(cost)
        waiting = self._waiting[kind]
        if waiting or not self._fits(kind, cost):
            if len(waiting) >= self.queue_factor[kind] * self._limits[kind][0]:
                self.refused += 1
                raise ServiceError(503, f"the service is busy decoding other images ({len(waiting)} {kind} ones waiting); "
                                        "retry shortly", {"Retry-After": "1"})
            fut = asyncio.get_running_loop().create_future()
            waiting.append((cost, fut))
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release(kind, cost)  # granted just before the cancel: hand it on
                else:
                    with contextlib.suppress(ValueError):
                        waiting.remove((cost, fut))
                raise
        else:
            self._take(kind, cost)
        try:
            yield
        finally:
            self._release(kind, cost)
