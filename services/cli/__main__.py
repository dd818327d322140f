"""`runs`: the command-line client of the Run API (runs.v1.RunService, WorkflowService and KeyService over gRPC).

Commands:
  runs start [--workflow W [--workflow-version N]] [--input JSON] [--idempotency-key K]
             [--max-attempts N] [--project P] [--workspace W] [--tool NAME [--args JSON]]
             [--wait [--timeout SECONDS]]
             [--count N]       (N runs in one StartRuns call)
  runs get ID                      (the run, its steps as a DAG table, tool calls, attempts)
  runs list [--status S] [--workflow W] [--page-size N] [--page-token T] [--all]
  runs watch ID [--after-sequence N]
  runs cancel ID [--reason TEXT]
  runs steps RUN [--status S]
  runs artifacts RUN
  runs artifact RUN STEP NAME -o FILE
  runs rebuild RUN --change TYPE [--input-patch JSON] [--steps a,b] [--dry-run] [--wait [--timeout SECONDS]]
  runs explain RUN [STEP]          (why the run is queued, running or ended; then why each step ran,
                                   hit the cache or was reused; with STEP only that step)
  runs cache ls [--workflow W] [--step S] [--page-size N] [--page-token T] [--all]
  runs cache rm --workflow W [--step S] [--key K]
  runs workflows [--page-size N] [--page-token T] [--all]
  runs workflow NAME [--version N]
  runs register FILE               (YAML or JSON; '-' reads stdin)
  runs keys create --role client|worker|admin [--tenant T] [--project P] [--workspace W]
                   [--ttl SECONDS] [--description D]
  runs keys list [--include-revoked] [--page-size N] [--page-token T] [--all]
  runs keys revoke KEY_ID
  runs stats                       (your tenant's counters; needs an admin key when keys are required)
  runs --version

Global flags (before or after the command): --addr HOST:PORT (default $RUN_API_ADDR, else
127.0.0.1:50051) and --json (machine-readable output: protobuf JSON with proto field names;
`watch --json` prints one JSON object per line per event). JSON and tables name statuses the same
way, without the enum prefix ("SUCCEEDED", not "RUN_STATUS_SUCCEEDED"); 64-bit counters such as
last_sequence are numbers, and whole numbers in inputs and outputs print without ".0". In `get`,
a step or tool call that a run's cancel interrupted shows CANCELED (the server records FAILED or
leaves it unfinished).

Connection: TLS when --tls-ca FILE ($RUNS_TLS_CA) names the CA of the API's certificate; for an
API that requires mutual TLS also --tls-cert FILE and --tls-key FILE ($RUNS_TLS_CERT,
$RUNS_TLS_KEY). The API key goes in $RUNS_API_KEY (--api-key works too, but flags show in `ps`).

Exit codes:
  0    success (for `start --wait`: the run SUCCEEDED)
  1    `start --wait`: the run ended FAILED or CANCELED (the run is still printed);
       `artifact`: the bytes did not match the artifact's sha256, or FILE cannot be written;
       also any error not listed below
  2    usage error (also a spec file `register` cannot read or finds invalid), or the API
       answered INVALID_ARGUMENT, ALREADY_EXISTS or RESOURCE_EXHAUSTED
  3    NOT_FOUND (no run, key, workflow, version or artifact by that name)
  4    FAILED_PRECONDITION (e.g. cancel a run that has already ended)
  5    UNAVAILABLE or DEADLINE_EXCEEDED: the API cannot be reached or did not answer in time
       (also `start --wait` when --timeout elapsed before the run ended, and a failed TLS handshake)
  6    UNAUTHENTICATED or PERMISSION_DENIED: no API key, a key that is unknown, revoked or
       expired, or a key whose role, tenant or project does not allow the call
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import grpc

from runs_client import Run, RunsError, RunTimeout
from services.cli import cache, keys, rebuild, stats, steps, workflows
from services.cli.common import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UNARY_DEADLINE_SECONDS,
    Api,
    CliError,
    cell,
    client_tls,
    collect_pages,
    compact_struct,
    connect,
    connection_problem,
    describe_rpc_error,
    dumps,
    enum_name,
    err,
    format_table,
    global_flags,
    iso_time,
    json_object,
    non_negative_int,
    out,
    positive_float,
    positive_int,
    print_page,
    shown_status,
    to_dict,
)
from services.cli.runs import (
    DEFAULT_WAIT_TIMEOUT_SECONDS,
    MAX_OUTPUT_SHOWN,
    format_run,
    print_run,
    run_status_name,
    wait_exit_code,
    wait_for_run,
)
from shared.events import attempt_text
from shared.gen.runs.v1 import (
    key_service_pb2_grpc,
    ops_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
    workflow_service_pb2_grpc,
)

TOOL_WORKFLOW = "runtime.tool"
CANCEL_WAIT_SECONDS = 10.0  # how long `cancel` waits for a running run to stop
STATUS_CHOICES = ("queued", "running", "succeeded", "failed", "canceled")


DISTRIBUTION = "runs"  # pyproject.toml's [project] name


def package_version() -> str:
    """The installed version of this project's distribution ('unknown' when it is not installed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


# --- argument parsing --------------------------------------------------------------------------


def build_parser(env: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; `env` (default os.environ) supplies RUN_API_ADDR, RUNS_TLS_* and RUNS_API_KEY."""
    return _build_parsers(env)[0]


def _build_parsers(env: dict[str, str] | None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and the parser of each command, by name."""
    environ = os.environ if env is None else env
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="runs",
        description=(
            "Start, inspect, watch, cancel and rebuild runs of the Run API; explain their steps; manage the step "
            "cache; register workflows; manage API keys; show your tenant's counters (stats)."
        ),
        epilog=EXIT_CODES,
        formatter_class=formatter,
        parents=[global_flags(environ, suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = global_flags(environ, suppress=True)
    commands: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        commands[name] = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXIT_CODES,
            formatter_class=formatter,
            parents=[common],
        )
        return commands[name]

    start = add("start", "Start a run (and optionally wait until it ends).")
    start.add_argument("--workflow", default="", help="workflow name [server default: runtime.noop]")
    start.add_argument(
        "--workflow-version",
        type=positive_int,
        default=0,
        metavar="N",
        help="pin this version of --workflow (see `runs workflow NAME`) [the latest]",
    )
    start.add_argument("--input", type=json_object, default=None, metavar="JSON", help="run input, a JSON object")
    start.add_argument(
        "--count",
        type=positive_int,
        default=1,
        metavar="N",
        help="start N such runs in one StartRuns call (at most 1000; prints their ids) [1]",
    )
    start.add_argument(
        "--idempotency-key", default="", metavar="KEY", help="the same key returns the same run, never a second one"
    )
    start.add_argument(
        "--max-attempts",
        type=positive_int,
        default=0,
        metavar="N",
        help="attempts before the run fails [server default]",
    )
    start.add_argument(
        "--project", default="", metavar="P", help="project inside your tenant [the key's project, else default]"
    )
    start.add_argument(
        "--workspace", default="", metavar="W",
        help="workspace the run belongs to (only workers serving W claim it) [the key's workspace, else default]",
    )
    start.add_argument(
        "--tool",
        default=None,
        metavar="NAME",
        help=f'shorthand for --workflow {TOOL_WORKFLOW} --input \'{{"tool": NAME, "args": ARGS}}\'',
    )
    start.add_argument(
        "--args",
        type=json_object,
        default=None,
        metavar="JSON",
        dest="tool_args",
        help="arguments of --tool, a JSON object [{}]",
    )
    start.add_argument(
        "--wait", action="store_true", help="watch the run until it ends, then print it; exit 1 if it did not succeed"
    )
    start.add_argument(
        "--timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help=f"with --wait: give up after this many seconds [{DEFAULT_WAIT_TIMEOUT_SECONDS:g}]",
    )
    start.add_argument(
        "--quiet", action="store_true", help="with --wait: no progress lines on stderr (steps and attempts)"
    )

    get = add("get", "Show a run with its steps (in the DAG's order), tool calls and attempts.")
    get.add_argument("run_id", metavar="ID")
    get.add_argument(
        "--output", action="store_true",
        help=f"print the run's and each step's output in full (else the run's is cut after {MAX_OUTPUT_SHOWN} "
        "characters and a step's after a table cell)",
    )

    lst = add("list", "List runs, newest first.")
    lst.add_argument("--status", type=str.lower, choices=STATUS_CHOICES, default=None, help="only runs in this status")
    lst.add_argument("--workflow", default="", help="only runs of this workflow")
    lst.add_argument(
        "--page-size",
        type=positive_int,
        default=0,
        metavar="N",
        help="runs per page [server default: 50, at most 500]",
    )
    lst.add_argument("--page-token", default="", metavar="TOKEN", help="continue from this page token")
    lst.add_argument("--all", action="store_true", help="follow next_page_token until the last page")

    watch = add("watch", "Print a run's events as they happen, until the run ends.")
    watch.add_argument("run_id", metavar="ID")
    watch.add_argument(
        "--after-sequence",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="only events with a greater sequence [0: from the start]",
    )

    cancel = add("cancel", "Cancel a queued run, or ask a running one to stop.")
    cancel.add_argument("run_id", metavar="ID")
    cancel.add_argument("--reason", default="", metavar="TEXT", help="why (recorded in the run's log)")
    cancel.add_argument(
        "--no-wait", action="store_true", help="return at once, without waiting for a running run to stop"
    )
    cancel.add_argument(
        "--timeout", type=positive_float, default=CANCEL_WAIT_SECONDS, metavar="SECONDS",
        help=f"wait at most this long for a running run to stop [{CANCEL_WAIT_SECONDS:g}]",
    )

    steps.add_parsers(add)
    rebuild.add_parsers(add)
    workflows.add_parsers(add)
    stats.add_parsers(add)

    group = add("cache", "List or remove step cache entries of your tenant.")
    commands.update({f"cache {name}": p for name, p in cache.add_parsers(group, common, EXIT_CODES).items()})

    group = add("keys", "Create, list and revoke API keys (needs an admin key).")
    commands.update({f"keys {name}": p for name, p in keys.add_parsers(group, common, EXIT_CODES).items()})
    return parser, commands


def parse_args(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the command line; usage errors exit 2 (SystemExit) with a message."""
    parser, commands = _build_parsers(env)
    args = parser.parse_args(argv)
    problem = connection_problem(args)
    if problem:
        parser.error(problem)
    if args.command == "start":
        problem = start_usage_problem(args)
        if problem:
            commands["start"].error(problem)
    if args.command == "rebuild":
        problem = rebuild.usage_problem(args)
        if problem:
            commands["rebuild"].error(problem)
    return args


def start_usage_problem(args: argparse.Namespace) -> str | None:
    """Why the start flags do not fit together, or None."""
    if args.tool is not None:
        if not args.tool:
            return "--tool needs a tool name"
        if args.workflow or args.input is not None:
            return "--tool cannot be combined with --workflow or --input (it sets both)"
    elif args.tool_args is not None:
        return "--args needs --tool NAME"
    if args.workflow_version and not args.workflow:
        return "--workflow-version needs --workflow NAME"
    if args.timeout is not None and not args.wait:
        return "--timeout applies only with --wait"
    if args.quiet and not args.wait:
        return "--quiet applies only with --wait"
    if args.count > 1 and (args.wait or args.idempotency_key):
        return "--count cannot be combined with --wait or --idempotency-key"
    if args.count > 1000:
        return "--count is at most 1000 (one StartRuns call)"
    return None


# --- formatting --------------------------------------------------------------------------------


def format_runs_table(runs: Sequence[run_pb2.Run]) -> str:
    """Runs as a table, one line each."""
    if not runs:
        return "no runs"
    return format_table(
        ("RUN_ID", "STATUS", "WORKFLOW", "ATTEMPT", "CREATED_AT", "FINISHED_AT", "STOP_REASON", "ERROR"),
        (
            (
                r.run_id,
                run_status_name(r.status),
                cell(r.workflow),
                attempt_text(r.attempt, r.max_attempts, r.released_attempts),
                iso_time(r, "created_at"),
                iso_time(r, "finished_at"),
                cell(r.stop_reason),
                cell(r.error),
            )
            for r in runs
        ),
    )


def shown_steps(response: run_service_pb2.GetRunResponse) -> list[run_pb2.Step]:
    """The run's steps as `get` shows them: those a cancel interrupted as CANCELED (see `shown_status`)."""
    run_status = run_status_name(response.run.status)
    shown = []
    for step in response.steps:
        name = steps.step_status_name(step.status)
        if shown_status(name, run_status) != name:
            copy = run_pb2.Step()
            copy.CopyFrom(step)
            copy.status = run_pb2.STEP_STATUS_CANCELED
            step = copy
        shown.append(step)
    return shown


def tool_call_status(call: run_pb2.ToolCall, run: run_pb2.Run) -> str:
    """A tool call's status as `get` shows it (CANCELED when the run's cancel interrupted it)."""
    name = enum_name(run_pb2.ToolCallStatus, call.status, "TOOL_CALL_STATUS_")
    return shown_status(name, run_status_name(run.status), call.attempt in (0, run.attempt))


def format_get(response: run_service_pb2.GetRunResponse, full_output: bool = False) -> str:
    """A GetRunResponse: the run, then tables of its steps, tool calls and attempts; with `full_output`
    the run's output uncut and each step's output after the steps table."""
    parts = [format_run(response.run, full_output)]
    if response.steps:
        parts.append("steps:\n" + steps.format_steps_table(shown_steps(response), datetime.now(UTC)))
        if full_output:
            parts.append("step outputs:\n" + "\n".join(
                f"{s.step_key}: {compact_struct(s, 'output')}" for s in steps.dag_order(response.steps)
                if s.HasField("output")
            ))
    else:
        parts.append("steps: none")
    if response.tool_calls:
        parts.append(
            "tool calls:\n"
            + format_table(
                (
                    "TOOL_CALL_ID",
                    "STEP_KEY",
                    "TOOL",
                    "STATUS",
                    "TRY",
                    "ATTEMPT",
                    "INVOKED_AT",
                    "FINISHED_AT",
                    "OUTPUT",
                    "ERROR",
                ),
                (
                    (
                        cell(c.tool_call_id),
                        cell(c.step_key),
                        cell(c.tool),
                        tool_call_status(c, response.run),
                        str(c.step_attempt or "-"),
                        str(c.attempt),
                        iso_time(c, "invoked_at"),
                        iso_time(c, "finished_at"),
                        cell(compact_struct(c, "output") if c.HasField("output") else ""),
                        cell(c.error),
                    )
                    for c in response.tool_calls
                ),
            )
        )
    else:
        parts.append("tool calls: none")
    if response.attempts:
        parts.append(
            "attempts:\n"
            + format_table(
                ("ATTEMPT", "WORKER_ID", "CLAIMED_AT", "ENDED_AT", "OUTCOME", "ERROR"),
                (
                    (
                        str(a.attempt),
                        cell(a.worker_id),
                        iso_time(a, "claimed_at"),
                        iso_time(a, "ended_at"),
                        cell(a.outcome),
                        cell(a.error),
                    )
                    for a in response.attempts
                ),
            )
        )
    return "\n\n".join(parts)


def get_json(response: run_service_pb2.GetRunResponse) -> dict[str, Any]:
    """The JSON document of `get --json` (lists are always present, possibly empty)."""
    return {
        "run": to_dict(response.run),
        "steps": [to_dict(s) for s in shown_steps(response)],
        "tool_calls": [{**to_dict(c), "status": tool_call_status(c, response.run)} for c in response.tool_calls],
        "attempts": [to_dict(a) for a in response.attempts],
    }


def list_json(runs: Sequence[run_pb2.Run], next_page_token: str) -> dict[str, Any]:
    """The JSON document of `list --json`."""
    return {"runs": [to_dict(r) for r in runs], "next_page_token": next_page_token}


EVENT_HEADER = f"{'SEQ':>5}  {'TYPE':<20}  {'ATTEMPT':>7}  {'RECORDED_AT':<24}  PAYLOAD"


def format_event(event: run_pb2.RunEvent) -> str:
    """One event as a line aligned with EVENT_HEADER."""
    return (
        f"{event.sequence:>5}  {event.type:<20}  {event.attempt:>7}  {iso_time(event, 'recorded_at'):<24}  "
        f"{compact_struct(event, 'payload')}"
    )


# --- commands ----------------------------------------------------------------------------------


def start_options(args: argparse.Namespace) -> tuple[str, dict[str, Any] | None, dict[str, Any]]:
    """The workflow, input and options of Client.start_run for parsed `start` arguments (--tool/--args map to
    runtime.tool; unset options are left to the server)."""
    workflow, run_input = args.workflow, args.input
    if args.tool is not None:
        workflow = TOOL_WORKFLOW
        run_input = {"tool": args.tool, "args": args.tool_args if args.tool_args is not None else {}}
    options = {
        "idempotency_key": args.idempotency_key, "max_attempts": args.max_attempts, "project_id": args.project,
        "workspace_id": args.workspace, "workflow_version": args.workflow_version,
    }
    return workflow, run_input, {k: v for k, v in options.items() if v}


def cmd_start(api: Api, args: argparse.Namespace) -> int:
    """`runs start`: queue a run; with --wait, follow it to its end (progress on stderr) and print the final
    run with its output in full (--count: many)."""
    workflow, run_input, options = start_options(args)
    if args.count > 1:
        started = api.client.start_runs([{"workflow": workflow, "input": run_input, **options}] * args.count)
        if args.json:
            out(dumps({"run_ids": [r.run_id for r in started]}))
        else:
            for r in started:
                out(r.run_id)
        return EXIT_OK
    created = api.client.start_run(workflow, run_input, **options)
    run = created.proto
    if created.deduplicated:
        err(f"note: idempotency key {args.idempotency_key!r} matched existing run {run.run_id}")
    if not args.wait:
        print_run(run, args.json)
        return EXIT_OK
    final = wait_for_run(api, run, args, progress=not args.quiet)
    print_run(final, args.json, full_output=True)
    return wait_exit_code(final)


def get_response(run: Run) -> run_service_pb2.GetRunResponse:
    """The GetRunResponse a client Run (read by get_run) came from."""
    return run_service_pb2.GetRunResponse(
        run=run.proto,
        steps=[s.proto for s in run.steps],
        tool_calls=[c.proto for c in run.tool_calls],
        attempts=[a.proto for a in run.attempts],
    )


def cmd_get(api: Api, args: argparse.Namespace) -> int:
    """`runs get ID`: the run with its steps, tool calls and attempts (--output: outputs in full)."""
    response = get_response(api.client.get_run(args.run_id))
    out(dumps(get_json(response)) if args.json else format_get(response, full_output=args.output))
    return EXIT_OK


def cmd_list(api: Api, args: argparse.Namespace) -> int:
    """`runs list`: one page of runs, or every page with --all."""

    def fetch(token: str) -> tuple[Sequence[run_pb2.Run], str]:
        runs, next_token = api.client.list_runs_page(
            args.status, args.workflow, args.page_size, page_token=token
        )
        return [r.proto for r in runs], next_token

    runs, token = collect_pages(fetch, args.page_token, args.all)
    print_page(args, list_json(runs, token), format_runs_table(runs), "runs list")
    return EXIT_OK


def cmd_watch(api: Api, args: argparse.Namespace) -> int:
    """`runs watch ID`: print each event as it arrives until the run ends (resuming after a disconnect)."""
    stream = api.client.watch(args.run_id, args.after_sequence)
    try:
        header = not args.json
        for event in stream:
            if header:
                out(EVENT_HEADER)
                header = False
            out(dumps(to_dict(event.proto), compact=True) if args.json else format_event(event.proto))
    finally:
        stream.close()
    return EXIT_OK



def cmd_cancel(api: Api, args: argparse.Namespace) -> int:
    """`runs cancel ID`: cancel the run; a running one is followed until it has stopped (at most --timeout
    seconds; --no-wait: at once) and printed as it ended."""
    run = api.client.cancel(args.run_id, args.reason).proto
    if run_status_name(run.status) == "RUNNING" and not args.no_wait:
        err(f"run {run.run_id} is running: asked its worker to stop; waiting up to {args.timeout:g}s ...")
        try:
            run = api.client.wait(run.run_id, timeout=args.timeout).proto
        except RunTimeout:
            err(f"run {run.run_id} has not stopped within {args.timeout:g}s; it ends CANCELED when its "
                f"worker stops it or its lease expires (follow it with: runs watch {run.run_id})")
            run = api.client.get_run(run.run_id).proto
    print_run(run, args.json)
    return EXIT_OK


COMMANDS: dict[str, Callable[[Api, argparse.Namespace], int]] = {
    "start": cmd_start,
    "get": cmd_get,
    "list": cmd_list,
    "watch": cmd_watch,
    "cancel": cmd_cancel,
    **steps.COMMANDS,
    **rebuild.COMMANDS,
    **workflows.COMMANDS,
    **stats.COMMANDS,
    "cache": cache.cmd_cache,
    "keys": keys.cmd_keys,
}


def dispatch(api: Api, args: argparse.Namespace) -> int:
    """Run the parsed command, turning expected failures into messages and exit codes (each printed once)."""
    try:
        return COMMANDS[args.command](api, args)
    except CliError as error:
        for line in error.lines:
            err(line)
        return error.exit_code
    except (grpc.RpcError, RunsError) as error:
        lines, code = describe_rpc_error(
            error, args.addr, UNARY_DEADLINE_SECONDS, has_key=bool(args.api_key), tls=client_tls(args)
        )
        for line in lines:
            err(line)
        return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_ERROR


def _silence_stdout() -> None:
    """After EPIPE (e.g. `runs list | head -1`): send further output to /dev/null so exit stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # pragma: no cover - stdout without a file descriptor
        pass


def _exit_status(code: object) -> int:
    """An argparse SystemExit code as an int."""
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `runs` command; returns the exit code."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:
        return _exit_status(exc.code)
    try:
        client = connect(args)
    except OSError as error:  # a TLS file that went away or became unreadable since parsing
        err(f"error: cannot read a TLS file: {error}")
        return EXIT_USAGE
    try:
        with client:
            return dispatch(Api(client), args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
