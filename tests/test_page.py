"""The page of `mumic serve` without a browser: `/` and its files are served from the package,
and `/gallery/{row}` answers only images the index lists, by row, within the limits."""

import io
from importlib import resources

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mumic.search import write_index
from serving import assert_error, png_bytes

MAX_IMAGE_BYTES = 60_000


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, page_run):
    """An index whose rows are: a small PNG, a PNG over the upload limit, a BMP, a missing
    file and a text file (vectors are random: /gallery never looks at them)."""
    tmp = tmp_path_factory.mktemp("page_catalogue")
    rng = np.random.default_rng(0)
    small = tmp / "small.png"
    small.write_bytes(png_bytes(Image.new("RGB", (40, 30), (200, 30, 30))))
    big = tmp / "big.png"
    big.write_bytes(png_bytes(Image.fromarray(rng.integers(0, 255, (1500, 1200, 3), dtype=np.uint8))))
    bmp = tmp / "blue.bmp"
    Image.new("RGB", (600, 300), (20, 20, 220)).save(bmp)
    text = tmp / "notes.png"
    text.write_text("not an image")
    paths = [small, big, bmp, tmp / "gone.png", text]
    emb = rng.normal(size=(len(paths), 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    frame = pd.DataFrame({"image": [str(p) for p in paths], "labels": ["red", "", "blue", "", ""]})
    index = write_index(tmp / "index", emb, frame, run_dir=page_run, backend="exact")
    return index, paths


@pytest.fixture(scope="module")
def client(page_run, catalogue):
    from mumic.serve import create_app

    app = create_app(page_run, catalogue[0], device="cpu", max_image_bytes=MAX_IMAGE_BYTES)
    with TestClient(app, base_url="http://localhost") as c:
        yield c


def packaged(name: str) -> bytes:
    return resources.files("mumic.serve").joinpath("static").joinpath(name).read_bytes()


def test_page_and_its_files_are_served_from_the_package(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content == packaged("index.html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    for ref in ('src="static/app.js"', 'href="static/style.css"', 'id="file"', 'id="zs-input"', 'id="search-input"'):
        assert ref in html
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere: the page works offline
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert r.content == packaged(name)
        assert "http://" not in r.text and "https://" not in r.text
    # only the page's own names: no other file of the package or the disk
    assert_error(client.get("/static/page.py"), 404, "no static file 'page.py'; the page has app.js, icon.svg, style.css")
    for probe in ("/static/..%2Fpage.py", "/static/%2e%2e/page.py", "/static/../app.py"):
        r = client.get(probe)
        assert r.status_code == 404 and b"import" not in r.content, (probe, r.text)


def test_gallery_answers_catalogue_images_by_row(client, catalogue):
    _, paths = catalogue
    r = client.get("/gallery/0")  # a PNG within the limits: its own bytes, so /search gets the same image back
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == paths[0].read_bytes()
    for row, size in ((1, (819, 1024)), (2, (600, 300))):  # over the upload limit, or a BMP: a JPEG within 1024 px
        r = client.get(f"/gallery/{row}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        img = Image.open(io.BytesIO(r.content))
        assert img.format == "JPEG" and img.size == size
    for row, size in ((0, (40, 30)), (1, (205, 256)), (2, (256, 128))):  # thumbnails: at most 256 px a side, never enlarged
        r = client.get(f"/gallery/{row}", params={"thumb": "true"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(r.content)).size == size
    r = client.get("/gallery/2", params={"thumb": "true"})
    assert np.abs(np.asarray(Image.open(io.BytesIO(r.content)), dtype=int) - (20, 20, 220)).max() < 12  # the BMP's colour


def test_gallery_refuses_rows_outside_the_index_and_anything_but_a_row(client, catalogue):
    _, paths = catalogue
    for row in (5, 6, 10**30):
        assert_error(client.get(f"/gallery/{row}"), 404, f"row {row} is not in the index: it has 5 rows, 0 to 4")
    for bad in ("-1", "1.5", "0x1", "one", "1e3", str(paths[0]).replace("/", "%2F"), "%2Fetc%2Fpasswd", "..%2F..%2Fetc%2Fpasswd"):
        r = client.get(f"/gallery/{bad}")
        assert r.status_code in (404, 422), (bad, r.status_code)
        assert r.headers["content-type"].startswith("application/json") and not r.headers["content-type"].startswith("image")
    body = assert_error(client.get("/gallery/-1"), 422)
    assert body["detail"][0]["loc"] == ["path", "row"]
    r = client.get("/gallery/0", params={"path": str(paths[2]), "url": "file:///etc/passwd"})  # other fields are not read
    assert r.content == paths[0].read_bytes()
    for row in (3, 4):  # a file gone from the server, or not an image: refused without the server's path
        body = assert_error(client.get(f"/gallery/{row}"), 404, f"the image of row {row} is missing or unreadable on the server")
        assert str(paths[row].parent) not in str(body)


def test_gallery_is_documented_and_the_page_is_not(client):
    spec = client.get("/openapi.json").json()
    assert "/gallery/{row}" in spec["paths"] and "/" not in spec["paths"] and "/static/{name}" not in spec["paths"]
    get = spec["paths"]["/gallery/{row}"]["get"]
    assert {"200", "404", "409", "422"} <= set(get["responses"])
    assert "image/png" in get["responses"]["200"]["content"]


def test_gallery_without_an_index_is_a_409(page_run):
    from mumic.serve import create_app

    with TestClient(create_app(page_run, device="cpu"), base_url="http://localhost") as c:
        assert_error(c.get("/gallery/0"), 409, "this service has no index")
        assert c.get("/").status_code == 200  # the page itself works without an index (no search box)


def test_with_a_token_the_page_loads_and_everything_with_data_needs_the_token(page_run, catalogue):
    from mumic.serve import create_app
    from mumic.serve.exposure import Exposure

    app = create_app(page_run, catalogue[0], device="cpu", exposure=Exposure(token="s3cret"))
    with TestClient(app, base_url="http://localhost") as c:
        for path, name in (("/", "index.html"), ("/static/app.js", "app.js"), ("/static/style.css", "style.css"),
                           ("/static/icon.svg", "icon.svg")):  # no data: the page loads, then asks for the token
            r = c.get(path)
            assert r.status_code == 200 and r.content == packaged(name)
        for method, path in (("GET", "/gallery/0"), ("GET", "/gallery/0?thumb=true"), ("GET", "/health"), ("GET", "/labels"),
                             ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/static/page.py"), ("GET", "/static/"),
                             ("GET", "/static/app.js/"), ("POST", "/"), ("POST", "/static/app.js")):
            r = c.request(method, path)
            assert_error(r, 401, "this service needs `Authorization: Bearer TOKEN`")
            assert r.headers["www-authenticate"] == 'Bearer realm="mumic"', (method, path)
        ok = {"authorization": "Bearer s3cret"}
        r = c.get("/gallery/0", headers=ok)
        assert r.status_code == 200 and r.content == catalogue[1][0].read_bytes()
        assert_error(c.get("/static/page.py", headers=ok), 404, "no static file 'page.py'")
