"""The FastAPI app: routes, error answers and the request guard over a Service."""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at
# run time, and their defaults and body models depend on the service limits.

import contextlib
import gc
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

import mumic
from mumic.errors import MumicError, ServiceError, UploadError
from mumic.serve import schemas
from mumic.serve.bodies import parsed_body, request_body
from mumic.serve.exposure import AccessGuard, Exposure, HostGuard
from mumic.serve.limits import JSON_TYPE, MULTIPART, URLENCODED, BodyBudget, Limits, RequestGuard
from mumic.serve.page import PUBLIC_PATHS, page_router
from mumic.serve.schemas import ERROR_RESPONSES, SEARCH_RESPONSES
from mumic.serve.service import Service


def create_app(run_dir: str | Path, index: str | Path | None = None, *, device: str = "auto", engine: str = "auto",
               exposure: Exposure | None = None, **limits: Any) -> Any:
    """The FastAPI app serving `run_dir` (and the index folder `index`, for /search).
    `engine` runs the image tower (see Predictor.set_engine: onnxruntime on CPUs by default).

    `exposure` says who may use it (allowed Host names, a bearer token, CORS origins) and
    which index columns /search shows; by default: loopback names only, no token, no
    CORS, no manifest columns. `limits` are the fields of Limits (sizes, counts,
    batching). The model, the run's class embeddings and the index are loaded here, so a
    bad run or index fails before serving. The documentation pages (/docs, /redoc) load
    their scripts from the service itself, so they work offline.
    """
    lim = Limits.from_kwargs(**limits)
    exposure = exposure or Exposure()
    svc = Service(run_dir, index, device=device, engine=engine, limits=lim, expose_columns=exposure.expose_columns)
    # FastAPI with /docs and /redoc served from the package's own copy of Swagger UI and ReDoc
    app: FastAPI = FastAPIOffline(
        title="mumic",
        version=mumic.__version__,
        summary="Multi-label image classification with image-text embeddings (MuMIC)",
        description=(
            f"Run `{Path(run_dir).name}`: {len(svc.bank.run_names)} labels, {svc.size} px images, {svc.dim}-d embeddings. "
            f"Limits: {lim.max_images} images and {lim.max_labels} labels per request, "
            f"{lim.max_image_bytes:,} bytes per image, {lim.max_pixels:,} pixels per image, "
            f"{lim.max_decoded_bytes:,} decoded bytes per image, "
            f"{lim.max_request_bytes:,} bytes per request."
        ),
        lifespan=_lifespan(svc),
    )
    app.state.service = svc
    app.state.batcher = svc.batcher
    app.state.model = svc.model
    app.state.limits = lim
    app.state.body_budget = body_budget = BodyBudget(max(lim.max_buffered_bytes, lim.max_request_bytes))
    _add_error_handlers(app)
    _add_image_routes(app, svc)
    _add_text_route(app, svc)
    _add_info_routes(app, svc)
    _add_search_route(app, svc)
    app.include_router(page_router(svc))  # GET /: the page, its files, and /gallery/{row}
    fields = (JSON_TYPE, MULTIPART, URLENCODED)
    content_types = {"/predict": (MULTIPART,), "/embed/image": (MULTIPART,), "/embed/text": fields, "/search": fields}
    # middleware, innermost first (each one added wraps the ones before); every route is
    # behind all of them, pages and routes added later included:
    # HostGuard -> CORS (only when origins are allowed) -> AccessGuard -> RequestGuard -> routes
    app.add_middleware(RequestGuard, max_bytes=lim.max_request_bytes, content_types=content_types, budget=body_budget,
                       body_timeout_s=lim.body_timeout_s, busy={"/embed/text": svc.texts_busy},
                       max_parts=_max_parts(lim))
    drain = 4 * lim.max_request_bytes
    app.add_middleware(AccessGuard, exposure=exposure, drain_bytes=drain, public_paths=PUBLIC_PATHS)
    if exposure.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(exposure.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], max_age=600)
    app.add_middleware(HostGuard, exposure=exposure, drain_bytes=drain)
    app.state.exposure = exposure
    return app


def _max_parts(lim: Limits) -> dict[str, int]:
    """The most parts a multipart body of each route may have: its images, its labels (as
    many again for a label in both fields, or an empty entry) or texts, its other fields,
    and a few to spare. A body with more is refused before its parts are parsed."""
    spare = 8
    return {"/predict": lim.max_images + 2 * lim.max_labels + 3 + spare, "/embed/image": lim.max_images + spare,
            "/embed/text": lim.max_texts + spare, "/search": 4 + spare}


def _lifespan(svc: Service) -> Any:
    """Serving starts with what loading made (the model, torch's and the web stack's
    modules: some 200,000 objects) moved out of the collector's sight (gc.freeze): a full
    collection would scan them all, on the event loop, stalling every request for 100 ms
    or more each time, and they live as long as the service anyway."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            svc.close()
            gc.unfreeze()

    return lifespan


# ----------------------------------------------------------------------------- errors


def _json_error(status: int, detail: Any, headers: dict[str, str] | None = None) -> Any:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _service_error(request: Request, exc: ServiceError) -> Any:
    return _json_error(exc.status, str(exc), exc.headers)


async def _upload_error(request: Request, exc: UploadError) -> Any:
    return _json_error(exc.status, str(exc))


async def _mumic_error(request: Request, exc: MumicError) -> Any:
    return _json_error(422, str(exc))


async def _validation_error(request: Request, exc: RequestValidationError) -> Any:
    # the location and reason only: client input is not echoed back
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in exc.errors()]
    return _json_error(422, detail)


def _add_error_handlers(app: Any) -> None:
    """Every refusal answers JSON {"detail": ...}."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(UploadError, _upload_error)
    app.add_exception_handler(MumicError, _mumic_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


# ----------------------------------------------------------------------------- routes


def _add_image_routes(app: Any, svc: Service) -> None:
    lim = svc.limits

    @app.post("/predict", response_model=schemas.PredictResponse, responses=ERROR_RESPONSES,
              summary="Label probabilities of uploaded images")
    async def predict(
        request: Request,
        images: list[UploadFile] = File(description=f"image files (JPEG, PNG, GIF, BMP, WebP, TIFF), at most {lim.max_images}"),
        labels: list[str] | None = Form(None, description=(
            "score exactly these labels, in this order (repeated field; by default the run's labels): names in the run "
            "use its trained class embeddings and thresholds, other names are zero-shot, from the prompt templates; "
            "as `mumic predict --labels` and Predictor.predict_proba(labels=...); empty entries are ignored")),
        extra_labels: list[str] | None = Form(None, description=(
            "labels to score after `labels` (or after the run's labels when `labels` is not given), repeated field: "
            "the way to add zero-shot labels to the run's; empty entries are ignored")),
        top_k: int | None = Form(None, ge=1, description="keep the k highest scores per image; `predicted` lists only the decided "
                                                          "labels among them"),
        apply_thresholds: bool = Form(True, description="decide with the run's calibrated thresholds (false: at 0.5)"),
        return_embedding: bool = Form(False, description="also return each image's normalised embedding"),
    ) -> Any:
        return await svc.predict(images, labels, extra_labels, top_k, apply_thresholds, return_embedding, request.receive)

    @app.post("/embed/image", response_model=schemas.EmbeddingsResponse, responses=ERROR_RESPONSES,
              summary="Normalised embeddings of uploaded images")
    async def embed_image(
        request: Request,
        images: list[UploadFile] = File(description=f"image files, at most {lim.max_images}"),
    ) -> Any:
        return await svc.embed_images(images, request.receive)


def _add_text_route(app: Any, svc: Service) -> None:
    TextsRequest = schemas.texts_request(svc.limits)

    @app.post("/embed/text", response_model=schemas.EmbeddingsResponse, responses=ERROR_RESPONSES,
              summary="Normalised embeddings of texts, in the image space",
              openapi_extra=request_body(TextsRequest, description='JSON {"texts": [...]}, or a form with a repeated `texts` field'))
    async def embed_text(request: Request) -> Any:
        async with parsed_body(request, TextsRequest) as (body, _):
            return await svc.embed_texts(body.texts, request.receive)


def _add_info_routes(app: Any, svc: Service) -> None:
    @app.get("/labels", response_model=schemas.LabelsResponse, summary="The run's labels, seen / unseen, and thresholds")
    async def labels_info() -> Any:
        return svc.labels_info()

    @app.get("/health", response_model=schemas.HealthResponse, summary="Liveness and batching counters")
    async def health() -> Any:
        return svc.health()


def _add_search_route(app: Any, svc: Service) -> None:
    SearchRequest = schemas.search_request(svc.limits)
    body_doc = request_body(SearchRequest, files={"image": "query image (give text or image), multipart only"},
                            description='JSON {"text": ..., "k": ..., "exact": ...}, or form fields; an image query is a multipart upload')

    @app.post("/search", response_model=schemas.SearchResponse, responses=SEARCH_RESPONSES,
              summary="Nearest indexed images of a text or an image (a service started with --index)", openapi_extra=body_doc)
    async def search(request: Request) -> Any:
        svc.check_index()
        async with parsed_body(request, SearchRequest, files=("image",)) as (body, uploads):
            return await svc.search(body.text, uploads.get("image"), body.k, body.exact, request.receive)
