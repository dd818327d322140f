"""Steps of faults.feature: real processes killed, paused and restarted."""

from __future__ import annotations

import json
import random
import signal
import time
from typing import Any

import psycopg
from pytest_bdd import given, parsers, scenarios, then, when

from features.conftest import Context, Stack, event_types
from features.harness import Worker, wait_until
from shared.gen.runs.v1 import ops_service_pb2, ops_service_pb2_grpc, run_service_pb2

scenarios("faults.feature")

SHORT_LEASES = {
    "RUN_LEASE_SECONDS": "2",
    "RUN_HEARTBEAT_SECONDS": "0.4",
    "RUN_REAPER_INTERVAL_SECONDS": "0.2",
    "RUN_RETRY_BACKOFF_SECONDS": "0.1",
    "RUN_RETRY_BACKOFF_MAX_SECONDS": "0.5",
    "RUN_WORKER_DRAIN_SECONDS": "0.5",
    "RUN_WORKER_POLL_MS": "200",
}
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELED"}
ALL_TOOLS = {"RUN_WORKER_TOOLS": "noop,sleep,fail,shell"}  # shell is opt-in; these workers run it


@given("a running API with short leases on a fresh database")
def api_short_leases(stack: Stack) -> None:
    """Leases of 2 s, heartbeats every 0.4 s, the reaper every 0.2 s; workers allow every tool, shell too."""
    stack.start_api(**SHORT_LEASES, **ALL_TOOLS)


def _tool_invoked(sql: psycopg.Connection, run_id: str) -> bool:
    return "tool.invoked" in event_types(sql, run_id)


@given(parsers.parse('a worker process holding a run of tool "{tool}" with args {args}'))
def worker_holding(stack: Stack, ctx: Context, sql: psycopg.Connection, tool: str, args: str) -> None:
    """A worker has claimed the run and invoked its tool."""
    ctx.extra["holder"] = stack.start_worker(RUN_WORKER_ID="holder")
    run = stack.client.start_tool(tool, json.loads(args))
    ctx.last_run_id = run.run_id
    wait_until(lambda: _tool_invoked(sql, run.run_id), 20, "the tool to be invoked")


@when("that worker is killed with SIGKILL")
def kill_holder(ctx: Context) -> None:
    """SIGKILL: no goodbye, no release."""
    ctx.extra["holder"].kill()
    ctx.extra["killed_at"] = time.monotonic()


@given("a worker process is started")
@when("another worker process is started")
def another_worker(stack: Stack) -> None:
    """A fresh worker."""
    stack.start_worker()


@given("a worker process with the default tools is started")
def default_tools_worker(stack: Stack) -> None:
    """RUN_WORKER_TOOLS empty: the default tools, which leave shell out."""
    stack.start_worker(RUN_WORKER_TOOLS="")


@given(parsers.parse("{count:d} worker processes are started"))
def n_workers(stack: Stack, count: int) -> None:
    """Several fresh workers."""
    for _ in range(count):
        stack.start_worker()


@then(parsers.parse("the run ends {status} within {seconds:d} seconds"))
def ends_within(stack: Stack, ctx: Context, status: str, seconds: int) -> None:
    """Reaches `status` in time; the latency is printed for the record."""
    started = ctx.extra.get("canceled_at", time.monotonic())
    got = stack.client.wait_status(ctx.last_run_id, TERMINAL, seconds)
    print(f"cancel latency: {time.monotonic() - started:.3f}s")
    assert got == status


@then("the run has exactly one successful attempt, after a lease_expired attempt")
def attempts_after_kill(stack: Stack, ctx: Context) -> None:
    """Attempt 1 expired, attempt 2 completed."""
    if "killed_at" in ctx.extra:
        print(f"SIGKILL to finished elsewhere: {time.monotonic() - ctx.extra['killed_at']:.2f}s")
    attempts = stack.client.get(ctx.last_run_id).attempts
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "lease_expired"), (2, "completed")]


@then(parsers.parse("the stats count at least {expired:d} lease_expired and {requeued:d} requeued"))
def stats(stack: Stack, expired: int, requeued: int) -> None:
    """OpsService.GetStats."""
    with stack.admin_channel() as channel:
        got = ops_service_pb2_grpc.OpsServiceStub(channel).GetStats(ops_service_pb2.GetStatsRequest(), timeout=10)
    assert got.lease_expired >= expired and got.requeued >= requeued, got
    assert got.completed >= 1 and got.claimed >= 2
    assert got.runs_by_status["SUCCEEDED"] >= 1


@when("that worker is paused with SIGSTOP until the run is claimed by another worker")
def pause(stack: Stack, ctx: Context, sql: psycopg.Connection) -> None:
    """The holder freezes; its lease lapses; a second worker claims attempt 2."""
    ctx.extra["holder"].signal(signal.SIGSTOP)
    stack.start_worker(RUN_WORKER_ID="rescuer")
    wait_until(
        lambda: sql.execute(
            "SELECT worker_id FROM run_events WHERE run_id = %s AND type = 'run.claimed' AND attempt = 2",
            (ctx.last_run_id,),
        ).fetchone(),
        20,
        "attempt 2 to be claimed",
    )
    claimer = sql.execute(
        "SELECT worker_id FROM run_events WHERE run_id = %s AND type = 'run.claimed' AND attempt = 2",
        (ctx.last_run_id,),
    ).fetchone()
    rescuer = stack.recorded_worker_id("rescuer")
    assert claimer == (rescuer,), "a paused worker whose lease lapsed must not be handed runs"
    row = sql.execute(
        "SELECT sequence FROM run_events WHERE run_id = %s AND type = 'run.lease_expired'", (ctx.last_run_id,)
    ).fetchone()
    assert row is not None
    ctx.extra["expired_at_sequence"] = row[0]


@when("that worker is paused with SIGSTOP until its lease has expired")
def pause_until_expired(ctx: Context, sql: psycopg.Connection) -> None:
    """No other worker exists, so the re-queued run stays queued."""
    ctx.extra["holder"].signal(signal.SIGSTOP)
    wait_until(
        lambda: "run.requeued" in event_types(sql, ctx.last_run_id), 20, "the reaper to re-queue the run"
    )


@then("the worker re-adopted the run under attempt 2 and finished it")
def readopted(stack: Stack, ctx: Context, sql: psycopg.Connection) -> None:
    """Attempt 2 claimed by the same worker (payload readopted), completed by it."""
    rows = sql.execute(
        "SELECT attempt, worker_id, payload->>'readopted' FROM run_events WHERE run_id = %s AND type = 'run.claimed'"
        " ORDER BY sequence",
        (ctx.last_run_id,),
    ).fetchall()
    holder = stack.recorded_worker_id("holder")
    assert rows == [(1, holder, None), (2, holder, "true")]
    attempts = stack.client.get(ctx.last_run_id).attempts
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "lease_expired"), (2, "completed")]
    assert "re-adopted" in ctx.extra["holder"].output()


@then(parsers.parse("the stats count at least {count:d} readopted"))
def stats_readopted(stack: Stack, count: int) -> None:
    """OpsService.GetStats counts re-adoptions."""
    with stack.admin_channel() as channel:
        got = ops_service_pb2_grpc.OpsServiceStub(channel).GetStats(ops_service_pb2.GetStatsRequest(), timeout=10)
    assert got.readopted >= count


@when("the paused worker is resumed with SIGCONT")
def resume(ctx: Context) -> None:
    """The holder wakes up believing it still holds attempt 1."""
    ctx.extra["holder"].signal(signal.SIGCONT)


@then("the resumed worker recorded nothing for the run after its lease expired")
def nothing_recorded(stack: Stack, sql: psycopg.Connection, ctx: Context) -> None:
    """No event of attempt 1 after run.lease_expired."""
    rows = sql.execute(
        "SELECT type FROM run_events WHERE run_id = %s AND sequence > %s AND (attempt = 1 OR worker_id = %s)",
        (ctx.last_run_id, ctx.extra["expired_at_sequence"], stack.recorded_worker_id("holder")),
    ).fetchall()
    assert [r[0] for r in rows] == ["run.requeued"]


@then("the resumed worker says it stopped working on the run")
def says_stopped(ctx: Context) -> None:
    """It learned it lost the attempt (from a refused report or its heartbeat)."""
    holder: Worker = ctx.extra["holder"]
    wait_until(
        lambda: "lost the lease" in holder.output() or "no longer current" in holder.output(),
        20,
        "the resumed worker to drop the run",
    )


@when("I cancel the run")
def cancel_running(stack: Stack, ctx: Context) -> None:
    """CancelRun while it runs."""
    ctx.extra["canceled_at"] = time.monotonic()
    stack.client.cancel(ctx.last_run_id, "test")


@when(parsers.parse('I start a run of tool "{tool}" with args {args} and {attempts:d} attempts'))
def start_with_attempts(stack: Stack, ctx: Context, tool: str, args: str, attempts: int) -> None:
    """A runtime.tool run with max_attempts."""
    ctx.last_run_id = stack.client.start_tool(tool, json.loads(args), max_attempts=attempts).run_id


@then("the worker takes a noop run queued after it, and the shell run stays QUEUED with no attempt")
def passed_over(stack: Stack, ctx: Context) -> None:
    """Claims are routed by the tools workers declare: the worker claims a later run, not the first."""
    later = stack.client.start("").run.run_id
    stack.client.wait_status(later, {"SUCCEEDED"}, 30)
    run = stack.client.get(ctx.last_run_id)
    assert (stack.client.status(ctx.last_run_id), run.run.attempt, list(run.attempts)) == ("QUEUED", 0, [])


@then(parsers.parse("ExplainRun says no worker declared the tools it needs ({tools})"))
def explained(stack: Stack, ctx: Context, tools: str) -> None:
    """The queued run's explanation names the missing tools."""
    answer = stack.client.stub.ExplainRun(run_service_pb2.ExplainRunRequest(run_id=ctx.last_run_id), timeout=10)
    assert (list(answer.queue.tools_needed), answer.queue.tools_available) == (tools.split(", "), "no")
    assert f"none of them declared the tools it needs ({tools}): it waits" in answer.summary, answer.summary


@then(parsers.parse("GetRun shows attempts: {spec}"))
def shows_attempts(stack: Stack, ctx: Context, spec: str) -> None:
    """Outcome and error of each attempt."""
    expected = []
    for part in spec.split(","):
        outcome, _, error = part.strip().partition(" ")
        expected.append((outcome, error.strip('"')))
    attempts = stack.client.get(ctx.last_run_id).attempts
    assert [(a.outcome, a.error) for a in attempts] == expected
    assert [a.attempt for a in attempts] == list(range(1, len(expected) + 1))


@then(parsers.parse('the tool call output has exit code {code:d}, stdout "{out}" and stderr "{err}"'))
def shell_output(stack: Stack, ctx: Context, code: int, out: str, err: str) -> None:
    """Captured in the tool call."""
    from google.protobuf import json_format

    (call,) = stack.client.get(ctx.last_run_id).tool_calls
    output = json_format.MessageToDict(call.output)
    assert (output["exit_code"], output["stdout"].strip(), output["stderr"].strip()) == (code, out, err)
    assert call.error == f"command exited with code {code}"


@when("that worker is stopped with SIGTERM")
def sigterm_holder(ctx: Context) -> None:
    """Graceful stop with a short drain."""
    ctx.extra["holder"].signal(signal.SIGTERM)


@then("the worker exits cleanly")
def exits_cleanly(ctx: Context) -> None:
    """Exit code 0 within the drain plus a margin."""
    holder: Worker = ctx.extra["holder"]
    assert holder.proc is not None
    assert holder.proc.wait(15) == 0, holder.output()


@then("the run is queued again at once, with a released attempt")
def released(stack: Stack, ctx: Context) -> None:
    """No lease wait: it is QUEUED right after the worker left."""
    got = stack.client.get(ctx.last_run_id)
    assert got.run.status == 1, got.run  # RUN_STATUS_QUEUED
    assert [(a.attempt, a.outcome) for a in got.attempts] == [(1, "released")]


@given(parsers.parse('{count:d} runs of tool "{tool}" with args {args} are running'))
def n_running(stack: Stack, ctx: Context, sql: psycopg.Connection, count: int, tool: str, args: str) -> None:
    """Started and claimed."""
    ids = [stack.client.start_tool(tool, json.loads(args)).run_id for _ in range(count)]
    ctx.extra["run_ids"] = ids
    wait_until(
        lambda: sql.execute(
            "SELECT count(*) FROM runs WHERE run_id = ANY(%s) AND status = 'RUNNING'", (ids,)
        ).fetchone()[0]  # type: ignore[index]
        == count,
        20,
        "every run to be running",
    )


@when("the API is restarted")
def restart(stack: Stack) -> None:
    """SIGTERM the API and start a new one on the same address."""
    stack.restart_api()


def _all_terminal(sql: psycopg.Connection, ids: list[str]) -> bool:
    row = sql.execute(
        "SELECT count(*) FROM runs WHERE run_id = ANY(%s) AND status IN ('SUCCEEDED','FAILED','CANCELED')",
        (ids,),
    ).fetchone()
    return row is not None and row[0] == len(ids)


@then("every run ends SUCCEEDED")
def every_succeeded(sql: psycopg.Connection, ctx: Context) -> None:
    """All of them, successfully."""
    ids = ctx.extra["run_ids"]
    wait_until(lambda: _all_terminal(sql, ids), 60, "every run to end", interval=0.1)
    rows = sql.execute("SELECT status, count(*) FROM runs WHERE run_id = ANY(%s) GROUP BY status", (ids,)).fetchall()
    assert dict(rows) == {"SUCCEEDED": len(ids)}


@then("every run has exactly one successful attempt")
def one_success_each(sql: psycopg.Connection, ctx: Context) -> None:
    """One run.completed per run."""
    for run_id in ctx.extra["run_ids"]:
        assert event_types(sql, run_id).count("run.completed") == 1


MIXED: list[tuple[str, dict[str, Any], int]] = [
    ("noop", {}, 3),
    ("sleep", {"seconds": 0.3}, 3),
    ("fail", {"message": "once", "times": 1}, 3),
    ("fail", {"message": "never", "retryable": False}, 3),
    ("shell", {"command": ["true"]}, 3),
]


@given(parsers.parse("{count:d} runs of mixed tools"))
def mixed_runs(stack: Stack, ctx: Context, count: int) -> None:
    """noop, sleep, fail-once, fail-always and shell, round robin."""
    ids = []
    for i in range(count):
        tool, args, attempts = MIXED[i % len(MIXED)]
        ids.append(stack.client.start_tool(tool, args, max_attempts=attempts).run_id)
    ctx.extra["run_ids"] = ids


@when(parsers.parse(
    "{workers:d} workers run them while one is SIGKILLed and replaced every {every:f} seconds, {times:d} times"
))
def chaos(stack: Stack, ctx: Context, sql: psycopg.Connection, workers: int, every: float, times: int) -> None:
    """Kill a random live worker on a schedule, starting a replacement each time."""
    rng = random.Random(1234)
    live = [stack.start_worker("--concurrency", "6") for _ in range(workers)]
    ids = ctx.extra["run_ids"]
    for _ in range(times):
        deadline = time.monotonic() + every
        # Wait on the clock between kills, but stop early if everything has already ended.
        wait_until(lambda d=deadline: time.monotonic() >= d or _all_terminal(sql, ids), every + 5, "next kill")
        victim = rng.choice(live)
        victim.kill()
        live.remove(victim)
        live.append(stack.start_worker("--concurrency", "6"))
    wait_until(lambda: _all_terminal(sql, ids), 90, "every run to end", interval=0.2)


@then("every run ends in a terminal state")
def all_terminal(sql: psycopg.Connection, ctx: Context) -> None:
    """Nothing left behind; the expected outcomes by tool."""
    ids = ctx.extra["run_ids"]
    assert _all_terminal(sql, ids)
    rows = dict(sql.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())
    never = len(ids) // len(MIXED)
    assert rows.get("FAILED", 0) >= never  # the never-succeeding ones, plus any whose attempts ran out
    assert rows.get("SUCCEEDED", 0) + rows.get("FAILED", 0) == len(ids)


@then("no run has two overlapping attempts")
def no_overlap(sql: psycopg.Connection) -> None:
    """Once attempt k+1 is claimed, nothing more is recorded for attempt k."""
    rows = sql.execute(
        """
        SELECT e.run_id, e.attempt, e.type FROM run_events e
        JOIN run_events c ON c.run_id = e.run_id AND c.type = 'run.claimed' AND c.attempt = e.attempt + 1
        WHERE e.sequence > c.sequence AND e.attempt > 0
        """
    ).fetchall()
    assert rows == []
    dup = sql.execute(
        "SELECT run_id, attempt FROM run_events WHERE type = 'run.claimed' GROUP BY run_id, attempt HAVING count(*) > 1"
    ).fetchall()
    assert dup == []
    twice = sql.execute(
        "SELECT run_id FROM run_events WHERE type = 'run.completed' GROUP BY run_id HAVING count(*) > 1"
    ).fetchall()
    assert twice == []


@then("every run's event sequence is gapless")
def gapless(sql: psycopg.Connection) -> None:
    """1..n for every run."""
    rows = sql.execute(
        "SELECT run_id FROM run_events GROUP BY run_id HAVING count(*) <> max(sequence) OR min(sequence) <> 1"
    ).fetchall()
    assert rows == []
