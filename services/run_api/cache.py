"""The step cache: keys, the two layers (Redis hot, PostgreSQL cold), lookups and invalidation.

The event store writes the cold layer (step_cache) with the step.succeeded it comes from; this module
only reads it, writes Redis after commit, and records invalidations through the store.

Redis (`REDIS_URL`) is optional and never required for correctness: every Redis call is bounded by a
short timeout, and when Redis does not answer the cache works from PostgreSQL alone. One warning is
logged when an outage starts and one info line when Redis answers again; calls during an outage skip
Redis for `retry_seconds` at a time instead of waiting on it for every lookup.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from services.run_api.artifacts import ArtifactStore
from services.run_api.store import queries as Q
from services.run_api.store.events import AppendResult, Outcome
from services.run_api.store.uow import UnitOfWork
from shared.events import EventType
from shared.settings import ApiSettings, SettingsError
from shared.workflow import cache_display, cache_key

# Hits and misses are logged as module "cache" (the name people filter on, README "The step cache").
log = logging.getLogger("cache")

T = TypeVar("T")

# How long one Redis call may take before the hot layer counts as down (seconds).
REDIS_TIMEOUT_SECONDS = 0.25
# While Redis is down, how long calls skip it before trying again (seconds).
REDIS_RETRY_SECONDS = 1.0
# The longest a hot copy lives, even for an entry that never expires (a bound on what a lost
# invalidation could leave behind; the entry is promoted again from PostgreSQL on its next hit).
HOT_MAX_TTL_SECONDS = 24 * 3600
# After an invalidation, how long this process writes no hot copy of the keys it removed (a lookup or
# report that read the row just before the invalidation must not put it back).
TOMBSTONE_SECONDS = 5.0
# Keys whose hot copies an outage kept from being deleted, remembered until Redis answers again;
# past this many the whole hot namespace is cleared instead.
MAX_PENDING_DELETES = 100_000
REDIS_PREFIX = "runs:cache:"


@dataclass(frozen=True)
class Keys:
    """A step's cache key in a tenant, the key its components would have in scope global (base), and the display."""

    key: str
    base_key: str
    display: str


def component_problems(components: Any, step_key: str, scope: str, run_id: str, workflow: str) -> list[tuple[str, str]]:
    """What ties a step's key components to its run is wrong, as (field under components, description).

    One rule for lookups and for the entries step.succeeded writes: the components must name the run's
    workflow and the step, and a run (this run) exactly when the scope is run_only.
    """
    if not isinstance(components, Mapping):
        return [("", "components must be an object")]
    out: list[tuple[str, str]] = []
    if components.get("workflow") != workflow:
        out.append(("workflow", "components.workflow must be the run's workflow"))
    if components.get("step") != step_key:
        out.append(("step", "components.step must be the step's key"))
    if scope == "run_only" and components.get("run_id") != run_id:
        out.append(("run_id", "scope run_only: components.run_id must be the run's id"))
    if scope != "run_only" and "run_id" in components:
        out.append(("run_id", "scope global: components must not name a run"))
    return out


def keys_for(components: dict[str, Any], tenant: str) -> Keys:
    """The keys of a step's components in a tenant (the API's own computation: the worker sends components only)."""
    base = {k: v for k, v in components.items() if k != "run_id"}
    return Keys(cache_key(components, tenant), cache_key(base, tenant), cache_display(components))


def redis_key(tenant: str, key: str) -> str:
    """Where the hot copy of a tenant's entry lives in Redis."""
    return f"{REDIS_PREFIX}{tenant}:{key}"


@dataclass(frozen=True)
class LookupResult:
    """What a lookup found: a valid entry and its layer, or a miss with its reason (and detail)."""

    keys: Keys
    hit: bool
    layer: str = ""  # hot | cold, on a hit
    entry: Mapping[str, Any] | None = None  # on a hit: the entry (see entry_of_row)
    reason: str = ""  # no_entry | expired | artifact_missing | artifact_changed | scope_run_only, on a miss
    detail: str = ""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def entry_of_row(row: Any) -> dict[str, Any]:
    """A step_cache row as the JSON object the hot layer holds (and a lookup answers with)."""
    return {
        "cache_key": row.cache_key, "base_key": row.base_key, "scope": row.scope, "workflow": row.workflow,
        "step_key": row.step_key, "display": row.display, "output": row.output, "artifacts": row.artifacts or [],
        "source_run_id": row.source_run_id, "source_step_key": row.source_step_key,
        "created_at": _iso(row.created_at), "expires_at": _iso(row.expires_at),
    }


def _entry_of_event(result: AppendResult) -> dict[str, Any] | None:
    """The entry a recorded step.succeeded with cache keys wrote (as the projection wrote it), else None."""
    event, stored = result.event, result.stored
    cache = event.payload.get("cache")
    if (result.outcome is not Outcome.RECORDED or event.type != EventType.STEP_SUCCEEDED or stored is None
            or not isinstance(cache, Mapping) or not cache.get("key")):
        return None
    ttl = cache.get("ttl_seconds")
    components = cache.get("components") or {}
    return {
        "cache_key": cache["key"], "base_key": cache.get("base_key") or cache["key"],
        "scope": cache.get("scope") or "global", "workflow": components.get("workflow", ""),
        "step_key": event.payload["step_key"], "display": cache.get("display") or "",
        "output": event.payload.get("output"), "artifacts": list(event.payload.get("artifacts") or []),
        "source_run_id": event.run_id, "source_step_key": event.payload["step_key"],
        "created_at": _iso(stored.recorded_at),
        "expires_at": _iso(stored.recorded_at + timedelta(seconds=float(ttl)) if ttl else None),
    }


def _expires_at(entry: Mapping[str, Any]) -> datetime | None:
    value = entry.get("expires_at")
    return datetime.fromisoformat(value) if isinstance(value, str) else None


class CacheLayers:
    """The step cache's layers: Redis in front (optional), PostgreSQL (step_cache) behind it."""

    def __init__(
        self, store: ArtifactStore, redis: Any = None, timeout: float = REDIS_TIMEOUT_SECONDS,
        retry_seconds: float = REDIS_RETRY_SECONDS,
    ) -> None:
        self.store, self.redis = store, redis
        self.timeout, self.retry_seconds = timeout, retry_seconds
        self._down = False
        self._retry_at = 0.0
        self._pending: set[str] = set()  # hot copies to delete once Redis answers again
        self._clear_all = False  # too many pending: clear the whole namespace instead
        self._tombstones: dict[str, float] = {}

    @classmethod
    def from_settings(cls, settings: ApiSettings, store: ArtifactStore) -> CacheLayers:
        """The layers REDIS_URL asks for; unset: PostgreSQL only. A malformed URL fails naming REDIS_URL."""
        if not settings.redis_url:
            return cls(store)
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        try:
            client = Redis.from_url(
                settings.redis_url, socket_timeout=REDIS_TIMEOUT_SECONDS,
                socket_connect_timeout=REDIS_TIMEOUT_SECONDS, retry=Retry(NoBackoff(), 0),
            )
        except ValueError as err:
            raise SettingsError(f"REDIS_URL is not a Redis URL: {err}") from None
        return cls(store, client)

    @property
    def hot(self) -> bool:
        """Whether a hot layer is configured (it may still be down)."""
        return self.redis is not None

    async def close(self) -> None:
        """Close the Redis connections (safe to call twice)."""
        if self.redis is not None:
            await self.redis.aclose()

    # --- Redis, bounded and never raising ---------------------------------------------------------

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """(True, result) when Redis answered in time; (False, None) when it is absent or down."""
        if self.redis is None or (self._down and time.monotonic() < self._retry_at):
            return False, None
        try:
            result = await asyncio.wait_for(call(), self.timeout)
        except Exception as err:  # any failure of the hot layer falls back to PostgreSQL
            self._retry_at = time.monotonic() + self.retry_seconds
            if not self._down:
                self._down = True
                log.warning(
                    "Redis (the step cache's hot layer) does not answer (%s while %s): the cache works from "
                    "PostgreSQL until it does", type(err).__name__, what,
                )
            return False, None
        if self._down:
            self._down = False
            log.info("Redis (the step cache's hot layer) answers again")
            await self._flush_pending()
        return True, result

    async def _flush_pending(self) -> None:
        """Delete the hot copies an outage kept from being deleted (or the whole namespace past the bound)."""
        if self._clear_all:
            self._clear_all, self._pending = False, set()
            assert self.redis is not None
            redis = self.redis

            async def clear() -> int:
                keys = [k async for k in redis.scan_iter(match=f"{REDIS_PREFIX}*", count=1000)]
                return int(await redis.delete(*keys)) if keys else 0

            ok, _ = await self._call("clearing the hot layer after an outage", clear)
            self._clear_all = not ok
            return
        pending, self._pending = sorted(self._pending), set()
        await self._delete(pending)

    async def _delete(self, redis_keys: list[str]) -> None:
        assert self.redis is not None or not redis_keys
        for i in range(0, len(redis_keys), 1000):
            chunk = redis_keys[i : i + 1000]
            ok, _ = await self._call("deleting hot copies", functools.partial(self.redis.delete, *chunk))
            if not ok:
                self._pending.update(redis_keys[i:])
                if len(self._pending) > MAX_PENDING_DELETES:
                    self._pending, self._clear_all = set(), True
                return

    async def _get(self, tenant: str, key: str) -> dict[str, Any] | None:
        ok, raw = await self._call("reading an entry", lambda: self.redis.get(redis_key(tenant, key)))
        if not ok or raw is None:
            return None
        try:
            entry = json.loads(raw)
        except ValueError:
            log.warning("a hot copy in Redis is not JSON; it is ignored (key %s)", key)
            return None
        return entry if isinstance(entry, dict) and entry.get("cache_key") == key else None

    async def _put(self, tenant: str, entry: Mapping[str, Any], now: datetime) -> None:
        """Write a hot copy that lives as long as the entry has left (at most HOT_MAX_TTL_SECONDS)."""
        name = redis_key(tenant, entry["cache_key"])
        if self.redis is None or self._tombstones.get(name, 0.0) > time.monotonic():
            return
        expires = _expires_at(entry)
        ttl = HOT_MAX_TTL_SECONDS if expires is None else min((expires - now).total_seconds(), HOT_MAX_TTL_SECONDS)
        if ttl <= 0:
            return
        value = json.dumps(entry, separators=(",", ":"))
        await self._call("writing an entry", lambda: self.redis.set(name, value, px=max(1, int(ttl * 1000))))

    # --- the cache's operations ---------------------------------------------------------------------

    async def lookup(
        self, engine: AsyncEngine, tenant: str, keys: Keys, scope: str, now: datetime | None = None
    ) -> LookupResult:
        """A valid entry for `keys` in `tenant` (hot layer first, then cold), or a miss with its reason."""
        now = now or datetime.now(UTC)
        layer, entry = "hot", await self._get(tenant, keys.key)
        if entry is not None and (expires := _expires_at(entry)) is not None and expires <= now:
            entry = None  # a stale hot copy: PostgreSQL says what it is
        if entry is not None and not await self._still_current(engine, tenant, entry):
            # Invalidated or replaced meanwhile (perhaps while Redis was down, or on another replica).
            await self._delete([redis_key(tenant, keys.key)])
            entry = None
        if entry is None:
            layer = "cold"
            async with UnitOfWork(engine) as uow:
                row = (await uow.conn.execute(Q.step_cache_get, {"tenant_id": tenant, "cache_key": keys.key})).first()
                other = None
                if row is None and scope == "run_only":
                    params = {"tenant_id": tenant, "base_key": keys.base_key}
                    other = (await uow.conn.execute(Q.step_cache_by_base, params)).first()
            if row is None:
                if other is not None:
                    detail = f"run {other.source_run_id} has an entry; the scope is run_only"
                    return self._miss(keys, "scope_run_only", detail)
                return self._miss(keys, "no_entry")
            entry = entry_of_row(row)
            expires = _expires_at(entry)
            if expires is not None and expires <= now:
                return self._miss(keys, "expired", f"expired at {entry['expires_at']}")
        problem = await self._artifact_problem(tenant, entry)
        if problem is not None:
            return self._miss(keys, *problem)
        if layer == "cold":
            await self._put(tenant, entry, now)
            await self._drop_if_gone(engine, tenant, entry)
        log.info("cache hit %s from the %s layer (key %s)", keys.display, layer, keys.key)
        return LookupResult(keys, True, layer, entry)

    @staticmethod
    def _miss(keys: Keys, reason: str, detail: str = "") -> LookupResult:
        log.info("cache miss %s: %s%s (key %s)", keys.display, reason, f" ({detail})" if detail else "", keys.key)
        return LookupResult(keys, False, reason=reason, detail=detail)

    async def _artifact_problem(self, tenant: str, entry: Mapping[str, Any]) -> tuple[str, str] | None:
        """(artifact_missing | artifact_changed, the artifact's name) for the first artifact not as recorded."""
        artifacts = [a for a in entry.get("artifacts") or [] if isinstance(a, Mapping)]
        digests = sorted({str(a.get("sha256")) for a in artifacts})
        sizes = dict(zip(digests, await asyncio.gather(*(self._size(tenant, d) for d in digests)), strict=True))
        for item in artifacts:
            size = sizes[str(item.get("sha256"))]
            if size is None:
                return "artifact_missing", str(item.get("name"))
            if size != item.get("size"):
                return "artifact_changed", str(item.get("name"))
        return None

    async def _size(self, tenant: str, sha256: str) -> int | None:
        try:
            return await self.store.size(tenant, sha256)
        except ValueError:  # not a digest: nothing the store could hold
            return None

    async def after_report(
        self, results: Iterable[AppendResult], tenant: str, engine: AsyncEngine | None = None
    ) -> None:
        """After a report committed: a hot copy of each entry a recorded step.succeeded wrote."""
        if self.redis is None:
            return
        now = datetime.now(UTC)
        for result in results:
            entry = _entry_of_event(result)
            if entry is not None:
                await self._put(tenant, entry, now)
                if engine is not None:
                    await self._drop_if_gone(engine, tenant, entry)

    @staticmethod
    async def _still_current(engine: AsyncEngine, tenant: str, entry: Mapping[str, Any]) -> bool:
        """Whether PostgreSQL still holds the entry a hot copy was made from (a primary-key read of one column)."""
        async with UnitOfWork(engine) as uow:
            row = (await uow.conn.execute(
                Q.step_cache_created_at, {"tenant_id": tenant, "cache_key": entry["cache_key"]})).first()
        return row is not None and _iso(row.created_at) == entry.get("created_at")

    async def _drop_if_gone(self, engine: AsyncEngine, tenant: str, entry: Mapping[str, Any]) -> None:
        """Remove a hot copy just written if its row is gone or replaced meanwhile.

        An invalidation (in this process or another replica) deletes the row, then the hot copy: if it
        ran between our read of the row and our write of the copy, its delete came first. Reading the
        row again after the write closes that window for every interleaving.
        """
        if self.redis is not None and not await self._still_current(engine, tenant, entry):
            await self._delete([redis_key(tenant, entry["cache_key"])])

    async def invalidate(
        self, engine: AsyncEngine, tenant: str, workflow: str, step_key: str | None, key: str | None,
        requested_by: str | None,
    ) -> int:
        """Record an invalidation and remove the matching entries (PostgreSQL, then Redis); returns how many."""
        params = {"tenant_id": tenant, "workflow": workflow, "step_key": step_key, "cache_key": key}
        async with UnitOfWork(engine) as uow:
            # Exclusive against the reports writing entries of this workflow (they hold it shared from
            # before their events get a time): every entry is written wholly before or after this
            # invalidation's time, live and in a replay alike.
            await uow.conn.execute(Q.step_cache_write_lock, {"tenant_id": tenant, "workflow": workflow})
            recorded = (await uow.conn.execute(
                Q.cache_invalidations_append, {**params, "requested_by": requested_by}
            )).one()
            removed = list((await uow.conn.execute(
                Q.step_cache_invalidate, {**params, "recorded_at": recorded.recorded_at}
            )).scalars())
            await uow.commit()
        log.info("cache invalidated: %d entries of workflow %s%s%s", len(removed), workflow,
                 f" step {step_key}" if step_key else "", f" key {key}" if key else "")
        if self.redis is not None:
            # An explicit key goes from Redis even when PostgreSQL no longer had it.
            names = sorted({redis_key(tenant, k) for k in [*removed, *([key] if key else [])]})
            until = time.monotonic() + TOMBSTONE_SECONDS
            self._tombstones = {k: t for k, t in self._tombstones.items() if t > time.monotonic()}
            self._tombstones.update(dict.fromkeys(names, until))
            await self._delete(names)
        return len(removed)
