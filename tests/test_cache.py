"""The step cache's API side against a real PostgreSQL and a real Redis (a redis-server each test starts itself).

Entries are made as in production: a held run reports step.succeeded with cache components (keyed by
the API's keys_for, as the servicer does) through handlers.report_events, and the hot copy is written
after commit by CacheLayers.after_report. Lookups go through cache_service.lookup_step_cache, fenced
like every worker call.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from sqlalchemy.ext.asyncio import AsyncEngine
from ulid import ULID

from services.run_api import cache_service, db, handlers
from services.run_api.artifacts import ArtifactStore
from services.run_api.auth import Caller
from services.run_api.cache import CacheLayers, Keys, entry_of_row, keys_for, redis_key
from services.run_api.errors import InvalidRequest, PermissionDenied
from services.run_api.store import queries as Q
from services.run_api.store.events import Outcome
from services.run_api.store.uow import UnitOfWork
from shared.gen.runs.v1 import run_service_pb2, worker_service_pb2
from shared.settings import ApiSettings

pytestmark = pytest.mark.timeout(60)

POLICY = handlers.RetryPolicy(max_attempts=1, backoff_seconds=0, backoff_max_seconds=0)
CACHE_LOG = "cache"
NO_REDIS = "redis-server is not installed: the Redis-specific scenarios need one they can stop"


# --- a Redis of the test's own ----------------------------------------------------------------------


class RedisServer:
    """A redis-server on a free port, without persistence, that a test may stop and start again."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            assert self.process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip(NO_REDIS)
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- the world: runs held by workers, entries written by their reports ------------------------------


@dataclass(frozen=True)
class Held:
    run_id: str
    workflow: str
    tenant: str
    worker: str  # the instance name the worker sends
    recorded_worker: str  # the worker id the API records (key id / instance)
    token: str
    caller: Caller


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = db.make_engine(database_url, pool_size=8)
    yield eng
    await eng.dispose()


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "artifacts"))


@pytest.fixture
async def cold(store: ArtifactStore) -> AsyncIterator[CacheLayers]:
    """PostgreSQL only (REDIS_URL unset)."""
    layers = CacheLayers.from_settings(ApiSettings(), store)
    assert not layers.hot
    yield layers


@pytest.fixture
async def layers(store: ArtifactStore, redis_server: RedisServer) -> AsyncIterator[CacheLayers]:
    """Redis in front of PostgreSQL; an outage is retried at every call (no skipping window in tests)."""
    out = CacheLayers.from_settings(ApiSettings(redis_url=redis_server.url), store)
    out.retry_seconds = 0.0
    yield out
    await out.close()


def _callers(tenant: str) -> tuple[Caller, Caller]:
    """A client and a worker of `tenant` (anonymous for the default tenant, as with auth off)."""
    if tenant == "default":
        return Caller.anonymous(), Caller.anonymous()
    return (Caller(key_id=f"client-{tenant}", role="client", tenant_id=tenant),
            Caller(key_id=f"worker-{tenant}", role="worker", tenant_id=tenant))


async def hold(engine: AsyncEngine, tenant: str = "default") -> Held:
    """A new run of the tenant, claimed by a new worker of the tenant, with run.started recorded."""
    client, worker_caller = _callers(tenant)
    async with UnitOfWork(engine) as uow:
        row, _ = await handlers.start_run(uow, handlers.StartRun("", {}, 2), POLICY, client)
    instance = f"w-{ULID()}"
    worker = worker_caller.worker_id(instance)
    async with UnitOfWork(engine) as uow:
        token = await handlers.open_session(uow, worker, tenant, "", 30)
    async with UnitOfWork(engine) as uow:
        claimed = await handlers.claim_runs(uow, handlers.Claim(worker, "default", 1, 1, 30, tenant_id=tenant))
    assert [r.run_id for r in claimed.runs] == [row.run_id]
    held = Held(row.run_id, row.workflow, tenant, instance, worker, token, worker_caller)
    await report(engine, held, ("run.started", {}))
    return held


async def report(engine: AsyncEngine, held: Held, *events: tuple[str, dict[str, Any]]) -> list[Any]:
    reported = [handlers.ReportedEvent(held.run_id, 1, str(ULID()), t, None, p) for t, p in events]
    async with UnitOfWork(engine) as uow:
        results = await handlers.report_events(uow, held.recorded_worker, held.token, reported)
    assert [r.outcome for r in results] == [Outcome.RECORDED] * len(events), [r.message for r in results]
    return results


def components(held: Held, step: str, input: dict[str, Any], run_only: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "workflow": held.workflow, "step": step, "tool": "echo", "tool_version": "1",
        "spec": {"tool": "echo", "args": {}, "input": {"x": "$.input.x"}}, "input": input, "input_artifacts": [],
    }
    if run_only:
        out["run_id"] = held.run_id
    return out


async def upload(store: ArtifactStore, tenant: str, name: str, data: bytes) -> dict[str, Any]:
    async def chunks() -> AsyncIterator[bytes]:
        yield data

    sha256, size, uri = await store.put(tenant, chunks(), 1 << 20)
    return {"name": name, "uri": uri, "sha256": sha256, "size": size, "media_type": "text/plain"}


async def write(
    engine: AsyncEngine, layers: CacheLayers, held: Held, step: str, comps: dict[str, Any], *,
    scope: str = "global", ttl: float | None = None, artifacts: list[dict[str, Any]] | None = None,
    output: dict[str, Any] | None = None,
) -> Keys:
    """The step executes and succeeds with cache components: the store writes the entry, then Redis after commit."""
    keys = keys_for(comps, held.tenant)
    cache = {"components": comps, "scope": scope, "ttl_seconds": ttl,
             "key": keys.key, "base_key": keys.base_key, "display": keys.display}  # as the servicer keys it
    results = await report(
        engine, held,
        ("step.created", {"step_key": step, "tool": "echo", "depends_on": []}),
        ("step.started", {"step_key": step, "try": 1, "cache": {"key": keys.key, "reason": "no_entry"}}),
        ("step.succeeded", {"step_key": step, "output": output or {"made_by": held.run_id}, "try": 1,
                            "artifacts": artifacts or [], "cache": cache}),
    )
    await layers.after_report(results, held.tenant)
    return keys


async def lookup(
    engine: AsyncEngine, layers: CacheLayers, held: Held, step: str, comps: dict[str, Any], scope: str = "global"
) -> worker_service_pb2.LookupStepCacheResponse:
    request = worker_service_pb2.LookupStepCacheRequest(
        worker_id=held.worker, session_token=held.token, run_id=held.run_id, attempt=1, step_key=step, scope=scope,
    )
    request.components.update(comps)
    return await cache_service.lookup_step_cache(engine, layers, request, held.caller)


def cache_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == CACHE_LOG and r.levelno == logging.WARNING]


# --- PostgreSQL alone ---------------------------------------------------------------------------------


async def test_cold_hit_from_postgresql_alone(engine: AsyncEngine, cold: CacheLayers, store: ArtifactStore) -> None:
    """With REDIS_URL unset a second run with the same components hits the entry the first run wrote."""
    first = await hold(engine)
    art = await upload(store, "default", "out/report.txt", b"hello")
    keys = await write(engine, cold, first, "s", components(first, "s", {"x": 1}), artifacts=[art])
    second = await hold(engine)
    answer = await lookup(engine, cold, second, "s", components(second, "s", {"x": 1}))
    assert (answer.hit, answer.layer, answer.cache_key, answer.display) == (True, "cold", keys.key, keys.display)
    assert (answer.source_run_id, answer.source_step_key) == (first.run_id, "s")
    assert dict(answer.output) == {"made_by": first.run_id}
    assert [(a.name, a.sha256, a.size, a.run_id, a.step_key) for a in answer.artifacts] == [
        ("out/report.txt", art["sha256"], 5, first.run_id, "s")
    ]
    other = await lookup(engine, cold, second, "s", components(second, "s", {"x": 2}))
    assert (other.hit, other.miss_reason, other.layer) == (False, "no_entry", "")
    assert other.cache_key != keys.key


async def test_expired_entry_is_a_miss(engine: AsyncEngine, cold: CacheLayers) -> None:
    held = await hold(engine)
    keys = await write(engine, cold, held, "s", components(held, "s", {"x": 1}), ttl=60)
    now = handlers.utcnow()
    assert (await cold.lookup(engine, "default", keys, "global", now=now)).hit
    later = await cold.lookup(engine, "default", keys, "global", now=now + timedelta(seconds=120))
    assert (later.hit, later.reason) == (False, "expired")
    assert "expired at" in later.detail


async def test_artifact_missing_or_changed_turns_a_hit_into_a_miss(
    engine: AsyncEngine, cold: CacheLayers, store: ArtifactStore
) -> None:
    held = await hold(engine)
    kept = await upload(store, "default", "kept.txt", b"kept")
    gone = await upload(store, "default", "images/hero.png", b"png bytes")
    comps = components(held, "s", {"x": 1})
    await write(engine, cold, held, "s", comps, artifacts=[kept, gone])
    assert (await lookup(engine, cold, held, "s", comps)).hit
    path = Path(store.path("default", gone["sha256"]))
    path.write_bytes(b"png bytes, and more")  # the object no longer has the recorded size
    changed = await lookup(engine, cold, held, "s", comps)
    assert (changed.hit, changed.miss_reason, changed.detail) == (False, "artifact_changed", "images/hero.png")
    path.unlink()
    missing = await lookup(engine, cold, held, "s", comps)
    assert (missing.hit, missing.miss_reason, missing.detail) == (False, "artifact_missing", "images/hero.png")
    assert not missing.artifacts and not missing.source_run_id


async def test_run_only_scope_never_hits_across_runs(engine: AsyncEngine, cold: CacheLayers) -> None:
    first = await hold(engine)
    await write(engine, cold, first, "s", components(first, "s", {"x": 1}, run_only=True), scope="run_only")
    same_run = await lookup(engine, cold, first, "s", components(first, "s", {"x": 1}, run_only=True), "run_only")
    assert (same_run.hit, same_run.layer) == (True, "cold")
    second = await hold(engine)
    answer = await lookup(engine, cold, second, "s", components(second, "s", {"x": 1}, run_only=True), "run_only")
    assert (answer.hit, answer.miss_reason) == (False, "scope_run_only")
    assert first.run_id in answer.detail
    fresh = await lookup(engine, cold, second, "s", components(second, "s", {"x": 9}, run_only=True), "run_only")
    assert fresh.miss_reason == "no_entry"


async def test_another_tenant_never_sees_an_entry(engine: AsyncEngine, cold: CacheLayers) -> None:
    """Same components in another tenant: another key, no hit (global is global within one tenant)."""
    mine = await hold(engine)
    keys = await write(engine, cold, mine, "s", components(mine, "s", {"x": 1}))
    theirs = await hold(engine, tenant="acme")
    answer = await lookup(engine, cold, theirs, "s", components(theirs, "s", {"x": 1}))
    assert (answer.hit, answer.miss_reason) == (False, "no_entry")
    assert answer.cache_key != keys.key
    assert answer.cache_key == keys_for(components(theirs, "s", {"x": 1}), "acme").key


async def test_lookup_checks_its_request_and_the_holder(engine: AsyncEngine, cold: CacheLayers) -> None:
    held = await hold(engine)
    comps = components(held, "s", {"x": 1})
    with pytest.raises(InvalidRequest) as err:
        await lookup(engine, cold, held, "s", comps, scope="forever")
    assert err.value.violations[0][0] == "scope"
    with pytest.raises(InvalidRequest) as err:
        await lookup(engine, cold, held, "other", comps)
    assert err.value.violations[0][0] == "components.step"
    with pytest.raises(InvalidRequest) as err:
        await lookup(engine, cold, held, "s", {**comps, "surprise": 1})
    assert err.value.violations[0][0] == "components"
    with pytest.raises(InvalidRequest) as err:
        await lookup(engine, cold, held, "s", {**comps, "workflow": "someone.else"})
    assert err.value.violations[0][0] == "components.workflow"
    with pytest.raises(InvalidRequest) as err:
        await lookup(engine, cold, held, "s", comps, scope="run_only")  # no run id in the components
    assert err.value.violations[0][0] == "components.run_id"
    stranger = await hold(engine)
    with pytest.raises(PermissionDenied):
        await lookup(engine, cold, Held(held.run_id, held.workflow, "default", stranger.worker,
                                        stranger.recorded_worker, stranger.token, stranger.caller), "s", comps)


async def test_list_and_stats(engine: AsyncEngine, cold: CacheLayers, store: ArtifactStore) -> None:
    held = await hold(engine)
    art = await upload(store, "default", "a.txt", b"a")
    for step in ("a", "b", "c"):
        await write(engine, cold, held, step, components(held, step, {"x": 1}), artifacts=[art], ttl=3600)
    caller = Caller.anonymous()
    first = await cache_service.list_cache_entries(
        engine, run_service_pb2.ListCacheEntriesRequest(page_size=2), caller
    )
    assert [e.step_key for e in first.entries] == ["c", "b"] and first.next_page_token
    rest = await cache_service.list_cache_entries(
        engine, run_service_pb2.ListCacheEntriesRequest(page_size=2, page_token=first.next_page_token), caller
    )
    assert [e.step_key for e in rest.entries] == ["a"] and not rest.next_page_token
    entry = rest.entries[0]
    assert (entry.scope, entry.workflow, entry.source_run_id, entry.hit_count) == ("global", held.workflow,
                                                                                   held.run_id, 0)
    assert entry.HasField("expires_at") and entry.artifacts[0].sha256 == art["sha256"]
    only_b = await cache_service.list_cache_entries(engine, run_service_pb2.ListCacheEntriesRequest(step_key="b"),
                                                    caller)
    assert [e.step_key for e in only_b.entries] == ["b"]
    acme = Caller(key_id="client-acme", role="client", tenant_id="acme")
    assert not (await cache_service.list_cache_entries(engine, run_service_pb2.ListCacheEntriesRequest(), acme)).entries
    with pytest.raises(InvalidRequest) as err:
        await cache_service.list_cache_entries(
            engine, run_service_pb2.ListCacheEntriesRequest(page_token="not a token"), caller
        )
    assert err.value.violations[0][0] == "page_token"

    # GetStats' counters: a hit recorded as step.skipped, misses as step.started reasons.
    later = await hold(engine)
    hit = await lookup(engine, cold, later, "a", components(later, "a", {"x": 1}))
    await report(
        engine, later,
        ("step.created", {"step_key": "a", "tool": "echo", "depends_on": []}),
        ("step.skipped", {"step_key": "a", "reason": "cache_hit", "output": dict(hit.output),
                          "artifacts": [art], "source_run_id": hit.source_run_id, "source_step_key": "a",
                          "cache": {"key": hit.cache_key, "display": hit.display, "layer": hit.layer}}),
    )
    async with UnitOfWork(engine) as uow:
        hits, misses = await cache_service.cache_stats(uow, "default")
        assert await cache_service.cache_stats(uow, "acme") == ({}, {})
    assert (hits, misses) == ({"cold": 1}, {"no_entry": 3})
    again = await cache_service.list_cache_entries(engine, run_service_pb2.ListCacheEntriesRequest(step_key="a"),
                                                   caller)
    assert again.entries[0].hit_count == 1 and again.entries[0].HasField("last_hit_at")


# --- Redis in front -------------------------------------------------------------------------------------


async def test_promotion_then_hot_hit_with_the_remaining_ttl(
    engine: AsyncEngine, cold: CacheLayers, layers: CacheLayers, redis_server: RedisServer
) -> None:
    """An entry written while Redis was not in use: the first lookup hits PostgreSQL and promotes it."""
    held = await hold(engine)
    comps = components(held, "s", {"x": 1})
    keys = await write(engine, cold, held, "s", comps, ttl=600)
    name = redis_key("default", keys.key)
    assert redis_server.client().get(name) is None
    first = await lookup(engine, layers, held, "s", comps)
    assert (first.hit, first.layer) == (True, "cold")
    assert 0 < redis_server.client().pttl(name) <= 600_000
    second = await lookup(engine, layers, held, "s", comps)
    assert (second.hit, second.layer, second.source_run_id) == (True, "hot", held.run_id)
    assert dict(second.output) == dict(first.output)


async def test_a_report_writes_the_hot_layer_after_commit(
    engine: AsyncEngine, layers: CacheLayers, redis_server: RedisServer, store: ArtifactStore
) -> None:
    held = await hold(engine)
    art = await upload(store, "default", "x.bin", b"x" * 10)
    comps = components(held, "s", {"x": 1})
    keys = await write(engine, layers, held, "s", comps, artifacts=[art])  # no ttl: bounded in Redis all the same
    assert redis_server.client().get(redis_key("default", keys.key)) is not None
    assert redis_server.client().ttl(redis_key("default", keys.key)) > 0
    answer = await lookup(engine, layers, held, "s", comps)
    assert (answer.hit, answer.layer) == (True, "hot")
    assert [a.sha256 for a in answer.artifacts] == [art["sha256"]]
    # The hot layer checks the artifact store too.
    Path(store.path("default", art["sha256"])).unlink()
    gone = await lookup(engine, layers, held, "s", comps)
    assert (gone.hit, gone.miss_reason, gone.detail) == (False, "artifact_missing", "x.bin")


async def test_a_hot_copy_past_its_expiry_is_not_a_hit(engine: AsyncEngine, layers: CacheLayers) -> None:
    held = await hold(engine)
    keys = await write(engine, layers, held, "s", components(held, "s", {"x": 1}), ttl=60)
    now = handlers.utcnow()
    assert (await layers.lookup(engine, "default", keys, "global", now=now)).layer == "hot"
    later = await layers.lookup(engine, "default", keys, "global", now=now + timedelta(seconds=61))
    assert (later.hit, later.reason) == (False, "expired")


async def test_redis_stopped_falls_back_to_postgresql_with_one_warning(
    engine: AsyncEngine, layers: CacheLayers, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CACHE_LOG)
    held = await hold(engine)
    comps = components(held, "s", {"x": 1})
    await write(engine, layers, held, "s", comps)
    assert (await lookup(engine, layers, held, "s", comps)).layer == "hot"
    redis_server.stop()
    started = time.monotonic()
    answers = [await lookup(engine, layers, held, "s", comps) for _ in range(3)]
    assert time.monotonic() - started < 5  # bounded Redis calls, not a client's default timeouts
    assert [(a.hit, a.layer) for a in answers] == [(True, "cold")] * 3
    # Writing and invalidating during the outage never raise either.
    other = await write(engine, layers, held, "t", components(held, "t", {"x": 2}))
    assert await layers.invalidate(engine, "default", held.workflow, "t", None, None) == 1
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "PostgreSQL" in warnings[0].getMessage()

    redis_server.start()  # an empty Redis: the lost hot copies come back by promotion
    assert (await lookup(engine, layers, held, "s", comps)).layer == "cold"
    assert (await lookup(engine, layers, held, "s", comps)).layer == "hot"
    assert any("answers again" in r.getMessage() for r in caplog.records if r.name == CACHE_LOG)
    assert len(cache_warnings(caplog)) == 1
    assert redis_server.client().get(redis_key("default", other.key)) is None


async def test_hits_and_misses_are_logged_with_the_key(
    engine: AsyncEngine, cold: CacheLayers, caplog: pytest.LogCaptureFixture
) -> None:
    """Module `cache` (the logger is services.run_api.cache) logs each hit and miss with the key."""
    caplog.set_level(logging.INFO, logger=CACHE_LOG)
    held = await hold(engine)
    keys = await write(engine, cold, held, "s", components(held, "s", {"x": 1}))
    hit = await lookup(engine, cold, held, "s", components(held, "s", {"x": 1}))
    miss = await lookup(engine, cold, held, "s", components(held, "s", {"x": 2}))
    lines = [r.getMessage() for r in caplog.records if r.name == CACHE_LOG]
    assert f"cache hit {keys.display} from the cold layer (key {hit.cache_key})" in lines
    assert f"cache miss {miss.display}: no_entry (key {miss.cache_key})" in lines


async def test_invalidation_removes_entries_from_both_layers(
    engine: AsyncEngine, layers: CacheLayers, redis_server: RedisServer, sql: psycopg.Connection
) -> None:
    held = await hold(engine)
    comps = {step: components(held, step, {"x": 1}) for step in ("a", "b", "c")}
    keys = {step: await write(engine, layers, held, step, c) for step, c in comps.items()}
    client = redis_server.client()
    assert all(client.get(redis_key("default", k.key)) is not None for k in keys.values())
    caller = Caller.anonymous()

    with pytest.raises(InvalidRequest) as err:
        await cache_service.invalidate_cache(engine, layers, run_service_pb2.InvalidateCacheRequest(step_key="a"),
                                             caller)
    assert err.value.violations[0][0] == "workflow"

    one = await cache_service.invalidate_cache(
        engine, layers, run_service_pb2.InvalidateCacheRequest(workflow=held.workflow, step_key="a"), caller
    )
    assert one.removed == 1
    assert client.get(redis_key("default", keys["a"].key)) is None
    assert client.get(redis_key("default", keys["b"].key)) is not None
    assert (await lookup(engine, layers, held, "a", comps["a"])).miss_reason == "no_entry"
    assert (await lookup(engine, layers, held, "b", comps["b"])).layer == "hot"

    by_key = await cache_service.invalidate_cache(
        engine, layers, run_service_pb2.InvalidateCacheRequest(workflow=held.workflow, cache_key=keys["b"].key), caller
    )
    assert by_key.removed == 1
    rest = await cache_service.invalidate_cache(
        engine, layers, run_service_pb2.InvalidateCacheRequest(workflow=held.workflow), caller
    )
    assert rest.removed == 1
    assert all(client.get(redis_key("default", k.key)) is None for k in keys.values())
    assert sql.execute("SELECT count(*) FROM step_cache").fetchone() == (0,)
    rows = sql.execute("SELECT workflow, step_key, cache_key FROM cache_invalidations ORDER BY sequence").fetchall()
    assert rows == [(held.workflow, "a", None), (held.workflow, None, keys["b"].key), (held.workflow, None, None)]
    # A lookup that read the row just before an invalidation must not put its hot copy back.
    await layers._put("default", {"cache_key": keys["c"].key, "expires_at": None}, handlers.utcnow())
    assert client.get(redis_key("default", keys["c"].key)) is None


async def test_another_tenant_never_sees_a_hot_copy(engine: AsyncEngine, layers: CacheLayers) -> None:
    mine = await hold(engine)
    await write(engine, layers, mine, "s", components(mine, "s", {"x": 1}))
    assert (await lookup(engine, layers, mine, "s", components(mine, "s", {"x": 1}))).layer == "hot"
    theirs = await hold(engine, tenant="acme")
    answer = await lookup(engine, layers, theirs, "s", components(theirs, "s", {"x": 1}))
    assert (answer.hit, answer.miss_reason) == (False, "no_entry")


def test_a_malformed_redis_url_names_its_variable(store: ArtifactStore) -> None:
    from shared.settings import SettingsError

    with pytest.raises(SettingsError, match="REDIS_URL"):
        CacheLayers.from_settings(ApiSettings(redis_url="http://nope"), store)
    assert ApiSettings.from_env({"REDIS_URL": " redis://127.0.0.1:1/0 "}).redis_url == "redis://127.0.0.1:1/0"
    assert ApiSettings.from_env({}).redis_url is None



async def test_a_copy_promoted_while_another_replica_invalidates_is_dropped(
    engine: AsyncEngine, layers: CacheLayers, store: ArtifactStore, redis_server: RedisServer
) -> None:
    """Two API replicas share Redis and PostgreSQL. Replica A read a row and is about to promote it when
    replica B invalidates it (B deletes the row, then the hot copy A has not written yet). A's write lands
    after B's delete: A reads the row again after writing and drops its copy, so no stale hit survives."""
    other = CacheLayers.from_settings(ApiSettings(redis_url=redis_server.url), store)  # replica B
    try:
        held = await hold(engine)
        comps = components(held, "a", {"x": 1})
        keys = await write(engine, layers, held, "a", comps)
        client = redis_server.client()
        client.flushall()
        async with UnitOfWork(engine) as uow:  # what replica A read before B's invalidation
            row = (await uow.conn.execute(Q.step_cache_get, {"tenant_id": "default", "cache_key": keys.key})).one()
        removed = await cache_service.invalidate_cache(
            engine, other, run_service_pb2.InvalidateCacheRequest(workflow=held.workflow), Caller.anonymous()
        )
        assert removed.removed == 1
        entry = entry_of_row(row)
        await layers._put("default", entry, handlers.utcnow())  # A's promotion, after B's delete
        assert client.get(redis_key("default", keys.key)) is not None  # (the race the recheck closes)
        await layers._drop_if_gone(engine, "default", entry)
        assert client.get(redis_key("default", keys.key)) is None
        assert (await lookup(engine, layers, held, "a", comps)).miss_reason == "no_entry"
    finally:
        await other.close()
