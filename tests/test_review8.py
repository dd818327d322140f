"""Review of issue 8 (step cache, partial rebuilds, explain): each test reproduces one finding against a real
PostgreSQL (and, where named, a real redis-server or a real run API process). Each failed before its fix
(they were committed as strict xfails first)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.run_api.artifacts import ArtifactStore
from services.run_api.auth import Caller
from services.run_api.cache import CacheLayers, keys_for, redis_key
from services.run_api.rebuild import explain_steps
from services.run_api.store import events as store_events
from services.run_api.store.uow import UnitOfWork
from shared.gen.runs.v1 import worker_service_pb2 as W
from shared.settings import ApiSettings
from tests.test_cache import (
    NO_REDIS,
    RedisServer,
    cold,
    components,
    engine,
    hold,
    lookup,
    report,
    store,
    write,
)
from tests.test_security import Forger, api, client, event, forger

pytestmark = pytest.mark.timeout(60)
BOUND = 10.0
# Lock waits of sessions on this test's database only: pg_locks spans the server, where other tests
# (other xdist workers, other users of TEST_DATABASE_URL) wait on locks of their own. By the waiter's
# pid, since a row lock is waited for as a transactionid lock, which names no database.
WAITING_HERE = ("SELECT count(*) FROM pg_locks WHERE NOT granted"
                " AND pid IN (SELECT pid FROM pg_stat_activity WHERE datname = current_database())")


# --- a Redis that keeps its data across a restart (RDB, as Redis's default configuration does) -----------


class PersistentRedis(RedisServer):
    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--dbfilename", "dump.rdb"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + BOUND
        while not self._answers():
            assert self.process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not answer in time"
            time.sleep(0.02)


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip(NO_REDIS)
    (tmp_path / "redis").mkdir()
    server = PersistentRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _invalidated_during_outage(
    engine: AsyncEngine, layers: CacheLayers, server: PersistentRedis
) -> tuple[Any, dict[str, Any], str]:
    """An entry with a hot copy; Redis restarts (its data kept) while the entry is invalidated."""
    held = await hold(engine)
    comps = components(held, "s", {"x": 1})
    keys = await write(engine, layers, held, "s", comps)
    name = redis_key("default", keys.key)
    assert server.client().get(name) is not None
    server.client().save()
    server.stop()
    assert await layers.invalidate(engine, "default", held.workflow, None, None, None) == 1  # Redis down: pending
    server.start()
    assert server.client().get(name) is not None  # the hot copy came back with Redis's data
    return held, comps, name


async def test_invalidation_during_redis_outage_leaves_no_stale_hit_on_another_replica(
    engine: AsyncEngine, store: ArtifactStore, persistent_redis: PersistentRedis
) -> None:
    replica_a = CacheLayers.from_settings(ApiSettings(redis_url=persistent_redis.url), store)
    replica_b = CacheLayers.from_settings(ApiSettings(redis_url=persistent_redis.url), store)
    replica_a.retry_seconds = replica_b.retry_seconds = 0.0
    try:
        held, comps, _ = await _invalidated_during_outage(engine, replica_a, persistent_redis)
        answer = await lookup(engine, replica_b, held, "s", comps)
        assert (answer.hit, answer.miss_reason) == (False, "no_entry"), (answer.hit, answer.layer)
    finally:
        await replica_a.close()
        await replica_b.close()


async def test_invalidation_during_redis_outage_leaves_no_stale_hit_on_the_same_replica(
    engine: AsyncEngine, store: ArtifactStore, persistent_redis: PersistentRedis
) -> None:
    layers = CacheLayers.from_settings(ApiSettings(redis_url=persistent_redis.url), store)
    layers.retry_seconds = 0.0
    try:
        held, comps, _ = await _invalidated_during_outage(engine, layers, persistent_redis)
        answer = await lookup(engine, layers, held, "s", comps)
        assert (answer.hit, answer.miss_reason) == (False, "no_entry"), (answer.hit, answer.layer)
    finally:
        await layers.close()


# --- replay of step_cache against an invalidation that overlaps a report --------------------------------


async def test_replay_keeps_an_entry_written_by_a_report_overlapping_an_invalidation(
    engine: AsyncEngine, cold: CacheLayers, database_url: str
) -> None:
    held = await hold(engine)
    comps = components(held, "s", {"x": 1})
    keys = keys_for(comps, "default")
    await report(engine, held, ("step.created", {"step_key": "s", "tool": "echo", "depends_on": []}),
                 ("step.started", {"step_key": "s", "try": 1, "cache": {"key": keys.key, "reason": "no_entry"}}))
    cache = {"components": comps, "scope": "global", "key": keys.key, "base_key": keys.base_key,
             "display": keys.display}
    from services.run_api import db

    with psycopg.connect(db.libpq_url(database_url)) as locker:  # not autocommit: holds its lock until commit
        locker.execute("SELECT 1 FROM run_steps WHERE run_id = %s AND step_key = 's' FOR UPDATE", (held.run_id,))
        task = asyncio.ensure_future(report(
            engine, held, ("step.succeeded", {"step_key": "s", "output": {"v": 1}, "try": 1, "cache": cache})))
        deadline = time.monotonic() + BOUND
        with psycopg.connect(db.libpq_url(database_url), autocommit=True) as watcher:
            # the report inserted its events and waits for the run_steps row (a lock not granted)
            while not watcher.execute(WAITING_HERE).fetchone()[0]:  # type: ignore[index]
                assert not task.done(), task
                assert time.monotonic() < deadline, "the report never waited on the locked row"
                await asyncio.sleep(0.01)
        # The invalidation waits for the report that writes an entry of its workflow (an advisory lock the
        # report holds shared from before its events get their time): it runs after, and sees the row.
        invalidation = asyncio.ensure_future(cold.invalidate(engine, "default", held.workflow, "s", None, None))
        with psycopg.connect(db.libpq_url(database_url), autocommit=True) as watcher:
            while watcher.execute(WAITING_HERE + " AND locktype = 'advisory'").fetchone()[0] == 0:  # type: ignore[index]
                assert not invalidation.done(), "the invalidation did not wait for the report"
                assert time.monotonic() < deadline, "the invalidation never waited"
                await asyncio.sleep(0.01)
        locker.commit()
        await asyncio.wait_for(task, BOUND)
        assert await asyncio.wait_for(invalidation, BOUND) == 1

    from services.run_api.store import queries as Q

    async with UnitOfWork(engine) as uow:
        live = (await uow.conn.execute(Q.step_cache_get, {"tenant_id": "default", "cache_key": keys.key})).first()
    async with UnitOfWork(engine) as uow:
        await store_events.replay(uow.conn)
        await uow.commit()
    async with UnitOfWork(engine) as uow:
        replayed = (await uow.conn.execute(Q.step_cache_get, {"tenant_id": "default", "cache_key": keys.key})).first()
    assert live is None and replayed is None, "replay and live disagree about an entry"


# --- explain across tenants through an unchecked source_run_id --------------------------------------------


async def test_explain_never_shows_another_tenants_components(
    engine: AsyncEngine, cold: CacheLayers
) -> None:
    victim = await hold(engine)
    secret = components(victim, "s", {"x": "default tenant's secret input"})
    await write(engine, cold, victim, "s", secret)
    attacker = await hold(engine, tenant="acme")
    try:
        await report(engine, attacker, ("step.created", {"step_key": "s", "tool": "echo", "depends_on": []}),
                     ("step.skipped", {"step_key": "s", "reason": "reused_from_base", "output": {},
                                       "source_run_id": victim.run_id, "source_step_key": "s"}))
    except Exception:
        return
    acme = Caller(key_id="client-acme", role="client", tenant_id="acme")
    async with UnitOfWork(engine) as uow:
        (found,) = await explain_steps(uow, attacker.run_id, "s", acme)
    assert found["components"] is None, found["components"]


# --- explain of a miss whose step has not succeeded --------------------------------------------------------


async def test_explain_of_a_running_miss_does_not_claim_the_same_components(
    engine: AsyncEngine, cold: CacheLayers
) -> None:
    first = await hold(engine)
    await write(engine, cold, first, "s", components(first, "s", {"x": 1}))
    second = await hold(engine)
    miss = await lookup(engine, cold, second, "s", components(second, "s", {"x": 2}))
    assert (miss.hit, miss.miss_reason) == (False, "no_entry")
    await report(engine, second, ("step.created", {"step_key": "s", "tool": "echo", "depends_on": []}),
                 ("step.started", {"step_key": "s", "try": 1, "cache": {
                     "key": miss.cache_key, "display": miss.display, "reason": miss.miss_reason}}))
    async with UnitOfWork(engine) as uow:
        (found,) = await explain_steps(uow, second.run_id, "s", Caller.anonymous())
    assert "has the same components" not in found["summary"], found["summary"]
    assert not (found["nearest_cache_key"] and not found["differences"]), found


# --- reports through the real WorkerService ---------------------------------------------------------------


def _claimed_step(forger: Forger, run_id: str, step: str) -> str:
    a = forger.claim("A")
    assert a.run_ids == [run_id]
    forger.report("A", a.token, event(run_id, 1, "run.started"),
                  event(run_id, 1, "step.created", {"step_key": step, "tool": "echo", "depends_on": []}))
    return a.token


def _refused_or_recorded(forger: Forger, token: str, ev: Any) -> None:
    """Report one event: INVALID_ARGUMENT is the fix; otherwise it must have been RECORDED (not stale)."""
    try:
        response = forger.report("A", token, ev)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        return
    assert [r.outcome for r in response.results] == [W.REPORT_OUTCOME_RECORDED], response


def test_a_step_succeeded_cannot_write_an_entry_for_another_workflow(
    client: Any, forger: Forger, sql: psycopg.Connection
) -> None:
    run_id = client.start().run.run_id
    token = _claimed_step(forger, run_id, "s")
    forged = {"workflow": "campaign.build", "step": "copy", "tool": "shell", "tool_version": "1",
              "spec": {"tool": "shell", "args": {}, "input": {}}, "input": {"product": "x"}, "input_artifacts": []}
    forger.report("A", token, event(run_id, 1, "step.started", {"step_key": "s", "try": 1}))
    succeeded = event(run_id, 1, "step.succeeded", {"step_key": "s", "output": {"poisoned": True}, "try": 1,
                                                    "cache": {"components": forged, "scope": "global"}})
    _refused_or_recorded(forger, token, succeeded)
    rows = sql.execute("SELECT workflow, step_key, output FROM step_cache").fetchall()
    assert rows == []  # (today: [('campaign.build', 's', {'poisoned': True})], keyed as campaign.build's copy)


def test_a_step_skipped_cannot_record_an_artifact_that_was_never_uploaded(
    client: Any, forger: Forger, sql: psycopg.Connection
) -> None:
    run_id = client.start().run.run_id
    token = _claimed_step(forger, run_id, "s")
    bogus = {"name": "report.pdf", "uri": "file:///etc/passwd", "sha256": "ab" * 32, "size": 5,
             "media_type": "application/pdf"}
    skipped = event(run_id, 1, "step.skipped", {"step_key": "s", "reason": "reused_from_base", "output": {},
                                                "artifacts": [bogus], "source_run_id": run_id,
                                                "source_step_key": "s"})
    _refused_or_recorded(forger, token, skipped)
    rows = sql.execute("SELECT uri, size FROM run_artifacts WHERE run_id = %s", (run_id,)).fetchall()
    assert rows == []  # (today: [('file:///etc/passwd', 5)])
