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

    p = sub.add_parser(
        "serve", help="serve a run over HTTP (predict, embed, labels, search)",
        description="Serve a run over HTTP with micro-batching; a page to try it at /, OpenAPI docs at /docs.",
    )
    d = Limits()
    p.add_argument("run", help="run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--index", help="index folder from `mumic index` (enables POST /search and the page's catalogue search)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    add_engine_option(p)
    p.add_argument("--no-batching", action="store_true", help="run each request alone (baseline for benchmarks)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help=f"images per model batch (default: {d.max_batch_size})")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help=f"how long a batch waits for more requests (default: {d.max_wait_ms:g})")
    p.add_argument("--max-images", type=int, default=d.max_images, help=f"images per request (default: {d.max_images})")
    p.add_argument("--max-labels", type=int, default=d.max_labels,
                   help=f"labels per request, labels and extra_labels together (default: {d.max_labels})")
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes, help=f"bytes per image (default: {d.max_image_bytes})")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, help=f"bytes per request (default: {d.max_request_bytes})")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help=f"pixels per image (default: {d.max_pixels})")
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
        "max_request_bytes": args.max_request_bytes, "max_pixels": args.max_pixels,
        "max_buffered_bytes": args.max_buffered_bytes, "header_timeout_s": args.header_timeout,
        "body_timeout_s": args.body_timeout, "keep_alive_s": args.keep_alive_timeout,
    }


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from mumic.errors import ConfigError
    from mumic.serve import create_app, protocol_class

    try:
        import uvicorn
    except ImportError:
        raise ConfigError("`mumic serve` needs uvicorn and fastapi: pip install fastapi uvicorn python-multipart") from None
    logging.getLogger().setLevel(getattr(logging, args.log_level.upper()))
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_connections < 1:
        raise ConfigError(f"--max-connections must be at least 1, got {args.max_connections}")
    if not _is_loopback(args.host):
        log.warning("binding %s: the service is reachable from other machines and has no authentication", args.host)
    app = create_app(args.run, index=args.index, device=args.device, engine=args.engine, **_limits(args))  # limits checked first
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, limit_concurrency=args.max_connections,
        http=protocol_class(args.header_timeout), timeout_keep_alive=args.keep_alive_timeout,
    )
    return 0
