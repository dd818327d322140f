"""A run for people and for `--wait`: its aligned fields, and following it to its end (`start --wait`,
`rebuild --wait`)."""

from __future__ import annotations

import argparse
import time

import grpc

from runs_client import Event, RunsError
from runs_client.models import TERMINAL_EVENT_TYPES
from services.cli.common import (
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_UNAVAILABLE,
    Api,
    CliError,
    compact_struct,
    dumps,
    enum_name,
    err,
    format_fields,
    iso_time,
    out,
    to_dict,
)
from shared.events import attempt_text
from shared.gen.runs.v1 import run_pb2

DEFAULT_WAIT_TIMEOUT_SECONDS = 300.0


def run_status_name(value: int) -> str:
    """A RunStatus without its RUN_STATUS_ prefix."""
    return enum_name(run_pb2.RunStatus, value, "RUN_STATUS_")


def format_run(run: run_pb2.Run, full_output: bool = False) -> str:
    """A run as aligned key/value lines (the output cut after MAX_OUTPUT_SHOWN characters unless `full_output`)."""
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
        ("attempt", attempt_text(run.attempt, run.max_attempts, run.released_attempts)),
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
        output = compact_struct(run, "output")
        pairs.append(("output", output if full_output else shown_output(output)))
    pairs.append(("last_sequence", str(run.last_sequence)))
    return format_fields(pairs)


MAX_OUTPUT_SHOWN = 2000  # characters of a run's output in `runs get` (all of it with --json)


def shown_output(text: str) -> str:
    """A run's output for reading: cut after MAX_OUTPUT_SHOWN characters, saying where the rest is."""
    if len(text) <= MAX_OUTPUT_SHOWN:
        return text
    return text[:MAX_OUTPUT_SHOWN] + f"... ({len(text)} characters; all of it with --output or --json)"


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


def print_run(run: run_pb2.Run, as_json: bool, full_output: bool = False) -> None:
    """Print a run as JSON or as aligned lines (see format_run)."""
    out(dumps(to_dict(run)) if as_json else format_run(run, full_output))


def print_current(api: Api, run_id: str, as_json: bool) -> None:
    """Best effort: print the run as it is now (after a --wait timeout)."""
    try:
        current = api.client.get_run(run_id).proto
    except RunsError:
        return
    print_run(current, as_json)


def progress_line(event: Event) -> str | None:
    """What `--wait` tells about an event on stderr (None for the ones it leaves out: tool calls, creation)."""
    payload, kind = event.payload, event.type.split(".", 1)[-1]
    if event.type.startswith("step.") and event.type != "step.created":
        line = f"step {payload.get('step_key', '?')} {kind}"
        detail = payload.get("error") or payload.get("reason") or ""
        if isinstance(detail, dict):
            detail = detail.get("message") or detail.get("code") or ""
        return line + (f": {detail}" if detail and kind != "succeeded" else "")
    if event.type == "run.claimed":
        return f"attempt {event.attempt} claimed by worker {event.worker_id or '?'}"
    if event.type == "run.requeued":
        return f"attempt {event.attempt} ended ({payload.get('reason', 'requeued')}); the run is queued again"
    if event.type == "run.cancel_requested":
        return "cancel requested"
    if event.type in TERMINAL_EVENT_TYPES:
        return f"run {kind}"
    return None


def follow(api: Api, run: run_pb2.Run, timeout: float, progress: bool) -> None:
    """Follow the run's events (resuming after disconnects) until it ends, within `timeout` seconds; with
    `progress`, a line on stderr per step and attempt change, with the seconds since the start."""
    started = time.monotonic()
    for event in api.client.watch(run.run_id, run.last_sequence, timeout=timeout):
        line = progress_line(event) if progress else None
        if line:
            err(f"{time.monotonic() - started:7.1f}s  {line}")


def wait_exit_code(run: run_pb2.Run) -> int:
    """0 when the run SUCCEEDED, 1 when it FAILED or was CANCELED (or has not ended)."""
    status = run_status_name(run.status)
    if status == "SUCCEEDED":
        return EXIT_OK
    if status not in ("FAILED", "CANCELED"):
        err(f"error: the watch of run {run.run_id} ended while the run is {status}")
    return EXIT_RUN_FAILED


def wait_for_run(api: Api, run: run_pb2.Run, args: argparse.Namespace, progress: bool = True) -> run_pb2.Run:
    """Follow `run` until it ends (within --timeout) and return it as it ended.

    When the time runs out first, the run is printed as it is and CliError exits 5.
    """
    timeout = args.timeout or DEFAULT_WAIT_TIMEOUT_SECONDS
    if run_status_name(run.status) not in ("SUCCEEDED", "FAILED", "CANCELED"):
        if progress:
            err(f"run {run.run_id} {run_status_name(run.status).lower()}; waiting up to {timeout:g}s ...")
        try:
            follow(api, run, timeout, progress)
        except RunsError as error:
            if error.status_code is not grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            print_current(api, run.run_id, args.json)
            raise CliError(
                [
                    f"error: DEADLINE_EXCEEDED: run {run.run_id} did not end within {timeout:g}s "
                    f"(follow it with: runs watch {run.run_id})"
                ],
                EXIT_UNAVAILABLE,
            ) from None
    return api.client.get_run(run.run_id).proto
