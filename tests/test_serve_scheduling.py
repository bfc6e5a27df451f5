"""The service's scheduling of model work and of decodes, without a model or a server:
image batches running while text jobs run on their own thread, the separate budgets of
images and text work, the size of text jobs, the decode gate (small images never wait
behind large ones; too many large ones waiting get 503), and the small pieces around
them (label normalisation, finite limits, freed memory given back). No timing: every
check is on an order, a count or a status."""

from __future__ import annotations

import asyncio
import io
import threading
import types

import numpy as np
import pytest
import torch
from PIL import Image

from mumic.errors import ConfigError, ServiceError
from mumic.serve import Limits, MicroBatcher
from mumic.serve.decoding import DecodeGate, decode_cost
from mumic.serve.service import Service
from serving import traced_peak


def _recording_batcher(**kw):
    """A batcher whose model records what it runs; text jobs record themselves."""
    order: list[str] = []
    b = MicroBatcher(lambda px: order.append(f"I{int(px[0, 0, 0, 0])}") or px[:, :1, 0, 0].float(), **kw)
    b.start()
    return b, order


def _block(b):
    gate = threading.Event()
    started = threading.Event()
    job = b.call(lambda: started.set() or gate.wait(10))
    assert started.wait(10)  # the model thread is inside the blocking job: everything below queues
    return gate, job


def test_image_batches_run_while_a_text_job_runs():
    """Text work has a thread of its own: images submitted while a long text job runs
    (and with more text queued behind it) are answered before that job ends."""
    b, order = _recording_batcher(enabled=False)
    try:
        gate, blocker = _block(b)  # the text thread is inside a job that waits for the gate
        texts = [b.call(lambda i=i: order.append(f"T{i}")) for i in (1, 2)]
        images = [b.submit(torch.full((1, 3, 2, 2), i, dtype=torch.uint8)) for i in (1, 2, 3)]
        for f in images:
            f.result(10)
        assert order == ["I1", "I2", "I3"] and not blocker.done() and not any(t.done() for t in texts)
        gate.set()
        for f in [blocker, *texts]:
            f.result(10)
        assert order == ["I1", "I2", "I3", "T1", "T2"]
        assert b.stats()["text_jobs"] == 3 and b.stats()["batches"] == 3
    finally:
        b.stop()


def test_the_text_thread_runs_at_a_lower_cpu_priority():
    import os

    def priority():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    b = MicroBatcher(lambda px: px[:, :1, 0, 0].float(), text_nice=10)
    b.start()
    try:
        text = b.call(priority).result(10)
        image = b.submit(torch.zeros((1, 3, 2, 2), dtype=torch.uint8)).result(10)
    finally:
        b.stop()
    assert text == min(19, priority() + 10) and image.shape == (1, 1)  # the model thread and this one keep theirs


def test_text_work_takes_at_most_its_share_of_the_text_thread():
    """With text_share 0.5, a text job that took 10 s (on the batcher's clock) is followed
    by 10 s without text, while images run."""
    now = [0.0]
    order: list[str] = []
    b = MicroBatcher(lambda px: order.append(f"I{int(px[0, 0, 0, 0])}") or px[:, :1, 0, 0].float(),
                     enabled=False, text_share=0.5, clock=lambda: now[0])
    b.start()
    try:
        gate, started = threading.Event(), threading.Event()

        def ten_seconds():
            started.set()
            gate.wait(10)
            now[0] += 10.0  # this job took 10 s: text may run again from 20 s on

        blocker = b.call(ten_seconds)
        assert started.wait(10)
        text = b.call(lambda: order.append("T1"))
        gate.set()
        blocker.result(10)
        images = [b.submit(torch.full((1, 3, 2, 2), i, dtype=torch.uint8)) for i in (1, 2)]
        for f in images:
            f.result(10)
        assert order == ["I1", "I2"] and not text.done()  # its share keeps it waiting
        now[0] = 20.0
        text.result(10)  # the text thread looks at the clock again within a second
        assert order == ["I1", "I2", "T1"]
    finally:
        b.stop()
    with pytest.raises(ConfigError, match="text_share_pct"):
        Limits(text_share_pct=101)


def test_a_batch_waits_for_more_jobs_only_until_its_first_has_waited_max_wait():
    """max_wait_ms counts from when the first job of a batch was queued: a job that waited
    behind a running batch that long goes as soon as the model thread is free, instead
    of waiting max_wait_ms more (here a minute on the batcher's clock, which stands still)."""
    now = [0.0]
    gate, started, sizes = threading.Event(), threading.Event(), []

    def run(px):
        sizes.append(len(px))
        if len(sizes) == 1:
            started.set()
            gate.wait(10)
        return px[:, :1, 0, 0].float()

    b = MicroBatcher(run, max_batch_size=8, max_wait_ms=60_000, clock=lambda: now[0])
    b.start()
    try:
        first = b.submit(torch.zeros((1, 3, 2, 2), dtype=torch.uint8))
        now[0] = 60.0  # its minute is up: it runs alone (and holds the model thread)
        assert started.wait(10)
        second = b.submit(torch.ones((1, 3, 2, 2), dtype=torch.uint8))
        now[0] = 120.0  # the second job has now waited a minute in the queue
        gate.set()
        assert first.result(10).shape == (1, 1)
        assert second.result(10).shape == (1, 1)  # no further minute of waiting for company
        assert sizes == [1, 1]
        third = b.submit(torch.ones((2, 3, 2, 2), dtype=torch.uint8))
        fourth = b.submit(torch.ones((3, 3, 2, 2), dtype=torch.uint8))
        now[0] = 180.0
        assert [f.result(10).shape for f in (third, fourth)] == [(2, 1), (3, 1)]
        assert sizes == [1, 1, 5]  # jobs queued within the first one's minute share its batch
    finally:
        b.stop()


def test_bulk_text_jobs_run_apart_at_the_lowest_priority():
    """A large request's text jobs (bulk=True) run on a thread of their own at nice 19
    and on a budget of their own: a small text job queued behind them runs first, and is
    admitted while bulk work fills its budget."""
    import os

    def priority():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    b, order = _recording_batcher(max_pending_texts=4, text_nice=10)
    try:
        gate, started = threading.Event(), threading.Event()
        bulk = b.call(lambda: (started.set(), gate.wait(10), priority())[-1], cost=3, bulk=True)
        assert started.wait(10)
        small = b.call(lambda: order.append("T1") or priority(), cost=1)
        assert small.result(10) == min(19, priority() + 10) and order == ["T1"] and not bulk.done()
        with pytest.raises(ServiceError) as e:  # the bulk budget (3 + 2 of 4) is full ...
            b.call(lambda: None, cost=2, bulk=True)
        assert e.value.status == 503 and "bulk text" in str(e.value)
        with b.reserved(4):  # ... while the small one takes all of its own
            assert not b.texts_full()
            with pytest.raises(ServiceError):
                b.call(lambda: None, cost=1)
            with b.reserved(1, bulk=True):
                assert b.texts_full()
        gate.set()
        assert bulk.result(10) == 19
        stats = b.stats()
        assert (stats["bulk_jobs"], stats["text_jobs"], stats["pending_texts"], stats["pending_bulk_texts"]) == (1, 1, 0, 0)
    finally:
        b.stop()
    assert priority() < 10  # the caller keeps its own priority


def test_images_and_text_work_have_separate_budgets():
    b, _ = _recording_batcher(max_pending=4, max_pending_texts=3)
    try:
        gate, blocker = _block(b)
        with b.reserved(3):  # the text budget is full ...
            with pytest.raises(ServiceError) as e:
                b.call(lambda: None, cost=1)
            assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"} and "text work" in str(e.value)
            images = b.submit(torch.zeros((4, 3, 2, 2), dtype=torch.uint8))  # ... and images are still admitted
            with pytest.raises(ServiceError) as e:
                b.submit(torch.zeros((1, 3, 2, 2), dtype=torch.uint8))
            assert e.value.status == 503 and "images" in str(e.value)
            assert b.stats()["pending_images"] == 4 and b.stats()["pending_texts"] == 3
        gate.set()
        blocker.result(10)
        images.result(10)
        assert b.call(lambda: 7, cost=100).result(10) == 7  # alone in its queue, a large job is admitted
        assert b.stats()["pending_images"] == 0 and b.stats()["pending_texts"] == 0
    finally:
        b.stop()


def test_text_work_runs_in_small_jobs():
    svc = types.SimpleNamespace(limits=Limits(text_chars_per_image=100, text_job_images=1, max_batch_size=32))
    chunks = Service._text_chunks(svc, [60, 30, 60, 250, 10, 10])
    assert chunks == [slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 6)]  # at most 100 characters, or one long text alone
    svc.limits = Limits(text_chars_per_image=100, text_job_images=3)
    assert Service._text_chunks(svc, [60, 30, 60, 250, 10, 10]) == [slice(0, 3), slice(3, 6)]


def test_large_text_requests_run_on_the_bulk_thread():
    """/embed/text (and new labels) of more than one job's worth run as bulk jobs; one
    query's worth stays on the text thread."""
    calls = []
    batcher = MicroBatcher(lambda px: px)
    batcher.start()
    real_call = batcher.call
    svc = types.SimpleNamespace(limits=Limits(text_chars_per_image=10, text_job_images=2), batcher=batcher,
                                _text_embeddings=lambda texts: np.zeros((len(texts), 3)))
    svc.text_cost, svc._text_chunks = types.MethodType(Service.text_cost, svc), types.MethodType(Service._text_chunks, svc)
    svc.is_bulk = types.MethodType(Service.is_bulk, svc)
    batcher.call = lambda fn, cost=0, bulk=False: calls.append(bulk) or real_call(fn, cost, bulk)
    watch = types.SimpleNamespace(check=lambda: None, result=lambda f: asyncio.wrap_future(f))
    try:
        small = asyncio.run(Service.embed_text_list(svc, ["a query"], watch))  # 1 image-equivalent
        large = asyncio.run(Service.embed_text_list(svc, ["x" * 15] * 4, watch))  # 6, in jobs of 20 characters
    finally:
        batcher.stop()
    assert small.shape == (1, 3) and large.shape == (4, 3)
    assert calls == [False, True, True, True, True] and batcher.stats()["bulk_jobs"] == 4


def test_text_is_costed_as_measured_against_images():
    """By default 32 characters of text count as one image (what a CPU text tower costs),
    so the text budget holds about two thousand characters and a job about 256."""
    svc = types.SimpleNamespace(limits=Limits())
    assert Service.text_cost(svc, ["x" * 256]) == 8 and Service.text_cost(svc, ["x" * 33]) == 2
    assert Service.text_cost(svc, ["ab"]) == 1  # any text costs at least one
    # 64 new labels of two 40-character prompts: 160 image-equivalents, over the whole text
    # budget, so such a request runs only alone (and is refused while other text work waits)
    assert Service.text_cost(svc, ["y" * 40] * 128) == 160 > Limits().max_pending_texts == 64
    assert Service._text_chunks(svc, [100, 100, 100, 100]) == [slice(0, 2), slice(2, 4)]  # jobs of at most 256 characters


def test_the_lite_text_tower_runs_on_text_threads(monkeypatch, tmp_path):
    """The service's text_threads reach the onnxruntime session of the `lite` text tower."""
    from mumic.backbones import lite

    made = {}

    class Session:
        def __init__(self, *args, **kw):
            made.update(kw)

        def __call__(self, texts):
            return torch.zeros(len(texts), lite.TEXT_FEATURE_DIM)

    monkeypatch.setattr(lite, "OnnxMiniLM", Session)
    monkeypatch.setattr(lite, "minilm_dir", lambda: str(tmp_path))
    backbone = types.SimpleNamespace(text_tower_mode="frozen", device=torch.device("cpu"), _onnx_text=None,
                                     _check_texts=lambda texts: texts)
    assert lite.LiteBackbone.use_onnx_text(backbone, True, tmp_path, threads=1)
    assert lite.LiteBackbone.text_features(backbone, ["a dog"]).shape == (1, lite.TEXT_FEATURE_DIM)
    assert made["threads"] == 1 and made["cache_dir"] == tmp_path

def _png(w, h, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def test_decode_cost_is_read_from_the_header():
    limits = {"max_pixels": 10**7, "max_decoded_bytes": 10**6}
    assert decode_cost(_png(64, 48), 32, **limits) == 64 * 48 * 4
    assert decode_cost(_png(64, 48, "L"), 32, **limits) == 64 * 48
    buf = io.BytesIO()
    Image.new("F", (100, 50)).save(buf, "TIFF")
    assert decode_cost(buf.getvalue(), 32, **limits) == 100 * 50 * 4
    buf = io.BytesIO()
    Image.new("RGB", (800, 800)).save(buf, "JPEG")
    assert decode_cost(buf.getvalue(), 100, **limits) == 100 * 100 * 4  # decoded at 1/8 scale (draft)
    assert decode_cost(b"not an image", 32, **limits) == 0  # the decoder says why, at once
    assert decode_cost(_png(1000, 1000), 32, **limits) == 0  # over max_decoded_bytes: refused from the header


def test_small_decodes_do_not_wait_behind_large_ones():
    async def go():
        gate = DecodeGate(budget=800, threads=2, small_bytes=100)
        order, release = [], asyncio.Event()

        async def decode(name, cost):
            async with gate.slot(cost):
                order.append(name)
                await release.wait()

        tasks = [asyncio.ensure_future(decode("large1", 500))]
        await asyncio.sleep(0)
        tasks.append(asyncio.ensure_future(decode("large2", 500)))  # waits: one thread for large decodes
        await asyncio.sleep(0)
        tasks += [asyncio.ensure_future(decode(f"small{i}", 10)) for i in (1, 2)]
        for _ in range(5):
            await asyncio.sleep(0)
        admitted = list(order)
        stats = gate.stats()
        release.set()
        await asyncio.gather(*tasks)
        return admitted, stats, order, gate.stats()

    admitted, stats, order, after = asyncio.run(go())
    # a semaphore of two threads would have run large1 and large2 and kept the small ones waiting
    assert admitted == ["large1", "small1", "small2"] and stats["waiting"] == {"small": 0, "large": 1}
    assert order[-1] == "large2" and after["running"] == {"small": 0, "large": 0} and after["bytes"] == {"small": 0, "large": 0}


def test_too_many_large_decodes_waiting_get_503():
    async def go():
        gate = DecodeGate(budget=800, threads=2, small_bytes=100, queue_factor={"large": 2})
        release = asyncio.Event()

        async def decode(cost):
            async with gate.slot(cost):
                await release.wait()

        tasks = [asyncio.ensure_future(decode(500)) for _ in range(3)]  # one runs, two wait (2 x 1 large thread)
        for _ in range(3):
            await asyncio.sleep(0)
        with pytest.raises(ServiceError) as e:
            async with gate.slot(500):
                pass
        release.set()
        await asyncio.gather(*tasks)
        return e.value, gate.stats()

    err, stats = asyncio.run(go())
    assert err.status == 503 and err.headers == {"Retry-After": "1"} and "busy decoding" in str(err)
    assert stats["refused"] == 1 and stats["large"] == 3 and stats["running"]["large"] == 0


def test_a_cancelled_waiter_gives_its_turn_on():
    async def go():
        gate = DecodeGate(budget=800, threads=2, small_bytes=100)
        release = asyncio.Event()
        got = []

        async def decode(name):
            async with gate.slot(500):
                got.append(name)
                await release.wait()

        first = asyncio.ensure_future(decode("first"))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(decode("gone"))
        third = asyncio.ensure_future(decode("third"))
        await asyncio.sleep(0)
        gone.cancel()  # its client left while it waited
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, third)
        return got, gate.stats()

    got, stats = asyncio.run(go())
    assert got == ["first", "third"] and stats["running"]["large"] == 0 and stats["waiting"]["large"] == 0


def test_large_decodes_give_their_memory_back(monkeypatch):
    import mumic.serve.decoding as decoding

    trims = []
    monkeypatch.setattr(decoding, "trim_memory", lambda: trims.append(1))
    px = decoding.decode_pixels(_png(40, 30), "image 0", 16, 10**8, 10**8)  # what a decode worker process runs
    assert px.shape == (3, 16, 16) and px.dtype == np.uint8 and trims == [1]
    refused = decoding.decode_pixels(b"junk", "image 1", 16, 10**8, 10**8)
    assert refused.status == 422 and "image 1: not an image" in refused.message and trims == [1, 1]


def test_serve_tunes_malloc_before_the_model_loads(monkeypatch):
    import mumic.serve
    import mumic.serve.decoding as decoding
    from mumic.cli import main

    calls = []
    monkeypatch.setattr(decoding, "tune_malloc", lambda: calls.append("malloc") or True)

    def create_app(*a, **kw):
        calls.append("app")
        raise ConfigError("stop here")

    monkeypatch.setattr(mumic.serve, "create_app", create_app, raising=False)
    assert main(["serve", "no-such-run"]) == 2
    assert calls == ["malloc", "app"]
    assert decoding.tune_malloc is not None and decoding.MMAP_THRESHOLD == 1 << 20


# ----------------------------------------------------------------------------- small fixes


def test_request_labels_are_normalised_as_everywhere():
    svc = types.SimpleNamespace(limits=Limits(max_labels=3), bank=types.SimpleNamespace(run_names=["dog", "cat"]))
    asked = Service.clean_labels(svc, ["caf\u00e9", "cafe\u0301", "cat\u200b", "cat", "black  cat", " black cat "], None)
    assert asked == ["caf\u00e9", "cat", "black cat"]  # NFC / NFD, a zero-width space, doubled spaces: one label each
    # no labels: the run's, then the extra ones (normalised, not repeated)
    assert Service.clean_labels(svc, ["\u200b", " "], ["dog", "bird\u200b", "bird"]) == ["dog", "cat", "bird"]
    with pytest.raises(ServiceError) as e:
        Service.clean_labels(svc, None, ["a", "b", "c", "d", "a"])
    assert e.value.status == 422 and str(e.value) == "4 labels asked for in labels and extra_labels; the limit is 3"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, True])
def test_every_float_limit_is_finite(value):
    with pytest.raises(ConfigError, match="max_wait_ms"):
        Limits(max_wait_ms=value)
    with pytest.raises(ConfigError, match="body_timeout_s"):
        Limits(body_timeout_s=value)


def test_cli_refuses_a_nan_wait(capsys, monkeypatch):
    import mumic.serve.decoding as decoding
    from mumic.cli import main

    monkeypatch.setattr(decoding, "tune_malloc", lambda: True)  # leave this process's allocator alone

    assert main(["serve", "no-such-run", "--max-wait-ms", "nan"]) == 2
    assert "max_wait_ms must be a finite number >= 0, got nan" in capsys.readouterr().err


def test_thumbnails_decode_inline_and_larger_images_through_the_gate(monkeypatch):
    import mumic.serve.service as service_mod

    hops = []

    async def threadpool(fn, *args):
        hops.append(args[1])
        return fn(*args)

    monkeypatch.setattr(service_mod, "run_in_threadpool", threadpool)

    class Upload:
        def __init__(self, data, filename):
            self.data, self.filename = data, filename

        async def read(self, n):
            return self.data[:n]

    lim = Limits(max_decoded_bytes=16_000_000)  # small decodes: at most 2,000,000 bytes
    svc = types.SimpleNamespace(limits=lim, size=16, decodes=DecodeGate(lim.max_decoding_bytes, 2, lim.max_decoded_bytes // 8))
    svc._decode = lambda data, label: Service._decode(svc, data, label)
    large = []

    async def run_large(fn, *args):
        large.append(args[1])
        return fn(*args)

    svc.decodes.run_large = run_large
    ups = [Upload(_png(64, 64), "thumb.png"), Upload(_png(300, 200), "photo.png"), Upload(_png(1000, 800), "big.png")]
    px, names = asyncio.run(Service.read_images(svc, ups))
    assert px.shape == (3, 3, 16, 16) and names == ["thumb.png", "photo.png", "big.png"]
    assert hops == ["image 1 (photo.png)"]  # 64 x 64 x 4 bytes decode on the event loop; 300 x 200 x 4 in a thread
    assert large == ["image 2 (big.png)"]  # 1000 x 800 x 4 bytes: over an eighth of the limit, in a decode process


def test_large_decodes_run_in_a_worker_process_as_background_work():
    """Off the service's GIL, under SCHED_IDLE (and at nice +10); the pixels are
    image_pixels' own, and an upload the decoder refuses comes back as the same
    UploadError (status and message)."""
    import os

    from mumic.data.images import image_pixels
    from mumic.errors import UploadError
    from mumic.serve.decoding import decode_pixels

    gate = DecodeGate(100, 2, 10)
    png = _png(300, 200)

    async def go():
        pid = await gate.run_large(os.getpid)
        nice = await gate.run_large(os.getpriority, os.PRIO_PROCESS, 0)
        policy = await gate.run_large(os.sched_getscheduler, 0)
        px = await gate.run_large(decode_pixels, png, "image 0 (big.png)", 16, 10**8, 10**8)
        with pytest.raises(UploadError) as refused:
            await gate.run_large(decode_pixels, b"not an image", "image 1 (x.png)", 16, 10**8, 10**8)
        return pid, nice, policy, px, refused.value

    try:
        pid, nice, policy, px, refused = asyncio.run(go())
    finally:
        gate.close()
    assert pid != os.getpid()
    assert nice == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)  # this process keeps its own priority
    assert policy == os.SCHED_IDLE and os.sched_getscheduler(0) == os.SCHED_OTHER
    np.testing.assert_array_equal(px, image_pixels(png, 16, max_pixels=10**8, name="x", max_decoded_bytes=10**8))
    with pytest.raises(UploadError) as inline:
        image_pixels(b"not an image", 16, max_pixels=10**8, name="image 1 (x.png)", max_decoded_bytes=10**8)
    assert (refused.status, str(refused)) == (inline.value.status, str(inline.value)) == (422, str(inline.value))


def test_a_decode_worker_that_dies_fails_its_request_with_503_and_is_replaced():
    """A decoder that crashes the process (here: the worker exits) answers 503 for that
    upload; the service lives on, and the next large decode gets a new worker."""
    import os

    gate = DecodeGate(100, 2, 10)

    async def go():
        first = await gate.run_large(os.getpid)
        with pytest.raises(ServiceError) as e:
            await gate.run_large(os._exit, 3)
        return first, e.value, await gate.run_large(os.getpid)

    try:
        first, err, second = asyncio.run(go())
    finally:
        gate.close()
    assert err.status == 503 and err.headers == {"Retry-After": "1"} and "decoder stopped" in str(err)
    assert second not in (first, os.getpid())


def test_onnxruntime_sessions_do_not_spin_when_idle(monkeypatch, tmp_path):
    """An idle spinning thread pool takes a core from the event loop: the served towers' sessions turn it off."""
    import onnxruntime as ort

    from mumic.backbones import onnx as onnx_mod

    seen = {}
    monkeypatch.setattr(ort, "InferenceSession", lambda path, sess_options, providers: seen.setdefault("opts", sess_options))
    onnx_mod._session(tmp_path / "tower.onnx", 2)
    opts = seen["opts"]
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 2


def test_decoding_copies_an_unturned_image_only_to_detach_it(monkeypatch):
    """No EXIF turn, no transposed copy: a grey image is converted straight from the
    decoded one; a turned one is still turned as exif_transpose turns it."""
    from PIL import ImageOps

    from mumic.data.preprocess import decode_rgb

    grey = np.arange(12 * 8, dtype=np.uint8).reshape(8, 12)
    buf = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buf, "PNG")
    copies = []
    real_copy = Image.Image.copy
    monkeypatch.setattr(Image.Image, "copy", lambda self: copies.append(self.mode) or real_copy(self))
    out = decode_rgb(Image.open(io.BytesIO(buf.getvalue())))
    assert copies == [] and out.mode == "RGB" and np.array_equal(np.asarray(out)[..., 1], grey)
    monkeypatch.undo()

    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees
    buf = io.BytesIO()
    Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB").save(buf, "PNG", exif=exif)
    turned = decode_rgb(Image.open(io.BytesIO(buf.getvalue())))
    ref = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue())))
    assert turned.size == (8, 12) and np.array_equal(np.asarray(turned), np.asarray(ref))


@pytest.mark.parametrize("mode", ["F", "I;16"])
def test_high_bit_depth_arithmetic_works_in_place_on_one_copy(monkeypatch, mode):
    """With the whole image as one chunk, its conversion holds one widened copy (float64
    or int32) and the uint8 result: not a new array per step (astype, nan_to_num, clip, round)."""
    from mumic.data import preprocess

    rng = np.random.default_rng(0)
    n = 500 * 500
    arr = rng.random((500, 500), dtype=np.float32) if mode == "F" else rng.integers(0, 65535, (500, 500), dtype=np.uint16)
    img = Image.fromarray(arr, mode="F") if mode == "F" else Image.fromarray(arr)
    monkeypatch.setattr(preprocess, "_CHUNK_PIXELS", n)
    out, peak = traced_peak(preprocess.to_rgb, img)
    ref = np.round(arr.astype(np.float64) * 255) if mode == "F" else np.round(arr / 257)
    assert np.array_equal(np.asarray(out)[..., 0], ref.astype(np.uint8))
    # the source chunk, one float64 (8 n) or int32 (4 n) copy, numpy's masks, the result;
    # a new array per step traced 29 n (float) and 19 n (16-bit)
    limit = 22 * n if mode == "F" else 12 * n
    assert peak < limit, f"{peak:,} bytes traced for {n:,} pixels"
