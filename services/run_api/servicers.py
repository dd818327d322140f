"""gRPC servicers: thin translations from proto requests to handler commands and back."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import grpc
from google.protobuf import json_format
from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncEngine

from services.run_api import (
    artifact_service,
    auth,
    cache_service,
    checks,
    convert,
    explain,
    handlers,
    payloads,
    rebuild,
    registry,
)
from services.run_api.artifacts import ArtifactStore
from services.run_api.auth import current_caller
from services.run_api.cache import CacheLayers
from services.run_api.errors import InvalidRequest, RequestTooLarge, RunsError, shorten
from services.run_api.listener import Hub
from services.run_api.store.events import (
    CHANNEL_CANCEL,
    CHANNEL_EVENTS,
    CHANNEL_QUEUED,
    CHANNEL_WORKER,
    Outcome,
    queued_key,
)
from services.run_api.store.uow import UnitOfWork
from shared.events import TERMINAL_EVENTS, TERMINAL_STATUSES, WORKER_EVENTS, EventType
from shared.gen.runs.v1 import (
    key_service_pb2,
    key_service_pb2_grpc,
    ops_service_pb2,
    ops_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from shared.limits import MAX_EVENT_PAYLOAD_BYTES
from shared.logs import log_context
from shared.settings import DEFAULT_ARTIFACT_MAX_BYTES
from shared.telemetry import context_from_carrier, current_trace_carrier

log = logging.getLogger(__name__)
tracer = trace.get_tracer("runs.api")

_STATUS_NAMES = {v: n.removeprefix("RUN_STATUS_") for n, v in run_pb2.RunStatus.items()}
_STEP_STATUS_NAMES = {v: n.removeprefix("STEP_STATUS_") for n, v in run_pb2.StepStatus.items()}
# The most events one ReportRunEvents call may carry (the stock worker sends at most 1,000).
MAX_REPORT_EVENTS = 5000


class ShuttingDown(RunsError):
    """The server is stopping; the client should reconnect (to this or another replica)."""

    code = grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class ServiceConfig:
    """What the servicers need to know besides the database."""

    lease_seconds: float = 30.0
    poll_seconds: float = 1.0
    retry: handlers.RetryPolicy = field(default_factory=handlers.RetryPolicy)
    artifact_max_bytes: int = DEFAULT_ARTIFACT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.lease_seconds <= 0 or self.poll_seconds <= 0:
            raise ValueError("lease_seconds and poll_seconds must be positive")


class RunService(run_service_pb2_grpc.RunServiceServicer):
    """runs.v1.RunService."""

    def __init__(
        self, engine: AsyncEngine, hub: Hub, config: ServiceConfig, stopping: asyncio.Event, artifacts: ArtifactStore,
        layers: CacheLayers,
    ) -> None:
        self.engine, self.hub, self.config, self.stopping = engine, hub, config, stopping
        self.artifacts, self.layers = artifacts, layers

    async def RebuildRun(
        self, request: run_service_pb2.RebuildRunRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.RebuildRunResponse:
        handlers.check_input_size(request.input_patch.ByteSize())
        try:
            patch = convert.to_dict(request.input_patch)
        except (ValueError, RecursionError):
            raise InvalidRequest.field("input_patch", "input_patch must be JSON: no NaN or Infinity") from None
        cmd = rebuild.RebuildRun(
            base_run_id=request.base_run_id, change_request_type=request.change_request_type, input_patch=patch,
            steps=tuple(request.steps), dry_run=request.dry_run, trace_context=current_trace_carrier(),
        )
        async with UnitOfWork(self.engine) as uow:
            row, plan = await rebuild.rebuild_run(uow, cmd, current_caller())
        out = run_service_pb2.RebuildRunResponse(
            plan=[run_service_pb2.RebuildPlanStep(step_key=p.step_key, action=p.action, reason=p.reason) for p in plan]
        )
        if row is not None:
            out.run.CopyFrom(convert.run(row))
        return out

    async def ExplainStep(
        self, request: run_service_pb2.ExplainStepRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.ExplainStepResponse:
        async with UnitOfWork(self.engine) as uow:
            items = await rebuild.explain_steps(uow, request.run_id, request.step_key, current_caller())
        out = run_service_pb2.ExplainStepResponse()
        for item in items:
            json_format.ParseDict({k: v for k, v in item.items() if v is not None}, out.steps.add())
        return out

    async def ExplainRun(
        self, request: run_service_pb2.ExplainRunRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.ExplainRunResponse:
        async with UnitOfWork(self.engine) as uow:
            found = await explain.explain_run(uow, request.run_id, current_caller())
        return explain.to_message(found)

    async def ListCacheEntries(
        self, request: run_service_pb2.ListCacheEntriesRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.ListCacheEntriesResponse:
        return await cache_service.list_cache_entries(self.engine, request, current_caller())

    async def InvalidateCache(
        self, request: run_service_pb2.InvalidateCacheRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.InvalidateCacheResponse:
        return await cache_service.invalidate_cache(self.engine, self.layers, request, current_caller())

    def DownloadArtifact(
        self, request: run_service_pb2.DownloadArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[run_service_pb2.DownloadArtifactResponse]:
        return artifact_service.download_artifact(self.engine, self.artifacts, request, context)

    async def StartRun(
        self, request: run_service_pb2.StartRunRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.StartRunResponse:
        cmd = self._start_command(request)
        # One statement queues it (after the version lookup): no transaction around them is needed.
        async with UnitOfWork(self.engine, autocommit=True) as uow:
            row, deduplicated = await handlers.start_run(uow, cmd, self.config.retry, current_caller())
        return run_service_pb2.StartRunResponse(run=convert.run(row), deduplicated=deduplicated)

    async def StartRuns(
        self, request: run_service_pb2.StartRunsRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.StartRunsResponse:
        if len(request.requests) > handlers.MAX_START_RUNS:
            raise RequestTooLarge([("requests", f"at most {handlers.MAX_START_RUNS} requests per call")])
        cmds, violations, too_large = [], [], False
        for i, one in enumerate(request.requests):
            try:
                cmds.append(self._start_command(one))
            except InvalidRequest as err:
                too_large = too_large or isinstance(err, RequestTooLarge)
                violations += handlers.indexed_violations(i, err)
        if violations:
            raise (RequestTooLarge if too_large else InvalidRequest)(violations)
        # One statement queues them all; with idempotency keys a reused one may refuse the call after that
        # statement, so then it runs in a transaction the refusal rolls back (nothing stored).
        async with UnitOfWork(self.engine, autocommit=not any(c.idempotency_key for c in cmds)) as uow:
            done = await handlers.start_runs(uow, cmds, self.config.retry, current_caller())
        return run_service_pb2.StartRunsResponse(responses=[
            run_service_pb2.StartRunResponse(run=convert.run(row), deduplicated=dedup) for row, dedup in done
        ])

    @staticmethod
    def _start_command(request: run_service_pb2.StartRunRequest) -> handlers.StartRun:
        """A StartRun request as its command (the input checked by its size on the wire before it is converted)."""
        handlers.check_input_size(request.input.ByteSize())
        try:
            run_input = convert.to_dict(request.input)
        except (ValueError, RecursionError):
            raise InvalidRequest.field("input", "input must be JSON: NaN and Infinity are not allowed") from None
        return handlers.StartRun(
            workflow=request.workflow,
            input=run_input,
            input_size=request.input.ByteSize(),
            idempotency_key=request.idempotency_key,
            max_attempts=request.max_attempts,
            workspace_id=request.workspace_id,
            trace_context=current_trace_carrier(),
            retry_backoff_seconds=request.retry_backoff_seconds,
            retry_backoff_max_seconds=request.retry_backoff_max_seconds,
            project_id=request.project_id,
            workflow_version=request.workflow_version,
        )

    async def CancelRun(
        self, request: run_service_pb2.CancelRunRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.CancelRunResponse:
        with log_context(run_id=shorten(request.run_id)):
            async with UnitOfWork(self.engine) as uow:
                row = await handlers.cancel_run(uow, request.run_id, request.reason, current_caller())
        return run_service_pb2.CancelRunResponse(run=convert.run(row))

    async def GetRun(
        self, request: run_service_pb2.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.GetRunResponse:
        async with UnitOfWork(self.engine) as uow:
            row, steps, calls = await handlers.get_run(uow, request.run_id, current_caller())
            tries = await handlers.attempts(uow, request.run_id)
        run = convert.run(row)
        run.steps_summary.CopyFrom(convert.steps_summary(handlers.steps_summary(steps)))
        return run_service_pb2.GetRunResponse(
            run=run,
            steps=[convert.step(s) for s in steps],
            tool_calls=[convert.tool_call(c) for c in calls],
            attempts=[convert.attempt(a) for a in tries],
        )

    async def ListRuns(
        self, request: run_service_pb2.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.ListRunsResponse:
        if request.status not in _STATUS_NAMES:
            raise InvalidRequest.field("status", "unknown status")
        status = _STATUS_NAMES[request.status] if request.status else None
        async with UnitOfWork(self.engine) as uow:
            rows, token = await handlers.list_runs(
                uow, current_caller(), status, request.workflow, request.page_size, request.page_token, request.query
            )
        return run_service_pb2.ListRunsResponse(runs=[convert.run(r) for r in rows], next_page_token=token)

    async def ListRunSteps(
        self, request: run_service_pb2.ListRunStepsRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.ListRunStepsResponse:
        if request.status not in _STEP_STATUS_NAMES:
            raise InvalidRequest.field("status", "unknown step status")
        status = _STEP_STATUS_NAMES[request.status] if request.status else None
        async with UnitOfWork(self.engine) as uow:
            steps = await handlers.list_run_steps(uow, request.run_id, status, current_caller())
        return run_service_pb2.ListRunStepsResponse(steps=[convert.step(s) for s in steps])

    async def ListRunArtifacts(
        self, request: run_service_pb2.ListRunArtifactsRequest, context: grpc.aio.ServicerContext
    ) -> run_service_pb2.ListRunArtifactsResponse:
        async with UnitOfWork(self.engine) as uow:
            rows = await handlers.list_run_artifacts(uow, request.run_id, current_caller())
        return run_service_pb2.ListRunArtifactsResponse(
            artifacts=[convert.artifact(r.run_id, r.step_key, r) for r in rows]
        )

    async def WatchRun(
        self, request: run_service_pb2.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[run_service_pb2.WatchRunResponse]:
        checks.check_identifier("run_id", request.run_id, required=True)
        if request.after_sequence < 0:
            raise InvalidRequest.field("after_sequence", "after_sequence must not be negative")
        caller = current_caller()
        after = request.after_sequence
        with self.hub.subscribe((CHANNEL_EVENTS, request.run_id)) as waiter:
            while True:
                async with UnitOfWork(self.engine) as uow:
                    run = await handlers.run_exists(uow, request.run_id, caller)
                    rows = await handlers.events_after(uow, request.run_id, after)
                for row in rows:
                    yield run_service_pb2.WatchRunResponse(event=convert.event(row))
                    after = row.sequence
                    if row.type in TERMINAL_EVENTS:
                        return
                if not rows and run.status in TERMINAL_STATUSES and run.last_sequence <= after:
                    return
                if rows:
                    continue
                if self.stopping.is_set():
                    raise ShuttingDown("the server is shutting down; resume with after_sequence")
                await waiter.wait(self.config.poll_seconds)


class WorkerService(worker_service_pb2_grpc.WorkerServiceServicer):
    """runs.v1.WorkerService."""

    def __init__(
        self, engine: AsyncEngine, hub: Hub, config: ServiceConfig, stopping: asyncio.Event, artifacts: ArtifactStore,
        layers: CacheLayers,
    ) -> None:
        self.engine, self.hub, self.config, self.stopping = engine, hub, config, stopping
        self.artifacts, self.layers = artifacts, layers
        self.specs = registry.SpecCache()

    async def LookupStepCache(
        self, request: worker_service_pb2.LookupStepCacheRequest, context: grpc.aio.ServicerContext
    ) -> worker_service_pb2.LookupStepCacheResponse:
        return await cache_service.lookup_step_cache(self.engine, self.layers, request, current_caller())

    async def UploadArtifact(
        self, request_iterator: AsyncIterator[worker_service_pb2.UploadArtifactRequest],
        context: grpc.aio.ServicerContext,
    ) -> worker_service_pb2.UploadArtifactResponse:
        return await artifact_service.upload_artifact(
            self.engine, self.artifacts, self.config.artifact_max_bytes, request_iterator, context
        )

    def FetchArtifact(
        self, request: worker_service_pb2.FetchArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_service_pb2.FetchArtifactResponse]:
        return artifact_service.fetch_artifact(self.engine, self.artifacts, request, context)

    async def _check_artifacts(self, reported: list[handlers.ReportedEvent]) -> None:
        """Artifacts a step.succeeded or step.skipped names must be in the store; uri and size are the store's."""
        tenant = current_caller().tenant_id
        sizes: dict[str, int | None] = {}
        for i, event in enumerate(reported):
            if event.type not in (EventType.STEP_SUCCEEDED, EventType.STEP_SKIPPED):
                continue
            for j, item in enumerate(event.payload.get("artifacts") or []):
                sha = item["sha256"]
                if sha not in sizes:
                    sizes[sha] = await self.artifacts.size(tenant, sha)
                if sizes[sha] is None:
                    raise InvalidRequest.field(
                        f"events[{i}].payload.artifacts[{j}].sha256",
                        "no artifact with this sha256 was uploaded: upload it with UploadArtifact first",
                    )
                # What is recorded describes the stored bytes, whatever the worker wrote.
                item["uri"], item["size"] = self.artifacts.uri(tenant, sha), sizes[sha]

    async def ClaimQueuedRuns(
        self, request: worker_service_pb2.ClaimQueuedRunsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_service_pb2.ClaimQueuedRunsResponse]:
        caller = current_caller()
        checks.check_identifier("worker_id", request.worker_id, required=True)
        checks.check_identifier("workspace_id", request.workspace_id)
        checks.check_text("session_token", request.session_token, limit=128)
        if request.capacity < 0 or request.batch_limit < 0 or request.poll_interval_ms < 0:
            raise InvalidRequest.field("capacity", "capacity, batch_limit and poll_interval_ms must not be negative")
        tools = handlers.check_declared_tools(list(request.tools))
        # Clamped to the server's limits (README): no worker hoards the queue or spins the database.
        capacity = min(request.capacity or 1, handlers.MAX_CAPACITY)
        claim = handlers.Claim(
            worker_id=caller.worker_id(request.worker_id),
            workspace_id=caller.scoped("workspace_id", request.workspace_id),
            capacity=capacity,
            batch_limit=min(request.batch_limit or capacity, capacity, handlers.MAX_BATCH_LIMIT),
            lease_seconds=self.config.lease_seconds,
            tenant_id=caller.tenant_id,
            project_id=caller.project_id,
            tools=tools or None,  # declared none: takes any run (an older client)
        )
        poll_ms = request.poll_interval_ms or round(self.config.poll_seconds * 1000)
        poll_ms = max(handlers.MIN_POLL_MS, min(poll_ms, handlers.MAX_POLL_MS))
        poll = poll_ms / 1000
        async with UnitOfWork(self.engine) as uow:
            token = await handlers.open_session(
                uow, claim.worker_id, claim.tenant_id, request.session_token, self.config.lease_seconds,
                declared=handlers.Declared(tools, claim.capacity, claim.workspace_id),
            )
        claim = dataclasses.replace(claim, session_token_hash=auth.hash_secret(token))
        first: worker_service_pb2.ClaimQueuedRunsResponse | None = worker_service_pb2.ClaimQueuedRunsResponse(
            session_token=token, worker_id=claim.worker_id, capacity=claim.capacity,
            batch_limit=claim.batch_limit, poll_interval_ms=poll_ms,
        )
        cancels_sent: set[str] = set()
        worker_keys = ((CHANNEL_WORKER, claim.worker_id), (CHANNEL_CANCEL, claim.worker_id))
        with log_context(worker_id=claim.worker_id), self.hub.subscribe(
            (CHANNEL_QUEUED, queued_key(claim.tenant_id, claim.workspace_id)), *worker_keys
        ) as any_news, self.hub.subscribe(*worker_keys) as worker_news:
            while True:
                if self.stopping.is_set():
                    raise ShuttingDown("the server is shutting down; reconnect")
                async with UnitOfWork(self.engine, autocommit=True) as uow:  # the claim is one statement
                    result = await handlers.claim_runs(uow, claim)
                rows = result.runs
                specs = await self.specs.get_many(self.engine, {r.spec_hash for r in rows if r.spec_hash})
                cancels = [r for r in result.cancel_run_ids if r not in cancels_sent]
                cancels_sent.update(cancels)
                if rows or cancels or request.once or first is not None:
                    message = first or worker_service_pb2.ClaimQueuedRunsResponse()
                    first = None
                    message.runs.extend(
                        self._claimed(r, specs.get(r.spec_hash), result.steps.get(r.run_id, []),
                                      result.steps.get(r.base_run_id, []) if r.base_run_id else None)
                        for r in rows
                    )
                    message.cancel_run_ids.extend(cancels)
                    yield message
                if request.once:
                    return
                if len(rows) == claim.batch_limit:
                    continue  # there may be more due right now
                # At capacity, newly queued runs are not ours to take: wait for a slot (or a cancel).
                await (worker_news if result.full else any_news).wait(poll)

    @staticmethod
    def _claimed(row: Any, spec: Any, steps: list[Any], base_steps: list[Any] | None) -> worker_service_pb2.ClaimedRun:
        carrier = dict(row.trace_context or {})
        with tracer.start_as_current_span(
            "run.claim", context=context_from_carrier(carrier), attributes={"run.id": row.run_id}
        ):
            out = worker_service_pb2.ClaimedRun(
                run_id=row.run_id,
                workflow=row.workflow,
                attempt=row.attempt,
                max_attempts=row.max_attempts,
                trace_context=carrier,
            )
        out.input.update(row.input or {})
        out.workflow_version = row.workflow_version
        if spec is not None:  # (never missing: a run pins a registered version)
            out.spec.CopyFrom(spec)
        out.steps.extend(convert.step_state(s) for s in steps)
        if base_steps is not None:  # a rebuild: re-execute `rerun`, reuse the base run's other steps
            rerun = set(row.rebuild_rerun or [])
            out.rebuild.base_run_id = row.base_run_id
            out.rebuild.rerun.extend(sorted(rerun))
            out.rebuild.reuse.extend(convert.step_state(s) for s in base_steps if s.step_key not in rerun)
        if row.lease_expires_at is not None:
            out.lease_expires_at.FromDatetime(row.lease_expires_at)
        return out

    async def ReportRunEvents(
        self, request: worker_service_pb2.ReportRunEventsRequest, context: grpc.aio.ServicerContext
    ) -> worker_service_pb2.ReportRunEventsResponse:
        worker_id = self._worker_id(request.worker_id, request.session_token)
        if len(request.events) > MAX_REPORT_EVENTS:
            raise RequestTooLarge([("events", f"at most {MAX_REPORT_EVENTS} events per call")])
        reported = [self._reported(i, e) for i, e in enumerate(request.events)]
        await self._check_artifacts(reported)
        async with UnitOfWork(self.engine) as uow:
            if not reported:
                await handlers.check_session(uow, worker_id, request.session_token)
                return worker_service_pb2.ReportRunEventsResponse()
            results = await handlers.report_events(uow, worker_id, request.session_token, reported)
        await self.layers.after_report(results, current_caller().tenant_id, self.engine)  # Redis after the commit
        outcome = {
            Outcome.RECORDED: worker_service_pb2.REPORT_OUTCOME_RECORDED,
            Outcome.DUPLICATE: worker_service_pb2.REPORT_OUTCOME_DUPLICATE,
            Outcome.STALE: worker_service_pb2.REPORT_OUTCOME_STALE,
        }
        return worker_service_pb2.ReportRunEventsResponse(
            results=[
                worker_service_pb2.ReportResult(
                    event_id=r.event.event_id,
                    run_id=r.event.run_id,
                    outcome=outcome[r.outcome],
                    sequence=r.sequence,
                    message=r.message,
                )
                for r in results
            ]
        )

    @staticmethod
    def _worker_id(instance: str, session_token: str) -> str:
        """The recorded worker id of the calling worker process (its key's id and its instance name)."""
        checks.check_identifier("worker_id", instance, required=True)
        checks.check_text("session_token", session_token, limit=128)
        return current_caller().worker_id(instance)

    @staticmethod
    def _reported(i: int, e: worker_service_pb2.ReportedEvent) -> handlers.ReportedEvent:
        where = f"events[{i}]"
        checks.check_identifier(f"{where}.run_id", e.run_id, required=True)
        checks.check_identifier(f"{where}.event_id", e.event_id, required=True)
        if e.type not in WORKER_EVENTS:
            raise InvalidRequest.field(f"{where}.type", f"{shorten(e.type)!r} is not an event a worker may report")
        if e.attempt < 1:
            raise InvalidRequest.field(f"{where}.attempt", "attempt must be the claim's attempt (1 or more)")
        if e.HasField("occurred_at") and (problem := convert.timestamp_problem(e.occurred_at)):
            raise InvalidRequest.field(f"{where}.occurred_at", problem)
        if e.payload.ByteSize() > MAX_EVENT_PAYLOAD_BYTES:
            raise RequestTooLarge([(f"{where}.payload", f"payload is over {MAX_EVENT_PAYLOAD_BYTES} bytes")])
        try:
            payload = convert.to_dict(e.payload)
        except (ValueError, RecursionError):
            raise InvalidRequest.field(f"{where}.payload", "payload must be JSON: no NaN or Infinity") from None
        wrong = payloads.problems(e.type, payload)
        if wrong:
            raise InvalidRequest([(f"{where}.payload" + (f".{name}" if name else ""), d) for name, d in wrong])
        return handlers.ReportedEvent(
            run_id=e.run_id,
            attempt=e.attempt,
            event_id=e.event_id,
            type=e.type,
            occurred_at=e.occurred_at.ToDatetime(tzinfo=UTC) if e.HasField("occurred_at") else None,
            payload=payload,
        )

    async def Heartbeat(
        self, request: worker_service_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> worker_service_pb2.HeartbeatResponse:
        worker_id = self._worker_id(request.worker_id, request.session_token)
        if len(request.runs) > handlers.MAX_CAPACITY:
            raise InvalidRequest.field("runs", f"a worker holds at most {handlers.MAX_CAPACITY} runs")
        for i, held in enumerate(request.runs):
            checks.check_identifier(f"runs[{i}].run_id", held.run_id, required=True)
        async with UnitOfWork(self.engine) as uow:
            await handlers.check_session(uow, worker_id, request.session_token)
            result = await handlers.heartbeat(
                uow, worker_id, [(r.run_id, r.attempt) for r in request.runs], self.config.lease_seconds
            )
        out = worker_service_pb2.HeartbeatResponse(
            cancel_run_ids=result.cancel_run_ids,
            lost_run_ids=result.lost_run_ids,
            readopted_runs=[worker_service_pb2.HeldRun(run_id=r, attempt=a) for r, a in result.readopted],
        )
        out.lease_expires_at.FromDatetime(result.lease_expires_at)
        return out


class WorkflowService(workflow_service_pb2_grpc.WorkflowServiceServicer):
    """runs.v1.WorkflowService: the registry."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def RegisterWorkflow(
        self, request: workflow_service_pb2.RegisterWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> workflow_service_pb2.RegisterWorkflowResponse:
        if not request.HasField("spec"):
            raise InvalidRequest.field("spec", "spec is required")
        size = request.spec.ByteSize()
        if size > registry.MAX_SPEC_FILE_BYTES:  # the bound of a spec file; validation time grows with it
            raise InvalidRequest.field("spec", f"spec is {size} bytes; at most {registry.MAX_SPEC_FILE_BYTES}")
        caller = current_caller()
        async with UnitOfWork(self.engine) as uow:
            registered = await registry.register(
                uow, registry.spec_from_proto(request.spec), caller.tenant_id, caller.key_id
            )
        return workflow_service_pb2.RegisterWorkflowResponse(
            workflow=self._workflow(registered.row), created=registered.created
        )

    async def ListWorkflows(
        self, request: workflow_service_pb2.ListWorkflowsRequest, context: grpc.aio.ServicerContext
    ) -> workflow_service_pb2.ListWorkflowsResponse:
        size = checks.page_bounds(request.page_size)
        checks.check_text("page_token", request.page_token, limit=checks.MAX_IDENTIFIER)
        async with UnitOfWork(self.engine) as uow:
            rows, token = await registry.list_page(uow, current_caller(), size, request.page_token)
        return workflow_service_pb2.ListWorkflowsResponse(
            workflows=[self._workflow(r) for r in rows], next_page_token=token
        )

    async def GetWorkflow(
        self, request: workflow_service_pb2.GetWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> workflow_service_pb2.GetWorkflowResponse:
        checks.check_text("name", request.name, limit=checks.MAX_IDENTIFIER)
        if not request.name:
            raise InvalidRequest.field("name", "name is required")
        if request.version < 0:
            raise InvalidRequest.field("version", "version must be 0 (the latest) or a version number")
        async with UnitOfWork(self.engine) as uow:
            row = await registry.get(uow, request.name, request.version, current_caller())
        return workflow_service_pb2.GetWorkflowResponse(workflow=self._workflow(row))

    @staticmethod
    def _workflow(row: Any) -> workflow_service_pb2.Workflow:
        return convert.workflow(row, registry.spec_to_proto(row.spec))


class OpsService(ops_service_pb2_grpc.OpsServiceServicer):
    """runs.v1.OpsService."""

    def __init__(self, engine: AsyncEngine, reaper_failures: Callable[[], int] = lambda: 0) -> None:
        self.engine = engine
        self.reaper_failures = reaper_failures

    async def GetStats(
        self, request: ops_service_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> ops_service_pb2.GetStatsResponse:
        tenant = current_caller().tenant_id
        async with UnitOfWork(self.engine) as uow:
            stats = await handlers.stats(uow, tenant)
            hits, misses = await cache_service.cache_stats(uow, tenant)
        e = stats.events
        return ops_service_pb2.GetStatsResponse(
            cache_hits_by_layer=hits,
            cache_misses_by_reason=misses,
            claimed=e.get("run.claimed", 0),
            completed=e.get("run.completed", 0),
            failed=e.get("run.failed", 0),
            lease_expired=e.get("run.lease_expired", 0),
            requeued=e.get("run.requeued", 0),
            canceled=e.get("run.canceled", 0),
            readopted=stats.readopted,
            runs_by_status=stats.runs_by_status,
            reaper_failures=self.reaper_failures(),
            tenant_id=tenant,
        )

    async def ListWorkers(
        self, request: ops_service_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> ops_service_pb2.ListWorkersResponse:
        async with UnitOfWork(self.engine) as uow:
            rows, token, connected = await handlers.list_workers(
                uow, current_caller(), request.page_size, request.page_token
            )
        return ops_service_pb2.ListWorkersResponse(
            workers=[convert.worker_info(r) for r in rows], next_page_token=token, connected=connected
        )

    async def GetThroughput(
        self, request: ops_service_pb2.GetThroughputRequest, context: grpc.aio.ServicerContext
    ) -> ops_service_pb2.GetThroughputResponse:
        tenant = current_caller().tenant_id
        async with UnitOfWork(self.engine) as uow:
            buckets = await handlers.throughput(uow, tenant, request.minutes)
        return ops_service_pb2.GetThroughputResponse(
            buckets=[convert.throughput_bucket(b) for b in buckets], tenant_id=tenant
        )


class KeyService(key_service_pb2_grpc.KeyServiceServicer):
    """runs.v1.KeyService (admin keys only; the interceptor checks the role)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def CreateKey(
        self, request: key_service_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> key_service_pb2.CreateKeyResponse:
        cmd = auth.CreateKey(
            role=convert.ROLE_NAMES.get(request.role, ""),
            tenant_id=request.tenant_id,
            project_id=request.project_id,
            workspace_id=request.workspace_id,
            ttl_seconds=request.ttl_seconds,
            description=request.description,
        )
        async with UnitOfWork(self.engine) as uow:
            row, secret = await auth.create_key(uow, cmd, current_caller(), handlers.utcnow())
        return key_service_pb2.CreateKeyResponse(key=convert.api_key(row), secret=secret)

    async def ListKeys(
        self, request: key_service_pb2.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> key_service_pb2.ListKeysResponse:
        async with UnitOfWork(self.engine) as uow:
            rows, token = await auth.list_keys(
                uow, current_caller(), request.page_size, request.page_token, request.include_revoked
            )
        return key_service_pb2.ListKeysResponse(keys=[convert.api_key(r) for r in rows], next_page_token=token)

    async def RevokeKey(
        self, request: key_service_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> key_service_pb2.RevokeKeyResponse:
        async with UnitOfWork(self.engine) as uow:
            row = await auth.revoke_key(uow, request.key_id, current_caller(), handlers.utcnow())
        return key_service_pb2.RevokeKeyResponse(key=convert.api_key(row))

