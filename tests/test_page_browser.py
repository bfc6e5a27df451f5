"""The page of `mumic serve` in a real browser: the service of a run and an index on uvicorn, headless
Chromium (Debian's chromium and chromium-driver, which `make test` installs when it runs as root)
driven by selenium. The first test uploads a PNG it draws, waits for the tags, adds zero-shot labels
from the keyboard, searches the catalogue and asks for more like a result, and checks what the
page shows against the library's own answers. The second one does it on a service with a bearer
token: the page asks for the token, and sends it on every call.

MUMIC_SCREENSHOT=PATH saves a screenshot of the page at the end (docs/page.png is one).
"""

import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
ZERO_SHOT = ("purple star", "7")  # a name like "7" is where a JSON object's key order differs from the answer's
QUERY = "a red circle"
K = 10  # the page's default number of results
TOKEN = "s3cret"


def _browser() -> tuple[str, str]:
    """(browser, driver) executables, or a skip with what is missing; a failure where a browser
    must be there (CI, or MUMIC_REQUIRE_BROWSER=1)."""
    binary = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    driver = shutil.which("chromedriver")
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (the pyproject `test` extra)")
    if not binary:
        missing.append("Chromium (Debian's chromium)")
    if not driver:
        missing.append("chromedriver (Debian's chromium-driver)")
    if missing:
        reason = (f"no browser for the page test: {', '.join(missing)} not installed; `make test` installs them "
                  "(the Debian packages only when run as root with apt-get)")
        if os.environ.get("CI") or os.environ.get("MUMIC_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    assert binary and driver
    return binary, driver


@pytest.fixture(scope="session")  # session: set up before the session-wide run, so a skip comes at once
def browser():
    binary, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1400",
                "--no-first-run", "--disable-extensions", "--disable-background-networking", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    yield drv
    drv.quit()


class ThreadServer:
    """The service's app on uvicorn (as `mumic serve` runs it) in a thread, on a loopback socket bound first."""

    def __init__(self, app) -> None:
        import uvicorn

        from mumic.serve import protocol_class

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=protocol_class(10.0), timeout_keep_alive=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def page_server(page_run, page_index):
    from mumic.serve import create_app

    # max_labels bounds the labels a request names (the run's own come on top): two zero-shot labels fit, a third does not;
    # the torch engine, as the library reference below
    app = create_app(page_run, page_index, device="cpu", engine="torch", max_labels=2, max_wait_ms=1.0)
    srv = ThreadServer(app)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def model(page_run):
    from mumic.predictor import Predictor

    return Predictor.from_run(page_run, device="cpu")


def drawn_image(path: Path) -> Path:
    """A PNG of a red circle and a blue square on white."""
    img = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((8, 8, 52, 52), fill=(215, 35, 35))
    draw.rectangle((56, 50, 88, 84), fill=(40, 70, 215))
    img.save(path)
    return path


class Page:
    """Waits on the page that say, when they time out, what the page showed and what the browser logged."""

    def __init__(self, drv, timeout: float = 30.0) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.drv = drv
        self.waiter = WebDriverWait(drv, timeout)

    def until(self, what: str, condition) -> None:
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.common.by import By

        try:
            self.waiter.until(condition)
        except TimeoutException:
            body = self.drv.find_element(By.TAG_NAME, "body").text
            raise AssertionError(f"the page never showed {what}; it shows:\n{body}\nbrowser log: {self.drv.get_log('browser')}") from None


def shown_tags(drv) -> list[dict]:
    """The tag rows as the page shows them: name, value text, decided, zero-shot, bar and mark positions."""
    return drv.execute_script("""
        return [...document.querySelectorAll('#tags li')].map((li) => ({
          name: li.dataset.label,
          text: li.querySelector('.tag-name').textContent,
          value: li.querySelector('.tag-value .p').textContent,
          decided: li.classList.contains('decided'),
          zeroShot: !!li.querySelector('.badge'),
          fill: li.querySelector('.fill').getBoundingClientRect().width / li.querySelector('.bar').getBoundingClientRect().width,
          mark: parseFloat(li.querySelector('.mark').style.left) / 100,
          meter: li.querySelector('.bar').getAttribute('aria-valuetext'),
        }));""")


def shown_hits(drv) -> list[dict]:
    return drv.execute_script("""
        return [...document.querySelectorAll('#gallery li')].map((li) => {
          const img = li.querySelector('img');
          return {id: Number(li.dataset.id), score: Number(li.dataset.score), text: li.querySelector('.score').textContent,
                  src: img.getAttribute('src'), loaded: img.complete && img.naturalWidth > 0,
                  alt: img.alt, more: li.querySelector('button.more').getAttribute('aria-label')};
        });""")


def check_tags(shown: list[dict], model, image: Path, names: list[str], run: Path, zero_shot: set[str]) -> None:
    """The page's tags against the library: predict_proba, decide, and the run's thresholds.json."""
    probs = model.predict_proba([image], labels=names)[0]
    decided = model.decide(probs[None], names)[0]
    saved = json.loads((run / "thresholds.json").read_text())
    assert [t["name"] for t in shown] == [names[j] for j in np.argsort(-probs, kind="stable")]  # highest first
    for t in shown:
        j = names.index(t["name"])
        p, th = float(probs[j]), float(saved["per_label"].get(t["name"], saved["default"]))
        assert t["value"] == f"{p:.3f}", t
        assert t["decided"] == bool(decided[j]), t  # highlighted exactly where the calibrated threshold decides
        assert t["zeroShot"] == (t["name"] in zero_shot), t
        assert t["fill"] == pytest.approx(p, abs=0.01) and t["mark"] == pytest.approx(th, abs=1e-4), t
        assert t["meter"].startswith(f"{p:.3f}, threshold {th:.3f}"), t


def test_the_page_tags_an_image_scores_zero_shot_labels_and_searches(browser, page_server, page_run, page_index, model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from mumic.search import Index

    drv = browser
    page = Page(drv)
    drv.get(page_server.url + "/")
    page.until("the run's description", lambda d: "labels" in d.find_element(By.ID, "run-info").text)
    assert drv.find_element(By.ID, "run-info").text == f"Run {page_run.name}: 8 labels, 32 px images, a catalogue of 40 images."
    assert drv.find_element(By.ID, "search").is_displayed()

    # pick a file: its tags, as the library scores them, decided at the run's thresholds
    image = drawn_image(tmp_path / "red-circle-blue-square.png")
    drv.find_element(By.ID, "file").send_keys(str(image))
    page.until("the image's 8 tags", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tags li")) == 8)
    names = [l.name for l in model.labels]
    check_tags(shown_tags(drv), model, image, names, page_run, set())
    assert drv.find_element(By.ID, "preview-name").text == image.name

    # zero-shot labels from the keyboard, scored with the others
    box = drv.find_element(By.ID, "zs-input")
    for n, label in enumerate(ZERO_SHOT, start=1):
        box.send_keys(label, Keys.ENTER)
        page.until(f"the tag of zero-shot label {label!r}", lambda d, n=n: len(d.find_elements(By.CSS_SELECTOR, "#tags li")) == 8 + n)
    check_tags(shown_tags(drv), model, image, names + list(ZERO_SHOT), page_run, set(ZERO_SHOT))
    chips = [c.text for c in drv.find_elements(By.CSS_SELECTOR, "#zs-list li span")]
    assert chips == list(ZERO_SHOT)

    # a third one is over the service's limit: the page shows the API's own message and drops the label
    box.send_keys("green star", Keys.ENTER)
    page.until("the API's error message", lambda d: d.find_element(By.ID, "tag-error").is_displayed())
    assert drv.find_element(By.ID, "tag-error").text == "3 labels asked for in labels and extra_labels; the limit is 2"
    assert [c.text for c in drv.find_elements(By.CSS_SELECTOR, "#zs-list li span")] == chips
    assert len(drv.find_elements(By.CSS_SELECTOR, "#tags li")) == 10  # the last good answer stays

    # a text search: the gallery is the index's nearest images, in order, each shown from /gallery/{row}
    index = Index.load(page_index)
    drv.find_element(By.ID, "search-input").send_keys(QUERY, Keys.ENTER)
    page.until("the gallery's results", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery li")) == K)
    drv.execute_script("document.getElementById('gallery').lastElementChild.scrollIntoView()")  # the images load lazily
    page.until("every gallery image loaded", lambda d: all(h["loaded"] for h in shown_hits(d)))
    scores, ids = index.search(model.embed_texts([QUERY]), K)
    hits = shown_hits(drv)
    assert sorted(h["id"] for h in hits) == sorted(ids[0].tolist())
    np.testing.assert_allclose([h["score"] for h in hits], scores[0], atol=1e-4)
    for h in hits:
        assert h["src"] == f"gallery/{h['id']}?thumb=true" and h["text"] == f"{h['score']:.3f}"
        assert h["alt"] == Path(index.items.iloc[h["id"]]["image"]).name and h["more"] == f"More like {h['alt']}"
    assert drv.find_element(By.ID, "search-status").text.startswith(f"{K} nearest catalogue images of \u201c{QUERY}\u201d")

    if os.environ.get("MUMIC_SCREENSHOT"):
        drv.save_screenshot(os.environ["MUMIC_SCREENSHOT"])

    # more like the third result: the catalogue image goes back to /search as it is, so it finds itself first
    third = hits[2]
    drv.find_elements(By.CSS_SELECTOR, "#gallery button.more")[2].send_keys(Keys.ENTER)  # from the keyboard
    more_status = f"{K} nearest catalogue images of {third['alt']}"
    page.until("the results of more like this", lambda d: d.find_element(By.ID, "search-status").text.startswith(more_status))
    again = shown_hits(drv)
    assert again[0]["id"] == third["id"] and again[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert not drv.find_element(By.ID, "search-error").is_displayed()

    # an image dropped on the zone is tagged like a picked one (dropped from within the page: WebDriver cannot drag files)
    drv.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('gallery/0').then((r) => r.blob()).then((b) => {
          const dt = new DataTransfer();
          dt.items.add(new File([b], 'dropped.png', {type: 'image/png'}));
          document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
          done();
        });""")
    page.until("the dropped image's tags", lambda d: d.find_element(By.ID, "tags").get_attribute("data-image") == "dropped.png")
    check_tags(shown_tags(drv), model, Path(index.items.iloc[0]["image"]), names + list(ZERO_SHOT), page_run, set(ZERO_SHOT))
    assert drv.find_element(By.ID, "preview-name").text == "dropped.png"
    assert not re.search(r"error|exception", drv.find_element(By.TAG_NAME, "body").text, re.I)
    refused = "/predict - Failed to load resource: the server responded with a status of 422"  # the second label, above
    errors = [e for e in drv.get_log("browser") if e["level"] == "SEVERE" and refused not in e["message"]]
    assert not errors, errors  # no script errors, no other failed loads


@pytest.fixture(scope="module")
def token_server(page_run, page_index):
    from mumic.serve import create_app
    from mumic.serve.exposure import Exposure

    app = create_app(page_run, page_index, device="cpu", engine="torch", exposure=Exposure(token=TOKEN), max_wait_ms=1.0)
    srv = ThreadServer(app)
    yield srv
    srv.stop()


def test_the_page_asks_for_the_access_token_and_sends_it_on_every_call(browser, token_server, page_run, page_index, model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from mumic.search import Index

    drv = browser
    page = Page(drv)
    drv.get(token_server.url + "/")  # another port, another origin: nothing kept from the test above
    page.until("the access token form", lambda d: d.find_element(By.ID, "token-form").is_displayed())
    assert drv.find_element(By.ID, "token-message").text == "this service needs `Authorization: Bearer TOKEN`"
    assert drv.find_element(By.ID, "run-info").text == "The service needs an access token."
    box = drv.find_element(By.ID, "token-input")
    assert box.get_attribute("type") == "password" and drv.switch_to.active_element == box  # focused, for the keyboard
    assert drv.find_element(By.CSS_SELECTOR, "label[for=token-input]").text == "Access token"

    box.send_keys("s3creT", Keys.ENTER)  # wrong: the API's refusal again
    wrong = "this service needs `Authorization: Bearer TOKEN`: the token given is wrong"
    page.until("the refusal of a wrong token", lambda d: d.find_element(By.ID, "token-message").text == wrong)
    assert drv.find_element(By.ID, "token-form").is_displayed()

    box.clear()
    box.send_keys(TOKEN, Keys.ENTER)
    page.until("the run's description", lambda d: d.find_element(By.ID, "run-info").text.startswith("Run "))
    assert drv.find_element(By.ID, "run-info").text == f"Run {page_run.name}: 8 labels, 32 px images, a catalogue of 40 images."
    assert not drv.find_element(By.ID, "token-form").is_displayed() and box.get_attribute("value") == ""
    kept = drv.execute_script("return [sessionStorage.getItem('mumic-token'), localStorage.length, location.href]")
    assert kept == [TOKEN, 0, token_server.url + "/"]  # this tab only, never in the URL

    image = drawn_image(tmp_path / "red-circle-blue-square.png")
    drv.find_element(By.ID, "file").send_keys(str(image))
    page.until("the image's 8 tags", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tags li")) == 8)
    check_tags(shown_tags(drv), model, image, [l.name for l in model.labels], page_run, set())

    # the thumbnails are fetched with the token and shown through blob: URLs
    drv.find_element(By.ID, "search-input").send_keys(QUERY, Keys.ENTER)
    page.until("the gallery's results", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery li")) == K)
    drv.execute_script("document.getElementById('gallery').lastElementChild.scrollIntoView()")
    page.until("every gallery image loaded", lambda d: all(h["loaded"] for h in shown_hits(d)))
    hits = shown_hits(drv)
    _, ids = Index.load(page_index).search(model.embed_texts([QUERY]), K)
    assert sorted(h["id"] for h in hits) == sorted(ids[0].tolist())
    assert all(h["src"].startswith("blob:") for h in hits), hits

    # more like the first one (its full image, fetched with the token): the old thumbnails' URLs are revoked
    drv.find_elements(By.CSS_SELECTOR, "#gallery button.more")[0].send_keys(Keys.ENTER)
    page.until("the results of more like this",
               lambda d: d.find_element(By.ID, "search-status").text.startswith(f"{K} nearest catalogue images of {hits[0]['alt']}"))
    page.until("every new gallery image loaded", lambda d: all(h["loaded"] for h in shown_hits(d)[:3]))
    again = shown_hits(drv)
    assert again[0]["id"] == hits[0]["id"] and again[0]["src"].startswith("blob:")
    assert not drv.find_element(By.ID, "search-error").is_displayed() and not drv.find_element(By.ID, "tag-error").is_displayed()
    refused = "Failed to load resource: the server responded with a status of 401"  # before the token, and the wrong one
    errors = [e for e in drv.get_log("browser") if e["level"] == "SEVERE" and refused not in e["message"]]
    assert not errors, errors
    loads = drv.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const load = (u) => new Promise((ok) => {
          const i = new Image(); i.onload = () => ok(true); i.onerror = () => ok(false); i.src = u;
        });
        Promise.all(arguments[0].map(load)).then(done);""", [h["src"] for h in hits + again[:3]])
    assert loads == [False] * K + [True] * 3  # the replaced gallery's URLs no longer load, the shown ones do
    assert [e["level"] for e in drv.get_log("browser")] == ["SEVERE"] * K  # those K failed loads only
