"""The `runs` CLI without a server: parsing, --tool mapping, formatting, exit codes, flows on a fake stub."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.cli import __main__ as cli
from shared.gen.runs.v1 import run_pb2, run_service_pb2

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


def test_start_request_from_plain_flags() -> None:
    request = cli.start_request(
        parse(
            "start",
            "--workflow",
            "runtime.noop",
            "--input",
            '{"a": 1, "b": {"c": [true]}}',
            "--idempotency-key",
            "k",
            "--max-attempts",
            "4",
        )
    )
    assert request.workflow == "runtime.noop"
    assert cli.json_format.MessageToDict(request.input) == {"a": 1.0, "b": {"c": [True]}}
    assert request.idempotency_key == "k" and request.max_attempts == 4


def test_start_request_defaults_leave_everything_to_the_server() -> None:
    request = cli.start_request(parse("start"))
    assert request == run_service_pb2.StartRunRequest()
    assert not request.HasField("input")


def test_tool_and_args_map_to_runtime_tool() -> None:
    request = cli.start_request(parse("start", "--tool", "sleep", "--args", '{"seconds": 1}'))
    assert request.workflow == "runtime.tool"
    assert cli.json_format.MessageToDict(request.input) == {"tool": "sleep", "args": {"seconds": 1.0}}


def test_tool_args_default_to_an_empty_object() -> None:
    request = cli.start_request(parse("start", "--tool", "noop"))
    assert request.workflow == "runtime.tool"
    assert cli.json_format.MessageToDict(request.input) == {"tool": "noop", "args": {}}


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


def test_list_request_maps_status_and_filters() -> None:
    args = parse("list", "--status", "FAILED", "--workflow", "runtime.tool", "--page-size", "7")
    request = cli.list_request(args, "tok")
    assert request.status == run_pb2.RUN_STATUS_FAILED
    assert (request.workflow, request.page_size, request.page_token) == ("runtime.tool", 7, "tok")
    assert cli.list_request(parse("list"), "").status == run_pb2.RUN_STATUS_UNSPECIFIED


@pytest.mark.parametrize("status", cli.STATUS_CHOICES)
def test_every_status_choice_is_a_run_status(status: str) -> None:
    assert cli.list_request(parse("list", "--status", status), "").status != run_pb2.RUN_STATUS_UNSPECIFIED


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
        (grpc.StatusCode.PERMISSION_DENIED, 1),
        (grpc.StatusCode.CANCELLED, 1),
    ],
)
def test_exit_code_for_status(code: grpc.StatusCode, expected: int) -> None:
    assert cli.exit_code_for(code) == expected


def test_exit_codes_are_documented_in_docstring_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.__doc__ is not None and cli.EXIT_CODES in cli.__doc__
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Exit codes:" in out and "130" in out and "FAILED_PRECONDITION" in out


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
    assert lines[2].endswith("...") and len(lines[2].split()[-1]) == cli.MAX_CELL
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
    assert doc["run"]["status"] == "RUN_STATUS_SUCCEEDED"
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
        stream = FakeStream(self.events, self.watch_error)
        self.streams.append(stream)
        return stream

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


def run_cli(stub: FakeStub, *argv: str) -> int:
    return cli.dispatch(stub, parse(*argv))


def test_start_without_wait_prints_the_run_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeStub()
    assert run_cli(stub, "start") == 0
    assert stub.names() == ["StartRun"]
    assert stub.calls[0][2] == cli.UNARY_DEADLINE_SECONDS
    assert "QUEUED" in capsys.readouterr().out


def test_start_wait_succeeded_exits_0_and_prints_the_final_run(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeStub(final=make_run(status=run_pb2.RUN_STATUS_SUCCEEDED))
    assert run_cli(stub, "start", "--wait", "--json") == 0
    assert stub.names() == ["StartRun", "WatchRun", "GetRun"]
    assert stub.calls[1][2] == cli.DEFAULT_WAIT_TIMEOUT_SECONDS
    assert json.loads(capsys.readouterr().out)["status"] == "RUN_STATUS_SUCCEEDED"


@pytest.mark.parametrize("status", [run_pb2.RUN_STATUS_FAILED, run_pb2.RUN_STATUS_CANCELED])
def test_start_wait_failed_or_canceled_exits_1_and_still_prints(
    capsys: pytest.CaptureFixture[str], status: int
) -> None:
    stub = FakeStub(final=make_run(status=status), events=[event(1, "run.queued"), event(2, "run.failed")])
    assert run_cli(stub, "start", "--wait", "--timeout", "7") == 1
    assert stub.calls[1][2] == 7
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
    assert captured.err.startswith("error: DEADLINE_EXCEEDED: run 01RUN did not end within 1s")


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
    assert cli.json_format.MessageToDict(request.input) == {"tool": "sleep", "args": {"seconds": 2.0}}


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
    assert json.loads(lines[1])["sequence"] == "2"  # int64 as a string: the protobuf JSON mapping


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


def test_cancel_sends_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeStub()
    assert run_cli(stub, "cancel", "01RUN", "--reason", "why not") == 0
    assert stub.calls[0][1] == run_service_pb2.CancelRunRequest(run_id="01RUN", reason="why not")
    assert "CANCELED" in capsys.readouterr().out


def test_plain_numbers() -> None:
    assert cli.plain_numbers({"a": 1.0, "b": [2.0, 2.5], "c": True, "d": "3.0"}) == {
        "a": 1,
        "b": [2, 2.5],
        "c": True,
        "d": "3.0",
    }
