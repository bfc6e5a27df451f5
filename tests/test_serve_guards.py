"""The service against costly and unwanted requests, in process: decode amplification
(decoded bytes bounded before decoding, high-bit-depth images converted without a
widened copy), text and label work admitted by cost and dropped when its client leaves,
labels embedded only after the images decode; and exposure: allowed Host names, the
bearer token, CORS and cross-site POSTs, the columns /search shows."""

import argparse
import asyncio
import concurrent.futures
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mumic.data.manifest import read_manifest
from mumic.errors import ConfigError, UploadError
from serving import assert_error, png_bytes, traced_peak


@pytest.fixture(scope="module")
def shapes(page_shapes):
    return page_shapes


@pytest.fixture(scope="module")
def run(page_run):  # conftest's tiny run, shared with the page's tests
    return page_run


@pytest.fixture(scope="module")
def index(page_index):
    return page_index


@pytest.fixture(scope="module")
def image(shapes):
    return Path(read_manifest(shapes / "manifest.csv").images[0]).read_bytes()


def client(run, index=None, exposure=None, **limits):
    from mumic.serve import create_app

    return TestClient(create_app(run, index, device="cpu", exposure=exposure, **limits), base_url="http://localhost")


def float_tiff(width, height):
    return png_bytes(Image.fromarray(np.random.default_rng(0).random((height, width), dtype=np.float32), mode="F"), "TIFF")


def test_serving_keeps_what_loading_made_out_of_the_collector(run):
    """A full garbage collection of the loaded service (torch, the model, the web stack)
    stalls the event loop for 100+ ms: serving freezes those objects, and thaws them at shutdown."""
    import gc

    assert gc.get_freeze_count() == 0
    with client(run) as c:
        assert c.get("/health").status_code == 200
        assert gc.get_freeze_count() > 10_000  # the modules, the model and the app
    assert gc.get_freeze_count() == 0


# ----------------------------------------------------------------------------- decode amplification


def test_decoded_bytes_are_bounded_before_decoding(monkeypatch):
    from mumic.data import images

    tiff = float_tiff(200, 100)  # 20,000 pixels, 4 bytes each
    grey = png_bytes(Image.new("L", (200, 100), 7))  # the same pixels, 1 byte each
    calls = []
    real = images.decode_rgb
    monkeypatch.setattr(images, "decode_rgb", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(UploadError) as e:
        images.decode_image(tiff, max_pixels=1_000_000, max_decoded_bytes=50_000, name="f.tif")
    assert e.value.status == 413 and "a 200x100 F image decodes to 80,000 bytes, over the limit of 50,000" in str(e.value)
    assert calls == []  # refused from the header: nothing was decoded
    assert images.decode_image(grey, max_pixels=1_000_000, max_decoded_bytes=50_000).size == (200, 100)
    sixteen = png_bytes(Image.fromarray(np.full((100, 200), 300, np.uint16)))
    with pytest.raises(UploadError, match="40,000 bytes"):  # 2 bytes per pixel
        images.decode_image(sixteen, max_pixels=1_000_000, max_decoded_bytes=39_999)
    # a JPEG costs its reduced (draft) size: 1600x1600 RGB is 10 MB in full, 200x200 at 1/8 scale
    jpeg = png_bytes(Image.new("RGB", (1600, 1600), (10, 200, 30)), "JPEG")
    with pytest.raises(UploadError, match="10,240,000 bytes"):
        images.decode_image(jpeg, max_pixels=10_000_000, max_decoded_bytes=1_000_000)
    assert images.image_pixels(jpeg, 64, max_pixels=10_000_000, max_decoded_bytes=1_000_000).shape == (3, 64, 64)


def test_high_bit_depth_images_convert_without_a_widened_copy(monkeypatch):
    """Float and 16-bit images once became float64 copies (8+ bytes a pixel, several of
    them); now the arithmetic holds one chunk at a time. numpy's allocations are traced."""
    from mumic.data import preprocess

    # hand-worked values: fractions scale by 255; otherwise 0..255 clipped; NaN is 0; 16-bit / 257
    frac = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], np.float32), mode="F")
    assert np.asarray(preprocess.to_rgb(frac))[0, :, 0].tolist() == [0, 128, 255, 0]
    wide = Image.fromarray(np.array([[-3.0, 2.0, 127.5, 300.0]], np.float32), mode="F")
    assert np.asarray(preprocess.to_rgb(wide))[0, :, 0].tolist() == [0, 2, 128, 255]
    ints = Image.fromarray(np.array([[0, 128, 129, 65535]], np.uint16))
    assert np.asarray(preprocess.to_rgb(ints))[0, :, 0].tolist() == [0, 0, 1, 255]

    monkeypatch.setattr(preprocess, "_CHUNK_PIXELS", 10_000)
    rng = np.random.default_rng(0)
    n = 1000 * 1000
    for img in (Image.fromarray(rng.random((1000, 1000), dtype=np.float32), mode="F"),
                Image.fromarray(rng.integers(0, 65535, (1000, 1000), dtype=np.uint16))):
        out, peak = traced_peak(preprocess.to_rgb, img)
        assert out.mode == "RGB" and out.size == (1000, 1000)
        assert peak < 1.5 * n, f"{img.mode}: {peak:,} bytes traced for {n:,} pixels"  # the uint8 result and one chunk


def test_uploads_over_the_decoded_bytes_limit_get_413_and_decodes_are_bounded(run, image, monkeypatch):
    import os

    from mumic.serve import Limits
    from mumic.serve import service as service_module

    assert Limits().decode_threads == len(os.sched_getaffinity(0))  # one decode per usable CPU by default
    with client(run, max_decoded_bytes=100_000, decode_threads=1) as c:
        files = [("images", ("bomb.tif", float_tiff(200, 200), "image/tiff"))]  # 40,000 pixels, 160,000 bytes decoded
        assert_error(c.post("/predict", files=files), 413, "bomb.tif", "decodes to 160,000 bytes")
        running, most = 0, 0
        lock = threading.Lock()
        real = service_module.image_pixels

        def counted(*a, **k):
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            try:
                return real(*a, **k)
            finally:
                with lock:
                    running -= 1

        monkeypatch.setattr(service_module, "image_pixels", counted)

        def many():
            return [c.post("/embed/image", files=[("images", (f"{i}.png", image, "image/png"))] * 3) for i in range(4)]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = [f.result() for f in [pool.submit(many) for _ in range(3)]]
        assert all(r.status_code == 200 for rs in answers for r in rs)
        assert most == 1  # decode_threads=1: never two decodes at once


# ----------------------------------------------------------------------------- text work and admission


def test_labels_are_embedded_only_after_the_images_decode(run, monkeypatch):
    with client(run) as c:
        svc = c.app.state.service
        computed = []
        real = svc.bank.compute
        monkeypatch.setattr(svc.bank, "compute", lambda specs: computed.append([s.name for s in specs]) or real(specs))
        labels = {"labels": [f"new label {i}" for i in range(20)]}
        r = c.post("/predict", files=[("images", ("junk.png", b"not an image at all", "image/png"))], data=labels)
        assert_error(r, 422, "junk.png", "not an image")
        assert computed == [] and len(svc.bank) == 0  # the garbage image was refused before any label was embedded


def test_deeply_nested_json_is_a_422_not_a_server_error(run):
    nested = b'{"texts": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    with client(run) as c:
        r = c.post("/embed/text", content=nested, headers={"content-type": "application/json"})
        assert_error(r, 422, "nested too deeply")


def _block_text_threads(svc, cost=1):
    """A job of `cost` on the text thread and one on the bulk thread, both running until the gate opens."""
    gate = threading.Event()
    jobs = [svc.batcher.call(lambda: gate.wait(20), cost=cost, bulk=bulk) for bulk in (False, True)]
    return gate, SimpleNamespace(result=lambda timeout: [j.result(timeout) for j in jobs])


def test_image_batches_run_on_model_threads(run, image):
    """By default on the usable CPUs but one (at least one); the setting reaches the image
    tower's onnxruntime session, and the CLI takes it as --model-threads."""
    from mumic.cli import build_parser
    from mumic.cli.serve import _limits
    from mumic.serve import Limits
    from mumic.serve.limits import usable_cpus

    assert Limits().model_threads == max(1, usable_cpus() - 1)
    with pytest.raises(ConfigError, match="model_threads must be a positive integer"):
        Limits(model_threads=0)
    args = build_parser().parse_args(["serve", "RUN", "--model-threads", "3"])
    assert _limits(args)["model_threads"] == 3
    with client(run, model_threads=1) as c:
        session = c.app.state.model._onnx_tower.session
        assert session.get_session_options().intra_op_num_threads == 1
        assert c.post("/predict", files=[("images", ("a.png", image, "image/png"))]).status_code == 200


def test_text_and_label_work_is_admitted_by_its_cost(run, image):
    with client(run, max_pending_texts=8, text_chars_per_image=100) as c:
        svc = c.app.state.service
        gate, job = _block_text_threads(svc)
        try:
            # 2 texts of 500 characters cost 10 images (100 characters each): over the (bulk) text budget of 8 while
            # anything waits
            r = c.post("/embed/text", json={"texts": ["x" * 500] * 2})
            assert_error(r, 503, "busy")
            assert r.headers["retry-after"] == "1"
            long_labels = {"labels": [("a very long zero-shot label " * 6)[:180] + str(i) for i in range(4)]}
            r = c.post("/predict", files=[("images", ("a.png", image, "image/png"))], data=long_labels)
            assert_error(r, 503, "busy")
            assert r.headers["retry-after"] == "1"
            r = c.post("/search", json={"text": "y" * 900})  # no index: 409 comes before any work
            assert r.status_code == 409
        finally:
            gate.set()
        job.result(10)
        assert c.post("/embed/text", json={"texts": ["x" * 500] * 2}).status_code == 200  # alone in the queue: admitted
        batching = c.get("/health").json()["batching"]
        assert batching["pending_images"] == 0 and batching["pending_texts"] == 0  # every reservation was returned


def test_embed_text_is_refused_from_its_headers_when_the_text_budget_is_full(run):
    with client(run, max_pending_texts=4) as c:
        svc = c.app.state.service
        gate, job = _block_text_threads(svc, cost=4)  # the whole text budgets are held
        try:
            # not even valid JSON: refused 503 from the headers, before the body is parsed (a 422 otherwise)
            r = c.post("/embed/text", content=b"not json at all", headers={"content-type": "application/json"})
            assert_error(r, 503, "text work budgets of 4 image-equivalents are full")
            assert r.headers["retry-after"] == "1"
        finally:
            gate.set()
        job.result(10)
        r = c.post("/embed/text", content=b"not json at all", headers={"content-type": "application/json"})
        assert_error(r, 422, "JSON decode error")  # room again: the body is read and judged
        assert c.post("/embed/text", json={"texts": ["a cat"]}).status_code == 200


def test_predict_with_new_labels_is_refused_before_decoding_when_the_text_budget_is_full(run):
    junk = [("images", ("junk.png", b"not an image at all", "image/png"))]
    with client(run, max_pending_texts=4) as c:
        svc = c.app.state.service
        gate, job = _block_text_threads(svc, cost=4)  # the whole text budgets are held
        try:
            # new zero-shot labels cannot be admitted: 503 before the (garbage) image is decoded, a 422 otherwise
            r = c.post("/predict", files=junk, data={"extra_labels": ["a never seen label"]})
            assert_error(r, 503, "text work budgets of 4 image-equivalents are full")
            assert r.headers["retry-after"] == "1"
            r = c.post("/predict", files=junk)  # the run's own labels need no text work: judged as usual
            assert_error(r, 422, "junk.png")
        finally:
            gate.set()
        job.result(10)
        r = c.post("/predict", files=junk, data={"extra_labels": ["a never seen label"]})
        assert_error(r, 422, "junk.png")  # room again: the images are read first


def test_multipart_parts_counts_delimiter_lines_not_boundary_text_inside_parts():
    from mumic.serve.limits import multipart_parts

    body = (b"--XyZ\r\ncontent-disposition: form-data; name=a\r\n\r\nsays --XyZ inline\r\n"
            b"--XyZ\r\ncontent-disposition: form-data; name=b\r\n\r\n2\r\n--XyZ--\r\n")
    assert multipart_parts('multipart/form-data; boundary="XyZ"', body) == 2
    assert multipart_parts("multipart/form-data; charset=utf-8; boundary=XyZ", b"preamble\r\n" + body) == 2
    assert multipart_parts("application/json", body) == 0 and multipart_parts("multipart/form-data", body) == 0


def test_a_form_with_more_parts_than_its_route_takes_is_refused_before_parsing(run, image):
    # max_images 1 + 2 x max_labels 2 + 3 other fields + 8 spare: /predict takes at most 16 parts
    files = [("images", ("a.png", image, "image/png"))]
    with client(run, max_images=1, max_labels=2) as c:
        r = c.post("/predict", files=files, data={"extra_labels": [""] * 15})  # 16 parts (empty entries are ignored)
        assert r.status_code == 200, r.text
        r = c.post("/predict", files=files, data={"extra_labels": [""] * 16})
        assert_error(r, 422, "the form has 17 parts; /predict takes at most 16")


def _asgi_post(app, path, body, ctype):
    """Send one POST to the ASGI app, then disconnect as soon as `leave` is set; returns
    (the task running the request, the leave event, the messages sent back)."""
    sent = []
    leave = asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
             "server": ("localhost", 80),
             "headers": [(b"host", b"localhost"), (b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]}
    return asyncio.ensure_future(app(scope, receive, send)), leave, sent


def _multipart(image, labels):
    b = "guardboundary"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
             + image + b"\r\n"]
    parts += [f'--{b}\r\nContent-Disposition: form-data; name="labels"\r\n\r\n{name}\r\n'.encode() for name in labels]
    return b"".join(parts) + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


@pytest.mark.parametrize("kind", ["embed_text", "predict_new_labels"])
def test_work_for_a_client_that_left_is_dropped(run, image, monkeypatch, kind):
    with client(run) as c:
        svc = c.app.state.service
        ran = []
        real_texts, real_compute = svc._text_embeddings, svc.bank.compute
        monkeypatch.setattr(svc, "_text_embeddings", lambda texts: ran.append(texts) or real_texts(texts))
        monkeypatch.setattr(svc.bank, "compute", lambda specs: ran.append(specs) or real_compute(specs))
        if kind == "embed_text":
            # 720 characters, within the text budget, in three jobs
            body, ctype = json.dumps({"texts": ["a long text " * 20] * 3}).encode(), "application/json"
        else:
            body, ctype = _multipart(image, ["left label one", "left label two"])

        async def go():
            gate, job = _block_text_threads(svc)
            task, leave, sent = _asgi_post(c.app, "/predict" if kind != "embed_text" else "/embed/text", body, ctype)
            def pending():
                stats = svc.batcher.stats()
                return stats["pending_texts"] + stats["pending_bulk_texts"]

            for _ in range(500):  # until the request's work waits behind the blocked text threads
                if pending() > 2:
                    break
                await asyncio.sleep(0.01)
            assert pending() > 2
            leave.set()  # the client disconnects
            await asyncio.wait_for(task, 10)  # answered without waiting for the text threads
            gate.set()
            await asyncio.to_thread(job.result, 10)
            for bulk in (False, True):  # everything queued before these has been handled
                await asyncio.wrap_future(svc.batcher.call(lambda: None, bulk=bulk))
            return sent

        sent = asyncio.run(go())
        assert sent[0]["status"] == 499
        assert ran == [] and len(svc.bank) == 0  # the queued work was skipped, not computed
        stats = svc.batcher.stats()
        assert stats["skipped"] == 1 and stats["pending_images"] == 0 and stats["pending_texts"] == stats["pending_bulk_texts"] == 0


# ----------------------------------------------------------------------------- exposure


def test_only_allowed_host_names_are_answered(run):
    from mumic.serve.exposure import Exposure

    with client(run) as c:
        for host in ("localhost", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST."):
            assert c.get("/labels", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
            for method, path in (("GET", "/labels"), ("POST", "/embed/text"), ("GET", "/"), ("GET", "/docs")):
                r = c.request(method, path, headers={"host": host}, json={"texts": ["a"]})
                assert_error(r, 400, "--allowed-host")  # every path, routes added later too
    with client(run, exposure=Exposure(allowed_hosts=("api.example.com",))) as c:
        assert c.get("/labels", headers={"host": "api.example.com:443"}).status_code == 200
        assert c.get("/labels").status_code == 400  # localhost is no longer listed
    with client(run, exposure=Exposure(allowed_hosts=("*",))) as c:
        assert c.get("/labels", headers={"host": "anything.example"}).status_code == 200


def test_bearer_token_guards_every_route(run):
    from mumic.serve.exposure import Exposure

    with client(run, exposure=Exposure(token="s3cret-token")) as c:
        for method, path in (("GET", "/labels"), ("GET", "/health"), ("GET", "/docs"), ("GET", "/gallery/0"), ("POST", "/embed/text")):
            r = c.request(method, path, json={"texts": ["a"]})
            assert_error(r, 401, "Authorization: Bearer")
            assert r.headers["www-authenticate"] == 'Bearer realm="mumic"'
            r = c.request(method, path, json={"texts": ["a"]}, headers={"authorization": "Bearer s3cret-tokeN"})
            assert_error(r, 401, "wrong")
            assert r.headers["www-authenticate"] == 'Bearer realm="mumic", error="invalid_token"'
        ok = {"authorization": "Bearer s3cret-token"}
        assert c.get("/labels", headers=ok).status_code == 200
        assert c.post("/embed/text", json={"texts": ["a"]}, headers=ok).status_code == 200
        assert c.get("/gallery/0", headers=ok).status_code == 409  # past the guard (no index)
        assert c.get("/").status_code == 200  # the page's shell holds no data: it loads, then asks for the token
    with pytest.raises(ConfigError, match="token"):
        Exposure(token="two words")


def test_cross_site_posts_are_refused_unless_their_origin_is_allowed(run):
    from mumic.serve.exposure import Exposure

    form = {"texts": "a red circle"}
    with client(run) as c:
        r = c.get("/labels", headers={"origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # CORS is off: the page cannot read it
        assert_error(c.post("/embed/text", data=form, headers={"origin": "https://evil.example"}), 403, "--cors-origin")
        assert_error(c.post("/embed/text", data=form, headers={"origin": "null"}), 403)
        assert_error(c.post("/embed/text", data=form, headers={"sec-fetch-site": "cross-site"}), 403)
        assert c.post("/embed/text", data=form, headers={"origin": "http://localhost"}).status_code == 200  # same origin
        assert c.post("/embed/text", data=form, headers={"sec-fetch-site": "same-origin"}).status_code == 200
        assert c.post("/embed/text", data=form).status_code == 200  # curl and scripts send neither
        assert c.options("/embed/text", headers={"origin": "https://evil.example", "access-control-request-method": "POST"}
                         ).headers.get("access-control-allow-origin") is None
    app_origin = "https://app.example.com"
    with client(run, exposure=Exposure(cors_origins=(app_origin,), token="t")) as c:
        pre = c.options("/embed/text", headers={"origin": app_origin, "access-control-request-method": "POST",
                                                "access-control-request-headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == app_origin
        r = c.post("/embed/text", json={"texts": ["a"]}, headers={"origin": app_origin, "authorization": "Bearer t"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == app_origin
        assert_error(c.post("/embed/text", data=form, headers={"origin": "https://evil.example", "authorization": "Bearer t"}), 403)
    with pytest.raises(ConfigError, match="not an origin"):
        Exposure(cors_origins=("app.example.com/path",))


def test_search_shows_only_the_chosen_columns_and_no_server_path(run, index, shapes):
    from mumic.serve.exposure import Exposure

    with client(run, index) as c:
        r = c.post("/search", json={"text": "a red shape", "k": 3})
        assert r.status_code == 200, r.text
        hits = r.json()["results"]
        assert [set(h) for h in hits] == [{"rank", "score", "id", "image"}] * 3
        names = pd.read_parquet(Path(index) / "items.parquet")["image"]
        assert [h["image"] for h in hits] == [Path(names[h["id"]]).name for h in hits]  # the images all sit in one folder
        assert str(shapes) not in r.text and "/" not in "".join(h["image"] for h in hits)
    with client(run, index, exposure=Exposure(expose_columns=("labels", "split"))) as c:
        hits = c.post("/search", json={"text": "a red shape", "k": 2}).json()["results"]
        assert set(hits[0]) == {"rank", "score", "id", "image", "labels", "split"} and str(shapes) not in json.dumps(hits)
    from mumic.serve import create_app

    with pytest.raises(ConfigError, match="--expose-columns: nope not in the index .* its columns: .*labels"):
        create_app(run, index, device="cpu", exposure=Exposure(expose_columns=("labels", "nope")))


def test_image_names_are_relative_to_the_indexed_folder():
    from mumic.serve.exposure import SearchHits

    def fake(paths, extra=None):
        items = pd.DataFrame({"image": paths, **(extra or {})})
        rows = items.to_dict("records")
        return SimpleNamespace(path=Path("idx"), items=items, results=lambda s, ids: [
            {"rank": r, "score": 0.5, "id": i, **{(f"manifest_{k}" if k in ("rank", "score", "id") else k): v for k, v in rows[i].items()}}
            for r, i in enumerate(ids, 1)])

    hits = SearchHits(fake(["/srv/data/photos/a/x.png", "/srv/data/photos/b/c/y.png"]), ())
    assert [h["image"] for h in hits.records([0.5, 0.5], [0, 1])] == ["a/x.png", "b/c/y.png"]
    assert [h["image"] for h in SearchHits(fake(["/srv/one.png"]), ()).records([0.5], [0])] == ["one.png"]
    clash = SearchHits(fake(["/a/x.png"], {"score": ["manifest score"]}), ("score",))
    assert clash.records([0.9], [0]) == [{"manifest_score": "manifest score", "rank": 1, "score": 0.5, "id": 0, "image": "x.png"}]


def test_cli_exposure_allows_the_bound_host_and_reads_the_token_from_the_environment(monkeypatch):
    from mumic.cli.serve import _exposure

    def args(**kw):
        base = {"host": "127.0.0.1", "allowed_host": [], "token": None, "cors_origin": [], "expose_columns": ""}
        return argparse.Namespace(**{**base, **kw})

    monkeypatch.delenv("MUMIC_TOKEN", raising=False)
    e = _exposure(args(host="10.1.2.3", allowed_host=["api.example.com"], expose_columns="labels, split"))
    assert e.allowed_hosts == ("localhost", "127.0.0.1", "::1", "10.1.2.3", "api.example.com") and e.token is None
    assert e.expose_columns == ("labels", "split")
    assert _exposure(args(host="0.0.0.0")).allowed_hosts == ("localhost", "127.0.0.1", "::1")  # a wildcard is no name
    monkeypatch.setenv("MUMIC_TOKEN", "from-env")
    assert _exposure(args()).token == "from-env" and _exposure(args(token="flag")).token == "flag"
