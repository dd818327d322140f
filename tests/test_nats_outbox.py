"""Run events on NATS JetStream: the API's outbox publisher against a real nats-server, API processes and workers.

The scenario (one test, its phases in order): two API processes on one database, one of them the publisher;
runs start; the publisher's API stops mid-stream and the other takes over; it comes back as a standby; the
NATS server stops mid-stream while runs go on, and starts again on the same port and store. Then every event
the database holds is in the stream, each run's in sequence order, duplicates counted (none within the
duplicate window). A second test makes the commit-order hazard happen with real transactions and checks
that the run's order is kept.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import nats
import psycopg
import pytest
from nats.js.api import DeliverPolicy

from features.harness import Api, Client, Process, Worker, free_port, wait_until
from services.run_api import db
from services.run_api.outbox import OutboxConfig, OutboxPublisher, redact, subject
from shared.gen.runs.v1 import run_service_pb2
from shared.settings import ApiSettings, SettingsError

pytestmark = pytest.mark.timeout(120)

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
FAST = dict(RUN_API_SHUTDOWN_GRACE_SECONDS="1")


class NatsServer(Process):
    """A real nats-server with JetStream, on a fixed port and store directory (so it can be restarted as itself)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.store = tempfile.mkdtemp(prefix="runs-nats-")
        self.url = f"nats://127.0.0.1:{self.port}"
        super().__init__([NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.store],
                         dict(os.environ), "nats")

    def start(self) -> None:
        super().start()

        def accepts() -> bool:
            assert self.running, self.output()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(accepts, 15, "nats-server accepting", interval=0.02)


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    server = NatsServer()
    server.start()
    try:
        yield server
    finally:
        server.stop(10)
        shutil.rmtree(server.store, ignore_errors=True)


async def _stream_count(url: str, stream: str = "RUNS") -> int:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    except nats.js.errors.NotFoundError:
        return 0
    finally:
        await nc.close()


def stream_count(url: str, stream: str = "RUNS") -> int:
    """How many messages the stream holds."""
    return asyncio.run(_stream_count(url, stream))


async def _read_stream(url: str, count: int, stream: str = "RUNS") -> list[Any]:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        js = nc.jetstream()
        sub = await js.subscribe("runs.events.>", stream=stream, ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.ALL)
        return [await sub.next_msg(timeout=10) for _ in range(count)]
    finally:
        await nc.close()


def read_stream(url: str, count: int, stream: str = "RUNS") -> list[Any]:
    """The stream's first `count` messages, in the stream's order (an ordered consumer from the start)."""
    return asyncio.run(_read_stream(url, count, stream))


HOLDERS = """
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()
  AND a.application_name LIKE 'runs-outbox-%'
"""
SESSIONS = "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() " \
           "AND application_name LIKE 'runs-outbox-%'"


def holder(conn: psycopg.Connection[Any]) -> int | None:
    """The pid of the one API process whose publisher holds the lock (None: nobody); fails if more than one."""
    names = [r[0] for r in conn.execute(HOLDERS)]
    assert len(names) <= 1, f"more than one publisher holds the lock: {names}"
    return int(names[0].rsplit("-", 1)[1]) if names else None


def pid(api: Api) -> int:
    assert api.proc is not None
    return api.proc.pid


def standby(conn: psycopg.Connection[Any], api: Api) -> bool:
    """Whether `api`'s publisher has its database session open (without the lock)."""
    return f"runs-outbox-{pid(api)}" in {r[0] for r in conn.execute(SESSIONS)} and holder(conn) != pid(api)


def start_runs(client: Client, n: int) -> None:
    for chunk in range(0, n, 100):
        requests = [run_service_pb2.StartRunRequest(workflow="runtime.noop") for _ in range(min(100, n - chunk))]
        client.stub.StartRuns(run_service_pb2.StartRunsRequest(requests=requests), timeout=30)


def unfinished(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute(
        "SELECT count(*) FROM runs WHERE status NOT IN ('SUCCEEDED', 'FAILED', 'CANCELED')").fetchone()[0])


def scrape(api: Api, name: str) -> float:
    """One unlabelled sample of the API's /metrics."""
    text = httpx.get(f"{api.http_url}/metrics", timeout=10).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"{name} ")))


def test_every_event_of_500_runs_arrives_in_order_across_api_and_nats_restarts(make_database: Any) -> None:
    t0 = time.monotonic()
    server = NatsServer()
    server.start()
    apis: list[Api] = []
    workers: list[Worker] = []
    with make_database() as url, psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
        try:
            # Two API processes on one database, started at once: one publishes, the other stands by.
            apis = [Api(url, processes=1, RUNS_NATS_URL=server.url, **FAST) for _ in range(2)]
            for api in apis:
                Process.start(api)
            for api in apis:
                api.wait_health("SERVING", 30)
            first = wait_until(lambda: {pid(a): a for a in apis}.get(holder(conn) or 0), 20, "one API publishing")
            other = apis[1 - apis.index(first)]
            wait_until(lambda: standby(conn, other), 20, "the other API's publisher session, standing by")
            wait_until(lambda: conn.execute("SELECT count(*) FROM outbox_checkpoints").fetchone()[0] == 1, 20,
                       "the checkpoint, at 'now'")
            workers = [Worker(other.addr, RUN_WORKER_CONCURRENCY="20", RUN_WORKER_DRAIN_SECONDS="0.5")
                       for _ in range(2)]
            for w in workers:
                w.start()
            client = Client(other.addr)

            # 1. The publishing API stops mid-stream and the other takes over; the first starts again (standby).
            start_runs(client, 150)
            wait_until(lambda: stream_count(server.url) >= 200, 30, "the first events in the stream")
            first.stop()
            wait_until(lambda: holder(conn) == pid(other), 20, "the other API taking over")
            start_runs(client, 100)
            Process.start(first)  # comes up while the rest goes on

            # 2. NATS stops mid-stream while runs go on, and starts again on the same port and store.
            start_runs(client, 150)
            wait_until(lambda: stream_count(server.url) >= 250 * 9 + 100, 30, "the stream moving")
            server.stop(10)
            start_runs(client, 100)
            wait_until(lambda: unfinished(conn) == 0, 60, "every run finished while NATS is down")
            assert scrape(other, "runs_outbox_lag_seconds") > 0  # their events wait for NATS
            server.start()

            # 3. Every event in the database arrives, exactly once, in each run's order.
            want = {(r[0], r[1]): (r[2], r[3]) for r in conn.execute(
                "SELECT run_id, event_id, sequence, recorded_at FROM run_events")}
            assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 500 and len(want) >= 500 * 8
            wait_until(lambda: stream_count(server.url) >= len(want), 60, f"{len(want)} events in the stream")
            got = read_stream(server.url, stream_count(server.url))
            first.wait_health("SERVING", 30)
            wait_until(lambda: standby(conn, first), 20, "the restarted API standing by")
            assert holder(conn) == pid(other)
            # /metrics: the publishing process says so and counts what it published; the other stands by
            assert (scrape(other, "runs_outbox_active"), scrape(first, "runs_outbox_active")) == (1, 0)
            assert scrape(other, "runs_outbox_published_total") > 0
            # caught up: nothing waits (read from the database, so both processes say the same)
            lags = ("runs_outbox_lag_seconds",) * 2
            wait_until(lambda: scrape(other, lags[0]) == scrape(first, lags[1]) == 0, 10, "the lag gauges at 0")
        finally:
            for p in (*workers, *apis):
                p.signal(signal.SIGTERM)
            for p in (*workers, *apis):
                p.stop()
            server.stop(10)
            shutil.rmtree(server.store, ignore_errors=True)

    # Exactly one publisher at a time: the first until it stopped, then the other; the first's second life
    # stood by.
    first_log, other_log = first.output(), other.output()
    assert first_log.count("outbox publisher active") == 1 and other_log.count("outbox publisher active") == 1
    assert first_log.index("outbox publisher active") < first_log.index("run API shutting down")
    bodies = [json.loads(m.data) for m in got]
    ids = Counter((body["run_id"], body["event_id"]) for body in bodies)
    duplicates = sum(n - 1 for n in ids.values())
    assert set(ids) == set(want), "the stream's events are the database's"
    assert duplicates == 0, f"{duplicates} duplicates inside the duplicate window"
    by_run: dict[str, list[int]] = defaultdict(list)
    seen = set()
    for m, body in zip(got, bodies, strict=True):
        key = (body["run_id"], body["event_id"])
        assert (body["sequence"], datetime.fromisoformat(body["recorded_at"])) == want[key]
        assert m.subject == subject("runtime.noop", body["type"]) == f"runs.events.runtime.noop.{body['type']}"
        assert m.headers["Nats-Msg-Id"] == f"{body['run_id']}:{body['event_id']}"
        if key not in seen:
            seen.add(key)
            by_run[body["run_id"]].append(body["sequence"])
    assert len(by_run) == 500
    for run_id, sequences in by_run.items():
        assert sequences == list(range(1, len(sequences) + 1)), f"run {run_id} out of order: {sequences}"
    first = bodies[0]
    assert set(first) == {"event_id", "run_id", "sequence", "type", "attempt", "worker_id", "occurred_at",
                          "recorded_at", "workflow", "workflow_version", "tenant_id", "workspace_id", "payload"}
    assert first["type"] == "run.queued" and first["tenant_id"] == "default" and first["workflow_version"] >= 1
    assert first["recorded_at"].endswith("Z") and "request_hash" not in first["payload"]
    print(f"{len(want)} events of 500 runs, {duplicates} duplicates, {time.monotonic() - t0:.1f}s")


async def test_a_runs_events_written_by_an_older_transaction_wait_for_its_earlier_ones(
    make_database: Any, nats_server: NatsServer
) -> None:
    """Transaction B gets its id first, A writes the run's event 1 and commits, then B writes event 2: B's
    tx_id is lower, yet event 1 is published first, and only once. The publisher starts while NATS is down,
    and later loses its database session (terminated): it takes the lock again and goes on."""
    nats_server.stop(10)
    with make_database() as url:
        conninfo = db.libpq_url(url)
        publisher = OutboxPublisher(OutboxConfig(nats_server.url, poll_seconds=0.05), conninfo)
        stop = asyncio.Event()
        task = asyncio.create_task(publisher.run(stop))
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as check:
                async def started() -> bool:
                    return bool(await (await check.execute("SELECT 1 FROM outbox_checkpoints")).fetchone())

                await until(started, 20, "the publisher's checkpoint")
            insert = ("INSERT INTO run_events (run_id, sequence, type, attempt, event_id, occurred_at) "
                      "VALUES (%s, %s, %s, 1, %s, now())")
            async with await psycopg.AsyncConnection.connect(conninfo) as tx_b, \
                    await psycopg.AsyncConnection.connect(conninfo) as tx_a:
                xid_b = await one(tx_b, "SELECT pg_current_xact_id()::text")
                await tx_b.execute(insert, ("OTHER", 1, "run.queued", "e-other"))
                await tx_a.execute(insert, ("R", 1, "run.queued", "e1"))
                xid_a = await one(tx_a, "SELECT pg_current_xact_id()::text")
                await tx_a.commit()
                await tx_b.execute(insert, ("R", 2, "run.claimed", "e2"))
                await tx_b.commit()
            assert int(xid_b) < int(xid_a)
            nats_server.start()

            async def all_there() -> bool:
                return await _stream_count(nats_server.url) >= 3

            await until(all_there, 20, "three events in the stream")
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as check:
                async def checkpoint_at_a() -> bool:
                    row = await (await check.execute("SELECT tx_id::text, ahead FROM outbox_checkpoints")).fetchone()
                    return row is not None and row[0] == xid_a and row[1] == []  # past event 1, nothing ahead

                await until(checkpoint_at_a, 20, "the checkpoint past event 1")
                killed = await one(check, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                                          "application_name LIKE 'runs-outbox-%' AND datname = current_database()")
                assert killed == 1
                await check.execute(insert, ("R", 3, "run.started", "e3"))

                async def four() -> bool:
                    return await _stream_count(nats_server.url) >= 4

                await until(four, 20, "event 3 after the publisher's session was terminated")
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    got = await _read_stream(nats_server.url, 4)
    order = [(json.loads(m.data)["run_id"], json.loads(m.data)["sequence"]) for m in got]
    assert order.index(("R", 1)) < order.index(("R", 2)) < order.index(("R", 3)), order
    assert sorted(order) == [("OTHER", 1), ("R", 1), ("R", 2), ("R", 3)]
    assert publisher.counters["early"] == 1  # event 1 went out ahead of its place, and was skipped there
    assert publisher.counters["published"] == 4 and publisher.counters["duplicates"] == 0


async def one(conn: psycopg.AsyncConnection[Any], query: str) -> Any:
    row = await (await conn.execute(query)).fetchone()
    assert row is not None
    return row[0]


async def until(check: Any, timeout: float, what: str) -> None:
    """Await `check()` until it is true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.02)


def test_settings_name_the_variable_and_subjects_are_tokens() -> None:
    """Bad settings are refused naming their variable; names become subject tokens; logs hide passwords."""
    assert ApiSettings.from_env({}).nats_url == "" and ApiSettings.from_env({}).nats_stream == "RUNS"
    assert ApiSettings.from_env({"RUNS_NATS_URL": "nats://a:4222, nats://b:4222"}).nats_url
    for env, variable in (({"RUNS_NATS_URL": "127.0.0.1:4222"}, "RUNS_NATS_URL"),
                          ({"RUNS_NATS_URL": "http://x"}, "RUNS_NATS_URL"),
                          ({"RUNS_NATS_STREAM": "runs.events"}, "RUNS_NATS_STREAM")):
        with pytest.raises(SettingsError, match=variable):
            ApiSettings.from_env(env)
    assert subject("campaign.build", "step.succeeded") == "runs.events.campaign.build.step.succeeded"
    assert subject("my flow*.>", "run.queued") == "runs.events.my_flow_._.run.queued"
    assert subject(None, "x..y") == "runs.events._.x._.y"
    assert redact("nats://user:secret@127.0.0.1:4222") == "nats://127.0.0.1:4222"  # what the logs name
