"""Micro-batching: image requests waiting together share a forward pass on the model
thread; text work (label prompts, /embed/text) runs in small jobs on a text thread of its
own, within its share of the CPU, and large text requests' jobs on a thread of background
priority; each kind of work within its own queue limit."""

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

#: the bulk thread runs at the lowest priority (not SCHED_IDLE: a thread of this process
#: holds the GIL for stretches, and one preempted while holding it would stall the event
#: loop until the CPU had nothing better to do)
BULK_NICE = 19


class _Job:
    __slots__ = ("pixels", "fn", "future", "n", "queued_at")

    def __init__(self, pixels: Any, fn: Callable[[], Any] | None, n: int, queued_at: float = 0.0) -> None:
        self.queued_at = queued_at
        self.pixels = pixels
        self.fn = fn
        self.n = n
        self.future: concurrent.futures.Future = concurrent.futures.Future()


class _Lane:
    """Queued work of one kind and the image-equivalents it holds against its limit."""

    __slots__ = ("name", "limit", "jobs", "pending", "next_at", "ran")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.jobs: collections.deque[_Job] = collections.deque()
        self.pending = 0
        self.next_at = float("-inf")  # a text lane's next job starts at this time (clock) at the earliest
        self.ran = 0  # a text lane's jobs run so far


class MicroBatcher:
    """Three worker threads: the model thread runs image batches, the text thread text
    jobs, the bulk thread the text jobs of large requests.

    Image jobs ([n, 3, S, S] uint8 each) waiting together are concatenated into one batch
    of at most max_batch_size images; a batch waits for more jobs until its first job has
    been queued for max_wait_ms (a job that waited behind a running batch that long goes
    at once). Text jobs (`call`: label prompts, /embed/text; the service cuts text work
    into small jobs) run one at a time on the text thread, so an image batch never waits
    behind text: the towers are used for inference only, from these threads, and share
    no state. Jobs submitted with bulk=True (the service's large text requests: many new
    zero-shot labels, many or long texts) run on the bulk thread instead, so that a small
    text job never waits behind them. The text thread runs `text_nice` nice levels below
    the caller (Linux), the bulk thread at nice 19 (BULK_NICE), so that on a busy CPU they
    yield to the image batches and the event loop, and the threads they start (torch's)
    inherit that. Each takes at most `text_share` of its thread's time: after a job of d
    seconds the next one starts d x (1 - text_share) / text_share seconds later at the
    earliest, so a flood of text cannot keep a CPU core busy all the time that the event
    loop, the decoders and the image batches need.

    Admission counts image-equivalents, in three separate budgets: images against
    max_pending, text work against max_pending_texts (the cost it is given), and bulk
    text work against a budget of the same size of its own (so that large requests
    never crowd small text work out). While any
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
        text_share: float = 1.0,
        text_nice: int = 0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "mumic-model",
    ) -> None:
        self._run_images = run_images
        self.enabled = enabled
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        if not 0 < text_share <= 1:
            raise ValueError(f"text_share must be in (0, 1], got {text_share!r}")
        self.text_share = float(text_share)
        self.text_nice = int(text_nice)
        self._clock = clock
        self._images = _Lane("images", max_pending)
        self._texts = _Lane("text", max_pending_texts)
        self._bulk = _Lane("bulk text", max_pending_texts)
        self._cond = threading.Condition()
        self._stopped = False
        self.batches = 0
        self.images = 0
        self.largest_batch = 0
        self.skipped = 0  # jobs cancelled before their turn
        self._threads = [
            threading.Thread(target=self._image_loop, name=name, daemon=True),
            threading.Thread(target=self._call_loop, args=(self._texts, self.text_nice), name=f"{name}-text", daemon=True),
            threading.Thread(target=self._call_loop, args=(self._bulk, BULK_NICE), name=f"{name}-bulk", daemon=True),
        ]

    @property
    def max_pending(self) -> int:
        return self._images.limit

    @property
    def max_pending_texts(self) -> int:
        return self._texts.limit

    def texts_full(self) -> bool:
        """True when no text work, of any cost, would be admitted now (the text budgets,
        small and bulk, are full): a request can be refused before its body is read."""
        with self._cond:
            return self._stopped or all(lane.pending >= lane.limit for lane in (self._texts, self._bulk))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled, "max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait * 1000.0,
            "batches": self.batches, "images": self.images, "largest_batch": self.largest_batch, "text_jobs": self._texts.ran,
            "bulk_jobs": self._bulk.ran,
            "pending_images": self._images.pending, "pending_texts": self._texts.pending,
            "pending_bulk_texts": self._bulk.pending, "skipped": self.skipped,
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
        job = _Job(pixels, None, n, self._clock())
        self._put(self._images, job)
        return job.future

    def _text_lane(self, bulk: bool) -> _Lane:
        return self._bulk if bulk else self._texts

    @contextlib.contextmanager
    def reserved(self, cost: int, bulk: bool = False) -> Iterator[None]:
        """Hold `cost` image-equivalents of the text budget (the bulk one with bulk=True)
        for the block (503 when they do not fit): text work submitted in several jobs is
        admitted, or refused, once."""
        cost = max(0, int(cost))
        lane = self._text_lane(bulk)
        self._admit(lane, cost)
        try:
            yield
        finally:
            self._release(lane, cost)

    def call(self, fn: Callable[[], Any], cost: int = 0, bulk: bool = False) -> concurrent.futures.Future:
        """Run fn() on the text thread, as a text job (on the bulk thread with bulk=True);
        `cost` (image-equivalents) counts against its budget until it has run."""
        cost = max(0, int(cost))
        lane = self._text_lane(bulk)
        self._admit(lane, cost)
        job = _Job(None, fn, cost)
        self._put(lane, job)
        return job.future

    # ------------------------------------------------------------------ the worker threads
    def _next_batch(self) -> list[_Job] | None:
        """The next image batch (for the model thread); None once stopped and the images
        queued before have run."""
        images = self._images.jobs
        with self._cond:
            while not images:
                if self._stopped:
                    return None
                self._cond.wait()
            job = images.popleft()
            batch, n = [job], job.n
            if self.enabled:
                deadline = job.queued_at + self.max_wait
                while n < self.max_batch_size and not self._stopped:
                    if images:
                        if n + images[0].n > self.max_batch_size:
                            break
                        nxt = images.popleft()
                        batch.append(nxt)
                        n += nxt.n
                        continue
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        break
                    self._cond.wait(min(remaining, 1.0))  # the clock may be a test's: look again
            return batch

    def _next_call(self, lane: _Lane) -> _Job | None:
        """The next job of a text lane once its share allows (for that lane's thread); None
        once stopped and the work queued before has run."""
        jobs = lane.jobs
        with self._cond:
            while True:
                if not jobs:
                    if self._stopped:
                        return None
                    self._cond.wait()
                    continue
                wait = lane.next_at - self._clock()
                if self._stopped or wait <= 0:
                    return jobs.popleft()
                self._cond.wait(min(max(wait, 0.001), 1.0))  # the clock may be a test's: look again

    def _image_loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run_batch(batch)
        self._fail_leftovers(self._images)

    def _call_loop(self, lane: _Lane, nice: int) -> None:
        if nice > 0:
            from mumic.serve.decoding import lower_priority

            lower_priority(nice)
        while (job := self._next_call(lane)) is not None:
            self._run_call(job, lane)
        self._fail_leftovers(lane)

    def _run_call(self, job: _Job, lane: _Lane) -> None:
        """Run a text job; its lane's next job may start once the share allows."""
        try:
            if not job.future.set_running_or_notify_cancel():
                self.skipped += 1
                return
            assert job.fn is not None  # only call jobs are queued as text
            lane.ran += 1
            start = self._clock()
            try:
                job.future.set_result(job.fn())
            except BaseException as e:  # handed to the waiting request
                job.future.set_exception(e)
            end = self._clock()
            lane.next_at = end + (end - start) * (1.0 - self.text_share) / self.text_share
        finally:
            self._release(lane, job.n)

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

    def _fail_leftovers(self, lane: _Lane) -> None:
        with self._cond:
            left = list(lane.jobs)
            lane.jobs.clear()
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ServiceError(503, "the service is shutting down"))
