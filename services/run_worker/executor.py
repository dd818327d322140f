"""Executes one claimed run: plans its steps, invokes the tools, reports every lifecycle event.

The same code serves the standalone worker, `--once` and the API's embedded worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from opentelemetry import trace
from ulid import ULID

from services.run_worker.reporter import Reporter, ReporterClosed, ReportRefused, StaleAttempt, make_event, restamp
from services.run_worker.tools import Tool, ToolContext, ToolError
from shared.events import EventType
from shared.logs import log_context
from shared.telemetry import context_from_carrier
from shared.workflows import WorkflowInputError, plan

log = logging.getLogger(__name__)
tracer = trace.get_tracer("runs.worker")


class Result(enum.Enum):
    """How an execution ended, from the worker's side."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # run.failed reported (the API may turn it into a retry)
    CANCELED = "canceled"
    LOST = "lost"  # the attempt is no longer ours: nothing more was reported
    RELEASED = "released"  # given back on shutdown


@dataclass
class RunHandle:
    """A run the worker holds: its attempt (fencing token) and the signals that stop it."""

    run_id: str
    attempt: int
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


class _Interrupted(Exception):
    pass


async def _race(tool_call: asyncio.Task[Any], handle: RunHandle) -> Any:
    """Await the tool unless the run is canceled, lost or released first (then the tool is cancelled)."""
    signals = {
        asyncio.create_task(handle.cancel.wait()),
        asyncio.create_task(handle.lost.wait()),
        asyncio.create_task(handle.release.wait()),
    }
    try:
        done, _ = await asyncio.wait({tool_call, *signals}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        tool_call.cancel()  # our own task is being cancelled: the tool (a subprocess, say) goes too
        raise
    finally:
        for s in signals:
            s.cancel()
    if tool_call in done:
        return tool_call.result()
    tool_call.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await tool_call
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError()
    raise _Interrupted()


async def _send(reporter: Reporter, handle: RunHandle, events: list[Any]) -> list[Any]:
    """Report events; if the run was re-adopted under a new attempt meanwhile, re-send them under it."""
    while True:
        try:
            return await reporter.report(events)
        except StaleAttempt:
            if not events or handle.lost.is_set() or handle.attempt == events[0].attempt:
                raise
            events = [restamp(e, handle.attempt) for e in events]


async def execute(claimed: Any, handle: RunHandle, reporter: Reporter, tools: dict[str, Tool]) -> Result:
    """Run one claimed run (a ClaimedRun message) to its end and report it."""
    run_id, attempt = claimed.run_id, handle.attempt
    run_input = json_format.MessageToDict(claimed.input)
    parent = context_from_carrier(dict(claimed.trace_context))
    with log_context(run_id=run_id, attempt=attempt), tracer.start_as_current_span(
        "run.execute", context=parent, attributes={"run.id": run_id, "run.attempt": attempt}
    ):
        try:
            return await _execute(claimed.workflow, run_input, run_id, handle, reporter, tools)
        except StaleAttempt as err:
            log.warning("attempt is no longer current; stopping the run: %s", err)
            return Result.LOST
        except ReportRefused as err:
            return await _fail_refused(run_id, handle, reporter, err)


async def _fail_refused(run_id: str, handle: RunHandle, reporter: Reporter, err: ReportRefused) -> Result:
    """A report of the run was refused: end the run FAILED with a plain event that cannot be refused the same way."""
    if err.not_ours:
        log.error("the API does not accept this worker's reports for the run (%s); stopping it", err,
                  extra={"run_id": run_id})
        return Result.LOST  # its lease lapses and the reaper gives it to another worker
    error = f"the worker's report was refused: {str(err)[:500]}"
    log.error("report refused; failing the run", extra={"run_id": run_id})
    try:
        await _send(reporter, handle, [make_event(run_id, handle.attempt, EventType.RUN_FAILED,
                                                  {"error": error, "retryable": False})])
    except (StaleAttempt, ReportRefused, ReporterClosed):
        return Result.LOST  # not ours any more, or the API refuses even that: the lease reaper ends it
    return Result.FAILED


async def _execute(
    workflow: str, run_input: dict[str, Any], run_id: str, handle: RunHandle, reporter: Reporter,
    tools: dict[str, Tool],
) -> Result:
    def ev(type_: str, payload: dict[str, Any] | None = None) -> Any:
        return make_event(run_id, handle.attempt, type_, payload)

    def step_failed(
        call_id: str, step_key: str, error: str, final: str, final_payload: dict[str, Any], output: Any = None
    ) -> list[Any]:
        """The tool call and its step fail with `error`; then the run's own closing event."""
        return [
            ev(EventType.TOOL_FAILED, {"tool_call_id": call_id, "error": error, "output": output}),
            ev(EventType.STEP_FAILED, {"step_key": step_key, "error": error}),
            ev(final, final_payload),
        ]

    try:
        steps = plan(workflow, run_input)
    except (KeyError, WorkflowInputError) as err:
        message = f"unknown workflow {workflow!r}" if isinstance(err, KeyError) else str(err)
        await _send(reporter, handle, [ev(EventType.RUN_STARTED), ev(EventType.RUN_FAILED,
                                                             {"error": message, "retryable": False})])
        return Result.FAILED
    pending = [ev(EventType.RUN_STARTED)]
    for step in steps:
        if handle.lost.is_set():
            return Result.LOST
        if handle.cancel.is_set():
            await _send(reporter, handle, [*pending, ev(EventType.RUN_CANCELED, {"reason": "cancel requested"})])
            return Result.CANCELED
        tool = tools.get(step.tool)
        call_id = str(ULID())
        pending += [
            ev(EventType.STEP_CREATED, {"step_key": step.key, "tool": step.tool}),
            ev(EventType.STEP_STARTED, {"step_key": step.key}),
            ev(EventType.TOOL_INVOKED,
               {"tool_call_id": call_id, "step_key": step.key, "tool": step.tool, "input": step.args}),
        ]
        # Recorded before the tool runs: a stale attempt learns it here, before doing any work.
        await _send(reporter, handle, pending)
        pending = []
        with tracer.start_as_current_span(f"tool.{step.tool}", attributes={"tool.name": step.tool}):
            try:
                if tool is None:
                    raise ToolError(f"tool {step.tool!r} is not enabled on this worker (RUN_WORKER_TOOLS)")
                task = asyncio.ensure_future(tool(step.args, ToolContext(run_id, handle.attempt, step.key)))
                output = await _race(task, handle)
            except _Interrupted:
                if handle.lost.is_set():
                    return Result.LOST
                if handle.release.is_set():
                    await _send(reporter, handle, step_failed(
                        call_id, step.key, "worker shutting down", EventType.RUN_FAILED,
                        {"error": "worker shut down before the run finished", "retryable": True, "released": True},
                    ))
                    return Result.RELEASED
                await _send(reporter, handle, step_failed(
                    call_id, step.key, "canceled", EventType.RUN_CANCELED, {"reason": "cancel requested"}
                ))
                return Result.CANCELED
            except Exception as err:
                error = err.message if isinstance(err, ToolError) else f"{type(err).__name__}: {err}"
                retryable = err.retryable if isinstance(err, ToolError) else True
                out = err.output if isinstance(err, ToolError) else None
                log.info("tool %s failed: %s", step.tool, error)
                await _send(reporter, handle, step_failed(
                    call_id, step.key, error, EventType.RUN_FAILED, {"error": error, "retryable": retryable}, out
                ))
                return Result.FAILED
        pending += [
            ev(EventType.TOOL_SUCCEEDED, {"tool_call_id": call_id, "output": output}),
            ev(EventType.STEP_SUCCEEDED, {"step_key": step.key}),  # the output lives on the tool call
        ]
    await _send(reporter, handle, [*pending, ev(EventType.RUN_COMPLETED)])
    return Result.SUCCEEDED
