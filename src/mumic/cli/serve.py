"""`mumic serve`: a run over HTTP."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import typing

from mumic.cli._options import add_engine_option

log = logging.getLogger("mumic.serve")


def register(sub: typing.Any) -> argparse.ArgumentParser:
    from mumic.serve import Limits
    from mumic.serve.exposure import LOOPBACK_HOSTS, TOKEN_ENV

    p = sub.add_parser(
        "serve", help="serve a run over HTTP (predict, embed, labels, search, and a web page at /)",
        description="Serve a run over HTTP with micro-batching; a page to try it at /, OpenAPI docs at /docs.",
    )
    d = Limits()
    p.add_argument("run", help="run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--index", help="index folder from `mumic index` (enables POST /search and the page's catalogue search)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help=f"a Host header name to answer for (repeatable); always: {', '.join(LOOPBACK_HOSTS)} and --host "
                        "unless it is 0.0.0.0 or ::; '*' answers any name (only behind a proxy that checks Host)")
    p.add_argument("--token", help=f"require `Authorization: Bearer TOKEN` on every request (default: ${TOKEN_ENV} if set; "
                                   "prefer the variable: a command line is visible to other users)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (https://app.example.com) whose pages may call the service (repeatable); "
                        "default: none, and cross-site POSTs from web pages are refused")
    p.add_argument("--expose-columns", default="", metavar="A,B",
                   help="index manifest columns that /search returns besides rank, score, id and the image's name "
                        "relative to the indexed folder (default: none)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    add_engine_option(p)
    p.add_argument("--no-batching", action="store_true", help="run each request alone (baseline for benchmarks)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help=f"images per model batch (default: {d.max_batch_size})")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long a request may wait in the queue for others to share its batch "
                        f"(default: {d.max_wait_ms:g})")
    p.add_argument("--max-images", type=int, default=d.max_images, help=f"images per request (default: {d.max_images})")
    p.add_argument("--max-labels", type=int, default=d.max_labels,
                   help=f"labels per request, labels and extra_labels together (default: {d.max_labels})")
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes, help=f"bytes per image (default: {d.max_image_bytes})")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, help=f"bytes per request (default: {d.max_request_bytes})")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help=f"pixels per image (default: {d.max_pixels})")
    p.add_argument("--max-decoded-bytes", type=int, default=d.max_decoded_bytes,
                   help="bytes an image may decode to (width x height x bytes per pixel of its mode: 4 for RGB or float, "
                        f"2 for 16-bit), checked before decoding (default: {d.max_decoded_bytes})")
    p.add_argument("--max-decoding-bytes", type=int, default=d.max_decoding_bytes,
                   help="decoded bytes of all the images decoding at once (a larger image decodes alone); a decode "
                        f"holds about 5 times its decoded bytes at its peak (default: {d.max_decoding_bytes})")
    p.add_argument("--decode-threads", type=int, default=None,
                   help="images decoded at once, all requests together; one is kept for small images, large ones "
                        "decode in worker processes (default: one per usable CPU)")
    p.add_argument("--model-threads", type=int, default=None,
                   help="threads an image batch runs on (onnxruntime's and torch's; default: one per usable CPU but one, "
                        "which is kept for the service's event loop)")
    p.add_argument("--max-pending", type=int, default=d.max_pending_images,
                   help=f"images queued for the model; beyond it 503 (default: {d.max_pending_images})")
    p.add_argument("--max-pending-texts", type=int, default=d.max_pending_texts,
                   help="text work queued for the model (new zero-shot labels' prompts, /embed/text), in images: a "
                        f"request's texts count 1 per started {d.text_chars_per_image} characters; beyond it 503 "
                        f"(default: {d.max_pending_texts})")
    p.add_argument("--max-connections", type=int, default=256, help="concurrent connections before answering 503 (default: 256)")
    p.add_argument("--max-buffered-bytes", type=int, default=d.max_buffered_bytes,
                   help="request-body bytes held in memory at once, all requests together; "
                        f"beyond it 503 (default: {d.max_buffered_bytes})")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help=f"seconds a connection has to send a complete request head (default: {d.header_timeout_s:g})")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help=f"seconds a request has to send its whole body, else 408 (default: {d.body_timeout_s:g})")
    p.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_s,
                   help=f"seconds an idle keep-alive connection stays open (default: {d.keep_alive_s:g})")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="how much the service logs (default: info)")
    p.set_defaults(func=run)
    return p


def _limits(args: argparse.Namespace) -> dict[str, typing.Any]:
    return {
        "batching": not args.no_batching, "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
        "max_images": args.max_images, "max_labels": args.max_labels, "max_image_bytes": args.max_image_bytes,
        "max_request_bytes": args.max_request_bytes, "max_pixels": args.max_pixels, "max_decoded_bytes": args.max_decoded_bytes,
        "max_decoding_bytes": args.max_decoding_bytes,
        "max_pending_images": args.max_pending, "max_pending_texts": args.max_pending_texts,
        **({"decode_threads": args.decode_threads} if args.decode_threads is not None else {}),
        **({"model_threads": args.model_threads} if args.model_threads is not None else {}),
        "max_buffered_bytes": args.max_buffered_bytes, "header_timeout_s": args.header_timeout,
        "body_timeout_s": args.body_timeout, "keep_alive_s": args.keep_alive_timeout,
    }


def _exposure(args: argparse.Namespace) -> typing.Any:
    """Exposure from the flags: loopback names, the bound host unless it is a wildcard
    address, --allowed-host; the token from --token or the environment."""
    import os

    from mumic.serve.exposure import LOOPBACK_HOSTS, TOKEN_ENV, Exposure

    hosts = list(LOOPBACK_HOSTS)
    if args.host not in ("0.0.0.0", "::", ""):
        hosts.append(args.host)
    hosts += args.allowed_host
    token = args.token if args.token is not None else (os.environ.get(TOKEN_ENV) or None)
    columns = tuple(c for c in args.expose_columns.split(",") if c.strip())
    return Exposure(allowed_hosts=tuple(hosts), token=token, cors_origins=tuple(args.cors_origin), expose_columns=columns)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from mumic.errors import ConfigError
    from mumic.serve import Limits, create_app, protocol_class

    try:
        import uvicorn
    except ImportError:
        raise ConfigError("`mumic serve` needs uvicorn and fastapi: pip install fastapi uvicorn python-multipart") from None
    logging.getLogger().setLevel(getattr(logging, args.log_level.upper()))
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_connections < 1:
        raise ConfigError(f"--max-connections must be at least 1, got {args.max_connections}")
    exposure = _exposure(args)  # checked before the model loads
    if not _is_loopback(args.host):
        if exposure.token is None:
            log.warning("binding %s: the service is reachable from other machines and has no authentication "
                        "(set MUMIC_TOKEN, and put it behind a TLS proxy: see the README)", args.host)
        if args.host in ("0.0.0.0", "::") and not args.allowed_host:
            log.warning("binding %s: only requests naming %s in their Host header are answered; add --allowed-host "
                        "for each name or address clients use", args.host, ", ".join(exposure.allowed_hosts))
    from mumic.serve.decoding import tune_malloc

    tune_malloc()  # before the model and the worker threads start
    limits = _limits(args)
    import torch

    # this process serves: torch's share of the CPU is the batches' (the limits are checked before the model loads)
    torch.set_num_threads(Limits.from_kwargs(**limits).model_threads)
    app = create_app(args.run, index=args.index, device=args.device, engine=args.engine, exposure=exposure, **limits)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, limit_concurrency=args.max_connections,
        http=protocol_class(args.header_timeout), timeout_keep_alive=args.keep_alive_timeout,
    )
    return 0
