"""Steps of lifecycle.feature."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
from pytest_bdd import parsers, scenarios, then, when

from features.conftest import Context, Stack, event_types
from features.harness import STATUS, wait_until
from shared.gen.runs.v1 import run_pb2, run_service_pb2

scenarios("lifecycle.feature")


@then(parsers.parse('the run has one step "{step}" and one tool call "{tool}", both succeeded'))
def one_step_one_call(stack: Stack, ctx: Context, step: str, tool: str) -> None:
    """GetRun shows the projected step and tool call."""
    got = stack.client.get(ctx.last_run_id)
    assert [(s.step_key, s.tool, s.status) for s in got.steps] == [(step, tool, run_pb2.STEP_STATUS_SUCCEEDED)]
    assert [(c.tool, c.status, c.step_key) for c in got.tool_calls] == [
        (tool, run_pb2.TOOL_CALL_STATUS_SUCCEEDED, step)
    ]
    assert got.run.attempt == 1
    assert got.run.HasField("started_at") and got.run.HasField("finished_at")
    assert got.run.stop_reason == "completed"


@then("the run has exactly one run.claimed event")
def one_claim(sql: psycopg.Connection, ctx: Context) -> None:
    """Claimed once."""
    assert event_types(sql, ctx.last_run_id).count("run.claimed") == 1


@then(parsers.parse('the run\'s error is "{error}"'))
def run_error(stack: Stack, ctx: Context, error: str) -> None:
    """The run carries the tool's error."""
    run = stack.client.get(ctx.last_run_id).run
    assert run.error == error
    assert run.stop_reason == "failed"


@when(parsers.parse("{count:d} worker processes run until every run has ended"))
def workers_drain(stack: Stack, ctx: Context, sql: psycopg.Connection, count: int) -> None:
    """Start `count` long-running workers and wait for the queue to drain."""
    for i in range(count):
        stack.start_worker("--concurrency", "8", "--batch-limit", "8", RUN_WORKER_ID=f"w{i}")
    wait_until(
        lambda: sql.execute(
            "SELECT count(*) FROM runs WHERE status IN ('SUCCEEDED','FAILED','CANCELED')"
        ).fetchone()[0]  # type: ignore[index]
        == len(ctx.runs),
        120,
        "every run to end",
        interval=0.2,
    )


@then("every run SUCCEEDED")
def all_succeeded(sql: psycopg.Connection, ctx: Context) -> None:
    """No run failed or is left over."""
    rows = sql.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall()
    assert dict(rows) == {"SUCCEEDED": len(ctx.runs)}


@then("every run has exactly one run.claimed event and one run.completed event")
def exactly_once(sql: psycopg.Connection, ctx: Context) -> None:
    """Exactly once per run, and gapless sequences."""
    rows = sql.execute(
        """
        SELECT run_id,
               count(*) FILTER (WHERE type = 'run.claimed'),
               count(*) FILTER (WHERE type = 'run.completed'),
               count(*), max(sequence)
        FROM run_events GROUP BY run_id
        """
    ).fetchall()
    assert len(rows) == len(ctx.runs)
    for run_id, claims, completions, total, last in rows:
        assert (claims, completions) == (1, 1), run_id
        assert total == last, f"gap in the sequence of {run_id}"


@then("the claims are spread over more than one worker")
def spread(sql: psycopg.Connection) -> None:
    """Several workers took part."""
    rows = sql.execute("SELECT DISTINCT worker_id FROM run_events WHERE type = 'run.claimed'").fetchall()
    assert len(rows) > 1


@when("I watch the run while a worker executes it")
def watch_while_working(stack: Stack, ctx: Context) -> None:
    """A watcher thread is streaming before the worker starts."""
    received: list[Any] = []
    ended = threading.Event()

    def watch() -> None:
        for event in stack.client.watch(ctx.last_run_id, timeout=60):
            received.append(event)
        ended.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    wait_until(lambda: len(received) >= 1, 10, "the watch to deliver run.queued")
    started = time.monotonic()
    stack.once()
    assert ended.wait(30), "the watch stream did not end"
    ctx.extra["watch"] = received
    ctx.extra["watch_seconds"] = time.monotonic() - started


@then("the watch received every event of the run, in order with no gaps, ending with run.completed")
def watch_complete(sql: psycopg.Connection, ctx: Context) -> None:
    """Exactly the log, in order."""
    received = ctx.extra["watch"]
    assert [e.sequence for e in received] == list(range(1, len(received) + 1))
    assert [e.type for e in received] == event_types(sql, ctx.last_run_id)
    assert received[-1].type == "run.completed"


@then("the watch stream ended by itself")
def watch_ended(ctx: Context) -> None:
    """The stream closed after the terminal event (checked by the thread finishing)."""
    assert ctx.extra["watch"][-1].type == "run.completed"


@when(parsers.parse("I list runs {size:d} per page"))
def list_pages(stack: Stack, ctx: Context, size: int) -> None:
    """Follow next_page_token to the end."""
    pages: list[list[str]] = []
    token = ""
    while True:
        response = stack.client.stub.ListRuns(
            run_service_pb2.ListRunsRequest(page_size=size, page_token=token), timeout=10
        )
        pages.append([r.run_id for r in response.runs])
        token = response.next_page_token
        if not token:
            break
        assert len(pages) < 10, "paging does not end"
    ctx.extra["pages"] = pages


@then(parsers.parse("I get {count:d} pages with {total:d} distinct runs, newest first"))
def pages_ok(ctx: Context, count: int, total: int) -> None:
    """Stable order, no duplicates, newest first."""
    pages = ctx.extra["pages"]
    flat = [r for page in pages for r in page]
    assert len(pages) == count
    assert len(set(flat)) == total == len(flat)
    assert flat == sorted(ctx.extra["run_ids"], reverse=True)


@then("listing with status SUCCEEDED returns no runs")
def list_filter(stack: Stack) -> None:
    """The status filter applies."""
    response = stack.client.stub.ListRuns(
        run_service_pb2.ListRunsRequest(status=STATUS["SUCCEEDED"]), timeout=10
    )
    assert list(response.runs) == []
    queued = stack.client.stub.ListRuns(run_service_pb2.ListRunsRequest(status=STATUS["QUEUED"]), timeout=10)
    assert len(queued.runs) == 7


@when(parsers.parse("{count:d} clients watch the run while a worker executes it"))
def many_watchers(stack: Stack, ctx: Context, count: int) -> None:
    """Each watcher has its own thread; all are streaming before the worker starts."""
    assert stack.api is not None
    got: list[list[Any]] = [[] for _ in range(count)]
    ended = [threading.Event() for _ in range(count)]

    def watch(i: int) -> None:
        for event in stack.client.watch(ctx.last_run_id, timeout=60):
            got[i].append(event)
        ended[i].set()

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    wait_until(lambda: all(g for g in got), 20, "every watcher to receive run.queued")
    stack.once()
    for e in ended:
        assert e.wait(30), "a watch stream did not end"
    ctx.extra["watchers"] = got


@then("every watcher received every event of the run in order and its stream ended")
def all_watchers(sql: psycopg.Connection, ctx: Context) -> None:
    """The same full chain for everyone."""
    expected = event_types(sql, ctx.last_run_id)
    assert expected[-1] == "run.completed"
    for received in ctx.extra["watchers"]:
        assert [e.type for e in received] == expected
        assert [e.sequence for e in received] == list(range(1, len(expected) + 1))
