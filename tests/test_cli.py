"""The `runs` CLI: parsing, --tool mapping, formatting, exit codes, flows on fake stubs, and `main` against an
in-process fake KeyService (TLS against a real API is in test_tls.py)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import zipfile
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import runs_client.client
from features.harness import Api, Worker
from runs_client import Client
from runs_client.models import workflow_spec
from services.cli import __main__ as cli
from services.cli import cache as cache_cli
from services.cli import common, keys, rebuild
from services.cli import runs as runs_cli
from services.cli import steps as steps_cli
from services.cli import workflows as workflows_cli
from shared.gen.runs.v1 import (
    key_service_pb2,
    key_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    workflow_service_pb2,
)
from shared.settings import ClientTls
from shared.workflow import from_proto_dict, load_spec_text, parse_spec, spec_to_dict, spec_version_hash, to_proto_dict

ENV = {"RUN_API_ADDR": "10.0.0.1:7000"}


def parse(*argv: str, env: dict[str, str] | None = None) -> argparse.Namespace:
    return cli.parse_args(list(argv), env=ENV if env is None else env)


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def ts(text: str) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    out = Timestamp()
    out.FromDatetime(datetime.fromisoformat(text).replace(tzinfo=UTC))
    return out


def make_run(status: int = run_pb2.RUN_STATUS_SUCCEEDED, run_id: str = "01RUN", **extra: Any) -> run_pb2.Run:
    run = run_pb2.Run(
        run_id=run_id,
        status=status,
        workflow="runtime.noop",
        attempt=2,
        max_attempts=3,
        created_at=ts("2025-01-31T12:00:00.123456"),
        **extra,
    )
    return run


# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "get", "X"],
        ["get", "X", "--json"],
        ["get", "--json", "X"],
        ["--json", "get", "X", "--json"],
    ],
)
def test_json_flag_before_or_after_the_command(argv: list[str]) -> None:
    args = parse(*argv)
    assert args.json is True
    assert args.command == "get" and args.run_id == "X"


def test_json_flag_defaults_to_false() -> None:
    assert parse("get", "X").json is False


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["get", "X"], "10.0.0.1:7000"),
        (["--addr", "h:1", "get", "X"], "h:1"),
        (["get", "X", "--addr", "h:2"], "h:2"),
        (["list", "--addr=h:3", "--json"], "h:3"),
    ],
)
def test_addr_flag_before_or_after_the_command_and_env_default(argv: list[str], expected: str) -> None:
    assert parse(*argv).addr == expected


def test_addr_builtin_default_without_env() -> None:
    assert parse("get", "X", env={}).addr == "127.0.0.1:50051"
    assert parse("get", "X", env={"RUN_API_ADDR": "  "}).addr == "127.0.0.1:50051"


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert "required" in usage_error(capsys)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("{bad", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "got an array"),
        ('"text"', "got a string"),
        ("3", "got a number"),
        ("null", "got null"),
        ("true", "got a boolean"),
    ],
)
def test_input_must_be_a_json_object(capsys: pytest.CaptureFixture[str], value: str, fragment: str) -> None:
    err = usage_error(capsys, "start", "--input", value)
    assert "--input" in err and fragment in err


def test_args_must_be_a_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--args" in usage_error(capsys, "start", "--tool", "sleep", "--args", "[]")


def sent(*argv: str) -> run_service_pb2.StartRunRequest:
    """The StartRunRequest `runs ARGV` sends (through the client, to a fake RunService)."""
    stub = FakeStub()
    assert run_cli(stub, *argv) == 0
    (name, request, _), = stub.calls
    assert name == "StartRun"
    return cast(run_service_pb2.StartRunRequest, request)


def test_start_request_from_plain_flags() -> None:
    request = sent(
        "start", "--workflow", "runtime.noop", "--input", '{"a": 1, "b": {"c": [true]}}', "--idempotency-key", "k",
        "--max-attempts", "4",
    )
    assert request.workflow == "runtime.noop"
    assert json_format.MessageToDict(request.input) == {"a": 1.0, "b": {"c": [True]}}
    assert request.idempotency_key == "k" and request.max_attempts == 4


def test_start_request_defaults_leave_everything_to_the_server() -> None:
    request = sent("start")
    assert request == run_service_pb2.StartRunRequest()
    assert not request.HasField("input")


def test_tool_and_args_map_to_runtime_tool() -> None:
    request = sent("start", "--tool", "sleep", "--args", '{"seconds": 1}')
    assert request.workflow == "runtime.tool"
    assert json_format.MessageToDict(request.input) == {"tool": "sleep", "args": {"seconds": 1.0}}


def test_tool_args_default_to_an_empty_object() -> None:
    request = sent("start", "--tool", "noop")
    assert request.workflow == "runtime.tool"
    assert json_format.MessageToDict(request.input) == {"tool": "noop", "args": {}}


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["start", "--tool", "sleep", "--workflow", "runtime.noop"], "--tool cannot be combined"),
        (["start", "--tool", "sleep", "--input", "{}"], "--tool cannot be combined"),
        (["start", "--args", "{}"], "--args needs --tool"),
        (["start", "--tool", ""], "--tool needs a tool name"),
        (["start", "--timeout", "5"], "--timeout applies only with --wait"),
    ],
)
def test_start_flags_that_do_not_fit_together(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    assert fragment in usage_error(capsys, *argv)


def test_wait_and_timeout() -> None:
    args = parse("start", "--wait", "--timeout", "2.5")
    assert args.wait is True and args.timeout == 2.5
    assert parse("start").wait is False


@pytest.mark.parametrize(
    "argv",
    [
        ["start", "--max-attempts", "0"],
        ["start", "--max-attempts", "x"],
        ["start", "--wait", "--timeout", "0"],
        ["start", "--wait", "--timeout", "-1"],
        ["start", "--wait", "--timeout", "nan"],
        ["list", "--page-size", "0"],
        ["list", "--status", "done"],
        ["watch", "X", "--after-sequence", "-1"],
        ["watch"],
        ["get"],
        ["cancel"],
    ],
)
def test_bad_values_are_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    usage_error(capsys, *argv)


def listed(*argv: str) -> run_service_pb2.ListRunsRequest:
    """The ListRunsRequest `runs list ARGV` sends."""
    stub = FakeStub(pages={"": run_service_pb2.ListRunsResponse(), "tok": run_service_pb2.ListRunsResponse()})
    assert run_cli(stub, "list", *argv) == 0
    request: run_service_pb2.ListRunsRequest = stub.calls[0][1]
    return request


def test_list_request_maps_status_and_filters() -> None:
    request = listed("--status", "FAILED", "--workflow", "runtime.tool", "--page-size", "7", "--page-token", "tok")
    assert request.status == run_pb2.RUN_STATUS_FAILED
    assert (request.workflow, request.page_size, request.page_token) == ("runtime.tool", 7, "tok")
    assert listed().status == run_pb2.RUN_STATUS_UNSPECIFIED


@pytest.mark.parametrize("status", cli.STATUS_CHOICES)
def test_every_status_choice_is_a_run_status(status: str) -> None:
    assert listed("--status", status).status != run_pb2.RUN_STATUS_UNSPECIFIED


def test_watch_and_cancel_arguments() -> None:
    args = parse("watch", "X", "--after-sequence", "4")
    assert (args.run_id, args.after_sequence) == ("X", 4)
    args = parse("cancel", "X", "--reason", "not needed")
    assert (args.run_id, args.reason) == ("X", "not needed")


# --- exit codes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.OK, 0),
        (grpc.StatusCode.INVALID_ARGUMENT, 2),
        (grpc.StatusCode.ALREADY_EXISTS, 2),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 2),
        (grpc.StatusCode.NOT_FOUND, 3),
        (grpc.StatusCode.FAILED_PRECONDITION, 4),
        (grpc.StatusCode.UNAVAILABLE, 5),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 5),
        (grpc.StatusCode.INTERNAL, 1),
        (grpc.StatusCode.UNKNOWN, 1),
        (grpc.StatusCode.PERMISSION_DENIED, 6),
        (grpc.StatusCode.UNAUTHENTICATED, 6),
        (grpc.StatusCode.CANCELLED, 1),
    ],
)
def test_exit_code_for_status(code: grpc.StatusCode, expected: int) -> None:
    assert common.exit_code_for(code) == expected


def test_exit_codes_are_documented_in_docstring_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.__doc__ is not None and cli.EXIT_CODES in cli.__doc__
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Exit codes:" in out and "130" in out and "FAILED_PRECONDITION" in out
    assert "  6    UNAUTHENTICATED or PERMISSION_DENIED" in out


def test_main_returns_2_on_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["start", "--input", "[]"]) == 2
    assert "must be a JSON object" in capsys.readouterr().err


# --- formatting --------------------------------------------------------------------------------


def test_iso_time_is_utc_with_milliseconds_or_dash() -> None:
    run = make_run()
    assert cli.iso_time(run, "created_at") == "2025-01-31T12:00:00.123Z"
    assert cli.iso_time(run, "finished_at") == "-"


def test_format_run_shows_the_essentials() -> None:
    run = make_run(stop_reason="completed", finished_at=ts("2025-01-31T12:00:01"))
    lines = cli.format_run(run).splitlines()
    fields = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    assert fields["run_id"] == "01RUN"
    assert fields["status"] == "SUCCEEDED"
    assert fields["workflow"] == "runtime.noop"
    assert fields["attempt"] == "2/3"
    assert fields["created_at"] == "2025-01-31T12:00:00.123Z"
    assert fields["started_at"] == "-"
    assert fields["finished_at"] == "2025-01-31T12:00:01.000Z"
    assert fields["stop_reason"] == "completed"
    assert fields["error"] == "-"
    assert "RUN_STATUS_" not in cli.format_run(run)
    # values start in one column
    assert len({line.index(line.split()[1]) for line in lines}) == 1


def test_format_run_indents_a_multi_line_error() -> None:
    text = cli.format_run(make_run(status=run_pb2.RUN_STATUS_FAILED, error="first\nsecond"))
    first = next(line for line in text.splitlines() if line.startswith("error"))
    second = text.splitlines()[text.splitlines().index(first) + 1]
    assert second.strip() == "second" and second.index("second") == first.index("first")


def test_format_run_input_reads_whole_numbers_plainly() -> None:
    run = make_run()
    run.input.update({"tool": "sleep", "args": {"seconds": 1, "ratio": 0.5}})
    assert 'input          {"args":{"ratio":0.5,"seconds":1},"tool":"sleep"}' in cli.format_run(run)


def test_unknown_enum_value_prints_its_number() -> None:
    assert cli.run_status_name(99) == "99"
    assert cli.run_status_name(run_pb2.RUN_STATUS_CANCELED) == "CANCELED"


def test_format_event_line() -> None:
    event = run_pb2.RunEvent(
        run_id="R", sequence=7, type="tool.succeeded", attempt=2, recorded_at=ts("2025-01-31T12:00:00.5")
    )
    event.payload.update({"tool_call_id": "T", "output": {"n": 3}})
    line = cli.format_event(event)
    assert line == (
        '    7  tool.succeeded              2  2025-01-31T12:00:00.500Z  {"output":{"n":3},"tool_call_id":"T"}'
    )
    assert line.index("tool.succeeded") == cli.EVENT_HEADER.index("TYPE")
    assert line.index("2025") == cli.EVENT_HEADER.index("RECORDED_AT")


def test_runs_table_is_aligned_and_one_line_per_run() -> None:
    runs = [
        make_run(run_id="01SHORT"),
        make_run(run_id="01A_MUCH_LONGER_ID", status=run_pb2.RUN_STATUS_FAILED, error="x" * 200 + "\nmore"),
    ]
    lines = cli.format_runs_table(runs).splitlines()
    assert len(lines) == 3
    assert len({line.index(word) for line, word in zip(lines, ["STATUS", "SUCCEEDED", "FAILED"], strict=True)}) == 1
    assert lines[2].endswith("...") and len(lines[2].split()[-1]) == common.MAX_CELL
    assert cli.format_runs_table([]) == "no runs"


def test_format_get_lists_steps_tool_calls_and_attempts() -> None:
    response = run_service_pb2.GetRunResponse(
        run=make_run(),
        steps=[run_pb2.Step(step_key="runtime", status=run_pb2.STEP_STATUS_SUCCEEDED, attempt=1, tool="noop")],
        tool_calls=[
            run_pb2.ToolCall(
                tool_call_id="TC1",
                step_key="runtime",
                tool="noop",
                status=run_pb2.TOOL_CALL_STATUS_SUCCEEDED,
                attempt=1,
            )
        ],
        attempts=[run_service_pb2.Attempt(attempt=1, worker_id="w1", outcome="completed")],
    )
    response.tool_calls[0].output.update({"ok": True})
    text = cli.format_get(response)
    assert "steps:" in text and "tool calls:" in text and "attempts:" in text
    assert "STEP_STATUS_" not in text and "TOOL_CALL_STATUS_" not in text
    assert '{"ok":true}' in text and "w1" in text
    empty = cli.format_get(run_service_pb2.GetRunResponse(run=make_run()))
    assert "steps: none" in empty and "tool calls: none" in empty


def test_json_documents_use_proto_field_names() -> None:
    response = run_service_pb2.GetRunResponse(run=make_run(stop_reason="completed"))
    doc = cli.get_json(response)
    assert set(doc) >= {"run", "steps", "tool_calls"}
    assert doc["steps"] == [] and doc["tool_calls"] == []
    assert doc["run"]["run_id"] == "01RUN" and doc["run"]["stop_reason"] == "completed"
    assert doc["run"]["status"] == "SUCCEEDED"  # as the tables name it
    assert doc["run"]["max_attempts"] == 3
    listing = cli.list_json([make_run()], "")
    assert listing == {"runs": [cli.to_dict(make_run())], "next_page_token": ""}
    json.dumps(doc)


# --- errors ------------------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    """What a failed call raises: code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, violations: list[tuple[str, str]] | None = None) -> None:
        super().__init__(details)
        self._code, self._details = code, details
        self._trailing: tuple[tuple[str, Any], ...] = ()
        if violations is not None:
            proto = status_pb2.Status(code=code.value[0], message=details)
            proto.details.add().Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations
                    ]
                )
            )
            self._trailing = tuple(rpc_status.to_status(proto).trailing_metadata)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing


def test_invalid_argument_lists_each_field_violation() -> None:
    err = FakeRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "input.tool: unknown tool; max_attempts: too many",
        [("input.tool", "unknown tool"), ("max_attempts", "too many")],
    )
    lines, code = cli.describe_rpc_error(err, "h:1")
    assert code == 2
    assert lines == [
        "error: INVALID_ARGUMENT: input.tool: unknown tool; max_attempts: too many",
        "  input.tool: unknown tool",
        "  max_attempts: too many",
    ]


def test_a_single_violation_that_is_the_whole_message_is_printed_once() -> None:
    detail = "input.args.secnds: unknown argument 'secnds' of tool sleep; known: seconds"
    err = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, detail, [("input.args.secnds", detail.split(": ", 1)[1])])
    assert cli.describe_rpc_error(err, "h:1") == ([f"error: INVALID_ARGUMENT: {detail}"], 2)


def test_a_status_without_details_prints_one_line() -> None:
    lines, code = cli.describe_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "run 'X' not found"), "h:1")
    assert (lines, code) == (["error: NOT_FOUND: run 'X' not found"], 3)


def test_mismatched_status_details_are_ignored() -> None:
    err = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "a", [("f", "d")])
    err._details = "something else"  # from_call refuses details that disagree with the call
    assert cli.describe_rpc_error(err, "h:1") == (["error: INVALID_ARGUMENT: something else"], 2)


def test_unavailable_and_deadline_name_the_address() -> None:
    lines, code = cli.describe_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"), "h:9")
    assert code == 5 and lines[0].startswith("error: UNAVAILABLE: ") and "h:9" in lines[0]
    assert "connection refused" in lines[0]
    lines, code = cli.describe_rpc_error(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, ""), "h:9", 10)
    assert code == 5 and lines == ["error: DEADLINE_EXCEEDED: the Run API at h:9 did not answer within 10s"]


def test_an_error_without_a_status_is_unknown() -> None:
    lines, code = cli.describe_rpc_error(grpc.RpcError("odd"), "h:1")
    assert code == 1 and lines[0].startswith("error: UNKNOWN:")


# --- command flows on a fake stub --------------------------------------------------------------


def event(sequence: int, type_: str) -> run_service_pb2.WatchRunResponse:
    return run_service_pb2.WatchRunResponse(event=run_pb2.RunEvent(run_id="01RUN", sequence=sequence, type=type_))


class FakeStream:
    """A server stream: yields items, then raises `error` if set; records cancel()."""

    def __init__(self, items: list[Any], error: BaseException | None = None) -> None:
        self.items, self.error, self.canceled = items, error, False

    def __iter__(self) -> Iterator[Any]:
        yield from self.items
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.canceled = True


class FakeStub:
    """RunService with canned answers; records every call with its timeout."""

    def __init__(
        self,
        final: run_pb2.Run | None = None,
        events: list[Any] | None = None,
        watch_error: BaseException | None = None,
        pages: dict[str, run_service_pb2.ListRunsResponse] | None = None,
        error: BaseException | None = None,
        deduplicated: bool = False,
        started: int = run_pb2.RUN_STATUS_QUEUED,
    ) -> None:
        self.started = started
        self.final = final or make_run()
        self.events = events if events is not None else [event(1, "run.queued"), event(2, "run.completed")]
        self.watch_error, self.pages, self.error, self.deduplicated = watch_error, pages or {}, error, deduplicated
        self.calls: list[tuple[str, Any, float | None]] = []
        self.streams: list[FakeStream] = []

    def _record(self, name: str, request: Any, timeout: float | None) -> None:
        self.calls.append((name, request, timeout))
        if self.error is not None:
            raise self.error

    def StartRun(self, request: Any, timeout: float | None = None) -> Any:
        self._record("StartRun", request, timeout)
        return run_service_pb2.StartRunResponse(run=make_run(status=self.started), deduplicated=self.deduplicated)

    def StartRuns(self, request: Any, timeout: float | None = None) -> Any:
        self._record("StartRuns", request, timeout)
        runs = [make_run(run_id=f"01RUN{i:021d}") for i in range(len(request.requests))]
        return run_service_pb2.StartRunsResponse(responses=[run_service_pb2.StartRunResponse(run=r) for r in runs])

    def GetRun(self, request: Any, timeout: float | None = None) -> Any:
        self._record("GetRun", request, timeout)
        return run_service_pb2.GetRunResponse(run=self.final)

    def ListRuns(self, request: Any, timeout: float | None = None) -> Any:
        self._record("ListRuns", request, timeout)
        return self.pages[request.page_token]

    def CancelRun(self, request: Any, timeout: float | None = None) -> Any:
        self._record("CancelRun", request, timeout)
        return run_service_pb2.CancelRunResponse(run=make_run(status=run_pb2.RUN_STATUS_CANCELED))

    def WatchRun(self, request: Any, timeout: float | None = None) -> Any:
        self._record("WatchRun", request, timeout)
        events = [e for e in self.events if e.event.sequence > request.after_sequence]
        stream = FakeStream(events, self.watch_error)
        self.streams.append(stream)
        return stream

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


class StubChannel:
    """A channel whose calls go to a fake stub's methods of the same name (for runs_client.Client(channel=...))."""

    def __init__(self, fake: Any) -> None:
        self.fake = fake

    def unary_unary(self, path: str, *args: Any, **kwargs: Any) -> Any:
        name = path.rsplit("/", 1)[-1]
        return lambda request, timeout=None, **kw: getattr(self.fake, name)(request, timeout=timeout)

    unary_stream = unary_unary


def api_of(stub: Any) -> common.Api:
    return common.Api(Client("h:1", key="", channel=cast(grpc.Channel, StubChannel(stub)),
                             timeout=cli.UNARY_DEADLINE_SECONDS, retry=common.CLI_RETRY))


def run_cli(stub: Any, *argv: str) -> int:
    return cli.dispatch(api_of(stub), parse(*argv))


def test_start_without_wait_prints_the_run_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeStub()
    assert run_cli(stub, "start") == 0
    assert stub.names() == ["StartRun"]
    assert stub.calls[0][2] == cli.UNARY_DEADLINE_SECONDS
    assert "QUEUED" in capsys.readouterr().out


def test_start_count_starts_many_runs_in_one_call(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeStub()
    assert run_cli(stub, "start", "--tool", "echo", "--count", "3") == 0
    (name, request, _), = stub.calls
    assert name == "StartRuns" and len(request.requests) == 3
    assert {r.workflow for r in request.requests} == {"runtime.tool"}
    assert capsys.readouterr().out.split() == [f"01RUN{i:021d}" for i in range(3)]
    for flags in (["--count", "2", "--wait"], ["--count", "2", "--idempotency-key", "k"], ["--count", "1001"]):
        with pytest.raises(SystemExit) as exited:
            parse("start", *flags)
        assert exited.value.code == 2


def test_start_wait_succeeded_exits_0_and_prints_the_final_run(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeStub(final=make_run(status=run_pb2.RUN_STATUS_SUCCEEDED))
    assert run_cli(stub, "start", "--wait", "--json") == 0
    assert stub.names() == ["StartRun", "WatchRun", "GetRun"]
    assert stub.calls[1][2] == pytest.approx(cli.DEFAULT_WAIT_TIMEOUT_SECONDS, abs=1)
    assert json.loads(capsys.readouterr().out)["status"] == "SUCCEEDED"


@pytest.mark.parametrize("status", [run_pb2.RUN_STATUS_FAILED, run_pb2.RUN_STATUS_CANCELED])
def test_start_wait_failed_or_canceled_exits_1_and_still_prints(
    capsys: pytest.CaptureFixture[str], status: int
) -> None:
    stub = FakeStub(final=make_run(status=status), events=[event(1, "run.queued"), event(2, "run.failed")])
    assert run_cli(stub, "start", "--wait", "--timeout", "7") == 1
    assert stub.calls[1][2] == pytest.approx(7, abs=1)
    assert cli.run_status_name(status) in capsys.readouterr().out


def test_start_wait_stops_reading_at_the_terminal_event() -> None:
    stub = FakeStub(
        events=[event(1, "run.queued"), event(2, "run.canceled"), event(3, "never.read")],
        final=make_run(status=run_pb2.RUN_STATUS_CANCELED),
    )
    assert run_cli(stub, "start", "--wait") == 1
    assert stub.streams[0].canceled


def test_start_wait_timeout_exits_5_after_printing_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeStub(
        final=make_run(status=run_pb2.RUN_STATUS_RUNNING),
        events=[event(1, "run.queued")],
        watch_error=FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
    )
    assert run_cli(stub, "start", "--wait", "--timeout", "1") == 5
    captured = capsys.readouterr()
    assert "RUNNING" in captured.out
    assert "\nerror: DEADLINE_EXCEEDED: run 01RUN did not end within 1s" in captured.err


def test_start_deduplicated_notes_it_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(FakeStub(deduplicated=True), "start", "--idempotency-key", "k", "--json") == 0
    captured = capsys.readouterr()
    assert "k" in captured.err and "01RUN" in captured.err
    json.loads(captured.out)


def test_start_wait_on_a_deduplicated_run_that_already_ended_does_not_watch() -> None:
    stub = FakeStub(deduplicated=True, started=run_pb2.RUN_STATUS_SUCCEEDED)
    assert run_cli(stub, "start", "--idempotency-key", "k", "--wait") == 0
    assert stub.names() == ["StartRun", "GetRun"]


def test_start_sends_the_tool_request() -> None:
    stub = FakeStub()
    run_cli(stub, "start", "--tool", "sleep", "--args", '{"seconds": 2}')
    request = stub.calls[0][1]
    assert request.workflow == "runtime.tool"
    assert json_format.MessageToDict(request.input) == {"tool": "sleep", "args": {"seconds": 2.0}}


@pytest.mark.parametrize(
    ("code", "expected"),
    [(grpc.StatusCode.INVALID_ARGUMENT, 2), (grpc.StatusCode.NOT_FOUND, 3), (grpc.StatusCode.UNAVAILABLE, 5)],
)
def test_rpc_errors_become_messages_and_exit_codes(
    capsys: pytest.CaptureFixture[str], code: grpc.StatusCode, expected: int
) -> None:
    stub = FakeStub(error=FakeRpcError(code, "nope"))
    assert run_cli(stub, "get", "X") == expected
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {code.name}: ")
    assert "Traceback" not in captured.err


def test_list_all_follows_page_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    pages = {
        "": run_service_pb2.ListRunsResponse(runs=[make_run(run_id="R1")], next_page_token="t1"),
        "t1": run_service_pb2.ListRunsResponse(runs=[make_run(run_id="R2")], next_page_token="t2"),
        "t2": run_service_pb2.ListRunsResponse(runs=[make_run(run_id="R3")]),
    }
    assert run_cli(FakeStub(pages=pages), "list", "--all", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in doc["runs"]] == ["R1", "R2", "R3"]
    assert doc["next_page_token"] == ""


def test_list_one_page_shows_the_next_token(capsys: pytest.CaptureFixture[str]) -> None:
    pages = {"t0": run_service_pb2.ListRunsResponse(runs=[make_run(run_id="R1")], next_page_token="t1")}
    stub = FakeStub(pages=pages)
    assert run_cli(stub, "list", "--page-token", "t0") == 0
    out = capsys.readouterr().out
    assert "R1" in out and "next_page_token: t1" in out
    assert stub.names() == ["ListRuns"]


def test_watch_prints_every_event(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeStub(events=[event(3, "run.started"), event(4, "run.completed")])
    assert run_cli(stub, "watch", "01RUN", "--after-sequence", "2") == 0
    assert stub.calls[0][1].after_sequence == 2 and stub.calls[0][2] is None
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == cli.EVENT_HEADER and "run.started" in lines[1] and "run.completed" in lines[2]


def test_watch_json_prints_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(FakeStub(), "watch", "01RUN", "--json") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["run.queued", "run.completed"]
    assert json.loads(lines[1])["sequence"] == 2  # int64 as a number (not the protobuf JSON mapping's string)


def test_watch_interrupted_exits_130_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeStub(events=[event(1, "run.queued")], watch_error=KeyboardInterrupt())
    assert run_cli(stub, "watch", "01RUN") == 130
    assert capsys.readouterr().err == ""
    assert stub.streams[0].canceled


def test_watch_error_mid_stream_maps_its_code(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeStub(
        events=[event(1, "run.queued")],
        watch_error=FakeRpcError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down"),
    )
    assert run_cli(stub, "watch", "01RUN") == 5
    assert "shutting down" in capsys.readouterr().err
    # the watch resumed after its last event, until the client's retries were spent
    assert [request.after_sequence for _, request, _ in stub.calls] == [0, 1, 1]


def test_cancel_sends_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeStub()
    assert run_cli(stub, "cancel", "01RUN", "--reason", "why not") == 0
    assert stub.calls[0][1] == run_service_pb2.CancelRunRequest(run_id="01RUN", reason="why not")
    assert "CANCELED" in capsys.readouterr().out


def test_plain_numbers() -> None:
    assert common.plain_numbers({"a": 1.0, "b": [2.0, 2.5], "c": True, "d": "3.0"}) == {
        "a": 1,
        "b": [2, 2.5],
        "c": True,
        "d": "3.0",
    }


# --- TLS and the API key -----------------------------------------------------------------------


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, str]:
    """Three files to name in TLS flags (parsing only checks that they exist)."""
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    return {name: str(path) for name, path in files.items()}


def test_connection_flags_default_to_off() -> None:
    args = parse("get", "X")
    assert (args.tls_ca, args.tls_cert, args.tls_key, args.api_key) == (None, None, None, None)
    assert common.client_tls(args) == ClientTls() and not common.client_tls(args).enabled


def test_connection_flags_before_or_after_the_command(pem_files: dict[str, str]) -> None:
    f = pem_files
    for argv in (
        ["--tls-ca", f["ca"], "--tls-cert", f["cert"], "--tls-key", f["key"], "--api-key", "k1", "get", "X"],
        ["get", "X", "--tls-ca", f["ca"], "--tls-cert", f["cert"], "--tls-key", f["key"], "--api-key", "k1"],
        ["keys", "list", "--tls-ca", f["ca"], "--tls-cert", f["cert"], "--tls-key", f["key"], "--api-key", "k1"],
    ):
        args = parse(*argv)
        assert common.client_tls(args) == ClientTls(ca=f["ca"], cert=f["cert"], key=f["key"])
        assert args.api_key == "k1"


def test_connection_flags_come_from_the_environment_and_flags_override_it(pem_files: dict[str, str]) -> None:
    env = {"RUNS_TLS_CA": pem_files["ca"], "RUNS_API_KEY": " from-env ", "RUNS_TLS_CERT": "", "RUNS_TLS_KEY": " "}
    args = parse("get", "X", env=env)
    assert (args.tls_ca, args.tls_cert, args.tls_key, args.api_key) == (pem_files["ca"], None, None, "from-env")
    assert common.client_tls(args).enabled
    assert parse("get", "X", "--api-key", "from-flag", env=env).api_key == "from-flag"
    assert parse("--tls-ca", pem_files["key"], "get", "X", env=env).tls_ca == pem_files["key"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--tls-cert", "{cert}", "get", "X"], "--tls-cert and --tls-key (RUNS_TLS_CERT, RUNS_TLS_KEY) go together"),
        (["--tls-key", "{key}", "get", "X"], "--tls-cert and --tls-key (RUNS_TLS_CERT, RUNS_TLS_KEY) go together"),
        (["--tls-ca", "{ca}.missing", "get", "X"], "--tls-ca (RUNS_TLS_CA): "),
        (["--tls-cert", "{cert}", "--tls-key", "/nonexistent", "get", "X"], "--tls-key (RUNS_TLS_KEY): '/nonexistent'"),
        (["--api-key", "two words", "get", "X"], "--api-key (RUNS_API_KEY) must be printable ASCII"),
        (["--api-key", "line\nbreak", "get", "X"], "--api-key (RUNS_API_KEY) must be printable ASCII"),
    ],
)
def test_unusable_connection_flags_are_usage_errors(
    capsys: pytest.CaptureFixture[str], pem_files: dict[str, str], argv: list[str], fragment: str
) -> None:
    assert fragment in usage_error(capsys, *(a.format(**pem_files) for a in argv))


def test_a_missing_tls_file_from_the_environment_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("get", "X", env={"RUNS_TLS_CA": "/no/such/ca.pem"})
    assert exc.value.code == 2
    assert "RUNS_TLS_CA" in capsys.readouterr().err


def test_the_api_key_from_the_environment_never_shows_in_help() -> None:
    env = {"RUNS_API_KEY": "sekrit-value-123"}
    parser, commands = cli._build_parsers(env)
    for p in (parser, *commands.values()):
        assert "sekrit" not in p.format_help()
    assert "RUNS_API_KEY" in parser.format_help() and "ps" in parser.format_help()


class FakeChannel:
    """Stands in for shared.channels.channel: records how it was opened."""

    opened: list[tuple[str, ClientTls | None, str | None]] = []

    def __init__(self, addr: str, tls: ClientTls | None = None, api_key: str | None = None, options: Any = ()) -> None:
        FakeChannel.opened.append((addr, tls, api_key))

    def __enter__(self) -> FakeChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        return None

    def unary_unary(self, *args: Any, **kwargs: Any) -> None:
        return None

    unary_stream = unary_unary


def test_main_opens_the_clients_channel_with_tls_and_the_key(
    monkeypatch: pytest.MonkeyPatch, pem_files: dict[str, str]
) -> None:
    apis: list[tuple[str, common.Api]] = []
    monkeypatch.setattr(runs_client.client, "open_channel", FakeChannel)
    monkeypatch.setattr(cli, "dispatch", lambda api, args: apis.append((args.command, api)) or 0)
    monkeypatch.setattr(FakeChannel, "opened", [])
    monkeypatch.setenv("RUNS_API_KEY", "env-key")
    monkeypatch.setenv("RUN_API_ADDR", "h:1")
    assert cli.main(["--tls-ca", pem_files["ca"], "get", "X"]) == 0
    assert cli.main(["keys", "list", "--tls-cert", pem_files["cert"], "--tls-key", pem_files["key"]]) == 0
    assert FakeChannel.opened == [
        ("h:1", ClientTls(ca=pem_files["ca"]), "env-key"),
        ("h:1", ClientTls(cert=pem_files["cert"], key=pem_files["key"]), "env-key"),
    ]
    (_, api), _ = apis
    assert api.client.retry == common.CLI_RETRY and api.client.timeout == cli.UNARY_DEADLINE_SECONDS
    # a watch (watch, --wait, cancel) outlasts an API restart; other calls give up within a second
    assert sum(common.CLI_WATCH_RETRY.delay(n) for n in range(1, 45)) > 20 > 1 > sum(
        common.CLI_RETRY.delay(n) for n in range(1, 3))
    assert api.client.watch_retry == common.CLI_WATCH_RETRY
    assert type(api.keys).__name__ == "KeyServiceStub" and type(api.ops).__name__ == "OpsServiceStub"


def test_main_reports_a_tls_file_it_cannot_read(
    monkeypatch: pytest.MonkeyPatch, pem_files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    def unreadable(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", pem_files["ca"])

    monkeypatch.setattr(runs_client.client, "open_channel", unreadable)
    assert cli.main(["--tls-ca", pem_files["ca"], "get", "X"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read a TLS file: [Errno 13] Permission denied")


def test_start_sends_the_project() -> None:
    assert sent("start", "--project", "billing").project_id == "billing"
    assert sent("start").project_id == ""


# --- denied and refused calls ------------------------------------------------------------------


def test_unauthenticated_without_a_key_says_to_set_one() -> None:
    err = FakeRpcError(grpc.StatusCode.UNAUTHENTICATED, "missing bearer key")
    lines, code = common.describe_rpc_error(err, "h:1")
    assert code == 6
    assert lines == [
        "error: UNAUTHENTICATED: the Run API at h:1 needs an API key: missing bearer key",
        "  set RUNS_API_KEY to your key (or pass --api-key)",
    ]


def test_unauthenticated_with_a_key_says_it_was_not_accepted() -> None:
    lines, code = common.describe_rpc_error(FakeRpcError(grpc.StatusCode.UNAUTHENTICATED, ""), "h:1", has_key=True)
    assert code == 6
    assert lines[0] == "error: UNAUTHENTICATED: the Run API at h:1 did not accept the API key"
    assert "unknown, revoked or expired" in lines[1]


def test_permission_denied_explains_role_and_scope() -> None:
    err = FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "a client key cannot call KeyService")
    lines, code = common.describe_rpc_error(err, "h:1", has_key=True)
    assert code == 6
    assert lines[0] == "error: PERMISSION_DENIED: a client key cannot call KeyService"
    assert "role, tenant or project" in lines[1] and "admin key" in lines[1]


HANDSHAKE = "failed to connect to all addresses; last error: UNKNOWN: Tls handshake failed: CERTIFICATE_VERIFY_FAILED"
CLOSED = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"


@pytest.mark.parametrize(
    ("details", "tls", "hint"),
    [
        (HANDSHAKE, ClientTls(ca="ca.pem"), "the TLS handshake failed: does --tls-ca (RUNS_TLS_CA) name the CA"),
        (CLOSED, None, "if it serves TLS, pass --tls-ca (or set RUNS_TLS_CA)"),
        (CLOSED, ClientTls(ca="ca.pem"), "if it requires mutual TLS, pass --tls-cert and --tls-key"),
        (CLOSED, ClientTls(ca="ca.pem", cert="c.pem", key="k.pem"), None),
        ("failed to connect to all addresses; last error: Connection refused", None, None),
    ],
)
def test_unavailable_hints_at_tls(details: str, tls: ClientTls | None, hint: str | None) -> None:
    lines, code = common.describe_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, details), "h:1", tls=tls)
    assert code == 5 and lines[0].startswith("error: UNAVAILABLE: the Run API at h:1 is unavailable: ")
    if hint is None:
        assert len(lines) == 1
    else:
        assert len(lines) == 2 and hint in lines[1]


@pytest.mark.parametrize(
    ("code", "has_key", "fragment"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, False, "needs an API key"),
        (grpc.StatusCode.UNAUTHENTICATED, True, "did not accept the API key"),
        (grpc.StatusCode.PERMISSION_DENIED, True, "does not allow this call"),
    ],
)
def test_denied_calls_exit_6_with_a_message_and_no_traceback(
    capsys: pytest.CaptureFixture[str], code: grpc.StatusCode, has_key: bool, fragment: str
) -> None:
    argv = ["--api-key", "the-key"] if has_key else []
    assert run_cli(FakeStub(error=FakeRpcError(code, "no")), *argv, "list") == 6
    captured = capsys.readouterr()
    assert captured.out == "" and fragment in captured.err
    assert "Traceback" not in captured.err and "the-key" not in captured.err


# --- runs get: tenant, project and audit -------------------------------------------------------


def test_format_run_shows_tenant_project_and_who_started_and_canceled() -> None:
    run = make_run(
        status=run_pb2.RUN_STATUS_CANCELED,
        tenant_id="acme",
        project_id="billing",
        created_by="01KEYSTART",
        cancel_requested_by="01KEYCANCEL",
        cancel_reason="not needed\nany more",
        cancel_requested_at=ts("2025-01-31T12:00:02"),
    )
    text = cli.format_run(run)
    fields = {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines() if not line.startswith(" ")}
    assert fields["tenant_id"] == "acme" and fields["project_id"] == "billing"
    assert fields["started_by"] == "01KEYSTART"
    assert fields["canceled_by"] == "01KEYCANCEL"
    assert fields["cancel_reason"] == "not needed"
    lines = text.splitlines()
    assert lines[lines.index(next(li for li in lines if li.startswith("cancel_reason"))) + 1].strip() == "any more"
    assert len({line.index(line.split(None, 1)[1]) for line in lines if not line.startswith(" ")}) == 1


def test_format_run_leaves_out_unset_tenant_and_audit_fields() -> None:
    text = cli.format_run(make_run())
    for name in ("tenant_id", "project_id", "started_by", "canceled_by", "cancel_reason"):
        assert name not in text


def test_a_reason_without_a_canceling_key_is_still_shown() -> None:
    text = cli.format_run(make_run(cancel_reason="operator said so"))
    assert "cancel_reason" in text and "operator said so" in text and "canceled_by" not in text


def test_get_json_carries_tenant_and_audit_fields() -> None:
    run = make_run(tenant_id="acme", created_by="K1", cancel_requested_by="K2", cancel_reason="r")
    doc = cli.get_json(run_service_pb2.GetRunResponse(run=run))["run"]
    assert (doc["tenant_id"], doc["created_by"], doc["cancel_requested_by"], doc["cancel_reason"]) == (
        "acme", "K1", "K2", "r"
    )


# --- runs keys: parsing ------------------------------------------------------------------------


def test_keys_create_maps_every_flag() -> None:
    args = parse(
        "keys", "create", "--role", "Worker", "--tenant", "acme", "--project", "p", "--workspace", "w",
        "--ttl", "3600", "--description", "ci runners",
    )
    assert keys.create_request(args) == key_service_pb2.CreateKeyRequest(
        role=key_service_pb2.KEY_ROLE_WORKER,
        tenant_id="acme",
        project_id="p",
        workspace_id="w",
        ttl_seconds=3600,
        description="ci runners",
    )


def test_keys_create_defaults_leave_scope_to_the_server() -> None:
    request = keys.create_request(parse("keys", "create", "--role", "admin"))
    assert request == key_service_pb2.CreateKeyRequest(role=key_service_pb2.KEY_ROLE_ADMIN)


@pytest.mark.parametrize("role", keys.ROLE_CHOICES)
def test_every_role_choice_is_a_key_role(role: str) -> None:
    assert keys.create_request(parse("keys", "create", "--role", role)).role != key_service_pb2.KEY_ROLE_UNSPECIFIED


@pytest.mark.parametrize(
    "argv",
    [
        ["keys"],
        ["keys", "rotate"],
        ["keys", "create"],
        ["keys", "create", "--role", "root"],
        ["keys", "create", "--role", "client", "--ttl", "0"],
        ["keys", "create", "--role", "client", "--ttl", "1h"],
        ["keys", "list", "--page-size", "0"],
        ["keys", "revoke"],
    ],
)
def test_bad_keys_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    usage_error(capsys, *argv)


def test_keys_list_and_revoke_arguments() -> None:
    args = parse("keys", "list", "--include-revoked", "--page-size", "5", "--all", "--json")
    assert keys.list_request(args, "t") == key_service_pb2.ListKeysRequest(
        page_size=5, page_token="t", include_revoked=True
    )
    assert args.all and args.json
    assert keys.list_request(parse("keys", "list"), "") == key_service_pb2.ListKeysRequest()
    args = parse("--json", "keys", "revoke", "01KEY")
    assert (args.command, args.keys_command, args.key_id, args.json) == ("keys", "revoke", "01KEY", True)


# --- runs keys: formatting ---------------------------------------------------------------------

NOW = datetime(2025, 2, 1, tzinfo=UTC)


def make_key(key_id: str = "01KEY", **extra: Any) -> key_service_pb2.ApiKey:
    fields: dict[str, Any] = {"role": key_service_pb2.KEY_ROLE_CLIENT, "tenant_id": "acme"}
    return key_service_pb2.ApiKey(key_id=key_id, created_at=ts("2025-01-31T12:00:00"), **{**fields, **extra})


def key_fields(text: str) -> dict[str, str]:
    return {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines()}


def test_format_key_shows_scope_expiry_and_state() -> None:
    fields = key_fields(keys.format_key(make_key(description="laptop"), NOW))
    assert fields == {
        "key_id": "01KEY",
        "role": "CLIENT",
        "state": "active",
        "tenant_id": "acme",
        "project_id": "any",
        "workspace_id": "any",
        "created_at": "2025-01-31T12:00:00.000Z",
        "created_by": "no key (the API host, or auth off)",
        "expires_at": "never",
        "description": "laptop",
    }


@pytest.mark.parametrize(
    ("extra", "state"),
    [
        ({"expires_at": ts("2025-02-02T00:00:00")}, "active"),
        ({"expires_at": ts("2025-01-31T23:59:59")}, "expired"),
        ({"revoked_at": ts("2025-01-31T13:00:00")}, "revoked"),
        ({"revoked_at": ts("2025-01-31T13:00:00"), "expires_at": ts("2025-01-31T23:59:59")}, "revoked"),
    ],
)
def test_key_state(extra: dict[str, Any], state: str) -> None:
    assert keys.key_state(make_key(**extra), NOW) == state


def test_a_revoked_key_shows_when() -> None:
    fields = key_fields(keys.format_key(make_key(revoked_at=ts("2025-01-31T13:00:00"), created_by="01ADMIN"), NOW))
    assert fields["revoked_at"] == "2025-01-31T13:00:00.000Z" and fields["state"] == "revoked"
    assert fields["created_by"] == "01ADMIN"


def test_a_created_key_ends_with_its_secret_aligned() -> None:
    response = key_service_pb2.CreateKeyResponse(key=make_key(project_id="billing"), secret="rk_s3cr3t")
    lines = keys.format_created(response, NOW).splitlines()
    assert lines[-1].split() == ["secret", "rk_s3cr3t"]
    assert len({line.index(line.split()[1]) for line in lines}) == 1
    assert key_fields("\n".join(lines))["project_id"] == "billing"


def test_keys_table_is_aligned_and_one_line_per_key() -> None:
    table = keys.format_keys_table(
        [make_key("01A", description="x" * 100), make_key("01LONGER", revoked_at=ts("2025-01-31T13:00:00"))], NOW
    )
    lines = table.splitlines()
    assert len(lines) == 3 and lines[0].split()[:3] == ["KEY_ID", "ROLE", "STATE"]
    assert len({line.index(word) for line, word in zip(lines, ["ROLE", "CLIENT", "CLIENT"], strict=True)}) == 1
    assert "active" in lines[1] and "revoked" in lines[2] and lines[1].endswith("...")
    assert keys.format_keys_table([], NOW) == "no keys"


def test_keys_json_documents() -> None:
    response = key_service_pb2.CreateKeyResponse(key=make_key(), secret="rk_s")
    assert keys.created_json(response) == {"key": cli.to_dict(make_key()), "secret": "rk_s"}
    assert keys.created_json(response)["key"]["role"] == "CLIENT"
    assert keys.list_json([make_key()], "") == {"keys": [cli.to_dict(make_key())], "next_page_token": ""}


# --- runs keys: flows on a fake stub -----------------------------------------------------------


class FakeKeyStub:
    """KeyService with canned answers; records every call with its timeout."""

    def __init__(
        self, pages: dict[str, key_service_pb2.ListKeysResponse] | None = None, error: BaseException | None = None
    ) -> None:
        self.pages, self.error = pages or {}, error
        self.calls: list[tuple[str, Any, float | None]] = []

    def _record(self, name: str, request: Any, timeout: float | None) -> None:
        self.calls.append((name, request, timeout))
        if self.error is not None:
            raise self.error

    def CreateKey(self, request: Any, timeout: float | None = None) -> Any:
        self._record("CreateKey", request, timeout)
        return key_service_pb2.CreateKeyResponse(key=make_key(role=request.role), secret="rk_only_once")

    def ListKeys(self, request: Any, timeout: float | None = None) -> Any:
        self._record("ListKeys", request, timeout)
        return self.pages[request.page_token]

    def RevokeKey(self, request: Any, timeout: float | None = None) -> Any:
        self._record("RevokeKey", request, timeout)
        return key_service_pb2.RevokeKeyResponse(key=make_key(request.key_id, revoked_at=ts("2025-01-31T13:00:00")))


def test_keys_create_prints_the_secret_once_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeKeyStub()
    assert run_cli(stub, "keys", "create", "--role", "admin") == 0
    assert stub.calls[0][0] == "CreateKey" and stub.calls[0][2] == cli.UNARY_DEADLINE_SECONDS
    captured = capsys.readouterr()
    assert captured.out.count("rk_only_once") == 1 and key_fields(captured.out)["secret"] == "rk_only_once"
    assert captured.err.strip() == keys.SECRET_NOTE and "rk_only_once" not in captured.err
    assert "only time the secret is shown" in keys.SECRET_NOTE


def test_keys_create_json_keeps_stdout_machine_readable(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(FakeKeyStub(), "keys", "create", "--role", "worker", "--json") == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["secret"] == "rk_only_once" and doc["key"]["role"] == "WORKER"
    assert captured.err.strip() == keys.SECRET_NOTE


def test_keys_list_all_follows_page_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    pages = {
        "": key_service_pb2.ListKeysResponse(keys=[make_key("K1")], next_page_token="t1"),
        "t1": key_service_pb2.ListKeysResponse(keys=[make_key("K2")]),
    }
    stub = FakeKeyStub(pages)
    assert run_cli(stub, "keys", "list", "--all", "--include-revoked", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert [k["key_id"] for k in doc["keys"]] == ["K1", "K2"] and doc["next_page_token"] == ""
    assert all(request.include_revoked for _, request, _ in stub.calls)


def test_keys_list_one_page_shows_the_next_token(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeKeyStub({"": key_service_pb2.ListKeysResponse(keys=[make_key("K1")], next_page_token="t1")})
    assert run_cli(stub, "keys", "list") == 0
    out = capsys.readouterr().out
    assert "K1" in out and "next_page_token: t1  (runs keys list --page-token t1, or --all)" in out
    assert [name for name, _, _ in stub.calls] == ["ListKeys"]


def test_keys_revoke_prints_the_revoked_key(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeKeyStub()
    assert run_cli(stub, "keys", "revoke", "01GONE") == 0
    assert stub.calls[0][1] == key_service_pb2.RevokeKeyRequest(key_id="01GONE")
    fields = key_fields(capsys.readouterr().out)
    assert fields["key_id"] == "01GONE" and fields["state"] == "revoked"
    assert run_cli(FakeKeyStub(), "keys", "revoke", "01GONE", "--json") == 0
    assert json.loads(capsys.readouterr().out)["revoked_at"] == "2025-01-31T13:00:00Z"


@pytest.mark.parametrize(
    ("code", "expected"),
    [(grpc.StatusCode.NOT_FOUND, 3), (grpc.StatusCode.PERMISSION_DENIED, 6), (grpc.StatusCode.UNAUTHENTICATED, 6)],
)
def test_keys_errors_become_messages_and_exit_codes(
    capsys: pytest.CaptureFixture[str], code: grpc.StatusCode, expected: int
) -> None:
    assert run_cli(FakeKeyStub(error=FakeRpcError(code, "nope")), "keys", "revoke", "K") == expected
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: {code.name}: ")


# --- runs keys: main against an in-process fake KeyService -------------------------------------


class FakeKeyService(key_service_pb2_grpc.KeyServiceServicer):
    """Answers CreateKey for the bearer key `admin-key` only, as the real interceptor would."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def CreateKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.metadata.append(metadata)
        authorization = metadata.get("authorization", "")
        if not authorization:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "an API key is required")
        if authorization != "Bearer admin-key":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "KeyService needs an admin key")
        expires = Timestamp()
        expires.FromDatetime(datetime.now(UTC) + timedelta(seconds=request.ttl_seconds))
        return key_service_pb2.CreateKeyResponse(
            key=key_service_pb2.ApiKey(key_id="01NEW", role=request.role, tenant_id="acme", expires_at=expires),
            secret="rk_new_secret",
        )


@pytest.fixture
def key_server() -> Iterator[tuple[str, FakeKeyService]]:
    servicer = FakeKeyService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    key_service_pb2_grpc.add_KeyServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None).wait(5)


def test_main_sends_the_key_from_runs_api_key_and_maps_refusals(
    key_server: tuple[str, FakeKeyService], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    addr, servicer = key_server
    argv = ["--addr", addr, "keys", "create", "--role", "client", "--ttl", "60"]
    monkeypatch.delenv("RUNS_API_KEY", raising=False)
    assert cli.main(argv) == 6
    assert "set RUNS_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("RUNS_API_KEY", "client-key")
    assert cli.main(argv) == 6
    assert "PERMISSION_DENIED: KeyService needs an admin key" in capsys.readouterr().err
    monkeypatch.setenv("RUNS_API_KEY", "admin-key")
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert key_fields(captured.out)["secret"] == "rk_new_secret" and key_fields(captured.out)["state"] == "active"
    assert keys.SECRET_NOTE in captured.err
    assert [m.get("authorization") for m in servicer.metadata] == [None, "Bearer client-key", "Bearer admin-key"]


# --- issue 7: parsing of the workflow, step and artifact commands ------------------------------


def test_start_pins_a_workflow_version() -> None:
    request = sent("start", "--workflow", "campaign.build", "--workflow-version", "3")
    assert (request.workflow, request.workflow_version) == ("campaign.build", 3)
    assert sent("start", "--workflow", "w").workflow_version == 0


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["start", "--workflow-version", "2"], "--workflow-version needs --workflow NAME"),
        (["start", "--tool", "noop", "--workflow-version", "2"], "--workflow-version needs --workflow NAME"),
        (["start", "--workflow", "w", "--workflow-version", "0"], "must be at least 1"),
        (["workflow", "w", "--version", "0"], "must be at least 1"),
        (["workflow"], "required"),
        (["register"], "required"),
        (["steps"], "required"),
        (["steps", "R", "--status", "pending"], "invalid choice"),
        (["artifacts"], "required"),
        (["artifact", "R", "S", "N"], "-o/--output"),
        (["artifact", "R", "S", "-o", "f"], "required"),
        (["workflows", "--page-size", "0"], "must be at least 1"),
    ],
)
def test_bad_workflow_and_step_arguments_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    assert fragment in usage_error(capsys, *argv)


@pytest.mark.parametrize("status", steps_cli.STEP_STATUS_CHOICES)
def test_every_step_status_choice_is_a_step_status(status: str) -> None:
    stub = DagStub()
    assert run_cli(stub, "steps", "R", "--status", status.upper()) == 0
    assert stub.calls[0][1].status != run_pb2.STEP_STATUS_UNSPECIFIED


def test_the_new_commands_are_in_the_docstring_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.__doc__ is not None
    for command in ("runs steps", "runs artifacts", "runs artifact RUN STEP NAME -o FILE", "runs workflows",
                    "runs workflow NAME", "runs register FILE", "--workflow-version"):
        assert command in cli.__doc__
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("steps", "artifacts", "artifact", "workflows", "workflow", "register"):
        assert f"    {command} " in out


# --- issue 7: formatting -----------------------------------------------------------------------


def make_step(key: str, status: Any = run_pb2.STEP_STATUS_SUCCEEDED, **extra: Any) -> run_pb2.Step:
    return run_pb2.Step(run_id="01RUN", step_key=key, status=status, tool="shell", **extra)


def dag_steps() -> list[run_pb2.Step]:
    """The campaign's five steps, listed out of the DAG's order, in every interesting state."""
    return [
        make_step("bundle", run_pb2.STEP_STATUS_CANCELED, depends_on=["landing_page"], reason="run_failed"),
        make_step(
            "landing_page", run_pb2.STEP_STATUS_FAILED, attempt=2, depends_on=["copy", "images"],
            started_at=ts("2025-01-31T12:00:03"), finished_at=ts("2025-01-31T12:02:08"), error="boom",
            step_error=run_pb2.StepError(code="tool_failed", message="command exited with code 1", attempt=2),
        ),
        make_step("images", run_pb2.STEP_STATUS_RUNNING, attempt=1, depends_on=["brief"],
                  started_at=ts("2025-01-31T12:00:01")),
        make_step("copy", attempt=1, depends_on=["brief"], started_at=ts("2025-01-31T12:00:01"),
                  finished_at=ts("2025-01-31T12:00:01.250")),
        make_step("brief", attempt=1, started_at=ts("2025-01-31T12:00:00"), finished_at=ts("2025-01-31T12:00:01")),
    ]


def table_rows(text: str) -> list[dict[str, str]]:
    """A format_table's rows as {HEADER: cell}, cut at the header's column starts."""
    lines = text.splitlines()
    header = lines[0]
    names = header.split()
    starts = [header.index(name) for name in names]
    ends = [*starts[1:], None]
    return [{n: line[s:e].strip() for n, s, e in zip(names, starts, ends, strict=True)} for line in lines[1:]]


def test_steps_table_is_in_the_dags_order_with_tries_durations_and_problems() -> None:
    now = datetime(2025, 1, 31, 12, 0, 4, 500000, tzinfo=UTC)
    rows = table_rows(steps_cli.format_steps_table(dag_steps(), now))
    assert [r["STEP"] for r in rows] == ["brief", "images", "copy", "landing_page", "bundle"]  # ties: as given
    by_key = {r["STEP"]: r for r in rows}
    assert [by_key[k]["STATUS"] for k in ("brief", "images", "landing_page", "bundle")] == [
        "SUCCEEDED", "RUNNING", "FAILED", "CANCELED"
    ]
    assert by_key["landing_page"]["TRIES"] == "2" and by_key["bundle"]["TRIES"] == "0"
    assert by_key["brief"]["DURATION"] == "1.0s" and by_key["copy"]["DURATION"] == "250ms"
    assert by_key["images"]["DURATION"] == "3.5s+"  # still running: the time so far
    assert by_key["landing_page"]["DURATION"] == "2m05s" and by_key["bundle"]["DURATION"] == "-"
    assert by_key["landing_page"]["DEPENDS_ON"] == "copy,images" and by_key["brief"]["DEPENDS_ON"] == "-"
    assert by_key["landing_page"]["ERROR"] == "tool_failed: command exited with code 1"
    assert by_key["bundle"]["ERROR"] == "canceled: run_failed"
    assert steps_cli.format_steps_table([], now) == "no steps"


def test_dag_order_keeps_the_given_order_when_it_cannot_sort() -> None:
    looped = [make_step("a", depends_on=["b"]), make_step("b", depends_on=["a"])]
    assert [s.step_key for s in steps_cli.dag_order(looped)] == ["a", "b"]
    twice = [make_step("a"), make_step("a")]
    assert len(steps_cli.dag_order(twice)) == 2
    unknown = [make_step("b", depends_on=["gone"]), make_step("a")]
    assert [s.step_key for s in steps_cli.dag_order(unknown)] == ["b", "a"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.85, "850ms"), (3.21, "3.2s"), (59.94, "59.9s"), (125, "2m05s"), (3720, "1h02m"), (-1, "0ms")],
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert steps_cli.format_seconds(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 1024 * 1024, "5.0 MiB")]
)
def test_format_size(size: int, text: str) -> None:
    assert steps_cli.format_size(size) == text


def make_artifact(step: str = "images", name: str = "hero.svg", data: bytes = b"<svg/>", **extra: Any) -> Any:
    return run_pb2.Artifact(
        run_id="01RUN", step_key=step, name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
        media_type="image/svg+xml", **extra,
    )


def test_artifacts_table_shows_a_short_sha256() -> None:
    artifact = make_artifact()
    zipped = make_artifact("bundle", "campaign.zip", b"z" * 2048)
    rows = table_rows(steps_cli.format_artifacts_table([artifact, zipped]))
    assert rows[0] == {"STEP": "images", "NAME": "hero.svg", "SIZE": "6 B", "SHA256": artifact.sha256[:12],
                       "MEDIA_TYPE": "image/svg+xml"}
    assert rows[1]["SIZE"] == "2.0 KiB"
    assert steps_cli.format_artifacts_table([]) == "no artifacts"


def test_format_run_shows_the_version_steps_summary_and_output() -> None:
    run = make_run(workflow_version=2, steps_summary=run_pb2.StepsSummary(total=5, succeeded=3, running=1, pending=1))
    run.workflow = "campaign.build"
    run.output.update({"bundle": {"result": {"files": ["a", "b"]}, "exit_code": 0}})
    fields = {line.split()[0]: line.split(None, 1)[1] for line in cli.format_run(run).splitlines()}
    assert fields["workflow"] == "campaign.build" and fields["workflow_version"] == "2"
    assert fields["steps_summary"] == "5 steps: 3 succeeded, 1 running, 1 pending"
    assert fields["output"] == '{"bundle":{"exit_code":0,"result":{"files":["a","b"]}}}'
    assert runs_cli.format_steps_summary(run_pb2.StepsSummary(total=1)) == "1 step"
    assert runs_cli.format_steps_summary(run_pb2.StepsSummary(total=2, failed=1, canceled=1)) == (
        "2 steps: 1 failed, 1 canceled"
    )


def test_a_long_run_output_is_cut_in_text_but_whole_in_json() -> None:
    run = make_run()
    run.output.update({"s": {"stdout": "x" * 5000}})
    text = cli.format_run(run)
    assert "(5019 characters; all of it with --output or --json)" in text and "x" * 5000 not in text
    assert cli.get_json(run_service_pb2.GetRunResponse(run=run))["run"]["output"]["s"]["stdout"] == "x" * 5000


def test_format_get_shows_the_dag_and_each_tool_calls_try() -> None:
    response = run_service_pb2.GetRunResponse(
        run=make_run(steps_summary=run_pb2.StepsSummary(total=5)),
        steps=dag_steps(),
        tool_calls=[run_pb2.ToolCall(tool_call_id="TC1", step_key="landing_page", step_attempt=2, attempt=1)],
    )
    text = cli.format_get(response)
    steps_part = text.split("steps:\n", 1)[1].split("\n\n")[0]
    assert [r["STEP"] for r in table_rows(steps_part)] == ["brief", "images", "copy", "landing_page", "bundle"]
    calls = table_rows(text.split("tool calls:\n", 1)[1].split("\n\n")[0])
    assert (calls[0]["TRY"], calls[0]["ATTEMPT"]) == ("2", "1")


# --- issue 7: workflow specs -------------------------------------------------------------------

CAMPAIGN = Path(__file__).resolve().parent.parent / "workflows" / "campaign.build.v1.yaml"


def make_workflow(version: int = 1, **extra: Any) -> workflow_service_pb2.Workflow:
    spec = workflow_spec(workflows_cli.load_spec_file(str(CAMPAIGN)))
    return workflow_service_pb2.Workflow(
        name="campaign.build", version=version, spec_hash="ab" * 32, spec=spec, created_at=ts("2025-01-31T12:00:00"),
        **extra,
    )


def test_format_workflow_is_yaml_that_registers_as_the_same_spec() -> None:
    text = workflows_cli.format_workflow(make_workflow(builtin=True))
    lines = text.splitlines()
    assert lines[0] == "# campaign.build version 1, built-in, 2025-01-31T12:00:00.000Z"
    assert lines[1] == "# spec sha256 " + "ab" * 32
    assert "  timeout_seconds: 30\n" in text and "backoff_seconds: 0.5" in text
    assert "    - |\n      import json, os\n" in text, "scripts are YAML blocks"
    assert "  cache:\n    scope: global\n" in text, "a declared cache is shown"
    bare = parse_spec({"name": "one", "steps": [{"key": "a", "tool": "noop"}]})
    spec = json_format.ParseDict(to_proto_dict(spec_to_dict(bare)), workflow_service_pb2.WorkflowSpec())
    bare_text = workflows_cli.format_workflow(workflow_service_pb2.Workflow(name="one", version=1, spec=spec))
    assert "cache:" not in bare_text, "the default cache is left out"
    shown = load_spec_text(text, "yaml")
    original = load_spec_text(CAMPAIGN.read_text(), "yaml")
    assert shown == original and spec_version_hash(shown) == spec_version_hash(original)
    text = workflows_cli.format_workflow(make_workflow(created_by="01KEY"))
    assert text.startswith("# campaign.build version 1, registered by 01KEY, ")


@pytest.mark.parametrize("value", ["0o17", "0x1F", "1e3", "yes", "true", "null", "12:30", "2025-01-01", ".inf", "~"])
def test_yaml_output_keeps_strings_that_look_like_other_things(value: str) -> None:
    spec = workflow_service_pb2.WorkflowSpec(name="w", steps=[workflow_service_pb2.WorkflowStep(key="a", tool="echo")])
    spec.steps[0].args.update({"text": value, "n": 3, "ratio": 0.5})
    text = workflows_cli.spec_yaml(workflows_cli.spec_file_form(spec))
    assert load_spec_text(text, "yaml").steps[0].args == {"text": value, "n": 3, "ratio": 0.5}


def test_workflows_table() -> None:
    rows = table_rows(workflows_cli.format_workflows_table([make_workflow(3, builtin=True)]))
    assert rows == [{"NAME": "campaign.build", "VERSION": "3", "STEPS": "5", "BUILTIN": "yes",
                     "CREATED_AT": "2025-01-31T12:00:00.000Z", "DESCRIPTION": rows[0]["DESCRIPTION"]}]
    assert rows[0]["DESCRIPTION"].startswith("Campaign build")
    assert workflows_cli.format_workflows_table([]) == "no workflows"


@pytest.mark.parametrize(
    ("path", "text", "fmt"),
    [
        ("a.json", "name: x", "json"),
        ("a.YML", "{}", "yaml"),
        ("a.yaml", "{}", "yaml"),
        ("-", ' \n{"name": 1}', "json"),
        ("spec", "name: x", "yaml"),
    ],
)
def test_spec_format(path: str, text: str, fmt: str) -> None:
    assert workflows_cli.spec_format(path, text) == fmt


# --- issue 7: flows on fake stubs --------------------------------------------------------------


class FakeWorkflowStub:
    """WorkflowService with canned answers; records every call with its timeout."""

    def __init__(self, created: bool = True, error: BaseException | None = None) -> None:
        self.created, self.error = created, error
        self.calls: list[tuple[str, Any, float | None]] = []

    def _record(self, name: str, request: Any, timeout: float | None) -> None:
        self.calls.append((name, request, timeout))
        if self.error is not None:
            raise self.error

    def RegisterWorkflow(self, request: Any, timeout: float | None = None) -> Any:
        self._record("RegisterWorkflow", request, timeout)
        workflow = workflow_service_pb2.Workflow(name=request.spec.name, version=4, spec=request.spec)
        return workflow_service_pb2.RegisterWorkflowResponse(workflow=workflow, created=self.created)

    def ListWorkflows(self, request: Any, timeout: float | None = None) -> Any:
        self._record("ListWorkflows", request, timeout)
        pages = {
            "": workflow_service_pb2.ListWorkflowsResponse(workflows=[make_workflow(1)], next_page_token="t1"),
            "t1": workflow_service_pb2.ListWorkflowsResponse(workflows=[make_workflow(2)]),
        }
        return pages[request.page_token]

    def GetWorkflow(self, request: Any, timeout: float | None = None) -> Any:
        self._record("GetWorkflow", request, timeout)
        return workflow_service_pb2.GetWorkflowResponse(workflow=make_workflow(request.version or 9))


def sent_spec(stub: FakeWorkflowStub) -> Any:
    """The spec a RegisterWorkflow call carried, parsed back into the model."""
    (name, request, timeout), = stub.calls
    assert name == "RegisterWorkflow" and timeout == cli.UNARY_DEADLINE_SECONDS
    return parse_spec(from_proto_dict(json_format.MessageToDict(request.spec, preserving_proto_field_name=True)))


def test_register_sends_the_files_spec_and_says_created_or_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeWorkflowStub(created=True)
    assert run_cli(stub, "register", str(CAMPAIGN)) == 0
    assert sent_spec(stub) == load_spec_text(CAMPAIGN.read_text(), "yaml")
    assert capsys.readouterr().out == "campaign.build version 4: created\n"
    assert run_cli(FakeWorkflowStub(created=False), "register", str(CAMPAIGN)) == 0
    assert capsys.readouterr().out == "campaign.build version 4: unchanged (this spec was registered before)\n"
    assert run_cli(FakeWorkflowStub(created=False), "register", str(CAMPAIGN), "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["created"] is False and doc["workflow"]["version"] == 4 and doc["workflow"]["name"] == "campaign.build"


def test_register_reads_json_stdin_and_a_workflow_json_document(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import io

    plain = {"name": "tiny", "steps": [{"key": "a", "tool": "echo", "args": {"n": 1}}]}
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(plain)))
    stub = FakeWorkflowStub()
    assert run_cli(stub, "register", "-") == 0
    assert sent_spec(stub).steps[0].args == {"n": 1}
    # what `runs workflow NAME --json` prints registers as that workflow's spec
    document = tmp_path / "campaign.json"
    document.write_text(json.dumps(cli.to_dict(make_workflow(7, builtin=True))))
    stub = FakeWorkflowStub()
    assert run_cli(stub, "register", str(document)) == 0
    assert sent_spec(stub) == load_spec_text(CAMPAIGN.read_text(), "yaml")
    capsys.readouterr()


def test_register_lists_every_local_violation_and_sends_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: ''\n"
        "steps:\n"
        "  - {key: a, tool: noop, depends_on: [b, zz]}\n"
        "  - {key: b, tool: noop, depends_on: [a], input: {x: steps.c.output}, retry: {max_attempts: 0}}\n"
    )
    stub = FakeWorkflowStub()
    assert run_cli(stub, "register", str(bad)) == 2
    assert stub.calls == []
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and lines[0] == f"error: {bad} is not a valid workflow spec (5 problems):"
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == [
        "name", "steps[0].depends_on[0]", "steps[0].depends_on[1]", "steps[1].input.x", "steps[1].retry.max_attempts"
    ]
    assert "cycle: a -> b -> a" in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("steps: [\n", "YAML does not parse"),
        ("- a\n", "must be an object"),
        ("name: x\nname: y\nsteps: []\n", "twice"),
    ],
)
def test_register_refuses_a_file_that_does_not_parse(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, fragment: str
) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(text)
    assert run_cli(FakeWorkflowStub(), "register", str(path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is not a valid workflow spec:") and fragment in err


def test_register_a_file_it_cannot_read(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_cli(FakeWorkflowStub(), "register", str(tmp_path / "missing.yaml")) == 2
    assert capsys.readouterr().err == f"error: cannot read {tmp_path / 'missing.yaml'}: No such file or directory\n"
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert run_cli(FakeWorkflowStub(), "register", str(binary)) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot read {binary}: ")


def test_register_maps_the_servers_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    error = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "spec.name: taken", [("spec.name", "taken")])
    assert run_cli(FakeWorkflowStub(error=error), "register", str(CAMPAIGN)) == 2
    assert capsys.readouterr().err == "error: INVALID_ARGUMENT: spec.name: taken\n"  # printed once


def test_workflows_lists_pages(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeWorkflowStub()
    assert run_cli(stub, "workflows") == 0
    out = capsys.readouterr().out
    assert "campaign.build" in out and "next_page_token: t1  (runs workflows --page-token t1, or --all)" in out
    stub = FakeWorkflowStub()
    assert run_cli(stub, "workflows", "--all", "--json", "--page-size", "1") == 0
    doc = json.loads(capsys.readouterr().out)
    assert [w["version"] for w in doc["workflows"]] == [1, 2] and doc["next_page_token"] == ""
    assert [request.page_size for _, request, _ in stub.calls] == [1, 1]


def test_workflow_shows_a_version(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeWorkflowStub()
    assert run_cli(stub, "workflow", "campaign.build", "--version", "2") == 0
    assert stub.calls[0][1] == workflow_service_pb2.GetWorkflowRequest(name="campaign.build", version=2)
    assert capsys.readouterr().out.startswith("# campaign.build version 2, ")
    assert run_cli(FakeWorkflowStub(), "workflow", "campaign.build", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == 9 and doc["spec"]["change_requests"]["copy_update"] == {"step_keys": ["copy"]}
    error = FakeRpcError(grpc.StatusCode.NOT_FOUND, "workflow 'x' not found")
    assert run_cli(FakeWorkflowStub(error=error), "workflow", "x") == 3
    assert capsys.readouterr().err == "error: NOT_FOUND: workflow 'x' not found\n"


def chunked(data: bytes, artifact: run_pb2.Artifact, size: int = 4) -> list[run_service_pb2.DownloadArtifactResponse]:
    """A DownloadArtifact stream: the artifact with the first chunk, then the rest."""
    parts = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    first = run_service_pb2.DownloadArtifactResponse(artifact=artifact, chunk=parts[0])
    return [first, *(run_service_pb2.DownloadArtifactResponse(chunk=p) for p in parts[1:])]


class DagStub(FakeStub):
    """FakeStub plus ListRunSteps, ListRunArtifacts and DownloadArtifact."""

    def __init__(self, download: list[Any] | None = None, download_error: BaseException | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.download, self.download_error = download or [], download_error

    def ListRunSteps(self, request: Any, timeout: float | None = None) -> Any:
        self._record("ListRunSteps", request, timeout)
        return run_service_pb2.ListRunStepsResponse(steps=dag_steps())

    def ListRunArtifacts(self, request: Any, timeout: float | None = None) -> Any:
        self._record("ListRunArtifacts", request, timeout)
        return run_service_pb2.ListRunArtifactsResponse(artifacts=[make_artifact()])

    def DownloadArtifact(self, request: Any, timeout: float | None = None) -> Any:
        self._record("DownloadArtifact", request, timeout)
        stream = FakeStream(self.download, self.download_error)
        self.streams.append(stream)
        return stream


def test_steps_and_artifacts_commands(capsys: pytest.CaptureFixture[str]) -> None:
    stub = DagStub()
    assert run_cli(stub, "steps", "01RUN", "--status", "failed") == 0
    assert stub.calls[0][1] == run_service_pb2.ListRunStepsRequest(run_id="01RUN", status=run_pb2.STEP_STATUS_FAILED)
    assert stub.calls[0][2] == cli.UNARY_DEADLINE_SECONDS
    assert table_rows(capsys.readouterr().out)[0]["STEP"] == "brief"
    assert run_cli(stub, "steps", "01RUN", "--json") == 0
    assert stub.calls[1][1].status == run_pb2.STEP_STATUS_UNSPECIFIED
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps"][1]["step_error"]["code"] == "tool_failed"
    assert run_cli(stub, "artifacts", "01RUN") == 0
    assert "hero.svg" in capsys.readouterr().out
    assert run_cli(stub, "artifacts", "01RUN", "--json") == 0
    assert json.loads(capsys.readouterr().out)["artifacts"][0]["size"] == 6  # int64: a number in JSON


def test_artifact_downloads_and_verifies(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = b"<svg>" + bytes(range(256)) * 10 + b"</svg>"
    artifact = make_artifact(data=data)
    stub = DagStub(download=chunked(data, artifact, 1000))
    target = tmp_path / "hero.svg"
    target.write_bytes(b"old contents")
    assert run_cli(stub, "artifact", "01RUN", "images", "hero.svg", "-o", str(target)) == 0
    assert stub.calls[0][1] == run_service_pb2.DownloadArtifactRequest(run_id="01RUN", step_key="images",
                                                                        name="hero.svg")
    assert stub.calls[0][2] == steps_cli.DOWNLOAD_DEADLINE_SECONDS
    assert target.read_bytes() == data and stub.streams[0].canceled
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert capsys.readouterr().out == f"{target}: images/hero.svg, {len(data)} bytes, sha256 {artifact.sha256}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hero.svg"]
    stub = DagStub(download=chunked(b"", make_artifact(data=b"")))
    assert run_cli(stub, "artifact", "01RUN", "images", "empty", "-o", str(tmp_path / "empty"), "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["path"] == str(tmp_path / "empty") and (tmp_path / "empty").read_bytes() == b""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("stream", "fragment"),
    [
        (chunked(b"tampered", make_artifact(data=b"original")), "does not match the artifact: sha256"),
        (chunked(b"short", make_artifact(data=b"short")), None),
        ([run_service_pb2.DownloadArtifactResponse(chunk=b"x")], "bytes before describing the artifact"),
        ([], "without sending the artifact"),
    ],
)
def test_artifact_refuses_a_mismatch_and_leaves_no_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, stream: list[Any], fragment: str | None
) -> None:
    if fragment is None:  # the right bytes but a size that disagrees
        stream[0].artifact.size += 1
        fragment = "(5 bytes), expected"
    target = tmp_path / "out.bin"
    target.write_bytes(b"keep me")
    assert run_cli(DagStub(download=stream), "artifact", "R", "S", "N", "-o", str(target)) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and fragment in captured.err and "Traceback" not in captured.err
    assert target.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"], "the partial file is removed"


def test_artifact_error_mid_stream_leaves_no_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = b"0123456789"
    stub = DagStub(
        download=chunked(data, make_artifact(data=data))[:1],
        download_error=FakeRpcError(grpc.StatusCode.UNAVAILABLE, "the server went away"),
    )
    assert run_cli(stub, "artifact", "R", "S", "N", "-o", str(tmp_path / "x")) == 5
    assert "the server went away" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    stub = DagStub(download=chunked(data, make_artifact(data=data))[:1], download_error=KeyboardInterrupt())
    assert run_cli(stub, "artifact", "R", "S", "N", "-o", str(tmp_path / "x")) == 130
    assert list(tmp_path.iterdir()) == []
    stub = DagStub(download_error=FakeRpcError(grpc.StatusCode.NOT_FOUND, "no artifact 'N' in step 'S'"))
    assert run_cli(stub, "artifact", "R", "S", "N", "-o", str(tmp_path / "x")) == 3
    assert list(tmp_path.iterdir()) == []


def test_artifact_to_a_place_it_cannot_write(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = b"abc"
    stub = DagStub(download=chunked(data, make_artifact(data=data)))
    assert run_cli(stub, "artifact", "R", "S", "N", "-o", str(tmp_path / "no" / "such" / "dir" / "f")) == 1
    assert capsys.readouterr().err.startswith(f"error: cannot write {tmp_path}/no/such/dir/f: ")
    (tmp_path / "adir").mkdir()
    stub = DagStub(download=chunked(data, make_artifact(data=data)))
    assert run_cli(stub, "artifact", "R", "S", "N", "-o", str(tmp_path / "adir")) == 1
    assert capsys.readouterr().err.startswith(f"error: cannot write {tmp_path / 'adir'}: ")
    assert [p.name for p in tmp_path.iterdir()] == ["adir"] and list((tmp_path / "adir").iterdir()) == []


# --- issue 8: rebuild, explain, cache (fake stubs) ------------------------------------------------


def plan_steps() -> list[run_service_pb2.RebuildPlanStep]:
    rows = [("brief", "reuse", "unaffected"), ("copy", "rerun", "named by change request copy_update"),
            ("images", "reuse", "unaffected"), ("landing_page", "rerun", "downstream of copy"),
            ("bundle", "rerun", "downstream of copy")]
    return [run_service_pb2.RebuildPlanStep(step_key=k, action=a, reason=r) for k, a, r in rows]


class CacheStub(FakeStub):
    """FakeStub plus RebuildRun, ExplainStep, ListCacheEntries and InvalidateCache."""

    def __init__(self, explained: list[run_service_pb2.StepExplanation] | None = None,
                 entries: dict[str, run_service_pb2.ListCacheEntriesResponse] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.explained, self.entries = explained or [], entries or {}

    def RebuildRun(self, request: Any, timeout: float | None = None) -> Any:
        self._record("RebuildRun", request, timeout)
        response = run_service_pb2.RebuildRunResponse(plan=plan_steps())
        if not request.dry_run:
            response.run.CopyFrom(make_run(status=self.started, run_id="01NEW", trigger="rebuild",
                                           base_run_id=request.base_run_id,
                                           change_request=request.change_request_type))
        return response

    def ExplainRun(self, request: Any, timeout: float | None = None) -> Any:
        # An API without ExplainRun: `runs explain RUN` prints the steps only (tests/test_explain_run.py
        # covers the run's explanation against a real API).
        raise FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

    def ExplainStep(self, request: Any, timeout: float | None = None) -> Any:
        self._record("ExplainStep", request, timeout)
        return run_service_pb2.ExplainStepResponse(steps=self.explained)

    def ListCacheEntries(self, request: Any, timeout: float | None = None) -> Any:
        self._record("ListCacheEntries", request, timeout)
        return self.entries[request.page_token]

    def InvalidateCache(self, request: Any, timeout: float | None = None) -> Any:
        self._record("InvalidateCache", request, timeout)
        return run_service_pb2.InvalidateCacheResponse(removed=3 if not request.cache_key else 1)


def test_rebuild_arguments_map_to_the_request() -> None:
    stub = CacheStub()
    assert run_cli(stub, "rebuild", "01BASE", "--change", "copy_update", "--input-patch",
                   '{"audience": "x", "color": null}', "--steps", "copy, images", "--dry-run") == 0
    assert run_cli(stub, "rebuild", "01BASE", "--steps", "bundle") == 0
    (_, request, _), (_, bare, _) = stub.calls
    assert (request.base_run_id, request.change_request_type, list(request.steps), request.dry_run) == (
        "01BASE", "copy_update", ["copy", "images"], True)
    assert json_format.MessageToDict(request.input_patch) == {"audience": "x", "color": None}
    assert bare.change_request_type == "" and not bare.HasField("input_patch") and not bare.dry_run


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["rebuild", "R"], "give --change TYPE or --steps a,b"),
        (["rebuild", "R", "--change", "c", "--dry-run", "--wait"], "--wait does not apply to --dry-run"),
        (["rebuild", "R", "--change", "c", "--timeout", "5"], "--timeout applies only with --wait"),
        (["rebuild", "R", "--steps", "a,,b"], "must be step keys separated by commas"),
        (["rebuild", "R", "--change", "c", "--input-patch", "[1]"], "must be a JSON object"),
        (["cache", "rm"], "--workflow"),
        (["cache"], "CACHE_COMMAND"),
        (["explain"], "RUN"),
    ],
)
def test_rebuild_explain_and_cache_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                 fragment: str) -> None:
    assert fragment in usage_error(capsys, *argv)


def test_rebuild_prints_the_plan_and_the_new_run(capsys: pytest.CaptureFixture[str]) -> None:
    stub = CacheStub()
    assert run_cli(stub, "rebuild", "01BASE", "--change", "copy_update") == 0
    text = capsys.readouterr().out
    table, last = text.split("\n\n")
    rows = table_rows(table)
    assert [(r["STEP"], r["ACTION"], r["REASON"]) for r in rows][:2] == [
        ("brief", "reuse", "unaffected"), ("copy", "rerun", "named by change request copy_update")]
    assert last == "run 01NEW QUEUED (follow it with: runs watch 01NEW)\n"
    assert stub.names() == ["RebuildRun"] and stub.calls[0][2] == common.UNARY_DEADLINE_SECONDS


def test_rebuild_dry_run_says_nothing_was_created(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(CacheStub(), "rebuild", "01BASE", "--change", "copy_update", "--dry-run") == 0
    assert capsys.readouterr().out.endswith("\n\ndry run: nothing was created\n")
    assert run_cli(CacheStub(), "rebuild", "01BASE", "--change", "copy_update", "--dry-run", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["run"] is None and doc["plan"][3] == {
        "step_key": "landing_page", "action": "rerun", "reason": "downstream of copy"}


def test_rebuild_wait_follows_the_new_run_like_start_wait(capsys: pytest.CaptureFixture[str]) -> None:
    stub = CacheStub(final=make_run(run_id="01NEW", trigger="rebuild", base_run_id="01BASE",
                                    change_request="copy_update"))
    assert run_cli(stub, "rebuild", "01BASE", "--change", "copy_update", "--wait", "--timeout", "7") == 0
    assert stub.names() == ["RebuildRun", "WatchRun", "GetRun"] and stub.calls[1][2] == pytest.approx(7, abs=1)
    run_part = capsys.readouterr().out.split("\n\n")[1]
    fields = {line.split()[0]: line.split(None, 1)[1] for line in run_part.splitlines()}
    assert (fields["status"], fields["trigger"], fields["change_request"]) == (
        "SUCCEEDED", "rebuild of run 01BASE", "copy_update")

    failed = CacheStub(final=make_run(status=run_pb2.RUN_STATUS_FAILED, run_id="01NEW"))
    assert run_cli(failed, "rebuild", "01BASE", "--steps", "copy", "--wait", "--json") == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["run"]["status"] == "FAILED" and len(doc["plan"]) == 5


def test_rebuild_refusals_keep_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    refused = FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "run 01BASE is FAILED; only a SUCCEEDED run can be "
                           "rebuilt")
    assert run_cli(CacheStub(error=refused), "rebuild", "01BASE", "--change", "copy_update") == 4
    assert "is FAILED" in capsys.readouterr().err
    unknown = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "change_request_type: unknown",
                           [("change_request_type", "unknown change request type 'x'; workflow w declares: a, b")])
    assert run_cli(CacheStub(error=unknown), "rebuild", "01BASE", "--change", "x") == 2
    assert "  change_request_type: unknown change request type 'x'; workflow w declares: a, b" in (
        capsys.readouterr().err)


def explanation(**fields: Any) -> run_service_pb2.StepExplanation:
    return json_format.ParseDict(fields, run_service_pb2.StepExplanation())


def test_explain_reads_decision_key_reason_and_differences(capsys: pytest.CaptureFixture[str]) -> None:
    stub = CacheStub(explained=[
        explanation(step_key="brief", decision="executed", summary="executed: cache miss (no_entry): ...",
                    cache_key="ab" * 32, cache_display="campaign.build:brief:0123456789ab", cache_reason="no_entry",
                    components={"input": {"product": "B", "n": 2.0}, "tool_version": "1"},
                    nearest_cache_key="cd" * 32, nearest_source_run_id="01OLD",
                    differences=[{"path": "input.product", "before": "A", "after": "B"},
                                 {"path": "input.n", "before": None, "after": 2}]),
        explanation(step_key="copy", decision="cache_hit", summary="skipped: cache hit in the hot layer",
                    cache_reason="hot", source_run_id="01OLD"),
    ])
    assert run_cli(stub, "explain", "01RUN") == 0
    first, second = capsys.readouterr().out.split("\n\n")
    assert first.splitlines() == [
        "brief: executed",
        "  summary      executed: cache miss (no_entry): ...",
        f"  key          campaign.build:brief:0123456789ab  (sha256 {'ab' * 32})",
        "  cache        no_entry",
        '  components   {"input":{"n":2,"product":"B"},"tool_version":"1"}',
        f"  nearest      {'cd' * 32} (run 01OLD)",
        '  differences  input.product: "A" -> "B"',
        "               input.n: null -> 2",
    ]
    assert second.splitlines()[0] == "copy: cache_hit" and "  source_run  01OLD" in second
    assert stub.calls[0][1] == run_service_pb2.ExplainStepRequest(run_id="01RUN")

    assert run_cli(stub, "explain", "01RUN", "brief", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps"][0]["differences"][0] == {"path": "input.product", "before": "A", "after": "B"}
    assert stub.calls[-1][1].step_key == "brief"
    assert run_cli(CacheStub(), "explain", "01RUN") == 0 and capsys.readouterr().out == "no steps\n"


def test_explain_same_components_and_long_components(capsys: pytest.CaptureFixture[str]) -> None:
    stub = CacheStub(explained=[explanation(step_key="s", decision="executed", summary="x",
                                            components={"input": {"text": "y" * 1000}},
                                            nearest_cache_key="k", nearest_source_run_id="R")])
    assert run_cli(stub, "explain", "01RUN") == 0
    text = capsys.readouterr().out
    assert "differences  none: the same components" in text and "characters; all of them with --json" in text


def cache_entry(n: int, **extra: Any) -> run_pb2.CacheEntry:
    return run_pb2.CacheEntry(cache_key=f"{n:02d}" * 32, display=f"campaign.build:brief:{n:012d}", scope="global",
                              workflow="campaign.build", step_key="brief", source_run_id=f"01RUN{n}", hit_count=n,
                              created_at=ts("2025-01-31T12:00:00"), **extra)


def test_cache_ls_table_pages_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    pages = {
        "": run_service_pb2.ListCacheEntriesResponse(entries=[cache_entry(1, expires_at=ts("2025-02-01T00:00:00"))],
                                                     next_page_token="t2"),
        "t2": run_service_pb2.ListCacheEntriesResponse(entries=[cache_entry(2, last_hit_at=ts("2025-01-31T13:00:00"))]),
    }
    stub = CacheStub(entries=pages)
    assert run_cli(stub, "cache", "ls", "--workflow", "campaign.build", "--step", "brief") == 0
    text = capsys.readouterr().out
    rows = table_rows(text.splitlines()[0] + "\n" + text.splitlines()[1])
    assert rows == [{"DISPLAY": "campaign.build:brief:000000000001", "KEY": "01" * 6, "SCOPE": "global", "HITS": "1",
                     "CREATED_AT": "2025-01-31T12:00:00.000Z", "EXPIRES_AT": "2025-02-01T00:00:00.000Z",
                     "LAST_HIT_AT": "-", "SOURCE_RUN": "01RUN1"}]
    assert text.splitlines()[-1].startswith("next_page_token: t2")
    request = stub.calls[0][1]
    assert (request.workflow, request.step_key, request.page_token) == ("campaign.build", "brief", "")

    assert run_cli(CacheStub(entries=pages), "cache", "ls", "--all", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert [e["source_run_id"] for e in doc["entries"]] == ["01RUN1", "01RUN2"] and doc["next_page_token"] == ""
    empty = CacheStub(entries={"": run_service_pb2.ListCacheEntriesResponse()})
    assert run_cli(empty, "cache", "ls") == 0 and capsys.readouterr().out == "no cache entries\n"
    never = table_rows(cache_cli.format_entries([cache_entry(3)]))
    assert never[0]["EXPIRES_AT"] == "never"


def test_cache_rm_sends_the_filters_and_says_how_many(capsys: pytest.CaptureFixture[str]) -> None:
    stub = CacheStub()
    assert run_cli(stub, "cache", "rm", "--workflow", "campaign.build", "--step", "copy") == 0
    assert capsys.readouterr().out == "removed 3 cache entries\n"
    assert stub.calls[0][1] == run_service_pb2.InvalidateCacheRequest(workflow="campaign.build", step_key="copy")
    assert run_cli(stub, "cache", "rm", "--workflow", "w", "--key", "k", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"removed": 1}
    assert run_cli(stub, "cache", "rm", "--workflow", "w", "--key", "k") == 0
    assert capsys.readouterr().out == "removed 1 cache entry\n"
    denied = CacheStub(error=FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "no"))
    assert run_cli(denied, "cache", "rm", "--workflow", "w") == 6


def test_steps_table_says_what_the_cache_did() -> None:
    def step(key: str, **extra: Any) -> run_pb2.Step:
        return run_pb2.Step(step_key=key, status=run_pb2.STEP_STATUS_SKIPPED, **extra)

    rows = table_rows(steps_cli.format_steps_table([
        step("a", reason="cache_hit", cache_result="hit", cache_reason="cold", source_run_id="01OLD"),
        step("b", reason="reused_from_base", source_run_id="01BASE"),
        step("c", cache_result="miss", cache_reason="artifact_missing"),
        step("d"),
    ], datetime.now(UTC)))
    assert [r["CACHE"] for r in rows] == ["hit (cold) from 01OLD", "reused from 01BASE", "miss (artifact_missing)", "-"]


# --- issue 7: against a real API ---------------------------------------------------------------


@pytest.fixture
def live_api(
    database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    """A real run API process (auth off, the project's workflows/ registered, artifacts in a temporary folder),
    and no key or TLS from our environment."""
    for name in ("RUNS_API_KEY", "RUNS_TLS_CA", "RUNS_TLS_CERT", "RUNS_TLS_KEY", "RUN_API_ADDR"):
        monkeypatch.delenv(name, raising=False)
    process = Api(database_url, RUNS_ARTIFACTS_URL=str(tmp_path_factory.mktemp("artifacts")))
    process.start()
    try:
        yield process
    finally:
        process.stop()
        print(f"--- api ---\n{process.output()[-6000:]}")
        process.log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def live_worker(api: Api, request: pytest.FixtureRequest) -> Iterator[None]:
    """A worker with the stock tools while the body runs; its log is printed after the test's own output."""
    worker = Worker(api.addr, RUN_WORKER_POLL_MS="100", RUN_WORKER_TOOLS="noop,echo,sleep,fail,shell")
    worker.start()
    try:
        yield
    finally:
        worker.stop()
        log = worker.output()[-6000:]
        worker.log_path.unlink(missing_ok=True)
        request.addfinalizer(lambda: print(f"--- worker ---\n{log}"))


def runs(capsys: pytest.CaptureFixture[str], api: Api, *argv: str) -> tuple[int, str, str]:
    """`runs --addr API ARGV...` in this process: (exit code, stdout, stderr)."""
    code = cli.main(["--addr", api.addr, *argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def test_live_registry_list_show_register_and_pin(
    live_api: Api, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = runs(capsys, live_api, "workflows", "--json")
    assert code == 0
    builtins = {w["name"]: w for w in json.loads(out)["workflows"]}
    assert {"runtime.noop", "runtime.tool", "campaign.build"} <= set(builtins)
    assert builtins["campaign.build"]["builtin"] is True and len(builtins["campaign.build"]["spec"]["steps"]) == 5
    code, out, _ = runs(capsys, live_api, "workflows")
    assert code == 0 and table_rows(out)[0]["NAME"] == "campaign.build"

    # the YAML `runs workflow` prints registers again, here under a new name
    code, out, _ = runs(capsys, live_api, "workflow", "campaign.build")
    assert code == 0 and load_spec_text(out, "yaml") == load_spec_text(CAMPAIGN.read_text(), "yaml")
    mine = tmp_path / "mine.yaml"
    mine.write_text(out.replace("name: campaign.build", "name: team.campaign", 1))
    assert runs(capsys, live_api, "register", str(mine))[:2] == (0, "team.campaign version 1: created\n")
    assert runs(capsys, live_api, "register", str(mine))[:2] == (
        0, "team.campaign version 1: unchanged (this spec was registered before)\n"
    )
    changed = tmp_path / "changed.yaml"
    changed.write_text(mine.read_text().replace("max_attempts: 2", "max_attempts: 3", 1))
    code, out, _ = runs(capsys, live_api, "register", str(changed), "--json")
    assert code == 0 and json.loads(out)["created"] is True and json.loads(out)["workflow"]["version"] == 2
    code, out, _ = runs(capsys, live_api, "workflow", "team.campaign", "--version", "1", "--json")
    assert code == 0 and json.loads(out)["version"] == 1
    assert json.loads(out)["spec"]["steps"][0]["retry"]["max_attempts"] == 2
    assert runs(capsys, live_api, "workflow", "team.campaign")[1].startswith("# team.campaign version 2, ")

    # refused locally (nothing sent), and by the server
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: broken\nsteps:\n  - {key: a, tool: noop, depends_on: [a]}\n")
    code, out, err = runs(capsys, live_api, "register", str(bad))
    assert (code, out) == (2, "") and "steps[0].depends_on[0]: step 'a' depends on itself" in err
    assert runs(capsys, live_api, "workflow", "broken")[0] == 3
    assert runs(capsys, live_api, "workflow", "team.campaign", "--version", "9")[0] == 3

    # a run pins the version it asked for
    code, out, _ = runs(
        capsys, live_api, "start", "--workflow", "team.campaign", "--workflow-version", "1",
        "--input", '{"product": "P", "audience": "A"}', "--json",
    )
    assert code == 0
    run = json.loads(out)
    assert run["workflow"] == "team.campaign" and run["workflow_version"] == 1
    code, out, _ = runs(capsys, live_api, "get", run["run_id"])
    fields = {line.split()[0]: line.split(None, 1)[1] for line in out.split("\n\n")[0].splitlines()}
    assert code == 0 and fields["workflow_version"] == "1" and fields["status"] == "QUEUED"
    code, out, err = runs(capsys, live_api, "start", "--workflow", "no.such.workflow")
    assert code == 2 and out == "" and "campaign.build" in err  # the known workflows are named
    assert runs(capsys, live_api, "steps", run["run_id"])[:2] == (0, "no steps\n")
    assert runs(capsys, live_api, "artifacts", run["run_id"])[:2] == (0, "no artifacts\n")
    assert runs(capsys, live_api, "steps", "01NOSUCHRUN")[0] == 3


def test_live_campaign_run_dag_steps_and_verified_artifacts(
    live_api: Api, capsys: pytest.CaptureFixture[str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The sample end to end through the CLI: start --wait, get (the DAG), steps, artifacts, artifact -o."""
    with live_worker(live_api, request):
        code, out, err = runs(
            capsys, live_api, "start", "--workflow", "campaign.build", "--json", "--wait", "--timeout", "90",
            "--input", '{"product": "Acme Rockets", "audience": "coyotes", "color": "#d9480f"}',
        )
        assert code == 0, err
    run = json.loads(out)
    run_id = run["run_id"]
    assert run["status"] == "SUCCEEDED" and run["workflow_version"] >= 1
    assert run["output"]["bundle"]["result"]["files"] == ["brief.txt", "copy.txt", "hero.svg", "index.html"]

    code, out, _ = runs(capsys, live_api, "get", run_id)
    assert code == 0
    head, steps_part = out.split("\n\nsteps:\n", 1)
    fields = {line.split()[0]: line.split(None, 1)[1] for line in head.splitlines() if not line.startswith(" ")}
    assert fields["steps_summary"] == "5 steps: 5 succeeded"
    assert '"files":["brief.txt","copy.txt","hero.svg","index.html"]' in fields["output"]
    rows = table_rows(steps_part.split("\n\n")[0])
    keys = [r["STEP"] for r in rows]
    assert keys[0] == "brief" and set(keys[1:3]) == {"copy", "images"} and keys[3:] == ["landing_page", "bundle"]
    assert {(r["STATUS"], r["TRIES"]) for r in rows} == {("SUCCEEDED", "1")}
    assert all(r["DURATION"].endswith(("ms", "s")) for r in rows)
    assert {r["STEP"]: r["DEPENDS_ON"] for r in rows}["landing_page"] in ("copy,images", "images,copy")

    code, out, _ = runs(capsys, live_api, "steps", run_id, "--status", "succeeded")
    assert code == 0 and len(table_rows(out)) == 5
    assert runs(capsys, live_api, "steps", run_id, "--status", "failed")[:2] == (0, "no steps\n")

    code, out, _ = runs(capsys, live_api, "artifacts", run_id, "--json")
    assert code == 0
    artifacts = json.loads(out)["artifacts"]
    assert sorted((a["step_key"], a["name"]) for a in artifacts) == [
        ("brief", "brief.txt"), ("bundle", "campaign.zip"), ("copy", "copy.txt"), ("images", "hero.svg"),
        ("landing_page", "index.html"),
    ]
    code, out, _ = runs(capsys, live_api, "artifacts", run_id)
    assert code == 0 and {r["SHA256"] for r in table_rows(out)} == {a["sha256"][:12] for a in artifacts}

    for artifact in artifacts:
        target = tmp_path / artifact["name"]
        code, out, err = runs(capsys, live_api, "artifact", run_id, artifact["step_key"], artifact["name"],
                              "-o", str(target))
        assert code == 0, err
        data = target.read_bytes()
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"] and len(data) == int(artifact["size"])
    with zipfile.ZipFile(tmp_path / "campaign.zip") as bundle:
        assert bundle.read("index.html") == (tmp_path / "index.html").read_bytes()
        assert bundle.read("hero.svg").decode() in (tmp_path / "index.html").read_text()
    code, _, err = runs(capsys, live_api, "artifact", run_id, "bundle", "nope.zip", "-o", str(tmp_path / "nope.zip"))
    assert code == 3 and err.startswith("error: NOT_FOUND: ") and not (tmp_path / "nope.zip").exists()


def test_live_rebuild_explain_and_cache(
    live_api: Api, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    """Issue 8 through the CLI: a campaign run, a copy_update rebuild that reuses brief and images, explain,
    refusals (unknown type, a FAILED base), a dry run that creates nothing, cache ls and rm."""
    with live_worker(live_api, request):
        code, out, err = runs(
            capsys, live_api, "start", "--workflow", "campaign.build", "--json", "--wait", "--timeout", "90",
            "--input", '{"product": "Acme Rockets", "audience": "coyotes"}',
        )
        assert code == 0, err
        base = json.loads(out)["run_id"]
        code, out, err = runs(capsys, live_api, "rebuild", base, "--change", "copy_update", "--json", "--wait",
                              "--timeout", "90", "--input-patch", '{"color": "#d9480f"}')
        assert code == 0, err
        code, failed_out, _ = runs(capsys, live_api, "start", "--tool", "fail", "--max-attempts", "1", "--wait",
                                   "--json", "--timeout", "60")
        assert code == 1
    doc = json.loads(out)
    assert [(p["step_key"], p["action"]) for p in doc["plan"]] == [
        ("brief", "reuse"), ("copy", "rerun"), ("images", "reuse"), ("landing_page", "rerun"), ("bundle", "rerun")]
    new = doc["run"]
    assert new["status"] == "SUCCEEDED" and new["trigger"] == "rebuild" and new["base_run_id"] == base
    assert new["change_request"] == "copy_update" and new["input"]["color"] == "#d9480f"

    code, out, _ = runs(capsys, live_api, "steps", new["run_id"])
    cache_cells = {r["STEP"]: r["CACHE"] for r in table_rows(out)}
    assert cache_cells["brief"] == cache_cells["images"] == f"reused from {base}"
    assert cache_cells["copy"] == "miss (refresh)"

    code, out, _ = runs(capsys, live_api, "explain", new["run_id"], "--json")
    explained = {s["step_key"]: s for s in json.loads(out)["steps"]}
    assert code == 0 and explained["brief"]["decision"] == "reused_from_base"
    assert explained["brief"]["source_run_id"] == base
    assert explained["copy"]["decision"] == "executed" and explained["copy"]["cache_reason"] == "refresh"
    code, out, _ = runs(capsys, live_api, "explain", base, "brief")
    assert code == 0 and out.startswith("brief: executed\n") and "campaign.build:brief:" in out

    code, _, err = runs(capsys, live_api, "rebuild", base, "--change", "nope")
    assert code == 2 and "brief_update, copy_update, image_update" in err
    code, _, err = runs(capsys, live_api, "rebuild", json.loads(failed_out)["run_id"], "--steps", "runtime")
    assert code == 4 and "is FAILED" in err
    before = json.loads(runs(capsys, live_api, "list", "--json")[1])["runs"]
    code, out, _ = runs(capsys, live_api, "rebuild", base, "--change", "image_update", "--dry-run")
    assert code == 0 and out.endswith("dry run: nothing was created\n")
    assert json.loads(runs(capsys, live_api, "list", "--json")[1])["runs"] == before

    code, out, _ = runs(capsys, live_api, "cache", "ls", "--workflow", "campaign.build", "--json")
    entries = json.loads(out)["entries"]
    assert code == 0 and {e["step_key"] for e in entries} == set(KEYS_OF_CAMPAIGN)
    code, out, _ = runs(capsys, live_api, "cache", "rm", "--workflow", "campaign.build", "--step", "copy")
    removed = sum(1 for e in entries if e["step_key"] == "copy")
    assert code == 0 and out == f"removed {removed} cache entr{'y' if removed == 1 else 'ies'}\n"
    code, out, _ = runs(capsys, live_api, "cache", "ls", "--workflow", "campaign.build", "--step", "copy")
    assert (code, out) == (0, "no cache entries\n")
    assert runs(capsys, live_api, "cache", "rm")[0] == 2  # --workflow is required


KEYS_OF_CAMPAIGN = ("brief", "copy", "images", "landing_page", "bundle")


# --- issue 11 item 5: --version, stats, start --workspace, JSON numbers and status names -------


def test_version_prints_the_installed_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess
    import sys
    from importlib import metadata

    expected = f"runs {metadata.version('runs')}"
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == expected
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, expected, "")


def test_start_workspace_sets_the_requests_workspace_id() -> None:
    assert sent("start", "--workspace", "gpu").workspace_id == "gpu"
    assert sent("start", "--tool", "noop", "--workspace", "w2").workspace_id == "w2"
    assert sent("start").workspace_id == ""
    batch_stub = FakeStub()
    assert run_cli(batch_stub, "start", "--count", "2", "--workspace", "gpu") == 0
    assert [r.workspace_id for r in batch_stub.calls[0][1].requests] == ["gpu", "gpu"]


def test_json_keeps_whole_numbers_and_int64_as_numbers_and_names_statuses_like_the_tables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = make_run(last_sequence=12)
    run.output.update({"exit_code": 0, "ratio": 2.5, "nested": {"count": 3, "list": [1.0, 1.5]}})
    stub = FakeStub(final=run)
    assert run_cli(stub, "get", "01RUN", "--json") == 0
    text = capsys.readouterr().out
    doc = json.loads(text)["run"]
    assert '"exit_code": 0,' in text or '"exit_code": 0\n' in text
    assert doc["output"] == {"exit_code": 0, "ratio": 2.5, "nested": {"count": 3, "list": [1, 1.5]}}
    assert doc["last_sequence"] == 12 and isinstance(doc["last_sequence"], int)
    assert doc["status"] == "SUCCEEDED" == runs_cli.format_run(run).split("status")[1].split()[0]
    assert "RUN_STATUS_" not in text and ".0" not in text
    assert run_cli(stub, "get", "01RUN") == 0
    assert '"exit_code":0' in capsys.readouterr().out
    # every message: enums of steps and tool calls, maps of int64, Timestamps unchanged
    step = run_pb2.Step(step_key="a", status=run_pb2.STEP_STATUS_SKIPPED)
    assert common.to_dict(step)["status"] == "SKIPPED"
    call = run_pb2.ToolCall(
        tool_call_id="c", status=run_pb2.TOOL_CALL_STATUS_INVOKED, invoked_at=ts("2025-01-31T12:00:00")
    )
    assert common.to_dict(call)["status"] == "INVOKED" and common.to_dict(call)["invoked_at"] == "2025-01-31T12:00:00Z"
    assert common.enum_prefix(run_pb2.ToolCallStatus.DESCRIPTOR) == "TOOL_CALL_STATUS_"


def canceled_response(run_status: int) -> run_service_pb2.GetRunResponse:
    """A run of two steps whose running step and its tool call were interrupted (recorded FAILED)."""
    return run_service_pb2.GetRunResponse(
        run=make_run(status=run_status, stop_reason="canceled"),  # attempt 2 of 3
        steps=[
            run_pb2.Step(step_key="first", status=run_pb2.STEP_STATUS_SUCCEEDED, attempt=1),
            run_pb2.Step(step_key="second", status=run_pb2.STEP_STATUS_FAILED, attempt=1),
        ],
        tool_calls=[
            run_pb2.ToolCall(tool_call_id="old", step_key="second", status=run_pb2.TOOL_CALL_STATUS_FAILED, attempt=1),
            run_pb2.ToolCall(tool_call_id="new", step_key="second", status=run_pb2.TOOL_CALL_STATUS_FAILED, attempt=2),
            run_pb2.ToolCall(
                tool_call_id="done", step_key="first", status=run_pb2.TOOL_CALL_STATUS_SUCCEEDED, attempt=2
            ),
        ],
    )


def test_get_shows_canceled_for_a_step_and_tool_call_that_a_cancel_interrupted() -> None:
    response = canceled_response(run_pb2.RUN_STATUS_CANCELED)
    text = cli.format_get(response)
    steps_rows = {r["STEP"]: r["STATUS"] for r in table_rows(text.split("steps:\n")[1].split("\n\n")[0])}
    calls = {r["TOOL_CALL_ID"]: r["STATUS"] for r in table_rows(text.split("tool calls:\n")[1].split("\n\n")[0])}
    assert steps_rows == {"first": "SUCCEEDED", "second": "CANCELED"}
    # an earlier attempt's failure stays FAILED; only the last attempt's interrupted call is CANCELED
    assert calls == {"old": "FAILED", "new": "CANCELED", "done": "SUCCEEDED"}
    doc = cli.get_json(response)
    assert [s["status"] for s in doc["steps"]] == ["SUCCEEDED", "CANCELED"]
    assert [c["status"] for c in doc["tool_calls"]] == ["FAILED", "CANCELED", "SUCCEEDED"]
    assert response.steps[1].status == run_pb2.STEP_STATUS_FAILED  # the response itself is left alone
    # a run that FAILED keeps FAILED
    failed = cli.get_json(canceled_response(run_pb2.RUN_STATUS_FAILED))
    assert [s["status"] for s in failed["steps"]] == ["SUCCEEDED", "FAILED"]
    assert [c["status"] for c in failed["tool_calls"]] == ["FAILED", "FAILED", "SUCCEEDED"]


class FakeOpsStub:
    """OpsService.GetStats with a canned answer or error."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.calls: list[Any] = []

    def GetStats(self, request: Any, timeout: float | None = None) -> Any:
        from shared.gen.runs.v1 import ops_service_pb2

        self.calls.append((request, timeout))
        if self.error is not None:
            raise self.error
        return ops_service_pb2.GetStatsResponse(
            tenant_id="acme", claimed=7, completed=5, failed=1, canceled=1,
            runs_by_status={"SUCCEEDED": 5, "QUEUED": 2, "FAILED": 1},
            cache_hits_by_layer={"hot": 3}, cache_misses_by_reason={"no_entry": 4},
        )


def test_stats_prints_a_table_and_json_with_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeOpsStub()
    assert run_cli(stub, "stats") == 0
    out = capsys.readouterr().out
    head, table = out.split("\n", 1)
    assert head == "tenant: acme"
    rows = [(r["WHAT"], r["NAME"], r["COUNT"]) for r in table_rows(table)]
    assert rows[:3] == [("runs", "QUEUED", "2"), ("runs", "SUCCEEDED", "5"), ("runs", "FAILED", "1")]
    assert ("event", "claimed", "7") in rows and ("event", "lease_expired", "0") in rows
    assert ("cache hit", "hot", "3") in rows and ("cache miss", "no_entry", "4") in rows
    assert stub.calls[0][1] == cli.UNARY_DEADLINE_SECONDS
    assert run_cli(stub, "stats", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["claimed"] == 7 and doc["lease_expired"] == 0 and doc["runs_by_status"]["QUEUED"] == 2
    assert doc["cache_hits_by_layer"] == {"hot": 3} and doc["tenant_id"] == "acme"


def test_stats_refused_prints_the_error_once_and_exits_6(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeOpsStub(error=FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "OpsService needs an admin key"))
    assert run_cli(stub, "stats") == 6
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("PERMISSION_DENIED") == 1
    assert "`runs stats` need an admin key" in captured.err


def test_live_stats_needs_an_admin_key_when_auth_is_required(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import secrets

    from features.harness import create_key

    for name in ("RUNS_API_KEY", "RUNS_TLS_CA", "RUNS_TLS_CERT", "RUNS_TLS_KEY", "RUN_API_ADDR"):
        monkeypatch.delenv(name, raising=False)
    admin = f"test-admin-{secrets.token_urlsafe(24)}"
    api = Api(database_url, RUNS_AUTH="required", RUNS_BOOTSTRAP_ADMIN_KEY=admin)
    api.start()
    try:
        _, client = create_key(api.addr, admin, "client")
        monkeypatch.setenv("RUNS_API_KEY", client)
        assert runs(capsys, api, "start", "--workspace", "w9")[0] == 0
        code, out, err = runs(capsys, api, "stats")
        assert code == 6 and out == "" and err.count("PERMISSION_DENIED") == 1, err
        monkeypatch.setenv("RUNS_API_KEY", admin)
        code, out, err = runs(capsys, api, "stats")
        assert code == 0, err
        rows = [(r["WHAT"], r["NAME"], r["COUNT"]) for r in table_rows(out.split("\n", 1)[1])]
        assert ("runs", "QUEUED", "1") in rows and ("event", "claimed", "0") in rows
        code, out, _ = runs(capsys, api, "stats", "--json")
        assert code == 0 and json.loads(out)["runs_by_status"] == {"QUEUED": 1} and json.loads(out)["claimed"] == 0
        code, out, _ = runs(capsys, api, "list", "--json")
        assert code == 0 and json.loads(out)["runs"][0]["workspace_id"] == "w9"
        assert isinstance(json.loads(out)["runs"][0]["last_sequence"], int)
    finally:
        api.stop()
        print(f"--- api ---\n{api.output()[-6000:]}")
        api.log_path.unlink(missing_ok=True)


def test_live_canceled_tool_call_shows_canceled(
    live_api: Api, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    from features.harness import wait_until

    with live_worker(live_api, request):
        code, out, err = runs(capsys, live_api, "start", "--tool", "sleep", "--args", '{"seconds": 30}', "--json")
        assert code == 0, err
        run_id = json.loads(out)["run_id"]

        def invoked() -> bool:
            doc = json.loads(runs(capsys, live_api, "get", run_id, "--json")[1])
            return any(c["status"] == "INVOKED" for c in doc["tool_calls"])

        wait_until(invoked, 30, "the sleep tool call to be invoked")
        code, out, err = runs(capsys, live_api, "cancel", run_id)
        # `cancel` waits for the running run to stop and prints it as it ended
        assert code == 0 and "waiting up to 10s" in err
        assert out.split("\n")[1].split() == ["status", "CANCELED"]

        def ended() -> dict[str, Any] | None:
            doc: dict[str, Any] = json.loads(runs(capsys, live_api, "get", run_id, "--json")[1])
            return doc if doc["run"]["status"] == "CANCELED" else None

        doc = wait_until(ended, 30, "the run to be CANCELED")
    assert doc is not None and [c["status"] for c in doc["tool_calls"]] == ["CANCELED"]
    assert [s["status"] for s in doc["steps"]] == ["CANCELED"]
    assert isinstance(doc["run"]["last_sequence"], int)
    code, out, _ = runs(capsys, live_api, "get", run_id)
    assert code == 0 and "FAILED" not in out.split("tool calls:\n")[1].split("\n\n")[0]


def test_live_start_wait_shows_progress_and_the_whole_output_and_cancel_no_wait(
    live_api: Api, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    long_text = "y" * 3000  # past the 2,000 characters `get` shows of an output without --output
    with live_worker(live_api, request):
        code, out, err = runs(capsys, live_api, "start", "--tool", "echo", "--args", json.dumps({"text": long_text}),
                              "--wait")
        assert code == 0, err
        progress = [line.split("s  ", 1)[1] for line in err.splitlines() if "s  " in line]
        assert progress[0].startswith("attempt 1 claimed by worker ")
        assert progress[1:] == ["step runtime started", "step runtime succeeded", "run completed"]
        assert "status            SUCCEEDED" in out or "SUCCEEDED" in out.split("\n")[1]
        assert long_text in out  # the output in full
        run_id = out.split("\n")[0].split()[1]
        cut = "characters; all of it with --output or --json)"
        assert cut in runs(capsys, live_api, "get", run_id)[1]  # the output line is cut (the input line is not)
        full = runs(capsys, live_api, "get", run_id, "--output")[1]
        assert cut not in full and f'runtime: {{"text":"{long_text}"}}' in full  # the step's output in full
        code, out, err = runs(capsys, live_api, "start", "--tool", "sleep", "--args", '{"seconds": 30}', "--wait",
                              "--quiet", "--timeout", "0.5")
        assert code == 5 and err.startswith("error: DEADLINE_EXCEEDED")  # --quiet: no progress lines
        run_id = out.split("\n")[0].split()[1]
        code, out, err = runs(capsys, live_api, "cancel", run_id, "--no-wait")
        assert code == 0 and err == ""
        assert out.split("\n")[1].split()[1] in ("RUNNING", "CANCELED")


def readme_first_screen() -> list[list[str]]:
    """The commands of the README's first screen after `make up` (the block that follows its banner)."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("From there to a finished campaign run", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_live_readme_first_screen_reaches_a_finished_campaign_run_and_its_artifacts(
    live_api: Api, capsys: pytest.CaptureFixture[str], tmp_path: Path, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`make up` and the four commands the README's first screen gives after it, run as written (the run id
    put in for <RUN_ID>, this test's API for the addresses): five commands to a finished campaign run, its
    artifacts listed and downloaded, and its page."""
    import httpx

    commands = readme_first_screen()
    assert [c[0] for c in commands] == [".venv/bin/runs"] * 3 + ["xdg-open"]
    monkeypatch.chdir(tmp_path)
    run_id = ""
    with live_worker(live_api, request):
        for argv in commands[:3]:
            argv = [a.replace("<RUN_ID>", run_id) for a in argv[1:]]
            code, out, err = runs(capsys, live_api, *argv)
            assert code == 0, err
            if not run_id:
                run_id = out.split("\n")[0].split()[1]
                assert out.split("\n")[1].split() == ["status", "SUCCEEDED"]
                assert "step bundle succeeded" in err  # the progress lines
            elif argv[0] == "artifacts":
                assert len(table_rows(out)) == 5
    with zipfile.ZipFile(tmp_path / "campaign.zip") as bundle:
        assert "index.html" in bundle.namelist()
    url = commands[3][1].replace("<RUN_ID>", run_id).replace("http://127.0.0.1:8080", live_api.http_url)
    page = httpx.get(url, timeout=10)
    assert page.status_code == 200 and run_id in page.text
