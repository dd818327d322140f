"""Steps of event_log.feature."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg
from pytest_bdd import given, scenarios, then, when

from features.conftest import Context, Stack
from features.harness import ROOT, base_env

scenarios("event_log.feature")

TABLES = {
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
    assert all(ctx.extra["before"].values())
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


@then("runs, run_steps and tool_calls equal what they were before the replay")
def equal(sql: psycopg.Connection, ctx: Context) -> None:
    """Row for row."""
    after = snapshot(sql)
    for name in TABLES:
        assert after[name] == ctx.extra["before"][name], name
