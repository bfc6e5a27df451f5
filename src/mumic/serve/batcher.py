"""Micro-batching: one thread owns the model; image requests waiting together share a
forward pass, other model work runs between batches."""

import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from mumic.errors import ServiceError

log = logging.getLogger(__name__)


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
    runs alone (the one-at-a-time baseline). Admission counts image-equivalents: an
    image job its images, other work the cost it is given. While any work is queued or
    running, a job that would take the total past max_pending is refused: submit and
    call raise ServiceError 503 with Retry-After. A job whose future is cancelled before
    its turn (its client left) is skipped.
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
        self.skipped = 0  # jobs cancelled before their turn
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
            "skipped": self.skipped,
        }

    def _admit(self, n: int) -> None:
        with self._lock:
            if self._stopped:
                raise ServiceError(503, "the service is shutting down; retry on another instance")
            if n > 0 and self._pending > 0 and self._pending + n > self.max_pending:
                raise ServiceError(503, f"the service is busy ({self._pending} images queued); retry shortly", {"Retry-After": "1"})
            self._pending += n

    def submit(self, pixels: Any) -> concurrent.futures.Future:
        """Queue uint8 pixels [n, 3, S, S]; the future gives the unnormalised embeddings [n, D]."""
        n = int(pixels.shape[0])
        self._admit(n)
        job = _Job(pixels, None, n)
        self._queue.put(job)
        return job.future

    @contextlib.contextmanager
    def reserved(self, cost: int) -> Iterator[None]:
        """Hold `cost` image-equivalents of the queue for the block (503 when they do not
        fit): work submitted in several steps is admitted, or refused, once."""
        cost = max(0, int(cost))
        self._admit(cost)
        try:
            yield
        finally:
            with self._lock:
                self._pending -= cost

    def call(self, fn: Callable[[], Any], cost: int = 0) -> concurrent.futures.Future:
        """Run fn() on the model thread (between batches); `cost` (image-equivalents)
        counts against max_pending until it has run."""
        cost = max(0, int(cost))
        self._admit(cost)
        job = _Job(None, fn, cost)
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
        try:
            if not job.future.set_running_or_notify_cancel():
                self.skipped += 1
                return
            assert job.fn is not None  # _loop hands only call jobs here
            try:
                job.future.set_result(job.fn())
            except BaseException as e:  # handed to the waiting request
                job.future.set_exception(e)
        finally:
            with self._lock:
                self._pending -= job.n

    def _run_batch(self, batch: list[_Job]) -> None:
        import torch

        live = [j for j in batch if j.future.set_running_or_notify_cancel()]  # skip requests whose client left
        self.skipped += len(batch) - len(live)
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

