"""What every command group of `runs` shares: the global flags and the connection they describe,
exit codes, argument types, error messages, and the plain-text/JSON output helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from runs_client import Client, Retry
from runs_client.errors import RunsError, field_violations_of, status_code_of
from runs_client.models import plain_numbers  # one copy: the CLI prints numbers as the client returns them
from shared.gen.runs.v1 import (
    key_service_pb2_grpc,
    ops_service_pb2_grpc,
    run_service_pb2_grpc,
    workflow_service_pb2_grpc,
)
from shared.settings import ClientTls

T = TypeVar("T")

DEFAULT_ADDR = "127.0.0.1:50051"
UNARY_DEADLINE_SECONDS = 10.0
MAX_CELL = 60

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_FAILED_PRECONDITION = 4
EXIT_UNAVAILABLE = 5
EXIT_DENIED = 6
EXIT_INTERRUPTED = 130

EXIT_CODES = """\
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

_EXIT_BY_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: EXIT_OK,
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_USAGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_USAGE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
}


def exit_code_for(code: grpc.StatusCode) -> int:
    """The process exit code for a gRPC status code."""
    return _EXIT_BY_CODE.get(code, EXIT_ERROR)


# --- argument types ----------------------------------------------------------------------------


def json_object(text: str) -> dict[str, Any]:
    """Parse a JSON object (argparse type); anything else is a usage error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno}): {text!r}"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"key\": 1}}', got {json_kind(value)}")
    return value


def json_kind(value: Any) -> str:
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


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (argparse type)."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number of seconds > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


# --- global flags and the connection -----------------------------------------------------------

# flag destination -> (flag, environment variable) of the connection flags that name files
_TLS_FILES = (("tls_ca", "--tls-ca", "RUNS_TLS_CA"), ("tls_cert", "--tls-cert", "RUNS_TLS_CERT"),
              ("tls_key", "--tls-key", "RUNS_TLS_KEY"))


def _env(env: Mapping[str, str], name: str) -> str | None:
    return env.get(name, "").strip() or None


def global_flags(env: Mapping[str, str], suppress: bool) -> argparse.ArgumentParser:
    """--addr, --json, TLS and the API key; with `suppress`, unset flags leave the top-level value alone."""
    default_addr = _env(env, "RUN_API_ADDR") or DEFAULT_ADDR

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--addr", metavar="HOST:PORT", default=default(default_addr),
        help=f"Run API address (RUN_API_ADDR) [{default_addr}]",
    )
    p.add_argument(
        "--json", action="store_true", default=default(False),
        help="machine-readable JSON output (statuses as in tables, e.g. SUCCEEDED; whole numbers without .0)",
    )
    p.add_argument(
        "--tls-ca", metavar="FILE", default=default(_env(env, "RUNS_TLS_CA")),
        help="connect with TLS, trusting this CA certificate (PEM) (RUNS_TLS_CA)",
    )
    p.add_argument(
        "--tls-cert", metavar="FILE", default=default(_env(env, "RUNS_TLS_CERT")),
        help="client certificate (PEM) for an API that requires mutual TLS (RUNS_TLS_CERT)",
    )
    p.add_argument(
        "--tls-key", metavar="FILE", default=default(_env(env, "RUNS_TLS_KEY")),
        help="private key (PEM) of --tls-cert (RUNS_TLS_KEY)",
    )
    p.add_argument(
        "--api-key", metavar="KEY", default=default(_env(env, "RUNS_API_KEY")),
        help="API key sent with every call; prefer the RUNS_API_KEY variable, since flags show in `ps`",
    )
    return p


def connection_problem(args: argparse.Namespace) -> str | None:
    """Why the TLS and key flags cannot be used, or None."""
    if (args.tls_cert is None) != (args.tls_key is None):
        return "--tls-cert and --tls-key (RUNS_TLS_CERT, RUNS_TLS_KEY) go together"
    for dest, flag, variable in _TLS_FILES:
        path = getattr(args, dest)
        if path is not None and not os.path.isfile(path):
            return f"{flag} ({variable}): {path!r} is not a readable file"
    key = args.api_key
    if key is not None and not (key.isascii() and key.isprintable() and " " not in key):
        return "--api-key (RUNS_API_KEY) must be printable ASCII without spaces"
    return None


def client_tls(args: argparse.Namespace) -> ClientTls:
    """The TLS settings the flags describe (TLS is off when none is given)."""
    return ClientTls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


class Api:
    """What a command calls: the Python client (runs_client.Client) for what it wraps, and stubs on the
    client's channel for the services it does not (keys, ops, the step cache, artifacts, steps)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        channel = client.channel
        self.runs = run_service_pb2_grpc.RunServiceStub(channel)
        self.workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        self.ops = ops_service_pb2_grpc.OpsServiceStub(channel)
        self.keys = key_service_pb2_grpc.KeyServiceStub(channel)


# Retries on UNAVAILABLE of the client's idempotent calls: a few quick ones, so that `runs get` with the API
# down answers within a second instead of after the library's default eight. A watch (`watch`, `--wait`,
# `cancel`) resumes for 20 to 40 s instead: long enough for an API restart.
CLI_RETRY = Retry(attempts=3, backoff_seconds=0.1, backoff_max_seconds=0.5)
CLI_WATCH_RETRY = Retry(attempts=45, backoff_seconds=0.1, backoff_max_seconds=1.0)


def connect(args: argparse.Namespace) -> Client:
    """The client the global flags describe (OSError when a TLS file cannot be read)."""
    return Client(
        args.addr, key=args.api_key or "", tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
        timeout=UNARY_DEADLINE_SECONDS, retry=CLI_RETRY, watch_retry=CLI_WATCH_RETRY,
    )


# --- output ------------------------------------------------------------------------------------


def out(text: str) -> None:
    """Print a line (or lines) to stdout and flush at once."""
    print(text, flush=True)


def err(text: str) -> None:
    """Print a line to stderr."""
    print(text, file=sys.stderr, flush=True)


def to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-able data: the protobuf JSON mapping with proto field names, made to read like the
    tables: enum values by their short name (RUN_STATUS_SUCCEEDED -> "SUCCEEDED", as `enum_name` prints them),
    64-bit integers as numbers (not strings) and whole Struct numbers without '.0'."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return _readable(cast(Descriptor, message.DESCRIPTOR), data)


_INT64_TYPES = frozenset({
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
})
_STRUCT_TYPES = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})


def enum_prefix(enum: EnumDescriptor) -> str:
    """The prefix of an enum's value names: its name in UPPER_SNAKE and '_' (RunStatus -> 'RUN_STATUS_')."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def _readable_scalar(field: FieldDescriptor, value: Any) -> Any:
    """One JSON-mapped value of a non-message field, read like the tables (see `to_dict`)."""
    if field.enum_type is not None and isinstance(value, str):
        return value.removeprefix(enum_prefix(field.enum_type))
    if field.type in _INT64_TYPES and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    return value


def _readable_value(field: FieldDescriptor, value: Any) -> Any:
    """One JSON-mapped value (not a repeated list or map) of `field`."""
    kind = field.message_type
    if kind is None:
        return _readable_scalar(field, value)
    if kind.full_name in _STRUCT_TYPES:
        return plain_numbers(value)
    if isinstance(value, dict) and not kind.full_name.startswith("google.protobuf."):
        return _readable(kind, value)
    return value


def _readable(descriptor: Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    """`data` (MessageToDict of a `descriptor` message) with `_readable_value` applied to every field."""
    result = dict(data)
    for field in descriptor.fields:
        if field.name not in result:
            continue
        value = result[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            result[field.name] = {k: _readable_value(value_field, v) for k, v in value.items()}
        elif isinstance(value, list) and not (field.message_type and field.message_type.full_name in _STRUCT_TYPES):
            result[field.name] = [_readable_value(field, v) for v in value]
        else:
            result[field.name] = _readable_value(field, value)
    return result


def dumps(data: Any, compact: bool = False) -> str:
    """JSON text: indented, or one line with `compact`."""
    if compact:
        return json.dumps(data, separators=(",", ":"))
    return json.dumps(data, indent=2)


def compact_struct(message: Message, field: str) -> str:
    """A Struct field as one-line JSON for reading: sorted keys, whole numbers without '.0', '{}' when unset."""
    if not message.HasField(field):
        return "{}"
    data = plain_numbers(json_format.MessageToDict(getattr(message, field)))
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """An enum value's name without its prefix (RUN_STATUS_SUCCEEDED -> SUCCEEDED)."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


INTERRUPTED_STATUSES = frozenset({"FAILED", "RUNNING", "INVOKED", "CREATED"})


def shown_status(status: str, run_status: str, same_attempt: bool = True) -> str:
    """A step's or tool call's status as `get` shows it (short names, see `to_dict`): in a CANCELED run,
    one left FAILED or unfinished by the run's last attempt shows CANCELED. The projection records a
    step or tool call that the cancel interrupted as FAILED (tool calls have no CANCELED status);
    only the display says CANCELED, and only where the run itself was canceled."""
    if run_status == "CANCELED" and same_attempt and status in INTERRUPTED_STATUSES:
        return "CANCELED"
    return status


def iso_time(message: Message, field: str) -> str:
    """A Timestamp field as ISO-8601 UTC with milliseconds ('2025-01-31T12:00:00.000Z'), or '-' when unset."""
    if not message.HasField(field):
        return "-"
    stamp = getattr(message, field).ToDatetime(tzinfo=UTC)
    return str(stamp.isoformat(timespec="milliseconds")).replace("+00:00", "Z")


def cell(value: str, limit: int = MAX_CELL) -> str:
    """A table cell: one line, at most `limit` characters."""
    text = " ".join(value.split()) if value else "-"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a header row."""
    table = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)


def format_fields(pairs: Sequence[tuple[str, str]]) -> str:
    """Aligned `key  value` lines; multi-line values are indented under their first line."""
    width = max(len(k) for k, _ in pairs)
    pad = "\n" + " " * (width + 2)
    return "\n".join(f"{key.ljust(width)}  {pad.join((value or '-').splitlines() or ['-'])}" for key, value in pairs)


def print_page(args: argparse.Namespace, document: Mapping[str, Any], table: str, again: str) -> None:
    """A listing: with --json its document; else its table and, when a next page exists, the command for it."""
    if args.json:
        out(dumps(document))
        return
    out(table)
    token = document.get("next_page_token")
    if token:
        out(f"next_page_token: {token}  ({again} --page-token {token}, or --all)")


def subcommands(
    group: argparse.ArgumentParser, common: argparse.ArgumentParser, epilog: str, dest: str
) -> tuple[dict[str, argparse.ArgumentParser], Callable[[str, str], argparse.ArgumentParser]]:
    """The subcommands of a command group (`keys`, `cache`): their parsers by name, and `add(name, help)`."""
    sub = group.add_subparsers(dest=dest, required=True, metavar=dest.upper())
    parsers: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        parsers[name] = sub.add_parser(
            name, help=help_text, description=help_text, epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common],
        )
        return parsers[name]

    return parsers, add


def collect_pages(fetch: Callable[[str], tuple[Sequence[T], str]], token: str, every: bool) -> tuple[list[T], str]:
    """Items of the page at `token`, or of it and every later page with `every`; and the next token."""
    items: list[T] = []
    seen: set[str] = set()
    while True:
        page, token = fetch(token)
        items.extend(page)
        if not every or not token or token in seen:
            return items, token
        seen.add(token)


# --- errors ------------------------------------------------------------------------------------


def failure_of(error: BaseException) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    """The status code, details and field violations of a failed call: a grpc.RpcError, or the client's
    RunsError (read from the call it came from when there is one)."""
    cause = error.__cause__ if isinstance(error, RunsError) else None
    if isinstance(error, RunsError) and not isinstance(cause, grpc.RpcError):
        return error.status_code or grpc.StatusCode.UNKNOWN, error.message, list(error.field_violations)
    call = cause if isinstance(cause, grpc.RpcError) else error
    details_of: Callable[[], Any] | None = getattr(call, "details", None)
    details = details_of() if callable(details_of) else None
    return status_code_of(call), str(details or ""), field_violations_of(call)


def _connection_hint(details: str, tls: ClientTls | None) -> str | None:
    """What to check when the connection failed: a refused TLS handshake, or a server that hung up at once."""
    text = details.lower()
    if "handshake" in text or "certificate" in text or "ssl_error" in text:
        return (
            "  the TLS handshake failed: does --tls-ca (RUNS_TLS_CA) name the CA that signed the API's "
            "certificate, and does that certificate name the host in --addr?"
        )
    if "socket closed" not in text:
        return None
    if tls is None or not tls.enabled:
        return "  the API closed the connection: if it serves TLS, pass --tls-ca (or set RUNS_TLS_CA)"
    if tls.cert is None:
        return (
            "  the API closed the connection: if it requires mutual TLS, pass --tls-cert and --tls-key "
            "(or set RUNS_TLS_CERT and RUNS_TLS_KEY)"
        )
    return None


def describe_rpc_error(
    error: BaseException,
    addr: str,
    deadline: float | None = None,
    *,
    has_key: bool = False,
    tls: ClientTls | None = None,
) -> tuple[list[str], int]:
    """The stderr lines and exit code for a failed call to the API at `addr` (a grpc.RpcError or RunsError).

    `has_key` (an API key was sent) and `tls` (how the client connected) only sharpen the hints.
    """
    code, details, violations = failure_of(error)
    hints: list[str] = []
    if code is grpc.StatusCode.UNAVAILABLE:
        message = f"the Run API at {addr} is unavailable" + (f": {details}" if details else "")
        hint = _connection_hint(details, tls)
        if hint:
            hints.append(hint)
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {deadline:g}s" if deadline else ""
        message = f"the Run API at {addr} did not answer{within}" + (f": {details}" if details else "")
    elif code is grpc.StatusCode.UNAUTHENTICATED:
        if has_key:
            message = f"the Run API at {addr} did not accept the API key" + (f": {details}" if details else "")
            hints.append("  the key is unknown, revoked or expired: ask an admin for a new one (runs keys create)")
        else:
            message = f"the Run API at {addr} needs an API key" + (f": {details}" if details else "")
            hints.append("  set RUNS_API_KEY to your key (or pass --api-key)")
    elif code is grpc.StatusCode.PERMISSION_DENIED:
        message = details or "(no details)"
        hints.append(
            "  the API key is valid, but its role, tenant or project does not allow this call "
            "(`runs keys` and `runs stats` need an admin key)"
        )
    else:
        message = details or "(no details)"
    lines = [f"error: {code.name}: {message}"]
    listed = [f"{field}: {description}" for field, description in violations]
    if listed != [message]:  # one violation is often the whole message already: print it once
        lines.extend(f"  {line}" for line in listed)
    lines.extend(hints)
    return lines, exit_code_for(code)


class CliError(Exception):
    """An expected failure: message lines for stderr and the exit code."""

    def __init__(self, lines: list[str], exit_code: int) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines
        self.exit_code = exit_code
