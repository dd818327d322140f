"""Batches the events of every run a worker executes into few ReportRunEvents calls.

Runs hand their events to `report()` and await the result; one sender task sends whatever has
accumulated in one call (one database transaction), so under load batches grow by themselves.
Reports are retried while the API is unreachable: they are idempotent by event_id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from ulid import ULID

from shared.gen.runs.v1 import worker_service_pb2, worker_service_pb2_grpc

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class StaleAttempt(Exception):
    """The API refused a report: this attempt is no longer current. Stop working on the run."""


class ReportRefused(Exception):
    """The API refused a report outright (bad or oversized event, not this worker's run); nothing was recorded."""

    def __init__(self, reason: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(reason)
        self.code = code

    @property
    def not_ours(self) -> bool:
        """The refusal is about who we are (session or key), not about the events: the run is not ours to end."""
        return self.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


class ReporterClosed(Exception):
    """The reporter stopped before the events could be sent."""


@dataclass(frozen=True)
class ReporterConfig:
    """Batch size, call deadline and retry backoff."""

    max_batch: int = 1000
    max_batch_bytes: int = 2 * 1024 * 1024
    max_in_flight: int = 4
    call_timeout_seconds: float = 10.0
    retry_min_seconds: float = 0.05
    retry_max_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_in_flight < 1 or self.call_timeout_seconds <= 0:
            raise ValueError("max_batch, max_in_flight and call_timeout_seconds must be positive")


def make_event(run_id: str, attempt: int, type_: str, payload: dict[str, Any] | None = None) -> Any:
    """A ReportedEvent with a fresh event id and the worker's clock."""
    event = worker_service_pb2.ReportedEvent(run_id=run_id, attempt=attempt, event_id=str(ULID()), type=type_)
    event.occurred_at.FromDatetime(datetime.now(UTC))
    if payload:
        event.payload.update(payload)
    return event


def restamp(event: Any, attempt: int) -> Any:
    """The same event under another attempt, with a fresh event id."""
    out = worker_service_pb2.ReportedEvent()
    out.CopyFrom(event)
    out.attempt = attempt
    out.event_id = str(ULID())
    return out


def _size(events: list[Any]) -> int:
    """The events' encoded size; 0 for events protobuf cannot encode (their send is then refused)."""
    try:
        return sum(e.ByteSize() for e in events)
    except Exception:
        return 0


class Reporter:
    """The worker's single path to ReportRunEvents."""

    def __init__(
        self, stub: worker_service_pb2_grpc.WorkerServiceStub, worker_id: str, config: ReporterConfig | None = None
    ) -> None:
        self.stub = stub
        self.worker_id = worker_id
        self.session_token = ""  # set from the claim stream's first message
        self.config = config or ReporterConfig()
        # Told of each ReportRunEvents call: (seconds, status code name, events sent); the worker's metrics.
        self.on_call: Callable[[float, str, int], None] | None = None
        self._pending: list[tuple[list[Any], asyncio.Future[list[Any]]]] = []
        self._wakeup = asyncio.Event()
        self._closed = False

    async def report(self, events: list[Any]) -> list[Any]:
        """Send `events` (ReportedEvent messages); returns their ReportResults, raises StaleAttempt."""
        if self._closed:
            raise ReporterClosed("reporter is closed")
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((events, future))
        self._wakeup.set()
        results = await future
        stale = [r for r in results if r.outcome == worker_service_pb2.REPORT_OUTCOME_STALE]
        if stale:
            raise StaleAttempt(stale[0].message)
        return results

    async def run(self, stop: asyncio.Event) -> None:
        """Send batches until `stop` is set and nothing is pending.

        Up to `max_in_flight` calls run at once. Two of them may carry events of one run (its steps
        report concurrently), never two of one step: each step awaits its report before the next, and
        the orchestrator sends run.completed only once no other report of the run can overtake it.
        """
        slots = asyncio.Semaphore(self.config.max_in_flight)
        sending: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            sending.discard(task)
            slots.release()

        while True:
            if not self._pending:
                if stop.is_set():
                    break
                self._wakeup.clear()
                waiter = asyncio.create_task(self._wakeup.wait())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                continue
            await slots.acquire()
            batch: list[tuple[list[Any], asyncio.Future[list[Any]]]] = []
            count = size = 0
            while self._pending:
                events = self._pending[0][0]
                more = _size(events)
                if batch and (count + len(events) > self.config.max_batch or size + more > self.config.max_batch_bytes):
                    break
                batch.append(self._pending.pop(0))
                count, size = count + len(events), size + more
            task = asyncio.create_task(self._send(batch, stop))
            sending.add(task)
            task.add_done_callback(done)
        if sending:
            await asyncio.gather(*sending, return_exceptions=True)
        self._closed = True
        for _, future in self._pending:
            if not future.done():
                future.set_exception(ReporterClosed("reporter stopped"))

    async def _send(self, batch: list[tuple[list[Any], asyncio.Future[list[Any]]]], stop: asyncio.Event) -> None:
        """Send a batch; on a refusal, each run's events alone, so one run's bad report fails only that run.

        Every error ends in the futures of the batch (never in this task): a run awaiting its report
        always learns what became of it.
        """
        delay = self.config.retry_min_seconds
        while True:
            try:
                # Built inside the try: a message protobuf cannot encode (nested too deep, say) is a refusal.
                request = worker_service_pb2.ReportRunEventsRequest(
                    worker_id=self.worker_id, session_token=self.session_token,
                    events=[e for events, _ in batch for e in events],
                )
                began = time.perf_counter()
                try:
                    response = await self.stub.ReportRunEvents(request, timeout=self.config.call_timeout_seconds)
                except grpc.aio.AioRpcError as err:
                    self._observe(began, err.code().name, len(request.events))
                    raise
                self._observe(began, "OK", len(request.events))
                break
            except Exception as err:
                retry = isinstance(err, grpc.aio.AioRpcError) and err.code() in RETRYABLE
                if not retry and len(batch) > 1:
                    # One run's bad event must not sink the others: send each run's events alone.
                    for item in batch:
                        await self._send([item], stop)
                    return
                if not retry:
                    code = err.code() if isinstance(err, grpc.aio.AioRpcError) else None
                    if isinstance(err, grpc.aio.AioRpcError):
                        reason = f"{err.code().name}: {err.details()}"
                    else:
                        reason = f"{type(err).__name__}: {err}"
                    log.error("report refused: %s", reason)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(ReportRefused(reason, code))
                    return
                # Once per batch, not at every retry while the API is away.
                (log.debug if delay > self.config.retry_min_seconds else log.warning)(
                    "report failed (%s); retrying with backoff",
                    err.code().name if isinstance(err, grpc.aio.AioRpcError) else type(err).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max_seconds)
        results = list(response.results)
        offset = 0
        for events, future in batch:
            if not future.done():
                future.set_result(results[offset : offset + len(events)])
            offset += len(events)

    def _observe(self, began: float, code: str, events: int) -> None:
        if self.on_call is not None:
            try:
                self.on_call(time.perf_counter() - began, code, events)
            except Exception:
                log.exception("report observer failed")
