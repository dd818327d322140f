"""Steps of event_log.feature."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import psycopg
from pytest_bdd import given, scenarios, then, when

from features.conftest import Context, Stack
from features.harness import ROOT, base_env, wait_until
from features.test_faults import SHORT_LEASES
from services.run_api import db
from services.run_api.store import events
from shared.gen.runs.v1 import run_service_pb2

scenarios("event_log.feature")

TABLES = {
    "workflows": "SELECT * FROM workflows ORDER BY tenant_id, name, version",
    "run_artifacts": "SELECT * FROM run_artifacts ORDER BY run_id, step_key, name",
    "step_cache": "SELECT * FROM step_cache ORDER BY tenant_id, cache_key",
    "runs": "SELECT * FROM runs ORDER BY run_id",
    "run_steps": "SELECT * FROM run_steps ORDER BY run_id, step_key",
    "tool_calls": "SELECT * FROM tool_calls ORDER BY run_id, tool_call_id",
}


@when("I try to UPDATE, DELETE and TRUNCATE run_events directly")
def tamper(sql: psycopg.Connection, ctx: Context) -> None:
    """Three statements, each in its own transaction."""
    errors: list[str] = []
    for statement in (
        "UPDATE run_events SET type = 'run.completed'",
        "DELETE FROM run_events",
        "TRUNCATE run_events",
    ):
        try:
            sql.execute(statement)
            errors.append("")
        except psycopg.Error as err:
            errors.append(str(err))
    ctx.extra["errors"] = errors


@then("each statement is refused by the database")
def refused(ctx: Context) -> None:
    """The trigger names the table."""
    errors = ctx.extra["errors"]
    assert len(errors) == 3
    assert all("run_events is append-only" in e for e in errors), errors


@given("a mixed workload of succeeded, failed, retried, canceled and queued runs")
def mixed(stack: Stack, ctx: Context) -> None:
    """Runs in every state, with retries, made by real workers."""
    stack.start_api(RUN_RETRY_BACKOFF_SECONDS="0", RUN_RETRY_BACKOFF_MAX_SECONDS="0",
                    RUN_WORKER_TOOLS="noop,sleep,fail,shell")
    c = stack.client
    ids = [c.start().run.run_id for _ in range(5)]
    ids.append(c.start_tool("fail", {"message": "nope", "retryable": False}).run_id)
    ids.append(c.start_tool("fail", {"message": "first time only", "times": 1}, max_attempts=2).run_id)
    ids.append(c.start_tool("fail", {"message": "always"}, max_attempts=2).run_id)
    ids.append(c.start_tool("shell", {"command": ["echo", "hello"]}).run_id)
    canceled = c.start().run.run_id
    c.cancel(canceled)
    for _ in range(4):
        stack.once()
    for run_id in ids:
        c.wait_status(run_id, {"SUCCEEDED", "FAILED"}, 30)
    queued = c.start().run.run_id
    statuses = {c.status(r) for r in [*ids, canceled, queued]}
    assert statuses == {"SUCCEEDED", "FAILED", "CANCELED", "QUEUED"}, statuses
    retried = c.get(ids[6])
    assert retried.run.attempt == 2 and c.status(ids[6]) == "SUCCEEDED"
    ctx.extra["ids"] = ids


def snapshot(sql: psycopg.Connection) -> dict[str, list[Any]]:
    """Every projected row."""
    return {name: sql.execute(query).fetchall() for name, query in TABLES.items()}


@when("I rebuild the projections with the replay command")
def replay(stack: Stack, ctx: Context, sql: psycopg.Connection) -> None:
    """`python -m services.run_api replay` against the scenario's database."""
    ctx.extra["before"] = snapshot(sql)
    assert all(v for k, v in ctx.extra["before"].items()
               if k not in ("run_artifacts", "step_cache") or ctx.extra.get("artifacts"))
    done = subprocess.run(
        [sys.executable, "-m", "services.run_api", "replay", "--database-url", stack.database_url],
        env=base_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "replayed" in done.stdout


@then("workflows, runs, run_steps, tool_calls, run_artifacts and step_cache equal what they were before the replay")
def equal(sql: psycopg.Connection, ctx: Context, stack: Stack) -> None:
    """Row for row; and again after a replay one event at a time, where no batch folds a row's events
    into one write (the live path and the command fold them: the three must agree)."""
    after = snapshot(sql)
    for name in TABLES:
        assert after[name] == ctx.extra["before"][name], name

    async def one_at_a_time() -> None:
        engine = db.make_engine(stack.database_url, 1)
        try:
            async with engine.begin() as conn:
                await events.replay(conn, page_size=1)
        finally:
            await engine.dispose()

    asyncio.run(one_at_a_time())
    sql.rollback()
    single = snapshot(sql)
    for name in TABLES:
        assert single[name] == ctx.extra["before"][name], f"{name} (one event at a time)"


DAG = {
    "name": "replayed",
    "steps": [
        {"key": "a", "tool": "echo", "args": {"n": 1}, "cache": {"scope": "global"}},
        {"key": "b", "tool": "fail", "depends_on": ["a"], "args": {"times": 1},
         "retry": {"max_attempts": 2, "backoff_seconds": 0.05}},
        {"key": "c", "tool": "sleep", "depends_on": ["a"], "input": {"seconds": "input.seconds"}},
        {"key": "d", "tool": "echo", "depends_on": ["b", "c"], "input": {"b": "steps.b.output"}},
    ],
}


@given("DAG runs that succeeded with a retried step, were resumed after a SIGKILL, failed, were canceled and "
       "made artifacts")
def dag_workload(stack: Stack, ctx: Context, sql: psycopg.Connection) -> None:
    """Real workers run a registered DAG (step b fails once), the campaign sample, and runs that end otherwise."""
    stack.start_api(**SHORT_LEASES, RUN_WORKER_TOOLS="noop,echo,sleep,fail,shell")
    c = stack.client
    assert c.register(DAG).created
    first = stack.start_worker(RUN_WORKER_ID="first")
    resumed = c.start("replayed", {"seconds": 3}).run.run_id
    wait_until(lambda: c.step_status(resumed, "c") == "RUNNING", 30, "step c of the resumed run to run")
    first.kill()
    stack.start_worker(RUN_WORKER_ID="second")
    ok = c.start("replayed", {"seconds": 0}).run.run_id
    failed = c.start("replayed", {"seconds": -1}).run.run_id  # sleep refuses a negative time: c fails
    canceled = c.start("replayed", {"seconds": 60}).run.run_id
    wait_until(lambda: c.step_status(canceled, "c") == "RUNNING", 30, "step c of the canceled run to run")
    c.cancel(canceled)
    campaign = c.start("campaign.build", {"product": "Replay", "audience": "auditors"}).run.run_id
    for run_id, status in ((resumed, "SUCCEEDED"), (ok, "SUCCEEDED"), (failed, "FAILED"), (canceled, "CANCELED"),
                           (campaign, "SUCCEEDED")):
        assert c.wait_status(run_id, {"SUCCEEDED", "FAILED", "CANCELED"}, 60) == status, c.get(run_id)
    assert c.get(resumed).run.attempt == 2
    assert c.steps(ok)["b"].attempt == 2  # tried twice
    # The step cache: campaign steps and step a hit on a second run; one workflow's entries invalidated
    # (a later run writes them again); a rebuild reuses its base's steps.
    again = c.start("campaign.build", {"product": "Replay", "audience": "auditors"}).run.run_id
    assert c.wait_status(again, {"SUCCEEDED", "FAILED", "CANCELED"}, 60) == "SUCCEEDED"
    assert c.steps(again)["brief"].reason == "cache_hit" and c.steps(ok)["a"].reason == "cache_hit"
    removed = c.stub.InvalidateCache(run_service_pb2.InvalidateCacheRequest(workflow="replayed"), timeout=10)
    assert removed.removed >= 1
    request = run_service_pb2.RebuildRunRequest(base_run_id=campaign, change_request_type="copy_update")
    rebuilt = c.stub.RebuildRun(request, timeout=10).run.run_id
    assert c.wait_status(rebuilt, {"SUCCEEDED", "FAILED", "CANCELED"}, 60) == "SUCCEEDED"
    assert c.steps(rebuilt)["brief"].reason == "reused_from_base"
    after = c.start("replayed", {"seconds": 0}).run.run_id
    assert c.wait_status(after, {"SUCCEEDED", "FAILED", "CANCELED"}, 60) == "SUCCEEDED"
    ctx.extra["artifacts"] = True
