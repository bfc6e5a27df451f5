"""What the routes call: the loaded run (its model owned by the batcher's thread), the
label bank, the optional search index, and the handling of each kind of request."""

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import UploadFile
from fastapi.concurrency import run_in_threadpool

import mumic
from mumic.data.images import image_pixels
from mumic.data.labels import normalize_label
from mumic.errors import ConfigError, MumicError, ServiceError
from mumic.serve.batcher import MicroBatcher
from mumic.serve.decoding import DecodeGate, decode_cost, decode_pixels
from mumic.serve.exposure import SearchHits
from mumic.serve.labels import LabelBank
from mumic.serve.limits import Limits

log = logging.getLogger(__name__)

#: the text thread runs this much nicer than the rest of the service: text work (zero-shot
#: labels, /embed/text) is what waits when the CPU is short, not the image batches
TEXT_NICE = 10

#: uploads that decode to at most this many bytes (128 x 128 RGB) are decoded on the event
#: loop: well under a millisecond each, less than the hop to a thread costs on a busy CPU
INLINE_DECODE_BYTES = 64 * 1024


def load_index(index: str | Path | None, run_dir: str | Path, dim: int) -> Any:
    """The search index folder for /search (None without one), checked against the run."""
    if index is None:
        return None
    from mumic.search import Index

    search_index = Index.load(index)
    search_index.check_run(run_dir)
    if search_index.dim != dim:
        raise MumicError(f"index {index} holds {search_index.dim}-d vectors, the run {dim}-d; rebuild the index with this run")
    return search_index


class ClientGone(ServiceError):
    """The client closed its connection: the rest of its work is dropped."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection before its answer was ready")


class ClientWatch:
    """Watches a request's connection once its body has been read: `gone` is set when
    the client disconnects, so that the service stops the work done for it (queued model
    jobs are cancelled, and the batcher skips them). Without a request it watches nothing."""

    def __init__(self, receive: Callable[[], Any] | None) -> None:
        self.receive = receive
        self.gone = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def _watch(self) -> None:
        assert self.receive is not None
        while True:
            message = await self.receive()
            if message.get("type") == "http.disconnect":
                self.gone.set()
                return
            await asyncio.sleep(0.05)  # nothing else is expected once the body is read

    def start(self) -> None:
        if self.receive is not None and self._task is None:
            self._task = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def check(self) -> None:
        """Raise ClientGone if the client has left (called before each expensive step)."""
        if self.gone.is_set():
            raise ClientGone()

    async def result(self, job: concurrent.futures.Future) -> Any:
        """The result of a model job, or ClientGone (and the job cancelled) if the client leaves first."""
        fut = asyncio.wrap_future(job)
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait({fut, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not fut.done():
            job.cancel()  # skipped by the batcher if it has not started
            fut.cancel()
            raise ClientGone()
        return fut.result()


class Service:
    """A run loaded for serving. Loading fails here, before serving, for a bad run or index.

    `engine` runs the image tower (see Predictor.set_engine: onnxruntime on CPUs by default).
    """

    def __init__(self, run_dir: str | Path, index: str | Path | None, *, device: str, engine: str, limits: Limits,
                 expose_columns: tuple[str, ...] = ()) -> None:
        from mumic.predictor import Predictor

        lim = self.limits = limits
        t0 = time.perf_counter()
        self.run_name = Path(run_dir).name
        self.model = model = Predictor.from_run(run_dir, device=device)
        model.eval()
        # text jobs are small: more threads gain nothing on a busy CPU; image batches leave a core to the event loop
        model.set_engine(engine, text_threads=lim.text_threads, image_threads=lim.model_threads)
        self.size = model.backbone.image_size
        self.dim = model.backbone.embed_dim
        self.bank = LabelBank(model, lim.label_cache_size)
        self.index = load_index(index, run_dir, self.dim)
        self.hits = SearchHits(self.index, expose_columns) if self.index is not None else None
        if expose_columns and self.index is None:
            raise ConfigError("--expose-columns names index columns: give --index too")
        self.batcher = MicroBatcher(
            self._run_images, enabled=lim.batching, max_batch_size=lim.max_batch_size, max_wait_ms=lim.max_wait_ms,
            max_pending=lim.max_pending_images, max_pending_texts=lim.max_pending_texts, text_share=lim.text_share_pct / 100,
            text_nice=TEXT_NICE,
        )
        self.batcher.start()
        self.decodes = DecodeGate(lim.max_decoding_bytes, lim.decode_threads, small_bytes=lim.max_decoded_bytes // 8)
        log.info(
            "serving run %s: %d labels%s; batching %s; ready in %.1f s", self.run_name, len(self.bank.run_names),
            f", index of {self.index.count} images" if self.index else "",
            f"on (max {lim.max_batch_size}, wait {lim.max_wait_ms:g} ms)" if lim.batching else "off", time.perf_counter() - t0,
        )

    def close(self) -> None:
        self.batcher.stop()
        self.decodes.close()

    # ------------------------------------------------------------------ the model and text threads
    def _run_images(self, px: Any) -> Any:
        with torch.inference_mode():
            return self.model.image_embeddings(px).float().cpu()

    def _text_embeddings(self, texts: list[str]) -> Any:
        try:
            return self.model.embed_texts(texts)
        finally:
            self.model.clear_text_cache()

    async def embed_pixels(self, px: Any, watch: ClientWatch) -> Any:
        """Unnormalised image embeddings [n, D] of uint8 pixels [n, 3, S, S], batched with other requests'."""
        watch.check()
        return await watch.result(self.batcher.submit(px))

    def text_cost(self, texts: list[str]) -> int:
        """Image-equivalents of embedding `texts`: 1 per started text_chars_per_image characters
        of them all (short prompts are much cheaper than an image; a text tower pads to the longest)."""
        return max(1, math.ceil(sum(len(t) for t in texts) / self.limits.text_chars_per_image))

    def texts_busy(self) -> str | None:
        """Why no text work can be admitted now (the text budget is full), or None: an
        /embed/text request is refused from its headers, before its body is parsed."""
        if not self.batcher.texts_full():
            return None
        return (f"the service is busy (its text work budgets of {self.batcher.max_pending_texts} image-equivalents are full); "
                "retry shortly")

    def _text_chunks(self, chars: list[int]) -> list[slice]:
        """Consecutive slices of the items (of `chars` characters each) of about
        text_job_images image-equivalents each (an item longer than that alone): text work
        runs as several small jobs, and image batches run between them."""
        per_job = self.limits.text_job_images * self.limits.text_chars_per_image
        out, start, acc = [], 0, 0
        for i, c in enumerate(chars):
            if i > start and acc + c > per_job:
                out.append(slice(start, i))
                start, acc = i, 0
            acc += c
        if start < len(chars):
            out.append(slice(start, len(chars)))
        return out

    def is_bulk(self, cost: int) -> bool:
        """Whether text work of `cost` image-equivalents is a large request's, run on the
        batcher's bulk thread and budget: more than one job's worth."""
        return cost > self.limits.text_job_images

    async def embed_text_list(self, texts: list[str], watch: ClientWatch) -> Any:
        """[n, D] normalised text embeddings, admitted by their cost and computed in batch-sized jobs."""
        parts = []
        cost = self.text_cost(texts)
        bulk = self.is_bulk(cost)
        with self.batcher.reserved(cost, bulk):  # 503 here when the queue is full
            for part in self._text_chunks([len(t) for t in texts]):
                watch.check()
                job = functools.partial(self._text_embeddings, texts[part])
                parts.append(np.asarray(await watch.result(self.batcher.call(job, bulk=bulk))))
        return np.concatenate(parts)

    @contextlib.asynccontextmanager
    async def watching(self, receive: Callable[[], Any] | None) -> AsyncIterator[ClientWatch]:
        watch = ClientWatch(receive)
        watch.start()
        try:
            yield watch
        finally:
            await watch.stop()

    # ------------------------------------------------------------------ request parts
    async def read_images(self, images: list[UploadFile], watch: ClientWatch | None = None) -> tuple[Any, list[str | None]]:
        """Uploads -> uint8 pixels [n, 3, S, S] and the file names, within the limits."""
        lim = self.limits
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
            cost = decode_cost(data, self.size, max_pixels=lim.max_pixels, max_decoded_bytes=lim.max_decoded_bytes)
            if cost <= INLINE_DECODE_BYTES:  # a thumbnail, or refused from its header: decoding costs less than a thread hop
                arrays.append(self._decode(data, label))
                continue
            async with self.decodes.slot(cost):  # by bytes and threads; small images never wait behind large ones
                if watch is not None:
                    watch.check()
                if self.decodes.kind(cost) == "large":  # in a worker process: off this process's GIL
                    arrays.append(await self.decodes.run_large(
                        decode_pixels, data, label, self.size, lim.max_pixels, lim.max_decoded_bytes))
                else:
                    arrays.append(await run_in_threadpool(self._decode, data, label))
        return torch.from_numpy(np.stack(arrays)), names

    def _decode(self, data: bytes, label: str) -> Any:
        lim = self.limits
        return image_pixels(data, self.size, max_pixels=lim.max_pixels, name=label, max_decoded_bytes=lim.max_decoded_bytes)

    def clean_labels(self, labels: list[str] | None, extra_labels: list[str] | None) -> list[str]:
        """The label names a request scores: `labels` (by default the run's), then
        `extra_labels`; normalised as everywhere (normalize_label: NFC, whitespace, no
        zero-width characters), empty entries dropped, each name once, within the limits."""
        lim = self.limits
        asked: dict[str, None] = {}
        given = [normalize_label(raw) for raw in labels or []]
        for name in [*given, *(normalize_label(raw) for raw in extra_labels or [])]:
            if not name:
                continue  # empty form entries are ignored
            if len(name) > lim.max_label_chars:
                raise ServiceError(422, f"label '{name[:40]}...' has {len(name)} characters; the limit is {lim.max_label_chars}")
            asked[name] = None
        if len(asked) > lim.max_labels:
            raise ServiceError(422, f"{len(asked)} labels asked for in labels and extra_labels; the limit is {lim.max_labels}")
        if not any(given):  # no labels: the run's, then the extra ones
            run = self.bank.run_names
            known = set(run)
            return run + [n for n in asked if n not in known]
        return list(asked)

    async def label_params(self, specs: list[Any], watch: ClientWatch) -> tuple[list[Any], Any, Any]:
        """Specs, [C, D] class embeddings and [C] biases of `specs` (from LabelBank.requested):
        zero-shot ones are embedded on the text thread the first time they are asked for,
        admitted by the cost of their prompts and computed in batch-sized jobs (many of
        them on the bulk thread, see is_bulk)."""
        bank = self.bank
        rows = bank.known_rows(specs)
        todo = [s for s in specs if s.name not in rows]
        if todo:
            prompts = [s.texts(self.model.templates) for s in todo]
            cost = self.text_cost([t for p in prompts for t in p])
            bulk = self.is_bulk(cost)
            with self.batcher.reserved(cost, bulk):  # 503 here when the queue is full
                for part in self._text_chunks([sum(map(len, p)) for p in prompts]):
                    watch.check()
                    chunk = todo[part]
                    tv, tb = await watch.result(self.batcher.call(functools.partial(bank.compute, chunk), bulk=bulk))
                    bank.put(chunk, tv, tb)
                    rows.update({s.name: (tv[i], tb[i]) for i, s in enumerate(chunk)})
        return bank.params(specs, rows)

    # ------------------------------------------------------------------ requests
    async def predict(self, images: list[UploadFile], labels: list[str] | None, extra_labels: list[str] | None,
                      top_k: int | None, apply_thresholds: bool, return_embedding: bool,
                      receive: Callable[[], Any] | None = None) -> dict[str, Any]:
        # cheap checks first, then the images are decoded; only then is any label embedded
        asked = self.bank.requested(self.clean_labels(labels, extra_labels))
        reason = self.texts_busy() if self.bank.missing(asked) else None
        if reason is not None:  # its new labels could not be admitted: refused before its images are decoded
            raise ServiceError(503, reason, {"Retry-After": "1"})
        async with self.watching(receive) as watch:
            px, filenames = await self.read_images(images, watch)
            specs, v, b = await self.label_params(asked, watch)
            u_raw = await self.embed_pixels(px, watch)
        probs = self.bank.probabilities(u_raw, specs, v, b)
        decided = self.bank.decide(probs, specs, apply_thresholds)
        u = F.normalize(u_raw, dim=-1).numpy() if return_embedding else None
        label_names = [s.name for s in specs]
        results = []
        for r in range(len(probs)):
            order = np.argsort(-probs[r], kind="stable")
            kept = order[:top_k] if top_k else order  # top_k trims the scores and the decisions alike
            results.append({
                "index": r,
                "filename": filenames[r],
                "scores": {label_names[j]: round(float(probs[r, j]), 6) for j in kept},
                "predicted": [label_names[j] for j in kept if decided[r, j]],
                "embedding": u[r].tolist() if u is not None else None,
            })
        return {"labels": label_names, "thresholds": "calibrated" if apply_thresholds else "fixed-0.5", "results": results}

    async def embed_images(self, images: list[UploadFile], receive: Callable[[], Any] | None = None) -> dict[str, Any]:
        async with self.watching(receive) as watch:
            px, filenames = await self.read_images(images, watch)
            u = F.normalize(await self.embed_pixels(px, watch), dim=-1)
        return {"dim": self.dim, "embeddings": u.numpy().tolist(), "filenames": filenames}

    async def embed_texts(self, texts: list[str], receive: Callable[[], Any] | None = None) -> dict[str, Any]:
        async with self.watching(receive) as watch:
            emb = await self.embed_text_list(list(texts), watch)
        return {"dim": self.dim, "embeddings": emb.tolist(), "filenames": None}

    def check_index(self) -> None:
        if self.index is None:
            raise ServiceError(409, "this service has no index: start it with `mumic serve RUN --index INDEX` "
                                    "(build one with `mumic index`)")

    async def search(self, text: str | None, image: UploadFile | None, k: int, exact: bool,
                     receive: Callable[[], Any] | None = None) -> dict[str, Any]:
        self.check_index()
        has_text = text is not None and text.strip() != ""
        if has_text == (image is not None):
            raise ServiceError(422, "give exactly one query: a non-empty 'text' or one 'image'")
        async with self.watching(receive) as watch:
            if has_text:
                assert text is not None
                q = np.asarray(await self.embed_text_list([text], watch), dtype=np.float32)
            else:
                assert image is not None
                px, _ = await self.read_images([image], watch)
                q = F.normalize(await self.embed_pixels(px, watch), dim=-1).numpy()
            watch.check()
        scores, ids = await run_in_threadpool(self.index.search, q, k, exact=exact)
        return {"query": "text" if has_text else "image", "exact": bool(exact or self.index.ann is None),
                "results": self.hits.records(scores[0], ids[0]) if self.hits else []}

    def labels_info(self) -> dict[str, Any]:
        from mumic.export import public_spec

        model = self.model
        th = getattr(model, "thresholds", None) or {"per_label": {}, "default": 0.5}
        scored = set(self.bank.run_names)
        return {
            "labels": [
                {"name": l.name, "seen": l.seen, "scored": l.name in scored,
                 "threshold": float(th["per_label"].get(l.name, th["default"])), "prompts": l.texts(model.templates)}
                for l in model.labels
            ],
            "default_threshold": float(th["default"]),
            "tau": model.tau,
            "embed_dim": self.dim,
            "backbone": public_spec(model.backbone.spec),
            "zero_shot": not self.bank.linear,
        }

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok", "version": mumic.__version__, "run": self.run_name, "labels": len(self.bank.run_names),
            "image_size": self.size, "embed_dim": self.dim, "index_items": self.index.count if self.index else None,
            "label_cache": len(self.bank), "batching": self.batcher.stats(), "decoding": self.decodes.stats(),
        }
