"""The HTTP side of the API process: a Starlette app served by uvicorn on the API's own event loop.

`create_app` assembles the routes (JSON API and event stream, readiness, the dashboard's pages
and its /static files; /metrics joins through `extra`); `HttpServer` binds RUN_API_HTTP_ADDR
(with SO_REUSEPORT when the API runs as several processes) and serves until stopped. uvicorn's
own signal handling is left out: the API process owns SIGTERM and stops this server in its
shutdown order.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from services.run_api.http import pages, routes
from services.run_api.http.gateway import Gateway

log = logging.getLogger(__name__)


def create_app(gateway: Gateway, ready: Callable[[], bool], extra: list[BaseRoute] | None = None) -> Starlette:
    """The ASGI app: /v1 JSON and events, /healthz (ready: the database answers), `extra` routes, the dashboard."""

    async def healthz(request: Request) -> Response:
        ok = ready()
        return JSONResponse({"status": "SERVING" if ok else "NOT_SERVING"}, status_code=200 if ok else 503)

    return Starlette(routes=[
        Route("/healthz", healthz), *routes.routes(gateway), *(extra or []), *pages.routes(gateway),
    ])


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

    def stop(self) -> None:
        """Stop accepting, let open requests finish (streams end when the API stops them)."""
        self.server.should_exit = True
