"""The web page of `mumic serve`: `GET /` answers a small app over the API, `GET /static/NAME`
its script and style sheet, and `GET /gallery/{row}` one catalogue image of the index the
service was started with.

The page is plain HTML, CSS and JavaScript shipped in the package (mumic/serve/static/): no
CDN and no build step, so it works offline. It calls only the service's own API (/health,
/labels, /predict, /search), so it meets the same limits and shows the same error messages.

A gallery image is addressed by its row in the index (`id` in /search results), never by a
path or URL from the client: the service shows only images the index lists. The row is
checked to be a whole number within the index; the image is read from the path the index
recorded and answered as it is when it is a JPEG, PNG, GIF or WebP within the upload limits
(so that "more like this" can send it back to /search unchanged), otherwise re-encoded as a
JPEG at most GALLERY_SIDE pixels on a side. `?thumb=true` answers a small JPEG thumbnail
(THUMB_SIDE pixels on its longer side), kept in a bounded cache.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run time.

import functools
import io
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response

from mumic.errors import MumicError, ServiceError

log = logging.getLogger(__name__)

#: the page's files, served from the package (name -> content type)
STATIC_TYPES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8", "icon.svg": "image/svg+xml"}
#: formats a browser shows and /search accepts, answered as the file's own bytes
PASS_THROUGH = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
#: the page's shell and files: no data in them, so they load without the bearer token (the page then asks for it)
PUBLIC_PATHS = ("/", *(f"/static/{name}" for name in STATIC_TYPES))
THUMB_SIDE = 256
GALLERY_SIDE = 1024
THUMB_CACHE = 512
#: the page loads only its own files and talks only to its own service
PAGE_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
                                "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
IMAGE_HEADERS = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
GALLERY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {t: {} for t in sorted(set(PASS_THROUGH.values()))}, "description": "the image (or its thumbnail)"},
    404: {"description": "no such row in the index, or its image is missing or unreadable on the server"},
    409: {"description": "this service has no index (start it with --index)"},
}


def static_file(name: str) -> bytes:
    """A file of the page, from the installed package."""
    return resources.files("mumic.serve").joinpath("static").joinpath(name).read_bytes()


def encode_jpeg(img: Any, side: int, quality: int) -> bytes:
    """An RGB image shrunk to at most `side` pixels on its longer side, as JPEG bytes."""
    from PIL import Image

    img = img.copy()
    img.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def gallery_image(path: Path, *, thumb: bool, max_bytes: int, max_pixels: int) -> tuple[bytes, str]:
    """(bytes, content type) of a catalogue image: its own bytes where a browser shows them
    and they are within the upload limits, else a bounded JPEG. Raises MumicError (ImageError)
    for a missing or unreadable file."""
    from PIL import Image

    from mumic.data.images import load_image

    side = THUMB_SIDE if thumb else GALLERY_SIDE
    img = load_image(path, size_hint=side, max_pixels=max_pixels)  # checks the file and the pixel count first
    if not thumb and path.stat().st_size <= max_bytes:
        with Image.open(path) as raw:
            kind = PASS_THROUGH.get(str(raw.format))
        if kind:
            return path.read_bytes(), kind
    return encode_jpeg(img, side, 85 if thumb else 90), "image/jpeg"


def page_router(svc: Any) -> APIRouter:
    """The routes of the page over a Service (its index, its limits, its decoding slots)."""
    router = APIRouter()
    page = static_file("index.html")
    assets = {name: static_file(name) for name in STATIC_TYPES}
    lim = svc.limits

    @functools.lru_cache(maxsize=THUMB_CACHE)
    def thumbnail(row: int) -> tuple[bytes, str]:
        return gallery_image(image_path(row), thumb=True, max_bytes=lim.max_image_bytes, max_pixels=lim.max_pixels)

    def image_path(row: int) -> Path:
        return Path(str(svc.index.items.iloc[row]["image"]))

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> Any:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @router.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Any:
        if name not in assets:  # a fixed set of names: nothing else of the package or the disk is reachable
            raise ServiceError(404, f"no static file {name[:60]!r}; the page has {', '.join(sorted(assets))}")
        return Response(assets[name], media_type=STATIC_TYPES[name], headers=PAGE_HEADERS)

    @router.get("/gallery/{row}", response_class=Response, responses=GALLERY_RESPONSES,
                summary="A catalogue image of the index, by its row (`id` in /search results)")
    async def gallery(
        row: int = PathParam(ge=0, description="row of the index (`id` of a /search result)"),
        thumb: bool = Query(False, description=f"a JPEG thumbnail, at most {THUMB_SIDE} pixels on a side"),
    ) -> Any:
        svc.check_index()
        count = svc.index.count
        if row >= count:
            raise ServiceError(404, f"row {row} is not in the index: it has {count} rows, 0 to {count - 1}")
        try:
            async with svc.decodes.slot(svc.decodes.small_bytes):  # a catalogue file, drafted to thumbnail or limit size
                if thumb:
                    data, kind = await run_in_threadpool(thumbnail, row)
                else:
                    data, kind = await run_in_threadpool(
                        gallery_image, image_path(row), thumb=False, max_bytes=lim.max_image_bytes, max_pixels=lim.max_pixels)
        except (MumicError, OSError) as e:  # the server's file, not the client's request: logged in full, answered briefly
            log.warning("gallery row %d: %s", row, e)
            raise ServiceError(404, f"the image of row {row} is missing or unreadable on the server") from None
        return Response(data, media_type=kind, headers=IMAGE_HEADERS)

    return router
