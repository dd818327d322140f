"""Steps of run_api.feature."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import grpc
import psycopg
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pytest_bdd import given, parsers, scenarios, then, when

from features.conftest import Context, Stack, count_runs, event_types
from features.harness import Client

scenarios("run_api.feature")


def _call(ctx: Context, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        result = fn(*args, **kwargs)
        ctx.error = None
        return result
    except grpc.RpcError as err:
        ctx.error = err
        return None


@when(parsers.parse('I start a run with idempotency key "{key}" twice'))
def start_twice(stack: Stack, ctx: Context, key: str) -> None:
    """Two identical requests."""
    ctx.extra["answers"] = [stack.client.start(idempotency_key=key) for _ in range(2)]


@then("both answers name the same run")
def same_run(ctx: Context) -> None:
    """One run id."""
    first, second = ctx.extra["answers"]
    assert first.run.run_id == second.run.run_id


@then("the second answer says it was deduplicated")
def deduplicated(ctx: Context) -> None:
    """The flag tells them apart."""
    first, second = ctx.extra["answers"]
    assert (first.deduplicated, second.deduplicated) == (False, True)


@then(parsers.parse("the database holds {count:d} run"))
@then(parsers.parse("the database holds {count:d} runs"))
def holds(sql: psycopg.Connection, count: int) -> None:
    """Rows in runs, and events only for them."""
    assert count_runs(sql) == count
    row = sql.execute("SELECT count(DISTINCT run_id) FROM run_events").fetchone()
    assert row is not None and row[0] == count


@when(parsers.parse('{n:d} clients start a run with idempotency key "{key}" at the same time'))
def concurrent_start(stack: Stack, ctx: Context, n: int, key: str) -> None:
    """n threads, each with its own channel, released together."""
    assert stack.api is not None
    clients = [Client(stack.api.addr, stack.keys.get("client")) for _ in range(n)]
    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(lambda c: c.start(idempotency_key=key, run_input={"n": 1}), clients))
    finally:
        for c in clients:
            c.close()
    ctx.extra["answers"] = answers


@then("all of them get the same run")
def all_same(ctx: Context) -> None:
    """One run id; exactly one answer created it."""
    answers = ctx.extra["answers"]
    assert len({a.run.run_id for a in answers}) == 1
    assert sum(1 for a in answers if not a.deduplicated) == 1


@when(parsers.parse('I start a run with idempotency key "{key}"'))
@given(parsers.parse('I started a run with idempotency key "{key}"'))
def start_with_key(stack: Stack, ctx: Context, key: str) -> None:
    """A keyed StartRun."""
    ctx.last_run_id = stack.client.start(idempotency_key=key, run_input={"order": 1}).run.run_id


@when(parsers.parse('I start a run with idempotency key "{key}" and a different input'))
def start_with_key_other(stack: Stack, ctx: Context, key: str) -> None:
    """Same key, other input."""
    _call(ctx, stack.client.start, idempotency_key=key, run_input={"order": 2})


BAD_INPUTS: dict[str, dict[str, Any]] = {
    "an unknown workflow": {"workflow": "no.such.workflow"},
    "a 256-character key": {"idempotency_key": "k" * 256},
    "an input over 256 KiB": {"run_input": {"blob": "x" * (256 * 1024 + 1)}},
    "an unknown tool": {"workflow": "runtime.tool", "run_input": {"tool": "no-such-tool"}},
    "an input with a NUL character": {"run_input": {"text": "a\x00b"}},
    "an input with NaN": {"run_input": {"x": float("nan")}},
    "a negative sleep": {"workflow": "runtime.tool", "run_input": {"tool": "sleep", "args": {"seconds": -1}}},
}


@when(parsers.parse("I send a StartRun with {bad}"))
def start_bad(stack: Stack, ctx: Context, bad: str) -> None:
    """A StartRun that must be refused."""
    _call(ctx, stack.client.start, **BAD_INPUTS[bad])


@then(parsers.parse('the call fails with {code} naming the field "{field}"'))
def fails_naming(ctx: Context, code: str, field: str) -> None:
    """The status code and a google.rpc.BadRequest field violation."""
    assert ctx.error is not None, "the call succeeded"
    assert ctx.error.code() == getattr(grpc.StatusCode, code), ctx.error
    assert field in ctx.error.details()
    status = rpc_status.from_call(ctx.error)
    assert status is not None, "no rich status details"
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    assert fields == [field]
    assert "Traceback" not in ctx.error.details()


@then(parsers.parse("the call fails with {code}"))
def fails_with(ctx: Context, code: str) -> None:
    """The status code."""
    assert ctx.error is not None, "the call succeeded"
    assert ctx.error.code() == getattr(grpc.StatusCode, code), ctx.error
    assert "Traceback" not in (ctx.error.details() or "")


@when("I cancel the run")
def cancel(stack: Stack, ctx: Context) -> None:
    """CancelRun."""
    ctx.extra["canceled"] = _call(ctx, stack.client.cancel, ctx.last_run_id, "test")


@then("a worker cycle claims nothing")
def cycle_claims_nothing(stack: Stack) -> None:
    """The canceled run is not claimable."""
    assert stack.once()["claimed"] == 0


@then("the run has no run.started event")
def never_started(sql: psycopg.Connection, ctx: Context) -> None:
    """It never started."""
    types = event_types(sql, ctx.last_run_id)
    assert "run.started" not in types and "run.claimed" not in types
    assert types == ["run.queued", "run.cancel_requested", "run.canceled"]


@then("canceling it again answers the same CANCELED run")
def cancel_again(stack: Stack, ctx: Context, sql: psycopg.Connection) -> None:
    """Idempotent cancel; no new events."""
    before = len(event_types(sql, ctx.last_run_id))
    run = stack.client.cancel(ctx.last_run_id)
    assert run.run_id == ctx.last_run_id and run.stop_reason == "canceled"
    assert len(event_types(sql, ctx.last_run_id)) == before


@when(parsers.parse('I get the run "{run_id}"'))
def get_unknown(stack: Stack, ctx: Context, run_id: str) -> None:
    """GetRun of an id nobody has."""
    _call(ctx, stack.client.get, run_id)
