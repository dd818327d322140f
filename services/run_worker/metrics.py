"""Prometheus metrics of one worker process, served on RUN_WORKER_METRICS_ADDR at /metrics.

A registry of its own per WorkerMetrics (never the global one). The HTTP server is prometheus_client's
(a daemon thread): scrapes only read the registry, so they never touch the worker's event loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Buckets in seconds: an instant tool's microseconds to a long shell step.
TOOL_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
REPORT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class WorkerMetrics:
    """The worker's metrics: runs held, tool durations, report latency, runs finished."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.runs_held = Gauge("runs_worker_runs_held", "Runs this worker holds (claimed, not yet ended).",
                               registry=r)
        self.runs_claimed = Counter("runs_worker_runs_claimed", "Runs this worker claimed.", registry=r)
        self.runs_finished = Counter("runs_worker_runs_finished", "Runs this worker stopped executing, by how "
                                     "(succeeded, failed, canceled, lost, released).", ["status"], registry=r)
        self.tool_duration = Histogram("runs_worker_tool_duration_seconds", "One tool call (one step try), by "
                                       "tool and result (ok, error).", ["tool", "result"], buckets=TOOL_BUCKETS,
                                       registry=r)
        self.report_latency = Histogram("runs_worker_report_latency_seconds", "ReportRunEvents calls, by gRPC "
                                        "status code.", ["code"], buckets=REPORT_BUCKETS, registry=r)
        self.report_events = Counter("runs_worker_reported_events", "Events sent in ReportRunEvents calls that "
                                     "were answered.", registry=r)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def hold(self, count: Callable[[], int]) -> None:
        """Read the runs held from `count` at each scrape."""
        self.runs_held.set_function(lambda: float(count()))

    def tool_done(self, tool: str, seconds: float, ok: bool) -> None:
        """A tool call ended after `seconds`."""
        self.tool_duration.labels(tool, "ok" if ok else "error").observe(seconds)

    def report_done(self, seconds: float, code: str, events: int) -> None:
        """A ReportRunEvents call ended with `code` after `seconds`."""
        self.report_latency.labels(code).observe(seconds)
        if code == "OK":
            self.report_events.inc(events)

    def serve(self, addr: str) -> int:
        """Serve /metrics on host:port (port 0: any free one) in a daemon thread; returns the port (OSError)."""
        host, _, port = addr.rpartition(":")
        self._server, self._thread = start_http_server(int(port), host.strip("[]") or "0.0.0.0",
                                                       registry=self.registry)
        bound = int(self._server.server_address[1])
        log.info("worker metrics on http://%s:%d/metrics", host.strip("[]") or "0.0.0.0", bound)
        return bound

    def close(self) -> None:
        """Stop serving; safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
