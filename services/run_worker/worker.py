"""The worker: holds a ClaimQueuedRuns stream, executes runs concurrently, heartbeats its leases.

Never opens a database connection: everything goes through the API over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from services.run_worker.artifacts import ArtifactClient
from services.run_worker.executor import Result, RunHandle
from services.run_worker.metrics import WorkerMetrics
from services.run_worker.orchestrator import EngineConfig, execute
from services.run_worker.reporter import Reporter
from services.run_worker.tools import Tool, as_tool, registry
from shared.channels import aio_channel
from shared.gen.runs.v1 import worker_service_pb2, worker_service_pb2_grpc
from shared.logs import log_context
from shared.settings import ClientTls, WorkerSettings

log = logging.getLogger(__name__)

# The longest wait between two tries of the claim stream: as the channel's own reconnect backoff (below), so a
# restarted API has its workers back within a few seconds.
MAX_RECONNECT_SECONDS = 2.0
# How long `--once` waits for its claim stream (the CLI's deadline words its "did not answer within").
ONCE_DEADLINE_SECONDS = 30.0


def open_channel(addr: str, tls: ClientTls, api_key: str | None) -> grpc.aio.Channel:
    """An instrumented channel to the API with keepalives, so a dead peer is noticed; TLS and the key when set."""
    return aio_channel(
        addr,
        tls,
        api_key,
        interceptors=aio_client_interceptors(),
        options=[
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
            # A claim batch carries each run's input (up to 256 KiB apiece).
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ],
    )


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class Worker:
    """One worker: `run(stop)` for the long-running mode, `run_cycle()` for one claim cycle."""

    def __init__(
        self, settings: WorkerSettings, tools: Mapping[str, Any] | None = None, metrics: WorkerMetrics | None = None
    ) -> None:
        """`tools`: name -> Tool or async callable (default: the registry of `settings.tools`); `metrics`: fed."""
        self.settings = settings
        self.metrics = metrics
        self.tools: dict[str, Tool] = (
            {name: as_tool(name, tool) for name, tool in tools.items()} if tools else registry(settings.tools)
        )
        self.engine = EngineConfig(step_parallelism=settings.step_parallelism, workdir=settings.workdir,
                                   on_tool=metrics.tool_done if metrics is not None else None)
        self.channel = open_channel(settings.api_addr, settings.tls, settings.api_key)
        self.stub = worker_service_pb2_grpc.WorkerServiceStub(self.channel)
        self.reporter = Reporter(self.stub, settings.worker_id)
        if metrics is not None:
            self.reporter.on_call = metrics.report_done
            metrics.hold(lambda: len(self.held))
        self.artifacts = ArtifactClient(self.stub, self.reporter)
        self.held: dict[str, RunHandle] = {}
        self.tasks: set[asyncio.Task[Result]] = set()
        self.counters: Counter[str] = Counter()
        self._reporter_stop = asyncio.Event()
        self._reporter_task: asyncio.Task[None] | None = None
        self._heartbeat_stop = asyncio.Event()
        self._heartbeat_task: asyncio.Task[None] | None = None
        # Set by a second stop signal: give the held runs back now instead of draining them.
        self.release_now = asyncio.Event()
        # Called once, when the first claim stream opens (`python -m services.run_worker` tells make up).
        self.on_connected: Callable[[], None] | None = None
        self._connections = 0

    # --- lifecycle ------------------------------------------------------------------------------

    def _start_side_tasks(self) -> None:
        if self._reporter_task is None:
            self._reporter_task = asyncio.create_task(self.reporter.run(self._reporter_stop), name="reporter")
            self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")

    async def close(self) -> None:
        """Stop the side tasks and close the channel; safe to call twice."""
        self._heartbeat_stop.set()
        self._reporter_stop.set()
        for task in (self._heartbeat_task, self._reporter_task):
            if task is not None:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(task, 5)
        await self.channel.close(None)

    def _check_side_tasks(self) -> None:
        for task in (self._reporter_task, self._heartbeat_task):
            if task is not None and task.done() and not self._reporter_stop.is_set():
                raise RuntimeError(f"worker task {task.get_name()} died") from task.exception()

    # --- executing ------------------------------------------------------------------------------

    def _spawn(self, claimed: Any) -> None:
        claimed_at = time.monotonic()
        handle = RunHandle(claimed.run_id, claimed.attempt)
        previous = self.held.get(claimed.run_id)
        if previous is not None:
            previous.lost.set()  # a newer attempt of the same run supersedes it
        self.held[claimed.run_id] = handle
        self.counters["claimed"] += 1
        if self.metrics is not None:
            self.metrics.runs_claimed.inc()
        task = asyncio.create_task(self._execute(claimed, handle, claimed_at), name=f"run-{claimed.run_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _execute(self, claimed: Any, handle: RunHandle, claimed_at: float) -> Result:
        try:
            result = await execute(claimed, handle, self.reporter, self.tools, self.artifacts, self.engine)
        except Exception:
            log.exception("run execution crashed", extra={"run_id": claimed.run_id})
            result = Result.LOST
        finally:
            if self.held.get(claimed.run_id) is handle:
                del self.held[claimed.run_id]
        self.counters[result.value] += 1
        workflow = claimed.workflow
        if workflow == "runtime.tool" and "tool" in claimed.input:
            workflow = f"{workflow} ({claimed.input['tool']})"
        # The one line per run: not one per event.
        log.info("run finished: %s %s in %.2fs", workflow, result.value, time.monotonic() - claimed_at,
                 extra={"run_id": claimed.run_id})
        if self.metrics is not None:
            self.metrics.runs_finished.labels(result.value).inc()
        return result

    # --- heartbeats -----------------------------------------------------------------------------

    async def heartbeat_once(self) -> None:
        """Extend our leases; stop runs that were canceled or are no longer ours."""
        # The answer is about the attempts we sent: apply it to those handles, not to whatever we hold
        # by the time it arrives (a newer attempt of the same run may have been claimed meanwhile).
        if not self.reporter.session_token:
            return  # no session yet: the claim stream that opens it is the first heartbeat
        sent = {h.run_id: (h, h.attempt) for h in self.held.values()}
        request = worker_service_pb2.HeartbeatRequest(
            worker_id=self.settings.worker_id,
            runs=[worker_service_pb2.HeldRun(run_id=r, attempt=a) for r, (_, a) in sent.items()],
            session_token=self.reporter.session_token,
        )
        response = await self.stub.Heartbeat(request, timeout=max(self.settings.heartbeat_seconds, 1.0))

        def handle_of(run_id: str) -> RunHandle | None:
            handle, attempt = sent.get(run_id, (None, 0))
            return handle if handle is not None and handle.attempt == attempt else None

        for run_id in response.cancel_run_ids:
            if (handle := handle_of(run_id)) is not None:
                handle.cancel.set()
        for run_id in response.lost_run_ids:
            if (handle := handle_of(run_id)) is not None:
                if self.held.get(run_id) is handle:  # else it finished meanwhile: nothing to stop
                    log.warning("lost the lease on a run; stopping it", extra={"run_id": run_id})
                handle.lost.set()
        for adopted in response.readopted_runs:
            handle = handle_of(adopted.run_id)
            if handle is not None:
                log.warning("re-adopted a run after its lease lapsed", extra={"run_id": adopted.run_id,
                                                                               "attempt": adopted.attempt})
                handle.attempt = adopted.attempt
                self.counters["readopted"] += 1

    async def _heartbeat_loop(self) -> None:
        failing = ""  # the failure last logged: while the API stays away, once, not at every beat
        while not self._heartbeat_stop.is_set():
            await _wait(self._heartbeat_stop, self.settings.heartbeat_seconds)
            if self._heartbeat_stop.is_set():
                return
            try:
                await self.heartbeat_once()
                failing = ""
            except grpc.aio.AioRpcError as err:
                if err.code().name != failing:
                    failing = err.code().name
                    log.warning("heartbeat failed: %s", failing)

    # --- claiming -------------------------------------------------------------------------------

    def _claim_request(self, once: bool) -> worker_service_pb2.ClaimQueuedRunsRequest:
        return worker_service_pb2.ClaimQueuedRunsRequest(
            worker_id=self.settings.worker_id,
            workspace_id=self.settings.workspace_id,
            capacity=self.settings.concurrency,
            batch_limit=self.settings.batch_limit,
            poll_interval_ms=self.settings.poll_ms,
            once=once,
            session_token=self.reporter.session_token,
            tools=sorted(self.tools),  # shown by ListWorkers and the dashboard's workers page
        )

    def _take(self, message: Any) -> None:
        """Apply one claim-stream message: the session (first message), new runs, cancel requests."""
        if message.session_token:
            self.reporter.session_token = message.session_token
        for claimed in message.runs:
            self._spawn(claimed)
        for run_id in message.cancel_run_ids:
            if run_id in self.held:
                self.held[run_id].cancel.set()

    async def run_cycle(self) -> Counter[str]:
        """One cycle: claim up to the batch limit, execute, report; returns this cycle's counters."""
        self._start_side_tasks()
        before = Counter(self.counters)
        request = self._claim_request(once=True)
        async for message in self.stub.ClaimQueuedRuns(request, timeout=ONCE_DEADLINE_SECONDS):
            self._take(message)
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        after = Counter(self.counters)
        after.subtract(before)
        return after

    async def _consume(self, call: Any) -> None:
        async for message in call:
            if message.session_token:  # the stream's first message: it is open
                self._connected(message)
            self._take(message)

    def _connected(self, message: Any) -> None:
        self._connections += 1
        if self._connections > 1:
            log.info("reconnected to %s", self.settings.api_addr)
            return
        log.info("connected to %s as %s (capacity %d, batch %d, poll %d ms)", self.settings.api_addr,
                 message.worker_id, message.capacity, message.batch_limit, message.poll_interval_ms)
        if self.on_connected is not None:
            self.on_connected()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and execute until `stop` is set, reconnecting with backoff; then drain."""
        self._start_side_tasks()
        # failure: the status code last logged; until the stream opens again, that code is not logged again
        # (its details vary from try to try: refused, reset, closed).
        delay, failure = 0.1, ""
        with log_context(worker_id=self.settings.worker_id):
            log.info("worker started; claiming from %s; tools: %s", self.settings.api_addr,
                     ", ".join(sorted(self.tools)))
            while not stop.is_set():
                self._check_side_tasks()
                connections = self._connections
                call = self.stub.ClaimQueuedRuns(self._claim_request(once=False))
                consumer = asyncio.create_task(self._consume(call))
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait([consumer, stopper], return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if not consumer.done():
                    call.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                        await consumer
                    break
                err = consumer.exception()
                if self._connections > connections:  # this stream had opened: a new outage begins
                    delay, failure = 0.1, ""
                if isinstance(err, grpc.aio.AioRpcError):
                    # Bad settings or a missing/revoked key: retrying cannot help. (PERMISSION_DENIED can:
                    # a live session under our id ends when its lease lapses.)
                    if err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED):
                        raise err
                    if err.code().name != failure:
                        failure = err.code().name
                        log.warning("claim stream to %s failed (%s: %s); reconnecting with backoff (up to %gs)",
                                    self.settings.api_addr, failure, err.details(), MAX_RECONNECT_SECONDS)
                elif err is not None:
                    raise err
                else:
                    delay = 0.1
                await _wait(stop, delay)
                delay = min(delay * 2, MAX_RECONNECT_SECONDS)
            await self.drain()
            log.info("worker stopped")

    async def drain(self) -> None:
        """Let held runs finish up to the drain timeout, or until `release_now`; then give the rest back.

        A released run goes back to the queue at once: the API is told, so any worker may claim it right
        away, without waiting for its lease to expire.
        """
        pending = set(self.tasks)
        if pending and not self.release_now.is_set():
            log.info("draining %d run(s) for up to %gs (RUN_WORKER_DRAIN_SECONDS); stop again (Ctrl-C) to release "
                     "them now", len(pending), self.settings.drain_seconds)
            asked = asyncio.create_task(self.release_now.wait())
            deadline = asyncio.get_running_loop().time() + self.settings.drain_seconds
            while pending and not asked.done():
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                await asyncio.wait([*pending, asked], timeout=left, return_when=asyncio.FIRST_COMPLETED)
                # runs a claim still in flight handed over after the stop are drained (and released) too
                pending = {task for task in self.tasks if not task.done()}
            asked.cancel()
        pending = {task for task in self.tasks if not task.done()}
        if pending:
            why = "as asked" if self.release_now.is_set() else f"after {self.settings.drain_seconds:g}s"
            log.warning("releasing %d unfinished run(s) back to the queue %s", len(pending), why)
            for handle in list(self.held.values()):
                handle.release.set()
            await asyncio.wait(pending, timeout=10)
