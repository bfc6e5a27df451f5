"""The HTTP service as a client sees it: a real server process on a loopback port, a tiny
trained run, good requests, every limit, garbage bodies, and schemathesis on its OpenAPI."""

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image

from mumic.config import load_config
from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes
from mumic.train import fit
from serving import Server, assert_error, case_with_decisions_past_top_k, files_of, free_port, png_bytes

# small limits, so every limit is cheap to reach
URLENCODED = "application/x-www-form-urlencoded"
LIMITS = {"max_images": 4, "max_labels": 8, "max_image_bytes": 200_000, "max_request_bytes": 1_000_000, "max_pixels": 1_000_000}


@pytest.fixture(scope="session")
def serve_shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("serve_shapes"), n=120, size=64, seed=1).parent


@pytest.fixture(scope="session")
def serve_run(serve_shapes, tmp_path_factory, tiny_clip_dir):
    tmp = tmp_path_factory.mktemp("serve_run")
    cfg = load_config(overrides={
        "manifest": str(serve_shapes / "manifest.csv"), "labels_file": str(serve_shapes / "labels.yaml"), "out": str(tmp / "run"),
        "cache_dir": str(tmp / "cache"), "backbone": f"hf:{tiny_clip_dir}", "batch_size": 16, "eval_every": 3, "max_steps": 6,
        "warmup_steps": 2, "patience": 100, "majority_n": 3,
    })
    return fit(cfg, progress=False)


@pytest.fixture(scope="session")
def serve_index(serve_run, serve_shapes, tmp_path_factory):
    from mumic.search import build_index

    return build_index(serve_run, serve_shapes / "manifest.csv", tmp_path_factory.mktemp("serve_index") / "index",
                       progress=False, device="cpu")


@pytest.fixture(scope="session")
def server(serve_run, serve_index, tmp_path_factory):
    args = ["--index", str(serve_index), "--max-wait-ms", "20"]
    for k, v in LIMITS.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    srv = Server(serve_run, tmp_path_factory.mktemp("server") / "server.log", *args)
    yield srv
    srv.stop()
    assert srv.proc.returncode == 0, srv.log()  # a clean shutdown on SIGINT
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture(scope="session")
def model(serve_run):
    from mumic.predictor import Predictor

    return Predictor.from_run(serve_run, device="cpu")


@pytest.fixture(scope="session")
def test_images(serve_shapes):
    return read_manifest(serve_shapes / "manifest.csv").split("test").images[:3]


# ----------------------------------------------------------------------------- good requests


def test_health_labels_and_openapi(server, serve_run):
    import json

    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["labels"] == 8 and h["index_items"] == 120 and h["batching"]["enabled"]
    labels = httpx.get(server.url + "/labels").json()
    th = json.loads((serve_run / "thresholds.json").read_text())
    by_name = {l["name"]: l for l in labels["labels"]}
    assert by_name["yellow"]["seen"] is False and by_name["red"]["seen"] is True
    for name, t in th["per_label"].items():
        assert by_name[name]["threshold"] == pytest.approx(t)
    assert labels["zero_shot"] is True and labels["embed_dim"] == 16
    assert str(serve_run.parent) not in httpx.get(server.url + "/labels").text  # no server paths
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/predict", "/embed/image", "/embed/text", "/labels", "/health", "/search"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    for path in ("/embed/text", "/search"):  # JSON or form fields, both documented
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data", "application/x-www-form-urlencoded"}
    assert "image" in spec["paths"]["/search"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    form = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    props = form["properties"] if "properties" in form else spec["components"]["schemas"][form["$ref"].split("/")[-1]]["properties"]
    assert "exactly these labels" in props["labels"]["description"] and "extra_labels" in props


def test_predict_matches_the_library(server, model, test_images):
    r = httpx.post(server.url + "/predict", files=files_of(test_images),
                   data={"extra_labels": ["purple star", "red", ""], "return_embedding": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    run_names = [l.name for l in model.labels]
    assert body["labels"] == run_names + ["purple star"]  # extra labels add to the run's; a run label is not repeated
    assert body["thresholds"] == "calibrated"
    want = model.predict_proba(test_images, labels=body["labels"])
    emb = model.embed_images(test_images)
    specs = model.resolve_labels(body["labels"])
    decided = model.decide(want, specs)
    for i, res in enumerate(body["results"]):
        assert res["index"] == i and res["filename"] == Path(test_images[i]).name
        got = np.array([res["scores"][n] for n in body["labels"]])
        np.testing.assert_allclose(got, want[i], atol=2e-5)
        assert list(res["scores"]) == sorted(res["scores"], key=lambda n: -res["scores"][n])  # best first
        assert set(res["predicted"]) == {n for j, n in enumerate(body["labels"]) if decided[i, j]}
        np.testing.assert_allclose(res["embedding"], emb[i], atol=2e-5)
        assert np.linalg.norm(res["embedding"]) == pytest.approx(1.0, abs=1e-5)

    r = httpx.post(server.url + "/predict", files=files_of(test_images[:1]), data={"top_k": "2", "apply_thresholds": "false"})
    res = r.json()["results"][0]
    assert len(res["scores"]) == 2 and res["embedding"] is None and r.json()["thresholds"] == "fixed-0.5"
    p = model.predict_proba(test_images[:1])[0]
    assert set(res["predicted"]) == {l.name for l, v in zip(model.labels, p) if v >= 0.5}


def test_labels_mean_what_they_mean_in_the_cli_and_the_library(server, model, test_images):
    """`labels` scores exactly those labels (as `mumic predict --labels` and
    predict_proba(labels=...)); `extra_labels` adds to the run's; so the README's
    `-F labels="sea view" -F top_k=5` shows "sea view"."""
    asked = ["purple star", "red"]
    r = httpx.post(server.url + "/predict", files=files_of(test_images), data={"labels": asked + [""]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["labels"] == asked
    want = model.predict_proba(test_images, labels=asked)
    for i, res in enumerate(body["results"]):
        assert list(res["scores"]) == sorted(asked, key=lambda n: -res["scores"][n])
        np.testing.assert_allclose([res["scores"][n] for n in asked], want[i], atol=2e-5)
    r = httpx.post(server.url + "/predict", files=files_of(test_images[:1]), data={"labels": ["sea view"], "top_k": "5"})
    assert r.status_code == 200, r.text
    assert list(r.json()["results"][0]["scores"]) == ["sea view"]
    r = httpx.post(server.url + "/predict", files=files_of(test_images[:1]), data={"labels": ["red"], "extra_labels": ["sea view"]})
    assert r.json()["labels"] == ["red", "sea view"]
    r = httpx.post(server.url + "/predict", files=files_of(test_images[:1]), data={"extra_labels": ["sea view"]})
    assert r.json()["labels"] == [l.name for l in model.labels] + ["sea view"]


def test_top_k_trims_scores_and_decisions_alike_in_the_service_and_the_cli(server, model, test_images, tmp_path):
    import json

    from mumic.batch import predict_manifest
    from mumic.data.inputs import inputs_manifest

    i, calibrated, k = case_with_decisions_past_top_k(model, test_images)
    r = httpx.post(server.url + "/predict", files=files_of(test_images[i:i + 1]),
                   data={"top_k": str(k), "apply_thresholds": str(calibrated).lower()})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert len(res["scores"]) == k
    assert len(res["predicted"]) <= k and set(res["predicted"]) <= set(res["scores"])
    if calibrated:  # the CLI decides at the calibrated thresholds: the same lists
        out = tmp_path / "p.jsonl"
        predict_manifest(model, inputs_manifest([str(test_images[i])]), out, top_k=k, progress=False)
        row = json.loads(out.read_text())
        assert list(row["scores"]) == list(res["scores"]) and row["predicted"] == res["predicted"]
        predict_manifest(model, inputs_manifest([str(test_images[i])]), tmp_path / "p.parquet", top_k=k, progress=False)
        import pyarrow.parquet as pq

        assert pq.read_table(tmp_path / "p.parquet").column("predicted").to_pylist() == [res["predicted"]]


def test_search_without_an_index_says_how_to_get_one(serve_run):
    from fastapi.testclient import TestClient

    from mumic.serve import create_app

    with TestClient(create_app(serve_run, device="cpu"), base_url="http://localhost") as client:
        for kw in ({"json": {"text": "red"}}, {"data": {"text": "red"}}):
            assert_error(client.post("/search", **kw), 409, "this service has no index", "mumic serve RUN --index INDEX")
        assert "/search" in client.get("/openapi.json").json()["paths"] and client.get("/health").json()["index_items"] is None


def test_docs_pages_load_nothing_from_outside(server):
    """/docs and /redoc work offline: every script and style they load is served here."""
    import re

    for page in ("/docs", "/redoc"):
        r = httpx.get(server.url + page)
        assert r.status_code == 200 and ("swagger" in r.text.lower() or "redoc" in r.text.lower())
        assets = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', r.text)
        assert assets and not [a for a in assets if "//" in a], assets  # no CDN (nor any other host)
        for a in assets:
            got = httpx.get(server.url + a)
            assert got.status_code == 200 and len(got.content) > 1000, a


def test_embed_image_and_text(server, model, test_images):
    r = httpx.post(server.url + "/embed/image", files=files_of(test_images[:2]))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["embeddings"]), model.embed_images(test_images[:2]), atol=2e-5)
    texts = ["a drawing of a red circle.", "blue"]
    r = httpx.post(server.url + "/embed/text", json={"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == 16
    np.testing.assert_allclose(np.array(body["embeddings"]), model.embed_texts(texts), atol=2e-5)
    # the same texts as form fields, urlencoded and multipart, give the same answer
    for kw in ({"data": {"texts": texts}}, {"files": [("texts", (None, t)) for t in texts]}):
        r = httpx.post(server.url + "/embed/text", **kw)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["embeddings"]), np.array(body["embeddings"]), atol=1e-6)


def test_search_by_text_and_image(server, test_images):
    r = httpx.post(server.url + "/search", data={"text": "a drawing of a red shape.", "k": "5"})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(hits[i]["score"] >= hits[i + 1]["score"] for i in range(4))
    assert set(hits[0]) == {"rank", "score", "id", "image"}  # by default no manifest column, no server path
    r = httpx.post(server.url + "/search", json={"text": "a drawing of a red shape.", "k": 5})  # JSON, as /embed/text takes
    assert r.status_code == 200, r.text
    assert r.json()["results"] == hits
    # an indexed image finds itself first, with the graph and exactly
    for exact in ("false", "true"):
        query = [("image", ("q.png", Path(test_images[0]).read_bytes(), "image/png"))]
        r = httpx.post(server.url + "/search", files=query, data={"k": "3", "exact": exact})
        assert r.status_code == 200, r.text
        top = r.json()["results"][0]
        assert top["image"] == Path(test_images[0]).name and top["score"] == pytest.approx(1.0, abs=1e-4)
        assert r.json()["exact"] is (exact == "true")


def test_concurrent_requests_share_batches(server, test_images):
    before = httpx.get(server.url + "/health").json()["batching"]
    payload = Path(test_images[0]).read_bytes()

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            rs = await asyncio.gather(*[client.post("/predict", files=[("images", ("a.png", payload, "image/png"))]) for _ in range(16)])
        return rs

    rs = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs)
    scores = {tuple(sorted(r.json()["results"][0]["scores"].items())) for r in rs}
    assert len({tuple(round(v, 4) for _, v in s) for s in scores}) == 1  # same answer in any batch
    # behaviour, not timing: the batcher's counters show that requests shared forward passes
    after = httpx.get(server.url + "/health").json()["batching"]
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images == 16
    assert batches < images, f"{images} images ran in {batches} batches: no two requests were batched together"
    assert after["largest_batch"] > 1


# ----------------------------------------------------------------------------- limits and garbage


def test_size_and_count_limits(server, test_images):
    url = server.url
    assert_error(httpx.post(url + "/predict", files=files_of(test_images[:1] * 5)), 413, "5 images", "limit is 4")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))
    big = png_bytes(noise)
    assert 200_000 < len(big) < 1_000_000
    assert_error(httpx.post(url + "/predict", files=[("images", ("big.png", big, "image/png"))]), 413, "big.png", "200,000 bytes")
    # a body over the request limit, declared and streamed without a length
    blob = b"\0" * 1_200_000
    assert_error(httpx.post(url + "/predict", files=[("images", ("x.png", blob, "image/png"))]), 413, "over the limit")

    def chunks():
        for _ in range(30):
            yield b"x" * 50_000

    r = httpx.post(url + "/embed/text", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "over the limit")
    # a decompression bomb: few bytes, many pixels
    bomb = png_bytes(Image.new("L", (3000, 3000)))
    assert len(bomb) < 100_000
    assert_error(httpx.post(url + "/predict", files=[("images", ("bomb.png", bomb, "image/png"))]), 413, "too many pixels")
    # labels: count and length
    many = {"labels": [f"label {i}" for i in range(9)]}
    assert_error(httpx.post(url + "/predict", files=files_of(test_images[:1]), data=many), 422, "9 labels asked for")
    split = {"labels": [f"label {i}" for i in range(5)], "extra_labels": [f"label {i}" for i in range(3, 9)]}
    assert_error(httpx.post(url + "/predict", files=files_of(test_images[:1]), data=split), 422, "9 labels asked for")
    assert_error(httpx.post(url + "/embed/text", data={"texts": ["a"] * 65}), 422)
    assert_error(httpx.post(url + "/embed/text", data={"texts": ["a" * 1001]}), 422, "1000 characters")
    assert_error(httpx.post(url + "/search", json={"text": "red", "k": 101}), 422)
    assert_error(httpx.post(url + "/search", json={"text": "r" * 1001}), 422, "1000 characters")
    assert_error(httpx.post(url + "/predict", files=files_of(test_images[:1]), data={"labels": ["x" * 201]}), 422, "limit is 200")
    assert_error(httpx.post(url + "/predict", files=files_of(test_images[:1]), data={"top_k": "0"}), 422)
    assert_error(httpx.post(url + "/embed/text", json={"texts": ["a"] * 65}), 422)
    assert_error(httpx.post(url + "/embed/text", json={"texts": ["a" * 1001]}), 422, "1000 characters")
    assert_error(httpx.post(url + "/search", data={"text": "red", "k": "101"}), 422)


def test_wrong_content_types(server, test_images):
    url = server.url
    assert_error(httpx.post(url + "/predict", json={"images": ["/etc/passwd"]}), 415, "multipart/form-data", "application/json")
    assert_error(httpx.post(url + "/predict", content=b"abc"), 415, "no content type")
    assert_error(httpx.post(url + "/embed/image", data={"images": "x"}), 415, "multipart/form-data")
    for path in ("/embed/text", "/search"):  # JSON or form fields, nothing else
        r = httpx.post(url + path, content=b"texts=a", headers={"content-type": "text/plain"})
        assert_error(r, 415, "application/json or multipart/form-data or application/x-www-form-urlencoded", "'text/plain'")


def test_undecodable_and_garbage_bodies(server, test_images):
    url = server.url

    def one(name, data):
        return httpx.post(url + "/predict", files=[("images", (name, data, "image/png"))])

    assert_error(one("junk.png", b"this is not an image"), 422, "junk.png", "not an image")
    assert_error(one("empty.png", b""), 422, "empty upload")
    good = Path(test_images[0]).read_bytes()
    assert_error(one("cut.png", good[: len(good) // 2]), 422, "cut.png")
    assert_error(one("doc.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"), 422, "supported format")
    # a path or URL given as a "file" is just bytes that are not an image: nothing is opened
    assert_error(one("x", b"/etc/hosts"), 422)
    assert_error(httpx.post(url + "/predict", data={"images": str(test_images[0])}, files=[("other", ("a", b"a"))]), 422)
    # broken multipart, broken JSON, wrong JSON shapes
    r = httpx.post(url + "/predict", content=b"--xx\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code in (400, 422), r.text
    r = httpx.post(url + "/predict", content=b"garbage", headers={"content-type": "multipart/form-data"})
    assert r.status_code in (400, 422), r.text
    assert_error(httpx.post(url + "/embed/text", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert_error(httpx.post(url + "/embed/text", json={"texts": "one string"}), 422)
    assert_error(httpx.post(url + "/embed/text", json={"texts": [1, 2]}), 422)
    assert_error(httpx.post(url + "/embed/text", json={"texts": []}), 422)
    assert_error(httpx.post(url + "/embed/text", json={"texts": ["a"], "extra": 1}), 422)
    assert_error(httpx.post(url + "/embed/text", json=["a"]), 422)
    assert_error(httpx.post(url + "/embed/text", data={"texts": "a", "extra": "1"}), 422, "extra")
    assert_error(httpx.post(url + "/embed/text", content=b"", headers={"content-type": URLENCODED}), 422, "texts")
    assert_error(httpx.post(url + "/embed/text", files={"texts": ("a.txt", b"hello")}), 422, "valid string")  # a file is no text
    assert_error(httpx.post(url + "/search", content=b"{", headers={"content-type": "application/json"}), 422, "JSON")
    assert_error(httpx.post(url + "/search", json={"k": 3}), 422, "exactly one query")
    assert_error(httpx.post(url + "/search", data={"text": "red", "image": "q.png"}), 422, "uploaded file")
    # search needs exactly one query
    assert_error(httpx.post(url + "/search", data={"k": "3"}), 422, "exactly one query")
    r = httpx.post(url + "/search", data={"text": "red"}, files=[("image", ("q.png", good, "image/png"))])
    assert_error(r, 422, "exactly one query")
    assert httpx.get(url + "/predict").status_code == 405
    assert httpx.get(url + "/nope").status_code == 404
    # the server is still healthy after all of it
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_image_modes_decode_as_files_do(tmp_path):
    """Uploads go through the same conversion as files: alpha onto white, EXIF, 16-bit, palette."""
    from mumic.data.images import decode_image, load_image

    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    exif = Image.new("RGB", (30, 20), (200, 10, 10))
    e = exif.getexif()
    e[0x0112] = 6  # rotate 90 degrees on display
    cases = {
        "rgba.png": png_bytes(rgba),
        "grey16.png": png_bytes(Image.fromarray(rng.integers(0, 65535, (10, 12), dtype=np.uint16))),
        "palette.gif": png_bytes(Image.new("P", (8, 8), 3), "GIF", transparency=3),
        "exif.jpg": png_bytes(exif, "JPEG", exif=e),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        a = np.asarray(decode_image(data, max_pixels=10_000))
        b = np.asarray(load_image(path))
        assert a.shape == b.shape and a.dtype == np.uint8 and a.shape[-1] == 3, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert np.asarray(decode_image(cases["exif.jpg"], max_pixels=10_000)).shape == (30, 20, 3)


def test_bad_run_or_limits_fail_before_serving(tmp_path):
    from mumic.errors import ConfigError
    from mumic.serve import Limits

    p = subprocess.run([sys.executable, "-m", "mumic", "serve", str(tmp_path / "no-run"), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert [l for l in p.stderr.splitlines() if l.startswith("mumic: error:")] and "no-run" in p.stderr
    with pytest.raises(ConfigError, match="max_images"):
        Limits.from_kwargs(max_images=0)
    with pytest.raises(ConfigError, match="unknown service limit"):
        Limits.from_kwargs(max_imagez=3)


def test_linear_head_run_scores_only_its_trained_labels(serve_shapes, tmp_path, tiny_clip_dir, test_images):
    from fastapi.testclient import TestClient

    from mumic.serve import create_app

    cfg = load_config(overrides={
        "manifest": str(serve_shapes / "manifest.csv"), "labels_file": str(serve_shapes / "labels.yaml"), "out": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"), "backbone": f"hf:{tiny_clip_dir}", "loss": "linear_bce", "batch_size": 16,
        "eval_every": 2, "max_steps": 2, "warmup_steps": 1, "patience": 100, "majority_n": 3,
    })
    run = fit(cfg, progress=False)
    with TestClient(create_app(run, device="cpu"), base_url="http://localhost") as client:
        r = client.post("/predict", files=files_of(test_images[:1]))
        assert r.status_code == 200, r.text
        assert "yellow" not in r.json()["labels"] and len(r.json()["labels"]) == 7  # the unseen label has no classifier row
        assert_error(client.post("/predict", files=files_of(test_images[:1]), data={"labels": ["purple star"]}), 422, "linear head")
        assert client.get("/labels").json()["zero_shot"] is False


def test_label_cache_is_bounded(model):
    from mumic.serve import LabelBank

    bank = LabelBank(model, capacity=2)
    assert bank.run_v.shape == (8, 16) and bank.run_b.shape == (8,)
    np.testing.assert_allclose(bank.run_v.numpy(), model.class_embeddings(model.labels).detach().numpy(), atol=1e-6)
    for name in ("purple star", "orange", "white"):
        specs = bank.extra_specs([name, "red"])  # run labels are not extra
        assert [s.name for s in specs] == [name]
        bank.put(specs, *bank.compute(specs))
    assert len(bank) == 2 and not bank.missing(model.resolve_labels(["orange", "white"]))
    assert [s.name for s in bank.missing(model.resolve_labels(["purple star"]))] == ["purple star"]
    assert not model._text_cache  # the model's own cache does not grow with client labels


def test_micro_batcher_batches_bounds_and_stops():
    import threading

    import torch

    from mumic.errors import ServiceError
    from mumic.serve import MicroBatcher

    sizes = []
    gate = threading.Event()

    def run(px):
        gate.wait(5)
        sizes.append(len(px))
        return px.float().mean(dim=(1, 2, 3), keepdim=False)[:, None]

    b = MicroBatcher(run, max_batch_size=8, max_wait_ms=50, max_pending=20)
    b.start()
    futs = [b.submit(torch.full((2, 3, 2, 2), i, dtype=torch.uint8)) for i in range(6)]
    gate.set()
    outs = [f.result(5) for f in futs]
    for i, o in enumerate(outs):  # every job gets its own rows back
        assert o.shape == (2, 1) and torch.all(o == i)
    assert max(sizes) > 2 and all(s <= 8 for s in sizes)
    assert b.call(lambda: 41 + 1).result(5) == 42
    gate.clear()
    blocked = [b.submit(torch.zeros((10, 3, 2, 2), dtype=torch.uint8)) for _ in range(2)]
    with pytest.raises(ServiceError) as e:
        b.submit(torch.zeros((10, 3, 2, 2), dtype=torch.uint8))
    assert e.value.status == 503
    gate.set()
    [f.result(5) for f in blocked]
    b.stop()
    with pytest.raises(ServiceError):
        b.submit(torch.zeros((1, 3, 2, 2), dtype=torch.uint8))

    one = MicroBatcher(lambda px: px[:, :1, 0, 0].float(), enabled=False, max_wait_ms=50)
    one.start()
    futs = [one.submit(torch.zeros((1, 3, 2, 2), dtype=torch.uint8)) for _ in range(5)]
    [f.result(5) for f in futs]
    assert one.stats()["largest_batch"] == 1 and one.stats()["batches"] == 5
    one.stop()


# ----------------------------------------------------------------------------- schemathesis


@pytest.fixture(scope="session")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


OPERATIONS = [("POST", "/predict"), ("POST", "/embed/image"), ("POST", "/embed/text"), ("POST", "/search"),
              ("GET", "/labels"), ("GET", "/health")]
CASES = [(m, p, "positive") for m, p in OPERATIONS] + [(m, p, "negative") for m, p in OPERATIONS if m == "POST"]


@pytest.mark.parametrize("method,path,mode", CASES)
def test_openapi_contract(api_schema, server, method, path, mode):
    """Requests generated from the service's own schema (valid and invalid) never give a
    server error, and every answer matches the documented status codes, content types
    and response bodies."""
    from hypothesis import given
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    strategy = api_schema[path][method].as_strategy(schemathesis.GenerationMode(mode))

    @given(case=strategy)
    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def check(case):
        case.call_and_validate(base_url=server.url, timeout=30, checks=checks)

    check()
    assert httpx.get(server.url + "/health").status_code == 200
