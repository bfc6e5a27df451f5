"""Request and response bodies of the service, as its OpenAPI document shows them."""

# No `from __future__ import annotations` here: pydantic and FastAPI read these
# annotations at run time, and the request bodies' depend on the service limits.

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from mumic.serve.limits import Limits


class ErrorBody(BaseModel):
    detail: str | list[dict[str, Any]] = Field(description="what was wrong with the request")


class ImagePrediction(BaseModel):
    index: int = Field(description="position of the image in the request")
    filename: str | None = Field(None, description="the upload's file name, as sent")
    scores: dict[str, float] = Field(description="label -> probability, highest first (top_k of them if asked)")
    predicted: list[str] = Field(description="labels at or above their threshold, highest probability first "
                                             "(among the top_k scores if asked)")
    embedding: list[float] | None = Field(None, description="L2-normalised image embedding (return_embedding)")


class PredictResponse(BaseModel):
    labels: list[str] = Field(description="all labels scored, in order: `labels` (by default the run's), then `extra_labels`")
    thresholds: str = Field(description="'calibrated' (the run's per-label thresholds) or 'fixed-0.5'")
    results: list[ImagePrediction]


class EmbeddingsResponse(BaseModel):
    dim: int
    embeddings: list[list[float]] = Field(description="one L2-normalised row per input")
    filenames: list[str | None] | None = None


class LabelInfo(BaseModel):
    name: str
    seen: bool = Field(description="trained on (true) or zero-shot only (false)")
    scored: bool = Field(description="scored by /predict by default")
    threshold: float = Field(description="calibrated decision threshold")
    prompts: list[str] = Field(description="the texts whose embeddings are averaged into the class embedding")


class LabelsResponse(BaseModel):
    labels: list[LabelInfo]
    default_threshold: float = Field(description="threshold of labels without a calibrated one (zero-shot labels)")
    tau: float
    embed_dim: int
    backbone: str
    zero_shot: bool = Field(description="whether labels not in the run can be scored (false for a linear-head run)")


class HealthResponse(BaseModel):
    status: str
    version: str
    run: str
    labels: int
    image_size: int
    embed_dim: int
    index_items: int | None
    label_cache: int
    batching: dict[str, Any]
    decoding: dict[str, Any]


class SearchHit(BaseModel):
    model_config = ConfigDict(extra="allow")
    rank: int
    score: float = Field(description="cosine similarity")
    id: int = Field(description="row of the index")
    image: str


class SearchResponse(BaseModel):
    query: str = Field(description="'text' or 'image'")
    exact: bool
    results: list[SearchHit]


def texts_request(lim: Limits) -> type[BaseModel]:
    """The body of POST /embed/text (JSON, or form fields), bounded by the service limits."""

    class TextsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[Annotated[str, Field(max_length=lim.max_text_chars)]] = Field(
            min_length=1, max_length=lim.max_texts,
            description=f"texts to embed into the image space (at most {lim.max_texts}); a repeated field in a form",
        )

    return TextsRequest


def search_request(lim: Limits) -> type[BaseModel]:
    """The fields of POST /search (JSON, or form fields beside an optional `image` upload)."""

    class SearchRequest(BaseModel):
        text: str = Field("", max_length=lim.max_text_chars, description="query text (give text or image)")
        k: int = Field(10, ge=1, le=lim.max_k, description="number of results")
        exact: bool = Field(False, description="exact search over all vectors instead of the HNSW graph")

    return SearchRequest


#: the error answers every POST route documents
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody, "description": text} for code, text in (
    (400, "malformed body"), (408, "the body did not arrive in time"),
    (413, "body, image, pixel count or number of images over the limit"),
    (415, "wrong content type"), (422, "invalid field or undecodable image"),
    (503, "queue or request-body memory full, or shutting down"),
)}

#: /search adds: a service started without an index
SEARCH_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES, 409: {"model": ErrorBody, "description": "this service has no index (start it with --index)"},
}
