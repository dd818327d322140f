"""Settings of both services: frozen dataclasses read from the environment, overridable by CLI flags.

Nothing is read at import time; `from_env(env)` is called by the entry points.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from ulid import ULID

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting has a bad value; the message names its variable."""


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _str(env, name, default).lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _path(env: Mapping[str, str], name: str) -> str | None:
    """An optional file path; a set but missing file fails at start, naming its variable."""
    value = env.get(name, "").strip()
    if not value:
        return None
    if not os.path.isfile(value):
        raise SettingsError(f"{name} names {value!r}, which is not a readable file")
    return value


# Tools every worker registers; `shell` runs commands on the worker's host, so it is opt-in.
STOCK_TOOLS = ("noop", "echo", "sleep", "fail", "shell")
DEFAULT_WORKER_TOOLS = ("noop", "echo", "sleep", "fail")
# The project's own workflows/ folder: the default RUNS_WORKFLOWS_DIR.
PROJECT_WORKFLOWS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
DEFAULT_ARTIFACT_MAX_BYTES = 64 * 1024 * 1024


def parse_tools(raw: str) -> tuple[str, ...]:
    """A comma-separated list of tool names (RUN_WORKER_TOOLS, --tools); ValueError names what is wrong.

    Only the form is checked here: the worker checks the names against its registry (the stock
    tools and the `runs.tools` entry points) when it starts.
    """
    tools = tuple(dict.fromkeys(t.strip() for t in raw.split(",") if t.strip()))
    # A name as an entry point may have it: letters, digits, '.', '_', '-'.
    bad = [t for t in tools if len(t) > 128 or not all(c.isascii() and (c.isalnum() or c in "._-") for c in t)]
    if not tools or bad:
        raise ValueError(
            f"must be a comma-separated list of tool names (stock tools: {', '.join(STOCK_TOOLS)}), got {raw!r}"
        )
    return tools


def _tools(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse_tools(raw)
    except ValueError as err:
        raise SettingsError(f"{name} {err}") from None


@dataclass(frozen=True)
class ClientTls:
    """TLS for a client of the API (CLI, worker): the CA to trust and an optional client certificate."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise SettingsError("RUNS_TLS_CERT and RUNS_TLS_KEY must be set together")

    @property
    def enabled(self) -> bool:
        """Whether the channel uses TLS."""
        return self.ca is not None or self.cert is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ClientTls:
        """Read RUNS_TLS_CA, RUNS_TLS_CERT and RUNS_TLS_KEY (files in PEM)."""
        return cls(ca=_path(env, "RUNS_TLS_CA"), cert=_path(env, "RUNS_TLS_CERT"), key=_path(env, "RUNS_TLS_KEY"))


def default_worker_id() -> str:
    """A worker id unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{str(ULID())[-6:].lower()}"


@dataclass(frozen=True)
class LogSettings:
    """How logs are written."""

    format: str = "console"
    level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> LogSettings:
        """Read LOG_FORMAT (console|json) and LOG_LEVEL."""
        return cls(
            format=_choice(env, "LOG_FORMAT", "console", ("console", "json")),
            level=_choice(env, "LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper(),
        )


DEFAULT_HTTP_ADDR = "127.0.0.1:8080"


def _check_listen_addr(variable: str, addr: str) -> None:
    """An optional listen address must be host:port with a port 0-65535 (empty: not served)."""
    if not addr:
        return
    _, sep, port = addr.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise SettingsError(f"{variable} must be host:port (a port 0-65535) or empty, got {addr!r}")


NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def _check_nats(url: str, stream: str) -> None:
    """RUNS_NATS_URL: "" (off) or comma-separated server URLs; RUNS_NATS_STREAM: a JetStream stream name."""
    for server in (s.strip() for s in url.split(",")) if url else ():
        scheme, sep, rest = server.partition("://")
        if not sep or scheme.lower() not in NATS_SCHEMES or not rest.strip("/"):
            raise SettingsError(
                f"RUNS_NATS_URL must be a NATS server URL such as nats://127.0.0.1:4222 (several: comma-separated; "
                f"schemes {', '.join(NATS_SCHEMES)}) or empty, got {server!r}"
            )
    if not stream or len(stream) > 255 or not all(c.isascii() and (c.isalnum() or c in "_-") for c in stream):
        raise SettingsError(
            f"RUNS_NATS_STREAM must be letters, digits, '_' or '-' (a JetStream stream name), got {stream!r}"
        )


@dataclass(frozen=True)
class ApiSettings:
    """Settings of the run API process."""

    addr: str = "127.0.0.1:50051"
    # The HTTP side (JSON, Server-Sent Events, dashboard, /metrics): host:port, "" for none. From the
    # environment it defaults to 127.0.0.1:8080; settings built in code (tests, tools) serve none.
    http_addr: str = ""
    # /metrics on an address of its own (host:port), and not on the HTTP side; "": on the HTTP side.
    metrics_addr: str = ""
    database_url: str | None = None
    data_dir: str = ".runs"
    migrate_on_start: bool = True
    db_pool_size: int = 10
    # API processes serving the one port (SO_REUSEPORT); 1: this process serves, no supervisor.
    processes: int = 1
    lease_seconds: float = 30.0
    reaper_interval_seconds: float = 1.0
    lease_policy: str = "requeue"
    poll_ms: int = 1000
    default_max_attempts: int = 3
    retry_backoff_seconds: float = 1.0
    retry_backoff_max_seconds: float = 60.0
    shutdown_grace_seconds: float = 5.0
    embedded_worker: bool = False
    # "required": every call but health and reflection needs a key; "off": no keys (loopback only,
    # unless set explicitly); "" (unset): off on a loopback address, refuse to start elsewhere.
    auth: str = ""
    bootstrap_admin_key: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_cache_seconds: float = 5.0
    # Workflow specs (*.yaml, *.yml, *.json) registered as built-ins at start; "" registers none.
    workflows_dir: str = PROJECT_WORKFLOWS_DIR
    # The artifact store, an fsspec URL; "" means <data_dir>/artifacts.
    artifacts_url: str = ""
    artifact_max_bytes: int = DEFAULT_ARTIFACT_MAX_BYTES
    # The step cache's hot layer (a Redis URL); None: the cache works from PostgreSQL alone.
    redis_url: str | None = None
    # Run events on NATS JetStream: the server URL(s), "" for off; the stream the publisher ensures.
    nats_url: str = ""
    nats_stream: str = "RUNS"
    log: LogSettings = field(default_factory=LogSettings)

    def __post_init__(self) -> None:
        if ":" not in self.addr:
            raise SettingsError(f"RUN_API_ADDR must be host:port, got {self.addr!r}")
        _check_listen_addr("RUN_API_HTTP_ADDR", self.http_addr)
        _check_listen_addr("RUN_API_METRICS_ADDR", self.metrics_addr)
        if self.auth not in ("", "required", "off"):
            raise SettingsError(f"RUNS_AUTH must be required or off, got {self.auth!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("RUN_API_TLS_CERT and RUN_API_TLS_KEY must be set together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingsError("RUN_API_TLS_CLIENT_CA needs RUN_API_TLS_CERT and RUN_API_TLS_KEY")
        if self.bootstrap_admin_key is not None and len(self.bootstrap_admin_key) < 24:
            raise SettingsError("RUNS_BOOTSTRAP_ADMIN_KEY must be at least 24 characters")
        if self.processes < 1:
            raise SettingsError(f"RUN_API_PROCESSES must be at least 1, got {self.processes}")
        if self.lease_seconds <= 0:
            raise SettingsError("RUN_LEASE_SECONDS must be positive")
        if self.default_max_attempts < 1:
            raise SettingsError("RUN_DEFAULT_MAX_ATTEMPTS must be at least 1")
        _check_nats(self.nats_url, self.nats_stream)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ApiSettings:
        """Read the API settings from environment variables (see README for the list)."""
        return cls(
            addr=_str(env, "RUN_API_ADDR", "127.0.0.1:50051"),
            http_addr=env.get("RUN_API_HTTP_ADDR", DEFAULT_HTTP_ADDR).strip(),
            metrics_addr=env.get("RUN_API_METRICS_ADDR", "").strip(),
            database_url=env.get("DATABASE_URL", "").strip() or None,
            data_dir=_str(env, "RUNS_DATA_DIR", ".runs"),
            migrate_on_start=_bool(env, "RUN_API_MIGRATE", True),
            db_pool_size=_int(env, "RUN_API_DB_POOL_SIZE", 10, minimum=2),
            processes=_int(env, "RUN_API_PROCESSES", 1, minimum=1),
            lease_seconds=_float(env, "RUN_LEASE_SECONDS", 30.0, minimum=0.1),
            reaper_interval_seconds=_float(env, "RUN_REAPER_INTERVAL_SECONDS", 1.0, minimum=0.05),
            lease_policy=_choice(env, "RUN_LEASE_POLICY", "requeue", ("requeue", "fail")),
            poll_ms=_int(env, "RUN_WORKER_POLL_MS", 1000, minimum=10),
            default_max_attempts=_int(env, "RUN_DEFAULT_MAX_ATTEMPTS", 3, minimum=1),
            retry_backoff_seconds=_float(env, "RUN_RETRY_BACKOFF_SECONDS", 1.0),
            retry_backoff_max_seconds=_float(env, "RUN_RETRY_BACKOFF_MAX_SECONDS", 60.0),
            shutdown_grace_seconds=_float(env, "RUN_API_SHUTDOWN_GRACE_SECONDS", 5.0),
            embedded_worker=_bool(env, "RUN_WORKER_EMBEDDED", False),
            auth=_choice(env, "RUNS_AUTH", "", ("", "required", "off")),
            bootstrap_admin_key=env.get("RUNS_BOOTSTRAP_ADMIN_KEY", "").strip() or None,
            tls_cert=_path(env, "RUN_API_TLS_CERT"),
            tls_key=_path(env, "RUN_API_TLS_KEY"),
            tls_client_ca=_path(env, "RUN_API_TLS_CLIENT_CA"),
            auth_cache_seconds=_float(env, "RUNS_AUTH_CACHE_SECONDS", 5.0),
            workflows_dir=env.get("RUNS_WORKFLOWS_DIR", PROJECT_WORKFLOWS_DIR).strip(),
            artifacts_url=env.get("RUNS_ARTIFACTS_URL", "").strip(),
            artifact_max_bytes=_int(env, "RUNS_ARTIFACT_MAX_BYTES", DEFAULT_ARTIFACT_MAX_BYTES, minimum=1),
            redis_url=env.get("REDIS_URL", "").strip() or None,
            nats_url=env.get("RUNS_NATS_URL", "").strip(),
            nats_stream=_str(env, "RUNS_NATS_STREAM", "RUNS"),
            log=LogSettings.from_env(env),
        )


@dataclass(frozen=True)
class WorkerSettings:
    """Settings of a worker process (and of the API's embedded worker)."""

    api_addr: str = "127.0.0.1:50051"
    worker_id: str = ""
    workspace_id: str = "default"
    concurrency: int = 10
    batch_limit: int = 10
    poll_ms: int = 1000
    heartbeat_seconds: float = 10.0
    drain_seconds: float = 30.0
    tools: tuple[str, ...] = DEFAULT_WORKER_TOOLS
    # Steps of one run executing at once.
    step_parallelism: int = 8
    # Where each step try gets its fresh working directory ("": the system's temporary folder).
    workdir: str = ""
    api_key: str | None = None
    tls: ClientTls = field(default_factory=ClientTls)
    log: LogSettings = field(default_factory=LogSettings)
    # host:port of the worker's own Prometheus /metrics ("": none).
    metrics_addr: str = ""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise SettingsError("RUN_WORKER_CONCURRENCY must be at least 1")
        _check_listen_addr("RUN_WORKER_METRICS_ADDR", self.metrics_addr)
        if self.batch_limit < 1:
            raise SettingsError("RUN_WORKER_BATCH_LIMIT must be at least 1")
        if self.step_parallelism < 1:
            raise SettingsError("RUN_WORKER_STEP_PARALLELISM must be at least 1")
        if not self.worker_id:
            object.__setattr__(self, "worker_id", default_worker_id())

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> WorkerSettings:
        """Read the worker settings from environment variables (see README for the list)."""
        lease = _float(env, "RUN_LEASE_SECONDS", 30.0, minimum=0.1)
        return cls(
            api_addr=_str(env, "RUN_API_ADDR", "127.0.0.1:50051"),
            worker_id=_str(env, "RUN_WORKER_ID", ""),
            workspace_id=_str(env, "RUN_WORKER_WORKSPACE_ID", "default"),
            concurrency=_int(env, "RUN_WORKER_CONCURRENCY", 10, minimum=1),
            batch_limit=_int(env, "RUN_WORKER_BATCH_LIMIT", 10, minimum=1),
            poll_ms=_int(env, "RUN_WORKER_POLL_MS", 1000, minimum=10),
            heartbeat_seconds=_float(env, "RUN_HEARTBEAT_SECONDS", lease / 3, minimum=0.05),
            drain_seconds=_float(env, "RUN_WORKER_DRAIN_SECONDS", 30.0),
            tools=_tools(env, "RUN_WORKER_TOOLS", DEFAULT_WORKER_TOOLS),
            step_parallelism=_int(env, "RUN_WORKER_STEP_PARALLELISM", 8, minimum=1),
            workdir=env.get("RUN_WORKER_WORKDIR", "").strip(),
            api_key=env.get("RUNS_API_KEY", "").strip() or None,
            tls=ClientTls.from_env(env),
            log=LogSettings.from_env(env),
            metrics_addr=env.get("RUN_WORKER_METRICS_ADDR", "").strip(),
        )
