"""A run for people and for `--wait`: its aligned fields, and following it to its end (`start --wait`,
`rebuild --wait`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc

from services.cli.common import (
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_UNAVAILABLE,
    UNARY_DEADLINE_SECONDS,
    CliError,
    call_status,
    compact_struct,
    dumps,
    enum_name,
    err,
    format_fields,
    iso_time,
    out,
    to_dict,
)
from shared.gen.runs.v1 import run_pb2, run_service_pb2

DEFAULT_WAIT_TIMEOUT_SECONDS = 300.0
TERMINAL_EVENT_TYPES = frozenset({"run.completed", "run.failed", "run.canceled"})


def run_status_name(value: int) -> str:
    """A RunStatus without its RUN_STATUS_ prefix."""
    return enum_name(run_pb2.RunStatus, value, "RUN_STATUS_")


def format_run(run: run_pb2.Run) -> str:
    """A run as aligned key/value lines."""
    pairs = [
        ("run_id", run.run_id),
        ("status", run_status_name(run.status)),
        ("workflow", run.workflow),
    ]
    if run.workflow_version:
        pairs.append(("workflow_version", str(run.workflow_version)))
    if run.trigger == "rebuild":
        pairs.append(("trigger", f"rebuild of run {run.base_run_id}"))
        pairs.append(("change_request", run.change_request or "(explicit steps)"))
    pairs += [
        ("attempt", f"{run.attempt}/{run.max_attempts}"),
        ("created_at", iso_time(run, "created_at")),
    ]
    if run.created_by:
        pairs.append(("started_by", run.created_by))
    pairs += [
        ("started_at", iso_time(run, "started_at")),
        ("finished_at", iso_time(run, "finished_at")),
        ("stop_reason", run.stop_reason),
        ("error", run.error),
    ]
    if run.HasField("cancel_requested_at"):
        pairs.append(("cancel_requested_at", iso_time(run, "cancel_requested_at")))
    if run.cancel_requested_by:
        pairs.append(("canceled_by", run.cancel_requested_by))
    if run.cancel_reason:
        pairs.append(("cancel_reason", run.cancel_reason))
    if run.HasField("next_attempt_at"):
        pairs.append(("next_attempt_at", iso_time(run, "next_attempt_at")))
    if run.worker_id:
        pairs.append(("worker_id", run.worker_id))
    if run.HasField("lease_expires_at"):
        pairs.append(("lease_expires_at", iso_time(run, "lease_expires_at")))
    if run.idempotency_key:
        pairs.append(("idempotency_key", run.idempotency_key))
    if run.tenant_id:
        pairs.append(("tenant_id", run.tenant_id))
    if run.project_id:
        pairs.append(("project_id", run.project_id))
    if run.workspace_id:
        pairs.append(("workspace_id", run.workspace_id))
    if run.HasField("steps_summary"):
        pairs.append(("steps_summary", format_steps_summary(run.steps_summary)))
    pairs.append(("input", compact_struct(run, "input")))
    if run.HasField("output"):
        pairs.append(("output", shown_output(compact_struct(run, "output"))))
    pairs.append(("last_sequence", str(run.last_sequence)))
    return format_fields(pairs)


MAX_OUTPUT_SHOWN = 2000  # characters of a run's output in `runs get` (all of it with --json)


def shown_output(text: str) -> str:
    """A run's output for reading: cut after MAX_OUTPUT_SHOWN characters, saying where the rest is."""
    if len(text) <= MAX_OUTPUT_SHOWN:
        return text
    return text[:MAX_OUTPUT_SHOWN] + f"... ({len(text)} characters; all of it with --json)"


def format_steps_summary(summary: run_pb2.StepsSummary) -> str:
    """'5 steps: 3 succeeded, 1 running, 1 pending' (states with no step left out)."""
    counts = [
        (summary.succeeded, "succeeded"),
        (summary.running, "running"),
        (summary.pending, "pending"),
        (summary.failed, "failed"),
        (summary.skipped, "skipped"),
        (summary.canceled, "canceled"),
    ]
    parts = [f"{n} {state}" for n, state in counts if n]
    total = f"{summary.total} step" + ("" if summary.total == 1 else "s")
    return total + (": " + ", ".join(parts) if parts else "")


def print_run(run: run_pb2.Run, as_json: bool) -> None:
    """Print a run as JSON or as aligned lines."""
    out(dumps(to_dict(run)) if as_json else format_run(run))


def print_current(stub: Any, run_id: str, as_json: bool) -> None:
    """Best effort: print the run as it is now (after a --wait timeout)."""
    try:
        current = stub.GetRun(run_service_pb2.GetRunRequest(run_id=run_id), timeout=UNARY_DEADLINE_SECONDS).run
    except grpc.RpcError:
        return
    print_run(current, as_json)


def wait_for_end(stub: Any, run_id: str, timeout: float) -> None:
    """Follow WatchRun until the run's terminal event (or the stream ends), within `timeout` seconds."""
    stream = stub.WatchRun(run_service_pb2.WatchRunRequest(run_id=run_id), timeout=timeout)
    try:
        for item in stream:
            if item.event.type in TERMINAL_EVENT_TYPES:
                return
    finally:
        cancel = getattr(stream, "cancel", None)
        if callable(cancel):
            cancel()


def wait_exit_code(run: run_pb2.Run) -> int:
    """0 when the run SUCCEEDED, 1 when it FAILED or was CANCELED (or has not ended)."""
    status = run_status_name(run.status)
    if status == "SUCCEEDED":
        return EXIT_OK
    if status not in ("FAILED", "CANCELED"):
        err(f"error: the watch of run {run.run_id} ended while the run is {status}")
    return EXIT_RUN_FAILED


def wait_for_run(stub: Any, run: run_pb2.Run, args: argparse.Namespace) -> run_pb2.Run:
    """Follow `run` until it ends (within --timeout) and return it as it ended.

    When the time runs out first, the run is printed as it is and CliError exits 5.
    """
    timeout = args.timeout or DEFAULT_WAIT_TIMEOUT_SECONDS
    if run_status_name(run.status) not in ("SUCCEEDED", "FAILED", "CANCELED"):
        if sys.stderr.isatty():
            err(f"run {run.run_id} {run_status_name(run.status).lower()}; waiting up to {timeout:g}s ...")
        try:
            wait_for_end(stub, run.run_id, timeout)
        except grpc.RpcError as error:
            code, _ = call_status(error)
            if code is not grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            print_current(stub, run.run_id, args.json)
            raise CliError(
                [
                    f"error: DEADLINE_EXCEEDED: run {run.run_id} did not end within {timeout:g}s "
                    f"(follow it with: runs watch {run.run_id})"
                ],
                EXIT_UNAVAILABLE,
            ) from None
    final: run_pb2.Run = stub.GetRun(
        run_service_pb2.GetRunRequest(run_id=run.run_id), timeout=UNARY_DEADLINE_SECONDS
    ).run
    return final
