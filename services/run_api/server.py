"""The API process: gRPC server, health and reflection, and the supervised background loops.

Shutdown order is fixed: health NOT_SERVING, stop accepting (server.stop(grace)), stop loops
(the embedded worker first, so it finishes before the pool closes), then dispose the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.routing import BaseRoute

from services.run_api import db, registry
from services.run_api.artifacts import ArtifactStore
from services.run_api.auth import (
    Authenticator,
    KeyCache,
    ensure_bootstrap_key,
    is_loopback,
    resolve_mode,
)
from services.run_api.cache import CacheLayers
from services.run_api.handlers import RetryPolicy, utcnow
from services.run_api.http.app import HttpServer, create_app, create_metrics_app
from services.run_api.http.gateway import Gateway
from services.run_api.interceptors import ErrorInterceptor
from services.run_api.listener import Hub, Listener, ListenerConfig
from services.run_api.metrics import ApiMetrics
from services.run_api.reaper import Reaper, ReaperConfig
from services.run_api.reflection import enable_reflection
from services.run_api.servicers import (
    KeyService,
    OpsService,
    RunService,
    ServiceConfig,
    WorkerService,
    WorkflowService,
)
from services.run_api.store import queries as Q
from services.run_api.tls import TlsError, bind
from shared.gen.runs.v1 import (
    key_service_pb2,
    key_service_pb2_grpc,
    ops_service_pb2,
    ops_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from shared.settings import PROJECT_WORKFLOWS_DIR, ApiSettings, WorkerSettings

if TYPE_CHECKING:
    from services.run_api.outbox import OutboxPublisher  # nats-py is imported only when publishing

log = logging.getLogger(__name__)

# How long the embedded worker may take to give back its runs after its drain, before it is cut off.
EMBEDDED_RELEASE_SECONDS = 15.0

SERVICE_NAMES = (
    run_service_pb2.DESCRIPTOR.services_by_name["RunService"].full_name,
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    ops_service_pb2.DESCRIPTOR.services_by_name["OpsService"].full_name,
    key_service_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
    workflow_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name,
)
# A health service name of its own for the lease reaper: NOT_SERVING while its cycles fail (the
# API still serves; runs of dead workers are not being recovered meanwhile).
REAPER_HEALTH = "runs.v1.LeaseReaper"
# The largest request the API accepts: reports are sent in batches of at most 2 MiB by the stock
# worker and StartRun input is at most 256 KiB; anything larger is refused before it is decoded.
MAX_RECEIVE_BYTES = 4 * 1024 * 1024


class ListenError(RuntimeError):
    """The server cannot bind its address."""


@dataclass(frozen=True)
class HealthConfig:
    """How often the database is pinged for the health service."""

    interval_seconds: float = 1.0
    timeout_seconds: float = 2.0


class HealthMonitor:
    """Keeps grpc.health.v1 in step with the database: NOT_SERVING while it cannot be reached."""

    def __init__(self, engine: AsyncEngine, servicer: Any, config: HealthConfig) -> None:
        self.engine, self.servicer, self.config = engine, servicer, config
        self.serving: bool | None = None

    async def run_once(self) -> bool:
        """Ping the database once and publish the result; returns whether it answered."""
        try:
            async with asyncio.timeout(self.config.timeout_seconds), self.engine.connect() as conn:
                await conn.execute(Q.db_ping)
            ok = True
        except Exception:
            ok = False
        if ok != self.serving:
            log.log(logging.INFO if ok else logging.WARNING, "database %s", "reachable" if ok else "unreachable")
            await self.set(ok)
        return ok

    async def set(self, serving: bool) -> None:
        """Publish SERVING or NOT_SERVING for the server and each service."""
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            await self.servicer.set(name, status)

    async def run(self, stop: asyncio.Event) -> None:
        """Ping every interval until stopped."""
        while not stop.is_set():
            await self.run_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.interval_seconds)


class ApiServer:
    """One API process: build with settings and a database URL, then start() / wait() / stop().

    `reuse_port`: bind with SO_REUSEPORT, for one of RUN_API_PROCESSES processes sharing the port
    (the kernel spreads connections over them). Off otherwise, so that a port already taken is
    refused rather than shared with whoever holds it.
    """

    def __init__(self, settings: ApiSettings, database_url: str, reuse_port: bool = False) -> None:
        self.settings = settings
        self.database_url = database_url
        # AuthConfigError: refuse to start.
        self.auth_mode = resolve_mode(settings.auth, settings.addr, settings.http_addr)
        self.engine = db.make_engine(database_url, settings.db_pool_size)
        self.authenticator = Authenticator(
            self.engine, self.auth_mode, KeyCache(settings.auth_cache_seconds), clock=utcnow
        )
        self.hub = Hub()
        self.stopping = asyncio.Event()  # set at the start of shutdown: streams end, loops stop
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.monitor = HealthMonitor(self.engine, self.health, HealthConfig())
        self.listener = Listener(ListenerConfig(db.libpq_url(database_url)), self.hub)
        # Prometheus metrics of this process, in a registry of its own (GET /metrics on the HTTP side; with
        # no HTTP side nothing is observed, so nothing waits for the database facts nobody can scrape).
        self.metrics = ApiMetrics(
            self.engine, settings.lease_seconds, reaper_counters=lambda: dict(self.reaper.counters),
            outbox_counters=lambda: self.outbox.metrics() if self.outbox is not None else {},
        )
        observed = self.metrics if settings.http_addr or settings.metrics_addr else None
        self.reaper = Reaper(
            self.engine,
            ReaperConfig(interval_seconds=settings.reaper_interval_seconds, policy=settings.lease_policy),
            on_health=self._reaper_health,
            on_ended=observed.observe_reaped if observed is not None else None,
        )
        self.artifacts = ArtifactStore.from_settings(settings)
        self.cache = CacheLayers.from_settings(settings, self.artifacts)  # Redis in front of step_cache when set
        config = ServiceConfig(
            artifact_max_bytes=settings.artifact_max_bytes,
            lease_seconds=settings.lease_seconds,
            poll_seconds=settings.poll_ms / 1000,
            retry=RetryPolicy(
                max_attempts=settings.default_max_attempts,
                backoff_seconds=settings.retry_backoff_seconds,
                backoff_max_seconds=settings.retry_backoff_max_seconds,
            ),
        )
        self.server = grpc.aio.server(
            interceptors=[aio_server_interceptor(), ErrorInterceptor(self.authenticator.calling, observed)],
            options=[
                ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                # Find dead peers of long-lived streams, and accept the workers' keepalive pings.
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                ("grpc.http2.max_ping_strikes", 0),
            ],
        )
        # One servicer object per service, served by gRPC and by the HTTP gateway alike.
        self.servicers: dict[str, Any] = dict(zip(SERVICE_NAMES, (
            RunService(self.engine, self.hub, config, self.stopping, self.artifacts, self.cache),
            WorkerService(self.engine, self.hub, config, self.stopping, self.artifacts, self.cache),
            OpsService(self.engine, lambda: self.reaper.counters["failures"]),
            KeyService(self.engine),
            WorkflowService(self.engine),
        ), strict=True))
        for name, add in zip(SERVICE_NAMES, (
            run_service_pb2_grpc.add_RunServiceServicer_to_server,
            worker_service_pb2_grpc.add_WorkerServiceServicer_to_server,
            ops_service_pb2_grpc.add_OpsServiceServicer_to_server,
            key_service_pb2_grpc.add_KeyServiceServicer_to_server,
            workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server,
        ), strict=True):
            add(self.servicers[name], self.server)  # type: ignore[operator]
        # The HTTP side, and /metrics on an address of its own when RUN_API_METRICS_ADDR is set.
        self.http = self._http_server(reuse_port)
        self.http_servers: dict[str, tuple[HttpServer, str]] = {}  # variable -> (server, address)
        if self.http is not None:
            self.http_servers["RUN_API_HTTP_ADDR"] = (self.http, settings.http_addr)
        if settings.metrics_addr:
            metrics_app = create_metrics_app(self.metrics.route(), ready=self._ready, addr=settings.metrics_addr)
            self.http_servers["RUN_API_METRICS_ADDR"] = (
                HttpServer(metrics_app, settings.metrics_addr, reuse_port, settings.shutdown_grace_seconds),
                settings.metrics_addr,
            )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection((*SERVICE_NAMES, health.SERVICE_NAME), self.server)  # as v1alpha and v1
        self.port = 0
        self._loops_stop = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failed = asyncio.Event()
        self._stopped = False
        self._embedded_stop = asyncio.Event()
        self._embedded_task: asyncio.Task[None] | None = None
        self._embedded_drain_seconds = 0.0
        self.outbox: OutboxPublisher | None = None  # with RUNS_NATS_URL, from start()
        self._http_tasks: list[asyncio.Task[None]] = []

    def _http_server(self, reuse_port: bool) -> HttpServer | None:
        """The HTTP side on RUN_API_HTTP_ADDR (None when it is empty), over the same servicers."""
        if not self.settings.http_addr:
            return None
        gateway = Gateway(self.authenticator, self.servicers, self.metrics)
        extra: list[BaseRoute] = [] if self.settings.metrics_addr else [self.metrics.route()]
        app = create_app(gateway, ready=self._ready, extra=extra, http_addr=self.settings.http_addr)
        return HttpServer(app, self.settings.http_addr, reuse_port, self.settings.shutdown_grace_seconds)

    def _ready(self) -> bool:
        """Readiness of the HTTP side (/healthz): the database answers and no shutdown has begun."""
        return bool(self.monitor.serving) and not self._stopped

    def _http_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopped:
            return
        log.error("HTTP server ended unexpectedly; stopping the server", exc_info=task.exception())
        self._failed.set()

    async def _reaper_health(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(REAPER_HEALTH, status)

    def _embedded_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._embedded_stop.is_set():
            return
        log.error("embedded worker ended unexpectedly; stopping the server", exc_info=task.exception())
        self._failed.set()

    def _supervise(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        async def runner() -> None:
            try:
                await factory()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task %s died; stopping the server", name)
                self._failed.set()
                return
            if not self._loops_stop.is_set():
                log.error("background task %s ended unexpectedly; stopping the server", name)
                self._failed.set()

        self._tasks[name] = asyncio.create_task(runner(), name=name)

    async def start(self) -> int:
        """Bind, start serving, and start the background loops; returns the bound port."""
        await self.monitor.set(False)
        await self._reaper_health(True)
        if self.settings.bootstrap_admin_key:
            await ensure_bootstrap_key(self.engine, self.settings.bootstrap_admin_key)
        try:
            await registry.load_builtins(
                self.engine, self.settings.workflows_dir, required=self.settings.workflows_dir != PROJECT_WORKFLOWS_DIR
            )
        except RuntimeError:
            await self.engine.dispose()
            raise
        try:
            self.port = bind(self.server, self.settings)  # TLS when RUN_API_TLS_CERT/KEY are set
        except TlsError as err:
            await self.engine.dispose()
            raise ListenError(f"cannot listen on {self.settings.addr} with TLS: {err}") from None
        if self.port == 0:
            await self.engine.dispose()
            raise ListenError(f"cannot listen on {self.settings.addr}: is another process using it?")
        for variable, (http, addr) in self.http_servers.items():
            try:
                http.bind()
            except (OSError, ValueError):
                for bound, _ in self.http_servers.values():
                    bound.close()
                await self.engine.dispose()
                raise ListenError(f"cannot listen on {addr} ({variable}): is another process using it?") from None
        await self.server.start()
        for variable, (http, _) in self.http_servers.items():
            task = asyncio.create_task(http.run(), name=variable)
            task.add_done_callback(self._http_done)
            self._http_tasks.append(task)
        self._supervise("listener", lambda: self.listener.run(self._loops_stop))
        self._supervise("health", lambda: self.monitor.run(self._loops_stop))
        self._supervise("reaper", lambda: self.reaper.run(self._loops_stop))
        if self.http_servers:
            self._supervise("metrics", lambda: self.metrics.run(self._loops_stop))
        if self.settings.nats_url:
            from services.run_api.outbox import OutboxConfig, OutboxPublisher  # nats-py only when it is used

            outbox = OutboxPublisher(OutboxConfig(self.settings.nats_url, self.settings.nats_stream),
                                     db.libpq_url(self.database_url))
            self.outbox = outbox
            self.metrics.outbox_checkpoint = outbox.config.name  # its lag, read at scrape time
            self._supervise("outbox", lambda: outbox.run(self._loops_stop))  # one active across processes
        if self.settings.embedded_worker:
            from services.run_worker.embedded import EmbeddedWorker

            host = self.settings.addr.rsplit(":", 1)[0]
            worker_settings = WorkerSettings.from_env()
            embedded = EmbeddedWorker(
                WorkerSettings(
                    api_addr=f"{host}:{self.port}",
                    workspace_id=worker_settings.workspace_id,
                    concurrency=worker_settings.concurrency,
                    batch_limit=worker_settings.batch_limit,
                    poll_ms=self.settings.poll_ms,
                    heartbeat_seconds=worker_settings.heartbeat_seconds,
                    drain_seconds=worker_settings.drain_seconds,
                    tools=worker_settings.tools,
                    step_parallelism=worker_settings.step_parallelism,
                    workdir=worker_settings.workdir,
                    api_key=self.authenticator.embedded_secret if self.auth_mode == "required" else None,
                    tls=worker_settings.tls,
                ),
                self.hub,
            )
            self._embedded_drain_seconds = worker_settings.drain_seconds
            self._embedded_task = asyncio.create_task(embedded.run(self._embedded_stop), name="embedded-worker")
            self._embedded_task.add_done_callback(self._embedded_done)
        log.info("run API listening on %s", f"{self.settings.addr.rsplit(':', 1)[0]}:{self.port}")
        if self.http is not None:
            host = self.settings.http_addr.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
            log.info("dashboard on http://%s:%d/ (JSON under /v1, run events, %s/healthz)",
                     f"[{host}]" if ":" in host else host, self.http.port,
                     "" if self.settings.metrics_addr else "/metrics, ")
        if self.settings.metrics_addr:
            metrics_http, _ = self.http_servers["RUN_API_METRICS_ADDR"]
            host = self.settings.metrics_addr.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
            log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, metrics_http.port)
        exposed = [a for a in (self.settings.addr, self.settings.http_addr) if a and not is_loopback(a)]
        if self.auth_mode == "required":
            log.info("auth required: every call but health and reflection needs an API key")
            if self.settings.tls_cert is None and not is_loopback(self.settings.addr):
                log.warning("API keys travel in plaintext on %s: set RUN_API_TLS_CERT and RUN_API_TLS_KEY, or "
                            "terminate TLS in front of the API", self.settings.addr)
            if self.settings.http_addr and not is_loopback(self.settings.http_addr):
                log.info("the HTTP side on %s serves plain HTTP: put a TLS terminator in front of it, or keys "
                         "and the dashboard's cookie travel in plaintext", self.settings.http_addr)
        elif self.settings.auth == "off" and exposed:
            log.warning("auth is OFF on %s (RUNS_AUTH=off): anyone who reaches this address can start, cancel "
                        "and execute runs; set RUNS_AUTH=required", " and ".join(exposed))
        else:
            log.info("auth is off: the API listens on loopback only (set RUNS_AUTH=required to require keys)")
        return self.port

    async def wait(self, stop: asyncio.Event) -> None:
        """Return when `stop` is set or a background task died."""
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(self._failed.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    @property
    def failed(self) -> bool:
        """Whether a background task died."""
        return self._failed.is_set()

    async def stop(self) -> None:
        """Shut down in order; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        log.info("run API shutting down")
        await self.health.enter_graceful_shutdown()
        if self._embedded_task is not None:
            # The embedded worker finishes its cycle while the server and the pool still serve it.
            self._embedded_stop.set()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                # its drain (RUN_WORKER_DRAIN_SECONDS), then releasing what is left, then the grace period
                limit = self._embedded_drain_seconds + EMBEDDED_RELEASE_SECONDS + self.settings.shutdown_grace_seconds
                await asyncio.wait_for(self._embedded_task, limit)
        self.stopping.set()
        self.hub.wake_all()  # open streams notice `stopping` and end with UNAVAILABLE
        for http, _ in self.http_servers.values():
            http.stop()
        await self.server.stop(self.settings.shutdown_grace_seconds)
        if self._http_tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.gather(*self._http_tasks), self.settings.shutdown_grace_seconds + 5)
        self._loops_stop.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks.values(), timeout=self.settings.shutdown_grace_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.cache.close()
        await self.engine.dispose()
        log.info("run API stopped")
