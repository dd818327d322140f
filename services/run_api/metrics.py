"""Prometheus metrics of one API process, served at GET /metrics on the HTTP port.

Each ApiServer has its own CollectorRegistry (never the global one), so several servers in one
process (tests) do not collide. What is counted where:

- `observe_call` / `observe_unary` / `observe_streamed` are called by the ErrorInterceptor (one place
  that sees every runs.v1 gRPC call, its final code, its request and its response): requests by
  method and code, runs started (StartRun/StartRuns responses, deduplicated ones left out), claims
  (for the pickup latency), and what a ReportRunEvents call recorded (outcome RECORDED only: refused,
  duplicate and stale events count nothing): run ends, step durations (the worker's occurred_at of
  step.started to step.succeeded/failed), cache hits by layer and misses by reason.
- `observe_reaped` is called by the reaper for the runs it ends.
- What needs the database (a run's workflow, status, next_attempt_at, started_at and finished_at)
  is noted as pending and resolved in batches by one primary-key query (`run_once`, every second
  from a supervised loop, and before each scrape), so no gRPC call waits on it.
- Queue depth, oldest due queued run and connected workers are read from the database at scrape
  time, at most once a second.

Counters are per process: with RUN_API_PROCESSES above 1 each scrape of the shared port reaches one
process (sum over processes needs each one scraped on a port of its own).

Calls served through the HTTP gateway are told to the same observer by the gateway (requests by
method and code, runs started). Not seen yet: runs the API itself cancels while QUEUED (CancelRun
records run.canceled in handlers.cancel_run; a repeated CancelRun answers the same row, so the
answer cannot tell); they are in GetStats and the database.
GET /metrics needs no key, like /healthz: keep the HTTP port internal or filter the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.run_api.store import queries as Q
from shared.events import EventType
from shared.gen.runs.v1 import worker_service_pb2

log = logging.getLogger(__name__)

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED"})
_RUN_ENDS = frozenset({EventType.RUN_COMPLETED, EventType.RUN_FAILED, EventType.RUN_CANCELED})
_STEP_ENDS = {EventType.STEP_SUCCEEDED: "SUCCEEDED", EventType.STEP_FAILED: "FAILED"}
RECORDED = worker_service_pb2.REPORT_OUTCOME_RECORDED

# Workflows remembered to report an empty queue as 0 (past it, a drained queue's series just ends).
MAX_WORKFLOW_SERIES = 10_000
# Buckets in seconds: from a hot queue's few milliseconds to runs of an hour.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 7200, 21600)


# Label values chosen by tenants (workflow and step names) are capped: past these many distinct values a
# new one is counted as "other", so no tenant can grow the series (and the scrape) without bound.
MAX_WORKFLOW_LABELS = 1_000
MAX_STEP_LABELS = 5_000  # distinct (workflow, step) pairs
CACHE_LAYERS = frozenset({"hot", "cold"})  # what a worker may name; anything else is "other"
OTHER = "other"


class LabelCap:
    """Admits up to `limit` distinct label values (tuples); the rest become OTHER."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[Any] = set()

    def __call__(self, value: Any) -> Any:
        if value in self.seen:
            return value
        if len(self.seen) < self.limit:
            self.seen.add(value)
            return value
        return (OTHER,) * len(value) if isinstance(value, tuple) else OTHER


@dataclass(frozen=True)
class MetricsConfig:
    """How often gauges are read and pending facts resolved, and how much may wait for resolution."""

    gauge_cache_seconds: float = 1.0
    resolve_interval_seconds: float = 1.0
    max_pending: int = 50_000  # past it new observations are dropped (and counted): nobody resolves them
    max_open_steps: int = 50_000  # step.started times kept to pair with their end
    resolve_batch: int = 5_000  # run ids per query

    def __post_init__(self) -> None:
        if self.gauge_cache_seconds < 0 or self.resolve_interval_seconds <= 0:
            raise ValueError("gauge_cache_seconds must be >= 0 and resolve_interval_seconds positive")
        if min(self.max_pending, self.max_open_steps, self.resolve_batch) < 1:
            raise ValueError("max_pending, max_open_steps and resolve_batch must be at least 1")


def _seconds(ts: Any) -> float | None:
    """A protobuf Timestamp as epoch seconds; None when unset."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return float(ts.seconds) + ts.nanos / 1e9


def _field(struct: Any, *path: str) -> str:
    """A string value at `path` in a google.protobuf.Struct ("" when absent or not a string)."""
    value: Any = None
    for name in path:
        fields = struct.fields if value is None else value.struct_value.fields
        if name not in fields:
            return ""
        value = fields[name]
    return str(value.string_value) if value is not None else ""


class _DatabaseGauges(Collector):
    """Queue depth per workflow, oldest due queued run per workflow, connected workers: from the last snapshot."""

    def __init__(self, metrics: ApiMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The families without reading anything (the registry asks when the collector is registered)."""
        return self._families(_Snapshot({}, 0, 0.0), {})

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return self._families(self.metrics.snapshot, self.metrics.reaper_counters(), self.metrics.outbox_counters())

    @staticmethod
    def _families(
        snap: _Snapshot, reaper: dict[str, int], outbox: dict[str, int] | None = None
    ) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        queued = GaugeMetricFamily("runs_queued", "Runs waiting in the queue (status QUEUED), by workflow.",
                                   labels=["workflow"])
        oldest = GaugeMetricFamily(
            "runs_queue_oldest_age_seconds",
            "Seconds the longest-waiting due queued run has waited since it became due (next_attempt_at), by workflow.",
            labels=["workflow"],
        )
        for workflow, (n, age) in sorted(snap.queued.items()):
            queued.add_metric([workflow], n)
            oldest.add_metric([workflow], age)
        yield queued
        yield oldest
        yield GaugeMetricFamily("runs_workers_connected", "Workers whose heartbeat lease is live.",
                                value=snap.workers)
        expiries = CounterMetricFamily(
            "runs_lease_expiries", "Runs whose lease expired, by what the reaper made of them "
            "(requeued, failed, canceled).", labels=["outcome"])
        for outcome in ("requeued", "failed", "canceled"):
            expiries.add_metric([outcome], reaper.get(outcome, 0))
        yield expiries
        cycles = CounterMetricFamily("runs_reaper_cycles", "Lease reaper cycles, by result (ok, failed).",
                                     labels=["result"])
        cycles.add_metric(["ok"], reaper.get("cycles_ok", 0))
        cycles.add_metric(["failed"], reaper.get("cycles_failed", 0))
        yield cycles
        outbox = outbox or {}
        yield GaugeMetricFamily("runs_outbox_active", "1 while this process is the one publishing run events to NATS "
                                "(RUNS_NATS_URL; one in the cluster), else 0.", value=outbox.get("active", 0))
        yield CounterMetricFamily("runs_outbox_published", "Run events this process published to NATS JetStream "
                                  "(acknowledged).", value=outbox.get("published", 0))
        if snap.outbox_lag is not None:
            yield GaugeMetricFamily(
                "runs_outbox_lag_seconds", "How long the oldest run event the NATS publisher has not published yet "
                "has waited (0 when it is caught up), read from the database: the same in every process.",
                value=snap.outbox_lag)
        yield CounterMetricFamily("runs_outbox_duplicates", "Published run events JetStream acknowledged as "
                                  "duplicates (sent again after a failure, within its duplicate window).",
                                  value=outbox.get("duplicates", 0))


@dataclass(frozen=True)
class _Snapshot:
    queued: dict[str, tuple[int, float]]
    workers: int
    at: float  # time.monotonic() of the read
    outbox_lag: float | None = None  # seconds the NATS publisher is behind (None: not publishing)


class ApiMetrics:
    """The metrics of one API process (its own registry); see the module docstring for who feeds what."""

    def __init__(
        self, engine: AsyncEngine, lease_seconds: float, config: MetricsConfig | None = None,
        reaper_counters: Callable[[], dict[str, int]] = dict, clock: Callable[[], datetime] | None = None,
        outbox_counters: Callable[[], dict[str, int]] = dict, outbox_checkpoint: str | None = None,
    ) -> None:
        self.engine, self.lease_seconds = engine, lease_seconds
        self.config = config or MetricsConfig()
        self.reaper_counters, self.outbox_counters = reaper_counters, outbox_counters
        self.outbox_checkpoint = outbox_checkpoint  # with RUNS_NATS_URL: the publisher's, for its lag
        self.clock = clock or (lambda: datetime.now(UTC))
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.grpc_requests = Counter("runs_grpc_requests", "runs.v1 gRPC calls, by method and final status code.",
                                     ["method", "code"], registry=r)
        self.runs_started = Counter("runs_runs_started", "Runs queued by StartRun/StartRuns (not deduplicated "
                                    "ones), by workflow.", ["workflow"], registry=r)
        self.runs_finished = Counter("runs_runs_finished", "Runs that ended, by workflow and status "
                                     "(SUCCEEDED, FAILED, CANCELED).", ["workflow", "status"], registry=r)
        self.pickup = Histogram("runs_pickup_latency_seconds", "From when a queued run was due (created or "
                                "requeued) to its claim, by workflow.", ["workflow"], buckets=LATENCY_BUCKETS,
                                registry=r)
        self.run_duration = Histogram("runs_run_duration_seconds", "From a run's first start to its end, by "
                                      "workflow and status.", ["workflow", "status"], buckets=DURATION_BUCKETS,
                                      registry=r)
        self.step_duration = Histogram("runs_step_duration_seconds", "One step try, step.started to "
                                       "step.succeeded/failed (the worker's clock), by workflow, step and status.",
                                       ["workflow", "step", "status"], buckets=DURATION_BUCKETS, registry=r)
        self.cache_hits = Counter("runs_cache_hits", "Steps skipped with a cached result, by cache layer (hot: "
                                  "Redis, cold: PostgreSQL).", ["layer"], registry=r)
        self.cache_misses = Counter("runs_cache_misses", "Cacheable steps that ran for want of a usable cached "
                                    "result, by reason.", ["reason"], registry=r)
        self.dropped = Counter("runs_metrics_dropped", "Observations dropped because too many waited for their "
                               "database facts.", registry=r)
        r.register(_DatabaseGauges(self))
        self.workflow_label = LabelCap(MAX_WORKFLOW_LABELS)
        self.step_label = LabelCap(MAX_STEP_LABELS)
        self.snapshot = _Snapshot({}, 0, float("-inf"))
        # Pending, to be resolved with the runs' database facts:
        self._pickups: list[tuple[str, int, float]] = []  # run id, attempt, claimed at (epoch seconds)
        self._ends: set[tuple[str, int]] = set()  # run id, attempt of a recorded run.completed/failed/canceled
        self._steps: list[tuple[str, str, str, float]] = []  # run id, step key, status, seconds
        self._open_steps: dict[tuple[str, str], float] = {}  # (run id, step key) -> step.started occurred_at
        self._resolving = asyncio.Lock()
        self._gauges = asyncio.Lock()
        self._workflows: set[str] = set()  # seen queued once: reported (as 0) after their queue drains
        self._failing: set[str] = set()  # reads failing now: logged once per outage, not every second

    # --- fed by the interceptor ------------------------------------------------------------------

    def observe_call(self, method: str, code: grpc.StatusCode) -> None:
        """One runs.v1 call ended with `code`."""
        self.grpc_requests.labels(method.rsplit("/", 1)[-1], code.name).inc()

    def observe_unary(self, method: str, request: Any, response: Any) -> None:
        """A unary call answered `response` (its effects are committed)."""
        name = method.rsplit("/", 1)[-1]
        if name == "StartRun":
            self._started([response])
        elif name == "StartRuns":
            self._started(response.responses)
        elif name == "ReportRunEvents":
            self._reported(request, response)

    def observe_streamed(self, method: str, request: Any, item: Any) -> None:
        """A server-streaming call sent `item`."""
        if method.endswith("/ClaimQueuedRuns") and len(item.runs):
            for run in item.runs:
                expires = _seconds(run.lease_expires_at)
                if expires is not None and self._room(1):
                    self._pickups.append((run.run_id, run.attempt, expires - self.lease_seconds))

    def observe_reaped(self, ended: Iterable[tuple[str, str, datetime | None, datetime]]) -> None:
        """Runs the reaper ended: (workflow, status, started_at, finished_at) each."""
        for workflow, status, started, finished in ended:
            self._finished(workflow, status, started, finished)

    # --- the observations ----------------------------------------------------------------------

    def _room(self, n: int) -> bool:
        if len(self._pickups) + len(self._ends) + len(self._steps) + n > self.config.max_pending:
            self.dropped.inc(n)
            return False
        return True

    def _started(self, responses: Iterable[Any]) -> None:
        for one in responses:
            if not one.deduplicated:
                self.runs_started.labels(self.workflow_label(one.run.workflow)).inc()

    def _reported(self, request: Any, response: Any) -> None:
        recorded = {r.event_id for r in response.results if r.outcome == RECORDED}
        for e in request.events:
            if e.event_id not in recorded:
                continue
            if e.type in _RUN_ENDS:
                if self._room(1):
                    self._ends.add((e.run_id, e.attempt))
            elif e.type == EventType.STEP_STARTED:
                step = _field(e.payload, "step_key")
                occurred = _seconds(e.occurred_at)
                if occurred is not None:
                    if len(self._open_steps) >= self.config.max_open_steps:
                        self._open_steps.pop(next(iter(self._open_steps)))  # the oldest never ended here
                    self._open_steps[(e.run_id, step)] = occurred
                # A cacheable step that runs carries its miss (or "refresh", a rebuild's rerun) in payload.cache.
                if reason := _field(e.payload, "cache", "reason"):
                    self.cache_misses.labels(reason).inc()
            elif e.type in _STEP_ENDS:
                began = self._open_steps.pop((e.run_id, _field(e.payload, "step_key")), None)
                ended = _seconds(e.occurred_at)
                if began is not None and ended is not None and self._room(1):
                    step = _field(e.payload, "step_key")
                    self._steps.append((e.run_id, step, _STEP_ENDS[e.type], max(ended - began, 0.0)))
            elif e.type == EventType.STEP_SKIPPED and _field(e.payload, "reason") == "cache_hit":
                layer = _field(e.payload, "cache", "layer")
                self.cache_hits.labels(layer if layer in CACHE_LAYERS else OTHER).inc()

    def _finished(self, workflow: str, status: str, started: datetime | None, finished: datetime | None) -> None:
        workflow = self.workflow_label(workflow)
        self.runs_finished.labels(workflow, status).inc()
        if started is not None and finished is not None:
            self.run_duration.labels(workflow, status).observe(max((finished - started).total_seconds(), 0.0))

    # --- resolving with the database -----------------------------------------------------------

    async def run_once(self) -> int:
        """Resolve what waits for database facts; returns how many observations were made."""
        async with self._resolving:
            pickups, ends, steps = self._pickups, self._ends, self._steps
            self._pickups, self._ends, self._steps = [], set(), []
            ids = sorted({p[0] for p in pickups} | {e[0] for e in ends} | {s[0] for s in steps})
            if not ids:
                return 0
            facts: dict[str, Any] = {}
            try:
                async with self.engine.connect() as conn:
                    size = self.config.resolve_batch
                    for i in range(0, len(ids), size):
                        rows = await conn.execute(Q.runs_metrics_facts, {"run_ids": ids[i : i + size]})
                        facts.update((row.run_id, row) for row in rows)
            except Exception as err:
                # Put them back for the next try (bounded: new observations are dropped past the cap).
                self._pickups, self._ends, self._steps = pickups + self._pickups, ends | self._ends, steps + self._steps
                self._failed("run facts", err)
                return 0
            self._recovered("run facts")
            made = 0
            for run_id, attempt, claimed_at in pickups:
                row = facts.get(run_id)
                # next_attempt_at is still the one the claim saw unless this attempt was requeued since (status
                # QUEUED, or a later attempt claimed it): then the sample is lost. next_attempt_at is stamped by
                # the database's clock, the claim by the API's: a negative difference (skew) counts as 0.
                if row is None or row.next_attempt_at is None:
                    continue
                if row.attempt == attempt and row.status != "QUEUED":
                    waited = max(claimed_at - row.next_attempt_at.timestamp(), 0.0)
                    self.pickup.labels(self.workflow_label(row.workflow)).observe(waited)
                    made += 1
            for run_id, attempt in ends:
                row = facts.get(run_id)
                if row is not None and row.status in TERMINAL and row.attempt == attempt:
                    self._finished(row.workflow, row.status, row.started_at, row.finished_at)
                    made += 1
            for run_id, step, status, seconds in steps:
                row = facts.get(run_id)
                if row is not None:
                    self.step_duration.labels(*self.step_label((row.workflow, step)), status).observe(seconds)
                    made += 1
            return made

    async def run(self, stop: asyncio.Event) -> None:
        """Resolve every interval until stopped (a failed read is retried next time)."""
        while not stop.is_set():
            await self.run_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.resolve_interval_seconds)

    async def refresh_gauges(self) -> None:
        """Read the database gauges unless the last read is younger than the cache time."""
        async with self._gauges:
            if time.monotonic() - self.snapshot.at < self.config.gauge_cache_seconds:
                return
            now = self.clock()
            try:
                async with self.engine.connect() as conn:
                    rows = (await conn.execute(Q.runs_queue_by_workflow, {"now": now})).all()
                    workers = int((await conn.execute(Q.workers_connected_all, {"now": now})).scalar_one())
                    lag = None
                    if self.outbox_checkpoint is not None:
                        found = (await conn.execute(Q.outbox_lag, {"name": self.outbox_checkpoint})).scalar()
                        lag = max(float(found), 0.0) if found is not None else 0.0
            except Exception as err:
                self._failed("queue gauges", err)
                return  # the last snapshot stays (the scrape still answers)
            self._recovered("queue gauges")
            queued: dict[str, tuple[int, float]] = {}
            for r in rows:  # workflows past the label cap add up under "other" (count summed, oldest kept)
                n, age = int(r.queued), max((now - r.oldest_due).total_seconds(), 0.0) if r.oldest_due else 0.0
                label = self.workflow_label(r.workflow)
                was_n, was_age = queued.get(label, (0, 0.0))
                queued[label] = (was_n + n, max(was_age, age))
            if len(self._workflows) < MAX_WORKFLOW_SERIES:
                self._workflows.update(queued)
            for workflow in self._workflows - queued.keys():
                queued[workflow] = (0, 0.0)
            self.snapshot = _Snapshot(queued, workers, time.monotonic(), lag)

    def _failed(self, what: str, err: BaseException) -> None:
        if what not in self._failing:
            self._failing.add(what)
            log.warning("metrics: cannot read the %s (%s); trying again at each scrape", what, type(err).__name__)

    def _recovered(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            log.info("metrics: the %s can be read again", what)

    async def scrape(self) -> bytes:
        """The text exposition, with pending facts resolved and gauges fresh."""
        await self.run_once()
        await self.refresh_gauges()
        return generate_latest(self.registry)

    def route(self) -> Route:
        """GET /metrics for the HTTP app."""

        async def metrics(request: Request) -> Response:
            return Response(await self.scrape(), media_type=CONTENT_TYPE_LATEST)

        return Route("/metrics", metrics, methods=["GET"])
