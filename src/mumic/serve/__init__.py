"""HTTP service over a trained run: label probabilities, embeddings, labels, search.

`create_app(run_dir)` builds a FastAPI app (OpenAPI at /openapi.json, read at /docs and
/redoc, pages served from the service itself: they work offline);
`mumic serve RUN` runs it on uvicorn. Endpoints:

    POST /predict        uploaded images -> label probabilities and calibrated decisions
    POST /embed/image    uploaded images -> normalised image embeddings
    POST /embed/text     texts (JSON or form) -> normalised text embeddings (image space)
    POST /search         a text or image query -> nearest indexed images (409 without --index)
    GET  /labels         the run's labels, seen / unseen, thresholds
    GET  /health         liveness and batching counters
    GET  /               a page over this API (tags, zero-shot labels, catalogue search)
    GET  /gallery/{row}  a catalogue image of the index, by its row (the page's gallery)

A model thread runs the image batches, a text thread the text work and a bulk thread the
text work of large requests (MicroBatcher). Image requests are queued and run together
(micro-batching: up to `max_batch_size` images; a batch waits for company until its first
request has been queued `max_wait_ms`), so concurrent clients share forward passes. `labels` means what it means in
`mumic predict --labels` and Predictor.predict_proba: score exactly these labels;
`extra_labels` adds labels to the run's. The run's class embeddings are computed once at
start; zero-shot labels are embedded on first use and kept in a bounded LRU cache.

The service reads only the bytes clients upload: it never opens a file or URL a client
names. Limits answer with JSON {"detail": ...}: 400 for a Host header it does not answer
for, 401 without the bearer token (when one is set), 403 for a cross-site POST from a web
page whose origin is not allowed, 408 for a body that does not arrive in time, 409 for
/search without an index, 413 for a body, image, pixel count or decoded size over its
limit or too many images, 415 for a wrong content type, 422 for an undecodable image or
invalid fields, 503 (with Retry-After) when the model queue or the memory for request
bodies is full. The host, token and origin checks (`exposure`) are middleware: they cover
every route.

Model work is admitted by its cost, images and text work on separate budgets: images
count one each (`max_pending_images`), texts (the prompts of new zero-shot labels,
/embed/text entries) one per `text_chars_per_image` characters (`max_pending_texts`); a
request's images are decoded before any of its labels is embedded, text work runs in
small jobs on a thread of its own at a lower CPU priority (image batches never wait
behind it, and on a busy CPU it yields to them and to the event loop) and takes at most
`text_share_pct` percent of that thread's time; the jobs of a request of more than one
job's worth (many new labels, many or long texts) run on the bulk thread instead, at the
lowest priority and on a budget of the same size of their own (so they never crowd out
or hold up a small query), and the queued work of a client that
hangs up is dropped. Decoding holds at most `max_decoded_bytes` per image (checked from
the header), `max_decoding_bytes` for all decodes at once, on at most `decode_threads`
threads, one kept for small images (`decoding.DecodeGate`); thumbnails decode on the
event loop, and a large decode runs in a worker process of its own (off the service's
GIL; a crash there fails that upload with 503) as background work and gives its
freed memory back to the system. What loading made is frozen out of the garbage collector while
serving (a full collection of it would stall the event loop), the model's onnxruntime
pools do not spin when idle, and a response goes out in one send.

Slow or abusive clients are bounded in time and memory: a connection must deliver each
request head within `header_timeout_s` (uvicorn itself never times out a request head),
an idle keep-alive connection is closed after `keep_alive_s`, a body must arrive within
`body_timeout_s`, and all request bodies held at once share `max_buffered_bytes`.

Modules: `limits` (Limits and the guards against slow or abusive clients), `exposure`
(allowed hosts, bearer token, cross-site requests, the columns /search shows), `batcher`
(the model thread), `decoding` (the decode gate and the allocator settings), `labels` (class embeddings and scoring), `schemas` (request and
response bodies), `bodies` (bodies read as JSON or form fields), `service` (the loaded run and the handling of requests), `app` (the
FastAPI routes), `page` (the page, its files in static/, and the gallery). Importing this
package stays cheap (no torch, FastAPI or Pillow): the CLI reads `Limits` while building its
--help; `create_app` loads the rest when called.
"""

from typing import Any

from mumic.errors import ServiceError, UploadError
from mumic.serve.batcher import MicroBatcher
from mumic.serve.labels import LabelBank
from mumic.serve.limits import BodyBudget, Limits, RequestGuard, protocol_class

__all__ = [
    "BodyBudget", "LabelBank", "Limits", "MicroBatcher", "RequestGuard", "ServiceError", "UploadError", "create_app",
    "protocol_class",
]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # FastAPI, torch and the model code load only here
        from mumic.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
