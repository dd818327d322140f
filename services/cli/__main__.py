"""`runs`: the command-line client of the Run API (runs.v1.RunService over gRPC).

Commands:
  runs start [--workflow W] [--input JSON] [--idempotency-key K] [--max-attempts N]
             [--tool NAME [--args JSON]] [--wait [--timeout SECONDS]]
  runs get ID
  runs list [--status S] [--workflow W] [--page-size N] [--page-token T] [--all]
  runs watch ID [--after-sequence N]
  runs cancel ID [--reason TEXT]

Global flags (before or after the command): --addr HOST:PORT (default $RUN_API_ADDR, else
127.0.0.1:50051) and --json (machine-readable output: protobuf JSON with proto field names;
`watch --json` prints one JSON object per line per event).

Exit codes:
  0    success (for `start --wait`: the run SUCCEEDED)
  1    `start --wait`: the run ended FAILED or CANCELED (the run is still printed);
       also any error not listed below
  2    usage error, or the API answered INVALID_ARGUMENT, ALREADY_EXISTS or RESOURCE_EXHAUSTED
  3    NOT_FOUND (no run has that id)
  4    FAILED_PRECONDITION (e.g. cancel a run that has already ended)
  5    UNAVAILABLE or DEADLINE_EXCEEDED: the API cannot be reached or did not answer in time
       (also `start --wait` when --timeout elapsed before the run ended)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC
from typing import Any, cast

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from shared.gen.runs.v1 import run_pb2, run_service_pb2, run_service_pb2_grpc

DEFAULT_ADDR = "127.0.0.1:50051"
UNARY_DEADLINE_SECONDS = 10.0
DEFAULT_WAIT_TIMEOUT_SECONDS = 300.0
TOOL_WORKFLOW = "runtime.tool"
TERMINAL_EVENT_TYPES = frozenset({"run.completed", "run.failed", "run.canceled"})
STATUS_CHOICES = ("queued", "running", "succeeded", "failed", "canceled")
MAX_CELL = 60

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_FAILED_PRECONDITION = 4
EXIT_UNAVAILABLE = 5
EXIT_INTERRUPTED = 130

EXIT_CODES = """\
Exit codes:
  0    success (for `start --wait`: the run SUCCEEDED)
  1    `start --wait`: the run ended FAILED or CANCELED (the run is still printed);
       also any error not listed below
  2    usage error, or the API answered INVALID_ARGUMENT, ALREADY_EXISTS or RESOURCE_EXHAUSTED
  3    NOT_FOUND (no run has that id)
  4    FAILED_PRECONDITION (e.g. cancel a run that has already ended)
  5    UNAVAILABLE or DEADLINE_EXCEEDED: the API cannot be reached or did not answer in time
       (also `start --wait` when --timeout elapsed before the run ended)
  130  interrupted (Ctrl-C)
"""

_EXIT_BY_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: EXIT_OK,
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_USAGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_USAGE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
}


def exit_code_for(code: grpc.StatusCode) -> int:
    """The process exit code for a gRPC status code."""
    return _EXIT_BY_CODE.get(code, EXIT_ERROR)


# --- argument parsing --------------------------------------------------------------------------


def _json_object(text: str) -> dict[str, Any]:
    """Parse a JSON object (argparse type); anything else is a usage error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno}): {text!r}"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"key\": 1}}', got {_json_kind(value)}")
    return value


def _json_kind(value: Any) -> str:
    """The JSON name of a decoded value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"


def _non_negative_int(text: str) -> int:
    """A whole number >= 0 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _positive_int(text: str) -> int:
    """A whole number >= 1 (argparse type)."""
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    """A number of seconds > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _common_flags(default_addr: str, suppress: bool) -> argparse.ArgumentParser:
    """--addr and --json; with `suppress`, unset flags leave the top-level value alone."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--addr",
        metavar="HOST:PORT",
        default=argparse.SUPPRESS if suppress else default_addr,
        help=f"Run API address (RUN_API_ADDR) [{default_addr}]",
    )
    p.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="machine-readable JSON output",
    )
    return p


def build_parser(env: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; `env` (default os.environ) supplies RUN_API_ADDR."""
    return _build_parsers(env)[0]


def _build_parsers(env: dict[str, str] | None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and the parser of each command, by name."""
    environ = os.environ if env is None else env
    default_addr = environ.get("RUN_API_ADDR", "").strip() or DEFAULT_ADDR
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="runs",
        description="Start, inspect, watch and cancel runs of the Run API.",
        epilog=EXIT_CODES,
        formatter_class=formatter,
        parents=[_common_flags(default_addr, suppress=False)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_flags(default_addr, suppress=True)
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
    start.add_argument("--input", type=_json_object, default=None, metavar="JSON", help="run input, a JSON object")
    start.add_argument(
        "--idempotency-key", default="", metavar="KEY", help="the same key returns the same run, never a second one"
    )
    start.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=0,
        metavar="N",
        help="attempts before the run fails [server default]",
    )
    start.add_argument(
        "--tool",
        default=None,
        metavar="NAME",
        help=f'shorthand for --workflow {TOOL_WORKFLOW} --input \'{{"tool": NAME, "args": ARGS}}\'',
    )
    start.add_argument(
        "--args",
        type=_json_object,
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
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help=f"with --wait: give up after this many seconds [{DEFAULT_WAIT_TIMEOUT_SECONDS:g}]",
    )

    get = add("get", "Show a run with its steps, tool calls and attempts.")
    get.add_argument("run_id", metavar="ID")

    lst = add("list", "List runs, newest first.")
    lst.add_argument("--status", type=str.lower, choices=STATUS_CHOICES, default=None, help="only runs in this status")
    lst.add_argument("--workflow", default="", help="only runs of this workflow")
    lst.add_argument(
        "--page-size",
        type=_positive_int,
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
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="only events with a greater sequence [0: from the start]",
    )

    cancel = add("cancel", "Cancel a queued run, or ask a running one to stop.")
    cancel.add_argument("run_id", metavar="ID")
    cancel.add_argument("--reason", default="", metavar="TEXT", help="why (recorded in the run's log)")
    return parser, commands


def parse_args(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the command line; usage errors exit 2 (SystemExit) with a message."""
    parser, commands = _build_parsers(env)
    args = parser.parse_args(argv)
    if args.command == "start":
        problem = start_usage_problem(args)
        if problem:
            commands["start"].error(problem)
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
    if args.timeout is not None and not args.wait:
        return "--timeout applies only with --wait"
    return None


def start_request(args: argparse.Namespace) -> run_service_pb2.StartRunRequest:
    """The StartRunRequest for parsed `start` arguments (--tool/--args map to runtime.tool)."""
    request = run_service_pb2.StartRunRequest(
        workflow=args.workflow,
        idempotency_key=args.idempotency_key,
        max_attempts=args.max_attempts,
    )
    run_input: dict[str, Any] | None = args.input
    if args.tool is not None:
        request.workflow = TOOL_WORKFLOW
        run_input = {"tool": args.tool, "args": args.tool_args if args.tool_args is not None else {}}
    if run_input is not None:
        request.input.update(run_input)
    return request


# --- formatting --------------------------------------------------------------------------------


def to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-able data (protobuf JSON mapping, proto field names)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def dumps(data: Any, compact: bool = False) -> str:
    """JSON text: indented, or one line with `compact`."""
    if compact:
        return json.dumps(data, separators=(",", ":"))
    return json.dumps(data, indent=2)


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """An enum value's name without its prefix (RUN_STATUS_SUCCEEDED -> SUCCEEDED)."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


def run_status_name(value: int) -> str:
    """A RunStatus without its RUN_STATUS_ prefix."""
    return enum_name(run_pb2.RunStatus, value, "RUN_STATUS_")


def iso_time(message: Message, field: str) -> str:
    """A Timestamp field as ISO-8601 UTC with milliseconds ('2025-01-31T12:00:00.000Z'), or '-' when unset."""
    if not message.HasField(field):
        return "-"
    stamp = getattr(message, field).ToDatetime(tzinfo=UTC)
    return str(stamp.isoformat(timespec="milliseconds")).replace("+00:00", "Z")


def plain_numbers(value: Any) -> Any:
    """`value` with whole floats as ints (Struct numbers are doubles: 3.0 reads better as 3)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_numbers(v) for v in value]
    return value


def compact_struct(message: Message, field: str) -> str:
    """A Struct field as one-line JSON for reading: sorted keys, whole numbers without '.0', '{}' when unset."""
    if not message.HasField(field):
        return "{}"
    data = plain_numbers(json_format.MessageToDict(getattr(message, field)))
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def _cell(value: str, limit: int = MAX_CELL) -> str:
    """A table cell: one line, at most `limit` characters."""
    text = " ".join(value.split()) if value else "-"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a header row."""
    table = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table)


def format_fields(pairs: Sequence[tuple[str, str]]) -> str:
    """Aligned `key  value` lines; multi-line values are indented under their first line."""
    width = max(len(k) for k, _ in pairs)
    pad = "\n" + " " * (width + 2)
    return "\n".join(f"{key.ljust(width)}  {pad.join((value or '-').splitlines() or ['-'])}" for key, value in pairs)


def format_run(run: run_pb2.Run) -> str:
    """A run as aligned key/value lines."""
    pairs = [
        ("run_id", run.run_id),
        ("status", run_status_name(run.status)),
        ("workflow", run.workflow),
        ("attempt", f"{run.attempt}/{run.max_attempts}"),
        ("created_at", iso_time(run, "created_at")),
        ("started_at", iso_time(run, "started_at")),
        ("finished_at", iso_time(run, "finished_at")),
        ("stop_reason", run.stop_reason),
        ("error", run.error),
    ]
    if run.HasField("cancel_requested_at"):
        pairs.append(("cancel_requested_at", iso_time(run, "cancel_requested_at")))
    if run.HasField("next_attempt_at"):
        pairs.append(("next_attempt_at", iso_time(run, "next_attempt_at")))
    if run.worker_id:
        pairs.append(("worker_id", run.worker_id))
    if run.HasField("lease_expires_at"):
        pairs.append(("lease_expires_at", iso_time(run, "lease_expires_at")))
    if run.idempotency_key:
        pairs.append(("idempotency_key", run.idempotency_key))
    if run.workspace_id:
        pairs.append(("workspace_id", run.workspace_id))
    pairs.append(("input", compact_struct(run, "input")))
    pairs.append(("last_sequence", str(run.last_sequence)))
    return format_fields(pairs)


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
                _cell(r.workflow),
                f"{r.attempt}/{r.max_attempts}",
                iso_time(r, "created_at"),
                iso_time(r, "finished_at"),
                _cell(r.stop_reason),
                _cell(r.error),
            )
            for r in runs
        ),
    )


def format_get(response: run_service_pb2.GetRunResponse) -> str:
    """A GetRunResponse: the run, then tables of its steps, tool calls and attempts."""
    parts = [format_run(response.run)]
    if response.steps:
        parts.append(
            "steps:\n"
            + format_table(
                ("STEP_KEY", "STATUS", "ATTEMPT", "TOOL", "STARTED_AT", "FINISHED_AT", "ERROR"),
                (
                    (
                        _cell(s.step_key),
                        enum_name(run_pb2.StepStatus, s.status, "STEP_STATUS_"),
                        str(s.attempt),
                        _cell(s.tool),
                        iso_time(s, "started_at"),
                        iso_time(s, "finished_at"),
                        _cell(s.error),
                    )
                    for s in response.steps
                ),
            )
        )
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
                    "ATTEMPT",
                    "INVOKED_AT",
                    "FINISHED_AT",
                    "OUTPUT",
                    "ERROR",
                ),
                (
                    (
                        _cell(c.tool_call_id),
                        _cell(c.step_key),
                        _cell(c.tool),
                        enum_name(run_pb2.ToolCallStatus, c.status, "TOOL_CALL_STATUS_"),
                        str(c.attempt),
                        iso_time(c, "invoked_at"),
                        iso_time(c, "finished_at"),
                        _cell(compact_struct(c, "output") if c.HasField("output") else ""),
                        _cell(c.error),
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
                        _cell(a.worker_id),
                        iso_time(a, "claimed_at"),
                        iso_time(a, "ended_at"),
                        _cell(a.outcome),
                        _cell(a.error),
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
        "steps": [to_dict(s) for s in response.steps],
        "tool_calls": [to_dict(c) for c in response.tool_calls],
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


# --- errors ------------------------------------------------------------------------------------


def _call_status(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a failed call."""
    code_of: Callable[[], Any] | None = getattr(err, "code", None)
    details_of: Callable[[], Any] | None = getattr(err, "details", None)
    code = code_of() if callable(code_of) else None
    details = details_of() if callable(details_of) else None
    return (code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN), str(details or "")


def field_violations(err: grpc.RpcError) -> list[tuple[str, str]]:
    """(field, description) of the google.rpc.BadRequest details the status carries, if any."""
    try:
        status = rpc_status.from_call(cast(grpc.Call, err))
    except (ValueError, AttributeError, TypeError):
        return []
    if status is None:
        return []
    out: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out


def describe_rpc_error(err: grpc.RpcError, addr: str, deadline: float | None = None) -> tuple[list[str], int]:
    """The stderr lines and exit code for a failed call to the API at `addr`."""
    code, details = _call_status(err)
    if code is grpc.StatusCode.UNAVAILABLE:
        message = f"the Run API at {addr} is unavailable" + (f": {details}" if details else "")
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {deadline:g}s" if deadline else ""
        message = f"the Run API at {addr} did not answer{within}" + (f": {details}" if details else "")
    else:
        message = details or "(no details)"
    lines = [f"error: {code.name}: {message}"]
    lines.extend(f"  {field}: {description}" for field, description in field_violations(err))
    return lines, exit_code_for(code)


class CliError(Exception):
    """An expected failure: message lines for stderr and the exit code."""

    def __init__(self, lines: list[str], exit_code: int) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines
        self.exit_code = exit_code


# --- commands ----------------------------------------------------------------------------------


def _out(text: str) -> None:
    """Print a line (or lines) to stdout and flush at once."""
    print(text, flush=True)


def _err(text: str) -> None:
    """Print a line to stderr."""
    print(text, file=sys.stderr, flush=True)


def _print_run(run: run_pb2.Run, as_json: bool) -> None:
    """Print a run as JSON or as aligned lines."""
    _out(dumps(to_dict(run)) if as_json else format_run(run))


def cmd_start(stub: Any, args: argparse.Namespace) -> int:
    """`runs start`: queue a run; with --wait, watch it to its end and print the final run."""
    response = stub.StartRun(start_request(args), timeout=UNARY_DEADLINE_SECONDS)
    run = response.run
    if response.deduplicated:
        _err(f"note: idempotency key {args.idempotency_key!r} matched existing run {run.run_id}")
    if not args.wait:
        _print_run(run, args.json)
        return EXIT_OK
    timeout = args.timeout or DEFAULT_WAIT_TIMEOUT_SECONDS
    if run_status_name(run.status) not in ("SUCCEEDED", "FAILED", "CANCELED"):
        if sys.stderr.isatty():
            _err(f"run {run.run_id} {run_status_name(run.status).lower()}; waiting up to {timeout:g}s ...")
        try:
            wait_for_end(stub, run.run_id, timeout)
        except grpc.RpcError as err:
            code, _ = _call_status(err)
            if code is not grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            _print_current(stub, run.run_id, args.json)
            raise CliError(
                [
                    f"error: DEADLINE_EXCEEDED: run {run.run_id} did not end within {timeout:g}s "
                    f"(follow it with: runs watch {run.run_id})"
                ],
                EXIT_UNAVAILABLE,
            ) from None
    final = stub.GetRun(run_service_pb2.GetRunRequest(run_id=run.run_id), timeout=UNARY_DEADLINE_SECONDS).run
    _print_run(final, args.json)
    return wait_exit_code(final)


def _print_current(stub: Any, run_id: str, as_json: bool) -> None:
    """Best effort: print the run as it is now (after a --wait timeout)."""
    try:
        current = stub.GetRun(run_service_pb2.GetRunRequest(run_id=run_id), timeout=UNARY_DEADLINE_SECONDS).run
    except grpc.RpcError:
        return
    _print_run(current, as_json)


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
        _err(f"error: the watch of run {run.run_id} ended while the run is {status}")
    return EXIT_RUN_FAILED


def cmd_get(stub: Any, args: argparse.Namespace) -> int:
    """`runs get ID`: the run with its steps, tool calls and attempts."""
    response = stub.GetRun(run_service_pb2.GetRunRequest(run_id=args.run_id), timeout=UNARY_DEADLINE_SECONDS)
    _out(dumps(get_json(response)) if args.json else format_get(response))
    return EXIT_OK


def list_request(args: argparse.Namespace, page_token: str) -> run_service_pb2.ListRunsRequest:
    """The ListRunsRequest for parsed `list` arguments and a page token."""
    request = run_service_pb2.ListRunsRequest(page_size=args.page_size, page_token=page_token, workflow=args.workflow)
    if args.status:
        request.status = run_pb2.RunStatus.Value("RUN_STATUS_" + args.status.upper())
    return request


def cmd_list(stub: Any, args: argparse.Namespace) -> int:
    """`runs list`: one page of runs, or every page with --all."""
    runs: list[run_pb2.Run] = []
    token = args.page_token
    seen: set[str] = set()
    while True:
        response = stub.ListRuns(list_request(args, token), timeout=UNARY_DEADLINE_SECONDS)
        runs.extend(response.runs)
        token = response.next_page_token
        if not args.all or not token or token in seen:
            break
        seen.add(token)
    if args.json:
        _out(dumps(list_json(runs, token)))
    else:
        _out(format_runs_table(runs))
        if token:
            _out(f"next_page_token: {token}  (runs list --page-token {token}, or --all)")
    return EXIT_OK


def cmd_watch(stub: Any, args: argparse.Namespace) -> int:
    """`runs watch ID`: print each event as it arrives until the stream ends."""
    stream = stub.WatchRun(
        run_service_pb2.WatchRunRequest(run_id=args.run_id, after_sequence=args.after_sequence), timeout=None
    )
    try:
        header = not args.json
        for item in stream:
            if header:
                _out(EVENT_HEADER)
                header = False
            _out(dumps(to_dict(item.event), compact=True) if args.json else format_event(item.event))
    finally:
        cancel = getattr(stream, "cancel", None)
        if callable(cancel):
            cancel()
    return EXIT_OK


def cmd_cancel(stub: Any, args: argparse.Namespace) -> int:
    """`runs cancel ID`: cancel the run and print it."""
    response = stub.CancelRun(
        run_service_pb2.CancelRunRequest(run_id=args.run_id, reason=args.reason), timeout=UNARY_DEADLINE_SECONDS
    )
    _print_run(response.run, args.json)
    return EXIT_OK


COMMANDS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "start": cmd_start,
    "get": cmd_get,
    "list": cmd_list,
    "watch": cmd_watch,
    "cancel": cmd_cancel,
}


def dispatch(stub: Any, args: argparse.Namespace) -> int:
    """Run the parsed command against `stub`, turning expected failures into messages and exit codes."""
    try:
        return COMMANDS[args.command](stub, args)
    except CliError as err:
        for line in err.lines:
            _err(line)
        return err.exit_code
    except grpc.RpcError as err:
        lines, code = describe_rpc_error(err, args.addr, UNARY_DEADLINE_SECONDS)
        for line in lines:
            _err(line)
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
        with grpc.insecure_channel(args.addr) as channel:
            return dispatch(run_service_pb2_grpc.RunServiceStub(channel), args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
