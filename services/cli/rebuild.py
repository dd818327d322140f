"""`runs rebuild RUN` and `runs explain RUN [STEP]`: partial rebuilds of a finished run, and why steps ran.

`rebuild` prints the plan (each step's rerun or reuse and the reason) and the new run; `--dry-run`
creates nothing; `--wait` follows the new run to its end like `start --wait`. `explain` reads the
API's explanation of each step: the decision, the cache key, the miss reason and, for a miss, what
differs from the nearest earlier cache entry.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from services.cli.common import (
    EXIT_OK,
    UNARY_DEADLINE_SECONDS,
    cell,
    dumps,
    format_fields,
    format_table,
    json_object,
    out,
    plain_numbers,
    positive_float,
    to_dict,
)
from services.cli.runs import DEFAULT_WAIT_TIMEOUT_SECONDS, format_run, run_status_name, wait_exit_code, wait_for_run
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

    explain = add("explain", "Say why a run's steps ran, hit the cache or were reused, from the run's log.")
    explain.add_argument("run_id", metavar="RUN")
    explain.add_argument("step_key", metavar="STEP", nargs="?", default="", help="only this step [every step]")


def usage_problem(args: argparse.Namespace) -> str | None:
    """Why the rebuild flags do not fit together, or None."""
    if not args.change and not args.steps:
        return "give --change TYPE or --steps a,b (the steps to re-execute)"
    if args.dry_run and args.wait:
        return "--wait does not apply to --dry-run (nothing is created)"
    if args.timeout is not None and not args.wait:
        return "--timeout applies only with --wait"
    return None


def rebuild_request(args: argparse.Namespace) -> run_service_pb2.RebuildRunRequest:
    """The RebuildRunRequest for parsed `rebuild` arguments."""
    request = run_service_pb2.RebuildRunRequest(
        base_run_id=args.run_id, change_request_type=args.change, steps=args.steps or [], dry_run=args.dry_run
    )
    if args.input_patch is not None:
        request.input_patch.update(args.input_patch)
    return request


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


def format_explanations(steps: Sequence[run_service_pb2.StepExplanation]) -> str:
    """Every step's explanation, separated by blank lines."""
    return "\n\n".join(format_explanation(s) for s in steps) if steps else "no steps"


# --- commands ----------------------------------------------------------------------------------


def cmd_rebuild(stub: Any, args: argparse.Namespace) -> int:
    """`runs rebuild RUN`: print the plan and the new run (with --wait: the run as it ended)."""
    response = stub.RebuildRun(rebuild_request(args), timeout=UNARY_DEADLINE_SECONDS)
    run = response.run if response.HasField("run") else None
    if run is not None and args.wait:
        run = wait_for_run(stub, run, args)
    if args.json:
        out(dumps({"plan": [to_dict(p) for p in response.plan], "run": to_dict(run) if run is not None else None}))
    else:
        out(format_plan(response.plan))
        if run is None:
            out("\ndry run: nothing was created")
        elif args.wait:
            out("\n" + format_run(run))
        else:
            out(f"\nrun {run.run_id} {run_status_name(run.status)} (follow it with: runs watch {run.run_id})")
    return wait_exit_code(run) if run is not None and args.wait else EXIT_OK


def cmd_explain(stub: Any, args: argparse.Namespace) -> int:
    """`runs explain RUN [STEP]`: why each step ran, hit the cache or was reused."""
    request = run_service_pb2.ExplainStepRequest(run_id=args.run_id, step_key=args.step_key)
    steps = stub.ExplainStep(request, timeout=UNARY_DEADLINE_SECONDS).steps
    out(dumps({"steps": [to_dict(s) for s in steps]}) if args.json else format_explanations(steps))
    return EXIT_OK


COMMANDS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "rebuild": cmd_rebuild,
    "explain": cmd_explain,
}
