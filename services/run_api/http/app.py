"""The HTTP side of the API process: a Starlette app served by uvicorn on the API's own event loop.

`create_app` assembles the routes (JSON API and event stream, readiness, the dashboard's pages
and its /static files; /metrics joins through `extra`); `HttpServer` binds RUN_API_HTTP_ADDR
(with SO_REUSEPORT when the API runs as several processes) and serves until stopped. uvicorn's
own signal handling is left out: the API process owns SIGTERM and stops this server in its
shutdown order.

On a loopback address every request must name a loopback host in its `Host` header
(`allowed_hosts`, from `loopback_hosts`): a web page whose name an attacker points at 127.0.0.1
(DNS rebinding) would otherwise be this server's own origin to the browser.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from services.run_api.auth import is_loopback
from services.run_api.http import pages, routes
from services.run_api.http.gateway import Gateway

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def loopback_hosts(addr: str) -> list[str] | None:
    """The host names a request may send in `Host` to a server on `addr` (host:port) when it is a loopback
    address (localhost, 127.0.0.1, ::1 and the address's own host, any port); None (no check) otherwise."""
    host = addr.rpartition(":")[0].strip("[]")
    if not host or not is_loopback(addr):
        return None
    return list(dict.fromkeys([*LOOPBACK_NAMES, host.lower()]))


def host_name(header: str) -> str | None:
    """The host of a Host header (host, host:port, [v6]:port) lower-cased, None when malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1:]
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isascii() and rest[1:].isdigit())):
            return None
        return header[1:end]
    name, sep, port = header.partition(":")
    if sep and not (port.isascii() and port.isdigit()):
        return None
    return name or None


class HostCheck:
    """ASGI middleware: an HTTP request whose Host header names none of `allowed` is refused with 400
    (a request without Host, HTTP/1.0 and no browser, passes)."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = frozenset(h.lower().strip("[]") for h in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = dict(scope["headers"]).get(b"host")
            if raw is not None and host_name(raw.decode("latin-1")) not in self.allowed:
                body = json.dumps({"code": "INVALID_ARGUMENT", "message": (
                    "unknown Host: this server is on a loopback address and answers only to "
                    + ", ".join(sorted(self.allowed)))}).encode()
                await send({"type": "http.response.start", "status": 400, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def create_app(
    gateway: Gateway, ready: Callable[[], bool], extra: list[BaseRoute] | None = None,
    http_addr: str | None = None, allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The ASGI app: /v1 JSON and events, /healthz (ready: the database answers), `extra` routes, the dashboard.

    `http_addr`: the address the app is served on (RUN_API_HTTP_ADDR). On a loopback address every route
    accepts only a loopback Host (`loopback_hosts`: no DNS rebinding), and the dashboard's key cookie is
    not Secure (plain http to localhost); None: unknown, no Host check and a Secure cookie.
    `allowed_hosts`: the host names accepted in the Host header, in place of those `http_addr` implies."""
    if allowed_hosts is None and http_addr:
        allowed_hosts = loopback_hosts(http_addr)

    middleware = [] if allowed_hosts is None else [Middleware(HostCheck, allowed=list(allowed_hosts))]
    return Starlette(routes=[
        healthz_route(ready), *routes.routes(gateway), *(extra or []), *pages.routes(gateway, http_addr),
    ], middleware=middleware)


def healthz_route(ready: Callable[[], bool]) -> Route:
    """GET /healthz: 200 SERVING while `ready()`, else 503 NOT_SERVING (an HTTP readiness probe)."""

    async def healthz(request: Request) -> Response:
        ok = ready()
        return JSONResponse({"status": "SERVING" if ok else "NOT_SERVING"}, status_code=200 if ok else 503)

    return Route("/healthz", healthz)


def create_metrics_app(route: BaseRoute, ready: Callable[[], bool], addr: str) -> Starlette:
    """The app of RUN_API_METRICS_ADDR: /metrics (`route`) and /healthz, nothing else (an internal address
    for the scraper, so the dashboard's port need not expose every tenant's workflow names)."""

    allowed = loopback_hosts(addr)
    middleware = [] if allowed is None else [Middleware(HostCheck, allowed=allowed)]
    return Starlette(routes=[route, healthz_route(ready)], middleware=middleware)


def listen(addr: str, reuse_port: bool) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one); OSError when it cannot bind."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
        sock.listen(1024)
        sock.setblocking(False)
    except (OSError, ValueError):
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (the API process stops it)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """Serves `app` on `addr` until stop(); `port` is the bound port once started."""

    def __init__(self, app: Any, addr: str, reuse_port: bool = False, grace_seconds: float = 5.0) -> None:
        self.addr, self.reuse_port = addr, reuse_port
        config = uvicorn.Config(
            app, lifespan="off", access_log=False, log_config=None, log_level="warning",
            timeout_graceful_shutdown=max(1, int(grace_seconds)),
        )
        self.server = _Server(config)
        self.sock: socket.socket | None = None
        self.port = 0

    def bind(self) -> int:
        """Bind the address (OSError when it cannot); returns the port."""
        self.sock = listen(self.addr, self.reuse_port)
        self.port = int(self.sock.getsockname()[1])
        return self.port

    async def run(self) -> None:
        """Serve on the bound socket until stop()."""
        assert self.sock is not None, "bind() first"
        await self.server.serve(sockets=[self.sock])

    def close(self) -> None:
        """Let go of a bound socket that never served (start-up failed)."""
        if self.sock is not None:
            self.sock.close()

    def stop(self) -> None:
        """Stop accepting, let open requests finish (streams end when the API stops them)."""
        self.server.should_exit = True
