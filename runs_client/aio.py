"""AsyncClient: the asyncio Python client of the Run API (grpc.aio); the same methods as Client, awaited."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from runs_client._common import CHANNEL_OPTIONS, DEFAULT_TIMEOUT, NO_RETRY, RETRYABLE, Connection, Retry
from runs_client.errors import RunsError, RunTimeout, from_rpc_error, status_code_of
from runs_client.models import (
    Event,
    Rebuild,
    Run,
    RunExplanation,
    RunStatus,
    SpecSource,
    StartRun,
    StepExplanation,
    Workflow,
    list_runs_request,
    rebuild_request,
    start_spec,
    workflow_spec,
)
from shared.channels import aio_channel
from shared.gen.runs.v1 import run_service_pb2, run_service_pb2_grpc, workflow_service_pb2, workflow_service_pb2_grpc

T = TypeVar("T")


class AsyncClient:
    """An asyncio client of the Run API; see Client for the arguments and each method.

    Create it inside a running event loop; use `async with AsyncClient(...) as client:` or await close().
    """

    def __init__(
        self,
        addr: str | None = None,
        key: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        *,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: Retry | None = None,
        watch_retry: Retry | None = None,
    ) -> None:
        self.connection = Connection.resolve(addr, key, tls_ca, tls_cert, tls_key)
        self.addr = self.connection.addr
        self.timeout = timeout
        self.retry = retry or Retry()
        self.watch_retry = watch_retry or self.retry
        self._channel = aio_channel(
            self.connection.addr, self.connection.tls, self.connection.key, options=CHANNEL_OPTIONS
        )
        self._runs = run_service_pb2_grpc.RunServiceStub(self._channel)
        self._workflows = workflow_service_pb2_grpc.WorkflowServiceStub(self._channel)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, retry: Retry) -> T:
        failures = 0
        while True:
            try:
                return await method(request, timeout=self.timeout)
            except grpc.RpcError as error:
                failures += 1
                if status_code_of(error) not in RETRYABLE or failures >= retry.attempts:
                    raise from_rpc_error(error) from error
            await asyncio.sleep(retry.delay(failures))

    async def start_run(self, workflow: str, input: Mapping[str, Any] | None = None, **options: Any) -> Run:
        """Queue a run (see Client.start_run)."""
        spec = start_spec({"workflow": workflow, "input": input, **options})
        retry = self.retry if spec.idempotency_key else NO_RETRY
        response = await self._call(self._runs.StartRun, spec.to_proto(), retry)
        return Run.from_proto(response.run, deduplicated=response.deduplicated)

    async def start_runs(self, runs: Sequence[StartRun | Mapping[str, Any]]) -> list[Run]:
        """Queue many runs in one transaction (see Client.start_runs)."""
        specs = [start_spec(r) for r in runs]
        request = run_service_pb2.StartRunsRequest(requests=[s.to_proto() for s in specs])
        retry = self.retry if specs and all(s.idempotency_key for s in specs) else NO_RETRY
        response = await self._call(self._runs.StartRuns, request, retry)
        return [Run.from_proto(r.run, deduplicated=r.deduplicated) for r in response.responses]

    async def get_run(self, run_id: str) -> Run:
        """The run with its steps and attempts."""
        response = await self._call(self._runs.GetRun, run_service_pb2.GetRunRequest(run_id=run_id), self.retry)
        return Run.from_proto(response.run, response.steps, response.attempts, tool_calls=response.tool_calls)

    async def cancel(self, run_id: str, reason: str = "") -> Run:
        """Cancel a run (see Client.cancel)."""
        request = run_service_pb2.CancelRunRequest(run_id=run_id, reason=reason)
        return Run.from_proto((await self._call(self._runs.CancelRun, request, self.retry)).run)

    async def list_runs(
        self,
        status: RunStatus | str | None = None,
        workflow: str | None = None,
        page_size: int = 100,
        query: str = "",
    ) -> AsyncIterator[Run]:
        """Every run, page after page (see Client.list_runs): `async for run in client.list_runs()`."""
        token, seen = "", set()
        while True:
            runs, token = await self.list_runs_page(status, workflow, page_size, query, token)
            for run in runs:
                yield run
            if not token or token in seen:
                return
            seen.add(token)

    async def list_runs_page(
        self,
        status: RunStatus | str | None = None,
        workflow: str | None = None,
        page_size: int = 100,
        query: str = "",
        page_token: str = "",
    ) -> tuple[list[Run], str]:
        """One page of runs and the next page's token (see Client.list_runs_page)."""
        request = list_runs_request(status, workflow, page_size, query, page_token)
        response = await self._call(self._runs.ListRuns, request, self.retry)
        return [Run.from_proto(run) for run in response.runs], response.next_page_token

    async def watch(
        self, run_id: str, after_sequence: int = 0, timeout: float | None = None
    ) -> AsyncIterator[Event]:
        """The run's events until its terminal one, resuming after UNAVAILABLE (see Client.watch)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        failures, after = 0, after_sequence
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            request = run_service_pb2.WatchRunRequest(run_id=run_id, after_sequence=after)
            call = self._runs.WatchRun(request, timeout=remaining)
            try:
                async for response in call:
                    event = Event.from_proto(response.event)
                    failures, after = 0, event.sequence
                    yield event
                    if event.terminal:
                        return
                return
            except grpc.RpcError as error:
                failures += 1
                if status_code_of(error) not in RETRYABLE or failures >= self.watch_retry.attempts:
                    raise from_rpc_error(error) from error
            finally:
                call.cancel()
            delay = self.watch_retry.delay(failures)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise RunTimeout(f"watching run {run_id}: no answer within the timeout", run_id)
            await asyncio.sleep(delay)

    async def wait(self, run_id: str, timeout: float | None = None) -> Run:
        """The run once it has ended; RunTimeout after `timeout` seconds (see Client.wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        run = await self.get_run(run_id)
        if run.done:
            return run
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        try:
            async for _ in self.watch(run_id, run.last_sequence, timeout=remaining):
                pass
        except RunsError as error:
            if error.status_code is not grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            raise RunTimeout(
                f"run {run_id} did not end within {timeout:g}s (last seen {run.status})", run_id, run
            ) from error
        return await self.get_run(run_id)

    async def rebuild(
        self,
        base_run_id: str,
        change: str | None = None,
        steps: Sequence[str] = (),
        input_patch: Mapping[str, Any] | None = None,
        dry_run: bool = False,
    ) -> Rebuild:
        """Rebuild a SUCCEEDED run (see Client.rebuild)."""
        request = rebuild_request(base_run_id, change, steps, input_patch, dry_run)
        retry = self.retry if dry_run else NO_RETRY
        return Rebuild.from_proto(await self._call(self._runs.RebuildRun, request, retry))

    async def explain_run(self, run_id: str) -> RunExplanation:
        """Why the run is where it is (see Client.explain_run)."""
        request = run_service_pb2.ExplainRunRequest(run_id=run_id)
        return RunExplanation.from_proto(await self._call(self._runs.ExplainRun, request, self.retry))

    async def explain(self, run_id: str, step_key: str = "") -> list[StepExplanation]:
        """Why each step ran, hit the cache or was reused (see Client.explain)."""
        request = run_service_pb2.ExplainStepRequest(run_id=run_id, step_key=step_key)
        response = await self._call(self._runs.ExplainStep, request, self.retry)
        return [StepExplanation.from_proto(s) for s in response.steps]

    async def register_workflow(self, spec: SpecSource) -> Workflow:
        """Register a workflow spec (see Client.register_workflow)."""
        request = workflow_service_pb2.RegisterWorkflowRequest(spec=workflow_spec(spec))
        response = await self._call(self._workflows.RegisterWorkflow, request, self.retry)
        return Workflow.from_proto(response.workflow, created=response.created)
