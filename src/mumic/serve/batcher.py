"""Micro-batching: one thread owns the model; image requests waiting together share a
forward pass, text work (label prompts, /embed/text) runs in small jobs between batches,
each kind of work within its own queue limit."""

import collections
import concurrent.futures
import contextlib
import logging
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


class _Lane:
    """Queued work of one kind and the image-equivalents it holds against its limit."""

    __slots__ = ("name", "limit", "jobs", "pending")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.jobs: collections.deque[_Job] = collections.deque()
        self.pending = 0


class MicroBatcher:
    """One worker thread that owns the model.

    Image jobs ([n, 3, S, S] uint8 each) waiting together are concatenated into one batch
    of at most max_batch_size images; the first job of a batch waits at most max_wait_ms
    for others. Text jobs (`call`: label prompts, /embed/text) run on the same thread, so
    the model is never used from two threads; the service cuts text work into small jobs.

    Order: image batches first. A text job runs when no image waits, or once
    `image_turns` image batches have run while it waited, so that neither kind starves
    the other: an image request waits behind at most one text job. Text work takes at
    most `text_share` of the thread's time: after a text job of d seconds the next one
    starts d x (1 - text_share) / text_share seconds later at the earliest (image batches
    run meanwhile), so a flood of text cannot keep the model thread, and a CPU core, busy
    all the time that the event loop and the decoders need.

    Admission counts image-equivalents, in two separate budgets: images against
    max_pending, text work against max_pending_texts (the cost it is given). While any
    work of its kind is queued or running, a job that would take its kind past the limit
    is refused: submit, call and reserved raise ServiceError 503 with Retry-After. So a
    flood of text work is refused on its own budget and never fills the image queue. A
    job whose future is cancelled before its turn (its client left) is skipped. With
    enabled=False every image job runs alone (the one-at-a-time baseline).
    """

    def __init__(
        self,
        run_images: Callable[[Any], Any],
        *,
        enabled: bool = True,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_pending: int = 512,
        max_pending_texts: int = 64,
        image_turns: int = 2,
        text_share: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "mumic-model",
    ) -> None:
        self._run_images = run_images
        self.enabled = enabled
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.image_turns = max(1, int(image_turns))
        if not 0 < text_share <= 1:
            raise ValueError(f"text_share must be in (0, 1], got {text_share!r}")
        self.text_share = float(text_share)
        self._clock = clock
        self._text_at = float("-inf")  # the next text job starts at this time (clock) at the earliest
        self._images = _Lane("images", max_pending)
        self._texts = _Lane("text", max_pending_texts)
        self._cond = threading.Condition()
        self._stopped = False
        self._image_run = 0  # image batches run while text work waited, since the last text job
        self.batches = 0
        self.images = 0
        self.largest_batch = 0
        self.text_jobs = 0
        self.skipped = 0  # jobs cancelled before their turn
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    @property
    def max_pending(self) -> int:
        return self._images.limit

    @property
    def max_pending_texts(self) -> int:
        return self._texts.limit

    def texts_full(self) -> bool:
        """True when no text work, of any cost, would be admitted now (the text budget is
        full): a request can be refused before its body is read."""
        with self._cond:
            return self._stopped or self._texts.pending >= self._texts.limit

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled, "max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait * 1000.0,
            "batches": self.batches, "images": self.images, "largest_batch": self.largest_batch, "text_jobs": self.text_jobs,
            "pending_images": self._images.pending, "pending_texts": self._texts.pending, "skipped": self.skipped,
        }

    def _admit(self, lane: _Lane, n: int) -> None:
        with self._cond:
            if self._stopped:
                raise ServiceError(503, "the service is shutting down; retry on another instance")
            if n > 0 and lane.pending > 0 and lane.pending + n > lane.limit:
                raise ServiceError(503, f"the service is busy ({lane.pending} image-equivalents of {lane.name} work queued); "
                                        "retry shortly", {"Retry-After": "1"})
            lane.pending += n

    def _release(self, lane: _Lane, n: int) -> None:
        with self._cond:
            lane.pending -= n

    def _put(self, lane: _Lane, job: _Job) -> None:
        with self._cond:
            if self._stopped:
                lane.pending -= job.n
                raise ServiceError(503, "the service is shutting down; retry on another instance")
            lane.jobs.append(job)
            self._cond.notify_all()

    def submit(self, pixels: Any) -> concurrent.futures.Future:
        """Queue uint8 pixels [n, 3, S, S]; the future gives the unnormalised embeddings [n, D]."""
        n = int(pixels.shape[0])
        self._admit(self._images, n)
        job = _Job(pixels, None, n)
        self._put(self._images, job)
        return job.future

    @contextlib.contextmanager
    def reserved(self, cost: int) -> Iterator[None]:
        """Hold `cost` image-equivalents of the text budget for the block (503 when they do
        not fit): text work submitted in several jobs is admitted, or refused, once."""
        cost = max(0, int(cost))
        self._admit(self._texts, cost)
        try:
            yield
        finally:
            self._release(self._texts, cost)

    def call(self, fn: Callable[[], Any], cost: int = 0) -> concurrent.futures.Future:
        """Run fn() on the model thread, as a text job; `cost` (image-equivalents) counts
        against max_pending_texts until it has run."""
        cost = max(0, int(cost))
        self._admit(self._texts, cost)
        job = _Job(None, fn, cost)
        self._put(self._texts, job)
        return job.future

    # ------------------------------------------------------------------ the model thread
    def _next(self) -> tuple[str, list[_Job]] | None:
        """The next work, by the order above: ("text", [job]) or ("images", batch); None once
        stopped and the work queued before has run."""
        images, texts = self._images.jobs, self._texts.jobs
        with self._cond:
            while True:
                if not images and not texts:
                    if self._stopped:
                        return None
                    self._cond.wait()
                    continue
                text_due = bool(texts) and (self._stopped or self._clock() >= self._text_at)
                if text_due and (not images or self._image_run >= self.image_turns):
                    self._image_run = 0
                    return "text", [texts.popleft()]
                if images:
                    break
                self._cond.wait(max(self._text_at - self._clock(), 0.001))  # only text waits, for its share
            job = images.popleft()
            batch, n = [job], job.n
            if self.enabled:
                deadline = time.monotonic() + self.max_wait
                while n < self.max_batch_size and not self._stopped:
                    if images:
                        if n + images[0].n > self.max_batch_size:
                            break
                        nxt = images.popleft()
                        batch.append(nxt)
                        n += nxt.n
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            if texts:
                self._image_run += 1
            return "images", batch

    def _loop(self) -> None:
        while True:
            work = self._next()
            if work is None:
                break
            kind, jobs = work
            if kind == "text":
                self._run_call(jobs[0])
            else:
                self._run_batch(jobs)
        self._fail_leftovers()

    def _run_call(self, job: _Job) -> None:
        try:
            if not job.future.set_running_or_notify_cancel():
                self.skipped += 1
                return
            assert job.fn is not None  # only call jobs are queued as text
            self.text_jobs += 1
            start = self._clock()
            try:
                job.future.set_result(job.fn())
            except BaseException as e:  # handed to the waiting request
                job.future.set_exception(e)
            end = self._clock()
            self._text_at = end + (end - start) * (1.0 - self.text_share) / self.text_share
        finally:
            self._release(self._texts, job.n)

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
            self._release(self._images, sum(j.n for j in batch))

    def _fail_leftovers(self) -> None:
        with self._cond:
            left = [*self._images.jobs, *self._texts.jobs]
            self._images.jobs.clear()
            self._texts.jobs.clear()
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ServiceError(503, "the service is shutting down"))
