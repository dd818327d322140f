"""`runs rebuild RUN` and `runs explain RUN [STEP]`: partial rebuilds of a finished run, why a run is where
it is, and why its steps ran.

`rebuild` prints the plan (each step's rerun or reuse and the reason) and the new run; `--dry-run`
creates nothing; `--wait` follows the new run to its end like `start --wait`. `explain` reads the
API's explanation of each step: the decision, the cache key, the miss reason and, for a miss, what
differs from the nearest earlier cache entry. `explain RUN` without a STEP first says why the run is
where it is (ExplainRun: a queued run's place in its workspace's queue, its backoff and the live
workers that could take it; a running run's holder, heartbeat, lease and current steps; a finished
run's ending, failing step and attempts), then explains every step; `--json` prints
{"run": ExplainRunResponse, "steps": [...]}. With a STEP only that step is explained ({"steps": [...]}).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from runs_client import RunsError
from services.cli.common import (
    EXIT_OK,
    Api,
    cell,
    dumps,
    err,
    format_fields,
    format_table,
    iso_time,
    json_object,
    out,
    plain_numbers,
    positive_float,
    to_dict,
)
from services.cli.runs import DEFAULT_WAIT_TIMEOUT_SECONDS, format_run, run_status_name, wait_exit_code, wait_for_run
from shared.events import attempt_text
from shared.gen.runs.v1 import run_service_pb2

MAX_VALUE_SHOWN = 80  # characters of a differing value in `explain`
MAX_COMPONENTS_SHOWN = 400  # characters of a key's components in `explain` (all of them with --json)


def step_list(text: str) -> list[str]:
    """Comma-separated step keys (argparse type): 'copy,images' -> ['copy', 'images']."""
    keys = [key.strip() for key in text.split(",")]
    if not all(keys):
        raise argparse.ArgumentTypeError(f"must be step keys separated by commas, such as copy,images; got {text!r}")
    return keys


def add_parsers(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add `rebuild` and `explain` through `add(name, help)`."""
    rebuild = add(
        "rebuild",
        "Re-execute what a change touches in a SUCCEEDED run (the named steps and everything downstream); "
        "reuse the rest.",
    )
    rebuild.add_argument("run_id", metavar="RUN", help="the SUCCEEDED run to rebuild")
    rebuild.add_argument("--change", default="", metavar="TYPE",
                         help="a change request type the run's workflow declares (see `runs workflow NAME`)")
    rebuild.add_argument("--input-patch", type=json_object, default=None, metavar="JSON",
                         help="RFC 7396 merge patch over the run's input (null removes a field)")
    rebuild.add_argument("--steps", type=step_list, default=None, metavar="a,b",
                         help="steps to re-execute (instead of, or besides, --change)")
    rebuild.add_argument("--dry-run", action="store_true", help="print the plan only; nothing is created")
    rebuild.add_argument("--wait", action="store_true",
                         help="watch the new run until it ends, then print it; exit 1 if it did not succeed")
    rebuild.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                         help=f"with --wait: give up after this many seconds [{DEFAULT_WAIT_TIMEOUT_SECONDS:g}]")
    rebuild.add_argument("--quiet", action="store_true",
                         help="with --wait: no progress lines on stderr (steps and attempts)")

    explain = add(
        "explain",
        "Say why a run is where it is (queued: its place in the queue, backoff and the live workers that could "
        "take it; running: its holder, heartbeat, lease and current steps; finished: how it ended, the failing "
        "step, the attempts), then why each step ran, hit the cache or was reused. With STEP: only that step's "
        "explanation. --json: {\"run\": ..., \"steps\": [...]} (with STEP: {\"steps\": [...]}).",
    )
    explain.add_argument("run_id", metavar="RUN")
    explain.add_argument("step_key", metavar="STEP", nargs="?", default="",
                         help="explain only this step, not the run [the run, then every step]")


def usage_problem(args: argparse.Namespace) -> str | None:
    """Why the rebuild flags do not fit together, or None."""
    if not args.change and not args.steps:
        return "give --change TYPE or --steps a,b (the steps to re-execute)"
    if args.dry_run and args.wait:
        return "--wait does not apply to --dry-run (nothing is created)"
    if args.timeout is not None and not args.wait:
        return "--timeout applies only with --wait"
    if args.quiet and not args.wait:
        return "--quiet applies only with --wait"
    return None


# --- formatting --------------------------------------------------------------------------------


def format_plan(plan: Sequence[run_service_pb2.RebuildPlanStep]) -> str:
    """The plan as a table: each step, rerun or reuse, and why."""
    if not plan:
        return "no steps"
    return format_table(("STEP", "ACTION", "REASON"), ((cell(p.step_key), p.action, cell(p.reason, 100)) for p in plan))


def _value(value: Any) -> str:
    text = json.dumps(plain_numbers(value), separators=(",", ":"), sort_keys=True)
    return cell(text, MAX_VALUE_SHOWN)


def format_explanation(step: run_service_pb2.StepExplanation) -> str:
    """One step's explanation: a header line, then aligned fields and the differing components."""
    pairs = [("summary", step.summary)]
    if step.cache_display or step.cache_key:
        pairs.append(("key", f"{step.cache_display or '-'}  (sha256 {step.cache_key or '-'})"))
    if step.cache_reason:
        pairs.append(("cache", step.cache_reason))
    if step.source_run_id:
        pairs.append(("source_run", step.source_run_id))
    if step.HasField("components"):
        text = json.dumps(plain_numbers(to_dict(step)["components"]), separators=(",", ":"), sort_keys=True)
        if len(text) > MAX_COMPONENTS_SHOWN:
            text = text[:MAX_COMPONENTS_SHOWN] + f"... ({len(text)} characters; all of them with --json)"
        pairs.append(("components", text))
    if step.nearest_cache_key:
        pairs.append(("nearest", f"{step.nearest_cache_key} (run {step.nearest_source_run_id or '-'})"))
        if step.differences:
            lines = []
            for diff in step.differences:
                before, after = (to_dict(diff).get(name) for name in ("before", "after"))
                lines.append(f"{diff.path}: {_value(before)} -> {_value(after)}")
            pairs.append(("differences", "\n".join(lines)))
        else:
            pairs.append(("differences", "none: the same components"))
    body = format_fields(pairs)
    return f"{step.step_key}: {step.decision}\n" + "\n".join("  " + line for line in body.splitlines())


def format_run_explanation(response: run_service_pb2.ExplainRunResponse) -> str:
    """ExplainRun's answer: the run and its state, the summary line, then the facts of its state and attempts."""
    run = response.run
    pairs = [("run", f"{run.run_id} {run_status_name(run.status)} (workflow {run.workflow or '-'}, "
                     f"workspace {run.workspace_id or '-'})"),
             ("state", response.state), ("why", response.summary)]
    if response.HasField("queue"):
        q = response.queue
        pairs += [
            ("queue", f"{q.runs_ahead} ahead ({q.due_ahead} of them due now) in workspace {q.workspace_id}"),
            ("due", "now" if q.due
             else f"backing off until {iso_time(q, 'next_attempt_at')} ({q.backoff_seconds:.0f}s)"),
            ("workers", f"{q.live_workers} live serving the workspace ({q.free_slots} free slots), "
                        f"{q.live_workers_elsewhere} live elsewhere"),
            ("tools", f"{', '.join(q.tools_needed) or 'unknown'}: available {q.tools_available} "
                      f"({q.live_workers_with_tools} with them, {q.live_workers_tools_unknown} declared none)"),
        ]
        if q.worker_ids:
            pairs.append(("worker_ids", ", ".join(q.worker_ids)))
    if response.HasField("holder"):
        h = response.holder
        pairs += [
            ("worker", f"{h.worker_id or '-'} ({'live' if h.worker_live else 'lease expired'})"),
            ("claimed_at", iso_time(h, "claimed_at")),
            ("heartbeat", iso_time(h, "last_heartbeat_at")),
            ("lease_until", iso_time(h, "lease_expires_at")),
            ("steps", ", ".join(h.running_steps) or "none running"),
            ("attempt", attempt_text(h.attempt, h.max_attempts, response.run.released_attempts)),
            ("cancel", (f"requested: {h.cancel_reason}" if h.cancel_reason else "requested")
             if h.cancel_requested else "not requested"),
        ]
    if response.HasField("ending"):
        e = response.ending
        pairs += [("finished_at", iso_time(e, "finished_at")), ("stop_reason", e.stop_reason),
                  ("error", e.error)]
        if e.failed_step:
            pairs.append(("failed_step", f"{e.failed_step}: {e.failed_step_error or '-'}"))
    text = format_fields(pairs)
    if response.attempts:
        text += "\nattempts:\n" + format_table(
            ("ATTEMPT", "WORKER", "CLAIMED_AT", "ENDED_AT", "OUTCOME", "ERROR"),
            ((str(a.attempt), cell(a.worker_id), iso_time(a, "claimed_at"), iso_time(a, "ended_at"), a.outcome,
              cell(a.error)) for a in response.attempts),
        )
    return text


def format_explanations(steps: Sequence[run_service_pb2.StepExplanation]) -> str:
    """Every step's explanation, separated by blank lines."""
    return "\n\n".join(format_explanation(s) for s in steps) if steps else "no steps"


# --- commands ----------------------------------------------------------------------------------


def cmd_rebuild(api: Api, args: argparse.Namespace) -> int:
    """`runs rebuild RUN`: print the plan and the new run (with --wait: the run as it ended)."""
    response = api.client.rebuild(
        args.run_id, args.change or None, args.steps or (), args.input_patch, args.dry_run
    ).proto
    run = response.run if response.HasField("run") else None
    if run is not None and args.wait:
        run = wait_for_run(api, run, args, progress=not args.quiet)
    if args.json:
        out(dumps({"plan": [to_dict(p) for p in response.plan], "run": to_dict(run) if run is not None else None}))
    else:
        out(format_plan(response.plan))
        if run is None:
            out("\ndry run: nothing was created")
        elif args.wait:
            out("\n" + format_run(run, full_output=True))
        else:
            out(f"\nrun {run.run_id} {run_status_name(run.status)} (follow it with: runs watch {run.run_id})")
    return wait_exit_code(run) if run is not None and args.wait else EXIT_OK


def cmd_explain(api: Api, args: argparse.Namespace) -> int:
    """`runs explain RUN [STEP]`: why the run is where it is (without STEP), then why each step (or STEP) ran."""
    run = None
    if not args.step_key:
        try:
            run = api.client.explain_run(args.run_id).proto
        except RunsError as error:
            if error.status_code is not grpc.StatusCode.UNIMPLEMENTED:
                raise
            err("this API does not explain runs (no ExplainRun: an older server); the steps only")
    steps = [s.proto for s in api.client.explain(args.run_id, args.step_key)]
    if args.json:
        document: dict[str, Any] = {"run": to_dict(run)} if run is not None else {}
        out(dumps({**document, "steps": [to_dict(s) for s in steps]}))
    elif run is not None:
        out(format_run_explanation(run) + "\n\nsteps:\n" + format_explanations(steps))
    else:
        out(format_explanations(steps))
    return EXIT_OK


COMMANDS: dict[str, Callable[[Api, argparse.Namespace], int]] = {
    "rebuild": cmd_rebuild,
    "explain": cmd_explain,
}
