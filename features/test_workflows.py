"""Steps of workflows.feature: DAG runs on real API and worker processes over a real PostgreSQL."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import json_format
from pytest_bdd import given, parsers, scenarios, then, when

from features.conftest import Context, Stack
from features.harness import wait_until
from features.test_faults import SHORT_LEASES

scenarios("workflows.feature")

EVERY_TOOL = {"RUN_WORKER_TOOLS": "noop,echo,sleep,fail,shell"}


def step(key: str, tool: str, *deps: str, **fields: Any) -> dict[str, Any]:
    """One step of a spec in its file form."""
    return {"key": key, "tool": tool, **({"depends_on": list(deps)} if deps else {}), **fields}


SPECS: dict[str, list[dict[str, Any]]] = {
    "diamond": [
        step("a", "echo", args={"n": 1}),
        step("b", "sleep", "a", args={"seconds": 1.5}),
        step("c", "sleep", "a", args={"seconds": 1.5}),
        step("d", "echo", "b", "c", input={"b": "steps.b.output", "c": "steps.c.output"}),
    ],
    "selectors": [
        step("a", "echo", args={"greeting": "hi"}),
        step("b", "echo", "a", input={"x": "input.x", "from_a": "steps.a.output"}),
    ],
    "flaky": [step("flaky", "fail", args={"times": 2, "message": "flaky"},
                   retry={"max_attempts": 3, "backoff_seconds": 0.05, "backoff_max_seconds": 0.1})],
    "doomed": [
        step("a", "echo", args={"kept": True}),
        step("b", "fail", "a", args={"message": "always"}, retry={"max_attempts": 2, "backoff_seconds": 0.05}),
        step("c", "sleep", "a", args={"seconds": 60}),
    ],
    "chain": [
        step("s1", "echo", args={"first": 1}),
        step("s2", "sleep", "s1", args={"seconds": 3}),
        step("s3", "echo", "s2", input={"slept": "steps.s2.output"}),
    ],
    "long": [
        step("a", "echo"),
        step("b", "sleep", "a", args={"seconds": 60}),
        step("c", "sleep", "a", args={"seconds": 60}),
        step("d", "echo", "b", "c"),
    ],
}

BAD_SPECS: dict[str, list[dict[str, Any]]] = {
    "a cycle": [step("a", "echo", "c"), step("b", "echo", "a"), step("c", "echo", "b")],
    "an unknown dependency": [step("a", "echo"), step("b", "echo", "nope")],
    "a selector that does not parse": [step("a", "echo"), step("b", "echo", "a", input={"v": "steps.a.output[["})],
    "a selector of a step not upstream": [step("a", "echo"), step("b", "echo", input={"v": "steps.a.output"})],
}


def steps_of(stack: Stack, ctx: Context) -> dict[str, Any]:
    return stack.client.steps(ctx.last_run_id)


def tool_calls(sql: psycopg.Connection, run_id: str, key: str) -> list[tuple[Any, ...]]:
    """(attempt, step_attempt, input, status) of a step's tool calls, in invocation order."""
    return sql.execute(
        "SELECT attempt, step_attempt, input, status FROM tool_calls WHERE run_id = %s AND step_key = %s "
        "ORDER BY invoked_at, tool_call_id",
        (run_id, key),
    ).fetchall()


def counts(sql: psycopg.Connection) -> tuple[int, int]:
    row = sql.execute("SELECT (SELECT count(*) FROM workflows), (SELECT count(*) FROM registry_events)").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# --- Given -------------------------------------------------------------------------------------


@given("a running API with short leases and every tool on a fresh database")
def api(stack: Stack) -> None:
    """Leases of 2 s; workers run noop, echo, sleep, fail and shell."""
    stack.start_api(**SHORT_LEASES, **EVERY_TOOL)


@given(parsers.re(r'the workflow "(?P<name>[a-z]+)" is registered: .*'))
def registered(stack: Stack, ctx: Context, name: str) -> None:
    """RegisterWorkflow with the spec of that name; a new version is created."""
    response = stack.client.register({"name": name, "steps": SPECS[name]})
    assert response.created and response.workflow.version == 1, response


@given("a worker process is running")
def worker(stack: Stack) -> None:
    stack.start_worker()


@given(parsers.parse('a worker process "{name}" is running'))
def named_worker(stack: Stack, ctx: Context, name: str) -> None:
    ctx.extra[name] = stack.start_worker(RUN_WORKER_ID=name)


# --- When --------------------------------------------------------------------------------------


@when(parsers.parse('I start a run of workflow "{name}"'))
def start(stack: Stack, ctx: Context, name: str) -> None:
    run = stack.client.start(name).run
    assert run.workflow_version >= 1 and run.spec_hash
    ctx.last_run_id = run.run_id


@when(parsers.parse('I start a run of workflow "{name}" with input {data}'))
def start_with_input(stack: Stack, ctx: Context, name: str, data: str) -> None:
    ctx.last_run_id = stack.client.start(name, json.loads(data)).run.run_id


@when(parsers.parse("step {key} is running"))
def step_running(stack: Stack, ctx: Context, key: str) -> None:
    wait_until(lambda: stack.client.step_status(ctx.last_run_id, key) == "RUNNING", 30, f"step {key} running")


@when("steps b and c are running")
def b_and_c_running(stack: Stack, ctx: Context) -> None:
    for key in ("b", "c"):
        step_running(stack, ctx, key)


@when(parsers.parse('the worker "{name}" is killed with SIGKILL'))
def kill(ctx: Context, name: str) -> None:
    ctx.extra[name].kill()


@when("another worker process is started")
def another(stack: Stack) -> None:
    stack.start_worker(RUN_WORKER_ID="second")


@when("I cancel the run")
def cancel(stack: Stack, ctx: Context) -> None:
    stack.client.cancel(ctx.last_run_id, "enough")


@when(parsers.parse("I register a spec with {problem}"))
def register_bad(stack: Stack, ctx: Context, sql: psycopg.Connection, problem: str) -> None:
    ctx.extra["before"] = counts(sql)
    with pytest.raises(grpc.RpcError) as caught:
        stack.client.register({"name": "bad", "steps": BAD_SPECS[problem]})
    ctx.error = caught.value


# --- Then --------------------------------------------------------------------------------------


@then(parsers.parse("the run ends {status} within {seconds:d} seconds"))
def ends_within(stack: Stack, ctx: Context, status: str, seconds: int) -> None:
    got = stack.client.wait_status(ctx.last_run_id, {"SUCCEEDED", "FAILED", "CANCELED"}, seconds)
    assert got == status, stack.client.get(ctx.last_run_id)


@then("steps b and c overlapped in time")
def overlapped(stack: Stack, ctx: Context) -> None:
    s = steps_of(stack, ctx)
    b, c = s["b"], s["c"]
    assert b.started_at.ToDatetime() < c.finished_at.ToDatetime(), (b, c)
    assert c.started_at.ToDatetime() < b.finished_at.ToDatetime(), (b, c)


@then("step d started only after b and c had both succeeded")
def joined(stack: Stack, ctx: Context) -> None:
    s = steps_of(stack, ctx)
    d_started = s["d"].started_at.ToDatetime()
    assert d_started >= max(s["b"].finished_at.ToDatetime(), s["c"].finished_at.ToDatetime()), s
    assert all(s[k].status == s["d"].status for k in "bc")


@then("the run's output holds the output of its sink step d")
def sink_output(stack: Stack, ctx: Context) -> None:
    got = stack.client.get(ctx.last_run_id)
    output = json_format.MessageToDict(got.run.output)
    assert list(output) == ["d"], output
    assert output["d"] == json_format.MessageToDict(steps_of(stack, ctx)["d"].output)
    summary = got.run.steps_summary
    assert (summary.total, summary.succeeded, summary.failed) == (4, 4, 0), summary


@then(parsers.parse("step b's tool was invoked with {data}"))
def invoked_with(sql: psycopg.Connection, ctx: Context, data: str) -> None:
    calls = tool_calls(sql, ctx.last_run_id, "b")
    assert len(calls) == 1 and calls[0][2] == json.loads(data), calls


@then(parsers.parse('the registration is refused with INVALID_ARGUMENT naming the field "{field}"'))
def refused(ctx: Context, field: str) -> None:
    from google.rpc import error_details_pb2, status_pb2

    err = ctx.error
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    details = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    status = status_pb2.Status.FromString(details)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert field in [v.field for v in bad.field_violations], bad
    ctx.extra["violations"] = bad


@then(parsers.parse('the message says "{words}"'))
def says(ctx: Context, words: str) -> None:
    assert words in ctx.error.details(), ctx.error.details()
    assert any(words in v.description for v in ctx.extra["violations"].field_violations)


@then("no workflow was stored")
def nothing_stored(sql: psycopg.Connection, ctx: Context) -> None:
    assert counts(sql) == ctx.extra["before"]
    row = sql.execute("SELECT count(*) FROM workflows WHERE name = 'bad'").fetchone()
    assert row is not None and row[0] == 0


@then("step flaky shows 3 tries and 3 tool calls, all in run attempt 1")
def three_tries(stack: Stack, ctx: Context, sql: psycopg.Connection) -> None:
    s = steps_of(stack, ctx)["flaky"]
    assert s.attempt == 3 and s.status == 3, s  # STEP_STATUS_SUCCEEDED
    calls = tool_calls(sql, ctx.last_run_id, "flaky")
    assert [(c[0], c[1], c[3]) for c in calls] == [(1, 1, "FAILED"), (1, 2, "FAILED"), (1, 3, "SUCCEEDED")], calls
    assert stack.client.get(ctx.last_run_id).run.attempt == 1


@then("the run stopped with reason step_failed and an error naming step b")
def step_failed(stack: Stack, ctx: Context) -> None:
    run = stack.client.get(ctx.last_run_id).run
    assert run.stop_reason == "step_failed" and "'b'" in run.error, run
    assert run.attempt == 1, "a failed step does not retry the run"


@then("step a SUCCEEDED with its output kept, b FAILED after 2 tries, c CANCELED")
def kept(stack: Stack, ctx: Context) -> None:
    s = steps_of(stack, ctx)
    names = {k: str(v.status) for k, v in s.items()}
    assert s["a"].status == 3 and json_format.MessageToDict(s["a"].output) == {"kept": True}, names
    assert s["b"].status == 4 and s["b"].attempt == 2, s["b"]
    assert s["b"].step_error.code == "tool_failed" and s["b"].step_error.attempt == 2, s["b"]
    assert s["b"].step_error.message == "always" and s["b"].step_error.tool == "fail"
    assert s["c"].status == 6, s["c"]  # STEP_STATUS_CANCELED
    summary = stack.client.get(ctx.last_run_id).run.steps_summary
    assert (summary.succeeded, summary.failed, summary.canceled) == (1, 1, 1), summary


@then("step s1's tool was invoked exactly once over the whole run")
def once(stack: Stack, ctx: Context, sql: psycopg.Connection) -> None:
    assert len(tool_calls(sql, ctx.last_run_id, "s1")) == 1
    assert stack.client.get(ctx.last_run_id).run.attempt == 2


@then("step s2's tool was invoked twice, once per attempt")
def twice(sql: psycopg.Connection, ctx: Context) -> None:
    calls = tool_calls(sql, ctx.last_run_id, "s2")
    assert [c[0] for c in calls] == [1, 2], calls
    assert calls[-1][3] == "SUCCEEDED"


@then("steps b, c and d are CANCELED and d never started")
def canceled(stack: Stack, ctx: Context, sql: psycopg.Connection) -> None:
    s = steps_of(stack, ctx)
    assert all(s[k].status == 6 for k in "bcd"), s
    assert not s["d"].HasField("started_at") and tool_calls(sql, ctx.last_run_id, "d") == []
    assert s["a"].status == 3


@then(parsers.parse("the run has {count:d} artifacts: {names}"))
def has_artifacts(stack: Stack, ctx: Context, count: int, names: str) -> None:
    artifacts = stack.client.artifacts(ctx.last_run_id)
    assert sorted(a.name for a in artifacts) == sorted(n.strip() for n in names.split(",")), artifacts
    assert len(artifacts) == count
    ctx.extra["artifacts"] = artifacts


@then("every artifact downloads with the sha256 and size it was recorded with")
def downloads(stack: Stack, ctx: Context) -> None:
    for recorded in ctx.extra["artifacts"]:
        artifact, data = stack.client.download(ctx.last_run_id, recorded.step_key, recorded.name)
        assert artifact is not None and artifact.sha256 == recorded.sha256
        assert hashlib.sha256(data).hexdigest() == recorded.sha256 and len(data) == recorded.size > 0
