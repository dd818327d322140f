"""Client: the blocking Python client of the Run API (a grpc sync channel)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
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
from shared.channels import channel as open_channel
from shared.gen.runs.v1 import run_service_pb2, run_service_pb2_grpc, workflow_service_pb2, workflow_service_pb2_grpc

T = TypeVar("T")


class Client:
    """A blocking client of the Run API.

    `Client("127.0.0.1:50051", key=None, tls_ca=None)`: the address defaults to RUN_API_ADDR (then
    127.0.0.1:50051), the key to RUNS_API_KEY (key="" sends none), TLS to RUNS_TLS_CA (and
    RUNS_TLS_CERT/RUNS_TLS_KEY for mutual TLS). Each unary call has `timeout` seconds. Idempotent calls
    (get, list, watch, wait, cancel; start_run with an idempotency_key) are retried on UNAVAILABLE
    as `retry` says. Failures raise RunsError subclasses (runs_client.errors).

    Use it as a context manager, or call close().
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
        channel: grpc.Channel | None = None,
        watch_retry: Retry | None = None,
    ) -> None:
        """`channel`: an open channel to call through instead of one the client opens (the key and TLS are
        then the channel's own, and close() leaves it open). `watch_retry`: how a watch (and `wait`) resumes
        after UNAVAILABLE, e.g. for as long as an API restart takes while unary calls give up sooner
        [`retry`]."""
        self.connection = Connection.resolve(addr, key, tls_ca, tls_cert, tls_key)
        self.addr = self.connection.addr
        self.timeout = timeout
        self.retry = retry or Retry()
        self.watch_retry = watch_retry or self.retry
        self._owns_channel = channel is None
        self._channel = channel or open_channel(
            self.connection.addr, self.connection.tls, self.connection.key, options=CHANNEL_OPTIONS
        )
        self._runs = run_service_pb2_grpc.RunServiceStub(self._channel)
        self._workflows = workflow_service_pb2_grpc.WorkflowServiceStub(self._channel)

    @property
    def channel(self) -> grpc.Channel:
        """The client's gRPC channel (with its key and TLS), for the services the client does not wrap."""
        return self._channel

    def close(self) -> None:
        """Close the channel (calls in flight are cancelled), unless it was given to the client."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ------------------------------------------------------------------------------

    def _call(self, method: Callable[..., T], request: Any, retry: Retry, timeout: float | None = None) -> T:
        """One unary call, retried on UNAVAILABLE as `retry` says; RunsError on failure."""
        failures = 0
        while True:
            try:
                return method(request, timeout=timeout or self.timeout)
            except grpc.RpcError as error:
                failures += 1
                if status_code_of(error) not in RETRYABLE or failures >= retry.attempts:
                    raise from_rpc_error(error) from error
            time.sleep(retry.delay(failures))

    # --- runs ----------------------------------------------------------------------------------

    def start_run(self, workflow: str, input: Mapping[str, Any] | None = None, **options: Any) -> Run:
        """Queue a run of `workflow` with `input` (a dict); returns it (status QUEUED, or as found when
        `idempotency_key` names an earlier run: then `.deduplicated` is True).

        Options are StartRun's fields: idempotency_key, max_attempts, workspace_id, project_id,
        workflow_version, retry_backoff_seconds, retry_backoff_max_seconds. Retried on UNAVAILABLE
        only with an idempotency_key (without one a retry could start a second run).
        """
        spec = start_spec({"workflow": workflow, "input": input, **options})
        retry = self.retry if spec.idempotency_key else NO_RETRY
        response = self._call(self._runs.StartRun, spec.to_proto(), retry)
        return Run.from_proto(response.run, deduplicated=response.deduplicated)

    def start_runs(self, runs: Sequence[StartRun | Mapping[str, Any]]) -> list[Run]:
        """Queue many runs in one transaction (StartRun specs or dicts of their fields); all or none.

        A bad request refuses the whole call: InvalidArgument with fields like `requests[3].workflow`.
        Retried on UNAVAILABLE only when every run has an idempotency_key.
        """
        specs = [start_spec(r) for r in runs]
        request = run_service_pb2.StartRunsRequest(requests=[s.to_proto() for s in specs])
        retry = self.retry if specs and all(s.idempotency_key for s in specs) else NO_RETRY
        response = self._call(self._runs.StartRuns, request, retry)
        return [Run.from_proto(r.run, deduplicated=r.deduplicated) for r in response.responses]

    def get_run(self, run_id: str) -> Run:
        """The run with its steps and attempts."""
        response = self._call(self._runs.GetRun, run_service_pb2.GetRunRequest(run_id=run_id), self.retry)
        return Run.from_proto(response.run, response.steps, response.attempts, tool_calls=response.tool_calls)

    def cancel(self, run_id: str, reason: str = "") -> Run:
        """Cancel a queued run, or ask a running one to stop (it ends CANCELED soon; `wait` for it).

        FailedPrecondition when the run has already ended.
        """
        request = run_service_pb2.CancelRunRequest(run_id=run_id, reason=reason)
        return Run.from_proto(self._call(self._runs.CancelRun, request, self.retry).run)

    def list_runs(
        self,
        status: RunStatus | str | None = None,
        workflow: str | None = None,
        page_size: int = 100,
        query: str = "",
    ) -> Iterator[Run]:
        """Every run (newest first), only those in `status` / of `workflow` when given; pages are
        fetched as the iterator is consumed."""
        token, seen = "", set()
        while True:
            runs, token = self.list_runs_page(status, workflow, page_size, query, token)
            yield from runs
            if not token or token in seen:
                return
            seen.add(token)

    def list_runs_page(
        self,
        status: RunStatus | str | None = None,
        workflow: str | None = None,
        page_size: int = 100,
        query: str = "",
        page_token: str = "",
    ) -> tuple[list[Run], str]:
        """One page of runs (page_size 0: the server's default) and the next page's token ('' after the last)."""
        request = list_runs_request(status, workflow, page_size, query, page_token)
        response = self._call(self._runs.ListRuns, request, self.retry)
        return [Run.from_proto(run) for run in response.runs], response.next_page_token

    def watch(self, run_id: str, after_sequence: int = 0, timeout: float | None = None) -> EventStream:
        """The run's events after `after_sequence`, until its terminal event (an iterator of Event).

        It reconnects by itself after UNAVAILABLE (a restarted API, a dropped connection), from the
        last sequence seen, with backoff: `watch_retry.attempts` failures in a row end it with Unavailable.
        `timeout` bounds the whole watch (DeadlineExceeded).
        """
        return EventStream(self, run_id, after_sequence, timeout)

    def wait(self, run_id: str, timeout: float | None = None) -> Run:
        """The run once it has ended (with its steps); RunTimeout when `timeout` seconds pass first.

        Waits on WatchRun (no polling); survives API restarts as `watch` does.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        run = self.get_run(run_id)
        if run.done:
            return run
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        try:
            for _ in self.watch(run_id, run.last_sequence, timeout=remaining):
                pass
        except RunsError as error:
            if error.status_code is not grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            raise RunTimeout(
                f"run {run_id} did not end within {timeout:g}s (last seen {run.status})", run_id, run
            ) from error
        return self.get_run(run_id)

    def rebuild(
        self,
        base_run_id: str,
        change: str | None = None,
        steps: Sequence[str] = (),
        input_patch: Mapping[str, Any] | None = None,
        dry_run: bool = False,
    ) -> Rebuild:
        """Re-execute what a change request type (`change`) or explicit `steps` touch on a SUCCEEDED
        run, reusing the rest; `input_patch` is a JSON merge patch of the base input. With `dry_run`
        only the plan comes back."""
        request = rebuild_request(base_run_id, change, steps, input_patch, dry_run)
        return Rebuild.from_proto(self._call(self._runs.RebuildRun, request, self.retry if dry_run else NO_RETRY))

    def explain_run(self, run_id: str) -> RunExplanation:
        """Why the run is where it is (ExplainRun): its place in the queue and the workers that could take it,
        who holds it, or how it ended; `summary` says it in one line."""
        request = run_service_pb2.ExplainRunRequest(run_id=run_id)
        return RunExplanation.from_proto(self._call(self._runs.ExplainRun, request, self.retry))

    def explain(self, run_id: str, step_key: str = "") -> list[StepExplanation]:
        """Why each step (or the one named) ran, hit the cache or was reused (ExplainStep)."""
        request = run_service_pb2.ExplainStepRequest(run_id=run_id, step_key=step_key)
        return [StepExplanation.from_proto(s) for s in self._call(self._runs.ExplainStep, request, self.retry).steps]

    # --- workflows -----------------------------------------------------------------------------

    def register_workflow(self, spec: SpecSource) -> Workflow:
        """Register a spec (a dict in the file form, or a YAML/JSON file's path); the same spec again
        returns the same version (`.created` False). The spec is validated locally first
        (InvalidArgument with every violation). Retried on UNAVAILABLE: registering is idempotent."""
        request = workflow_service_pb2.RegisterWorkflowRequest(spec=workflow_spec(spec))
        response = self._call(self._workflows.RegisterWorkflow, request, self.retry)
        return Workflow.from_proto(response.workflow, created=response.created)


class EventStream:
    """An iterator of a run's events that resumes after disconnects (see Client.watch).

    `last_sequence` is the sequence of the last event yielded; `reconnects` counts resumptions.
    """

    def __init__(self, client: Client, run_id: str, after_sequence: int, timeout: float | None) -> None:
        self.client, self.run_id = client, run_id
        self.last_sequence = after_sequence
        self.reconnects = 0
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._call: Any = None
        self._events: Generator[Event, None, None] = self._stream()

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def close(self) -> None:
        """Stop watching (cancels the call)."""
        if self._call is not None:
            self._call.cancel()
        self._events.close()

    def _remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.001)

    def _stream(self) -> Generator[Event, None, None]:
        retry = self.client.watch_retry
        failures = 0
        while True:
            request = run_service_pb2.WatchRunRequest(run_id=self.run_id, after_sequence=self.last_sequence)
            self._call = self.client._runs.WatchRun(request, timeout=self._remaining())
            try:
                for response in self._call:
                    event = Event.from_proto(response.event)
                    failures = 0
                    self.last_sequence = event.sequence
                    yield event
                    if event.terminal:
                        return
                return  # the server ended the stream: the run had ended before after_sequence
            except grpc.RpcError as error:
                failures += 1
                if status_code_of(error) not in RETRYABLE or failures >= retry.attempts:
                    raise from_rpc_error(error) from error
            finally:
                self._call.cancel()
            delay = retry.delay(failures)
            remaining = self._remaining()
            if remaining is not None and delay >= remaining:
                raise RunTimeout(f"watching run {self.run_id}: no answer within the timeout", self.run_id)
            time.sleep(delay)
            self.reconnects += 1
