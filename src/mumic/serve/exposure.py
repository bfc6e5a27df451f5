"""Who may reach the service and what it shows: the Host names it answers for (DNS
rebinding), an optional bearer token, cross-site POSTs refused unless their origin is
allowed (CORS), and the index columns /search returns.

The two middlewares see every request before any route does (pages and routes added
later included). FastAPI-free: the CLI reads the defaults while building its --help.
"""

import dataclasses
import hmac
import os
import posixpath
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from mumic.errors import ConfigError
from mumic.serve.limits import drain_body, send_json

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""The Host names a service answers for by default: this machine's loopback names."""
TOKEN_ENV = "MUMIC_TOKEN"
"""The environment variable `mumic serve` reads its bearer token from (when --token is not given)."""
ANY = "*"
#: methods a browser may send cross-site without asking first, that change nothing here
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def host_name(value: str) -> str:
    """The host of a Host header or an allowed-host entry: lower case, without port,
    brackets or a trailing dot ('LocalHost:8000' -> 'localhost', '[::1]:80' -> '::1')."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        v = v[1:end] if end > 0 else v
    elif v.count(":") == 1:
        v = v.split(":", 1)[0]
    return v.rstrip(".")


@dataclasses.dataclass(frozen=True)
class Exposure:
    """Who may use the service, and what /search shows.

    allowed_hosts: the Host header names answered (others get 400, against DNS
      rebinding); "*" answers any (only behind a proxy that checks Host itself).
    token: when set, every request must carry `Authorization: Bearer TOKEN` (else 401),
      but a GET of the page's shell and its static files (AccessGuard's public_paths),
      which carry no data: the page asks for the token itself.
    cors_origins: web origins ("https://app.example.com") whose pages may call the
      service from a browser; none by default: no CORS headers, and a cross-site POST
      (a form on another site) is refused with 403. "*" allows every origin.
    expose_columns: the index's manifest columns /search returns besides rank, score, id
      and the image's name relative to the indexed folder (never a server path).
    """

    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    token: str | None = None
    cors_origins: tuple[str, ...] = ()
    expose_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        hosts = tuple(dict.fromkeys(host_name(h) for h in self.allowed_hosts))
        if not hosts or "" in hosts:
            raise ConfigError("--allowed-host needs a host name (e.g. localhost, 10.0.0.5, api.example.com) or '*'")
        object.__setattr__(self, "allowed_hosts", hosts)
        if self.token is not None and (not self.token.strip() or any(c.isspace() for c in self.token)):
            raise ConfigError(f"the bearer token (--token or {TOKEN_ENV}) must be non-empty and contain no spaces")
        for origin in self.cors_origins:
            parts = urlsplit(origin)
            if origin != ANY and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/")
                                  or parts.query or parts.fragment):
                raise ConfigError(f"--cors-origin {origin!r} is not an origin: give scheme://host[:port] "
                                  "(e.g. https://app.example.com), or '*'")
        object.__setattr__(self, "cors_origins", tuple(o.rstrip("/") for o in self.cors_origins))
        cols = tuple(c.strip() for c in self.expose_columns if c.strip())
        object.__setattr__(self, "expose_columns", tuple(dict.fromkeys(cols)))

    def host_allowed(self, header: str | None) -> bool:
        if ANY in self.allowed_hosts:
            return True
        return header is not None and host_name(header) in self.allowed_hosts

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """A browser's Origin: one of cors_origins, or the service's own (same origin)."""
        origin = origin.strip().rstrip("/")
        if ANY in self.cors_origins or origin in self.cors_origins:
            return True
        netloc = urlsplit(origin).netloc.lower()
        return bool(host) and netloc == (host or "").strip().lower()


def _headers(scope: dict) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _refuse(receive: Callable, send: Callable, status: int, detail: str, *, drain_bytes: int,
                  headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    await drain_body(receive, drain_bytes)
    await send_json(send, status, detail, headers)


class HostGuard:
    """ASGI middleware, outermost: answers only requests whose Host header names an
    allowed host (400 otherwise). A web page on another name that resolves to this
    machine (DNS rebinding) sends its own name as Host, so it cannot read the service."""

    def __init__(self, app: Any, *, exposure: Exposure, drain_bytes: int) -> None:
        self.app = app
        self.exposure = exposure
        self.drain_bytes = drain_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and not self.exposure.host_allowed(_headers(scope).get("host")):
            await _refuse(receive, send, 400, "this service does not answer for the host named in the Host header; "
                                              "start it with --allowed-host NAME for each name clients use", drain_bytes=self.drain_bytes)
            return
        await self.app(scope, receive, send)


class AccessGuard:
    """ASGI middleware, inside CORS: refuses a cross-site request that can change state or
    cost work (any method but GET/HEAD/OPTIONS from a page whose origin is not allowed:
    403), and, with a token, every request without `Authorization: Bearer TOKEN` (401
    with WWW-Authenticate; the token is compared in constant time). A CORS preflight
    (OPTIONS) carries no credentials and passes to the CORS middleware outside, and so does
    a GET of one of `public_paths` (exact paths: the page and its script, which hold
    no data and must load before the page can ask for the token)."""

    def __init__(self, app: Any, *, exposure: Exposure, drain_bytes: int, public_paths: Sequence[str] = ()) -> None:
        self.app = app
        self.exposure = exposure
        self.drain_bytes = drain_bytes
        self.public_paths = frozenset(public_paths)
        self._token = exposure.token.encode() if exposure.token else None

    def _cross_site(self, method: str, headers: dict[str, str]) -> bool:
        if method in _SAFE_METHODS:
            return False
        origin = headers.get("origin")
        if origin is not None:
            return not self.exposure.origin_allowed(origin, headers.get("host"))
        # no Origin: a browser still says where the request comes from; other clients say nothing
        return headers.get("sec-fetch-site", "").strip().lower() in ("cross-site", "same-site")

    def _authorized(self, headers: dict[str, str]) -> bool | None:
        """True with the right token, False with a wrong one, None without any."""
        scheme, _, given = headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        assert self._token is not None
        return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), self._token)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        method = scope["method"].upper()
        if self._cross_site(method, headers):
            await _refuse(receive, send, 403, "cross-site requests from web pages are refused; allow the page's origin "
                                              "with --cors-origin", drain_bytes=self.drain_bytes)
            return
        public = method == "GET" and scope.get("path") in self.public_paths
        if self._token is not None and method != "OPTIONS" and not public:
            ok = self._authorized(headers)
            if not ok:
                challenge = b'Bearer realm="mumic"' + (b', error="invalid_token"' if ok is False else b"")
                await _refuse(receive, send, 401, "this service needs `Authorization: Bearer TOKEN`"
                                                  + (": the token given is wrong" if ok is False else ""),
                              drain_bytes=self.drain_bytes, headers=[(b"www-authenticate", challenge)])
                return
        await self.app(scope, receive, send)


class SearchHits:
    """The records /search answers with: rank, score, id, `image` (the image's path
    relative to the folder that holds all indexed images: never an absolute server path)
    and the manifest columns in `expose` only."""

    def __init__(self, index: Any, expose: Sequence[str]) -> None:
        self.index = index
        columns = [str(c) for c in index.items.columns]
        unknown = [c for c in expose if c not in columns]
        if unknown:
            shown = ", ".join(c for c in columns if c != "image") or "none"
            raise ConfigError(f"--expose-columns: {', '.join(unknown)} not in the index {index.path}; its columns: {shown}")
        self.expose = [c for c in expose if c != "image"]  # the image is always shown, relative
        paths = [str(p) for p in index.items["image"]] if "image" in columns else []
        self._root = _common_folder(paths)

    def image_name(self, path: str) -> str:
        p = path.replace(os.sep, "/")
        if self._root is not None:
            return posixpath.relpath(p, self._root)
        return posixpath.basename(p)

    def records(self, scores: Any, ids: Any) -> list[dict[str, Any]]:
        from mumic.search import RESULT_FIELDS

        out = []
        for hit in self.index.results(scores, ids):
            keys = [f"manifest_{k}" if k in RESULT_FIELDS else k for k in self.expose]  # as Index.item names them
            item = {k: hit[k] for k in keys}
            image = hit.get("image")
            record = {"rank": hit["rank"], "score": hit["score"], "id": hit["id"],
                      "image": self.image_name(str(image)) if image is not None else str(hit["id"])}
            out.append({**item, **record})
        return out


def _common_folder(paths: list[str]) -> str | None:
    """The deepest folder holding every path (POSIX form), or None when there is none
    (no paths, or absolute and relative ones mixed)."""
    folders = {posixpath.dirname(p.replace(os.sep, "/")) for p in paths}
    if not folders:
        return None
    try:
        root = posixpath.commonpath(sorted(folders))
    except ValueError:
        return None
    return root or None
