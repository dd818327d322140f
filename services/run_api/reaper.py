"""The lease reaper: finds runs whose lease lapsed and applies the policy.

A run's lease lapses when its claim-time lease and its worker's heartbeat lease have both expired.
Then: a cancel was requested -> canceled; attempts left -> run.lease_expired + run.requeued (with
backoff); attempts spent (or policy `fail`) -> run.lease_expired + run.failed (stop reason
lease_expired). Exactly one reaper is active per cluster: each cycle runs under a transaction-level
advisory lock, and rows are taken with SKIP LOCKED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from services.run_api.errors import StoreUnavailable
from services.run_api.handlers import counted_attempts, utcnow
from services.run_api.interceptors import translate
from services.run_api.store import events as store
from services.run_api.store import queries as Q
from services.run_api.store.uow import UnitOfWork
from shared.backoff import backoff_seconds
from shared.events import EventType, StopReason

log = logging.getLogger(__name__)

# A run a reaper cycle ended: workflow, status, started_at (None if it never started), finished_at.
Ended = tuple[str, str, datetime | None, datetime]


@dataclass(frozen=True)
class ReaperConfig:
    """How often to look, how many runs per cycle, and what to do with an expired lease."""

    interval_seconds: float = 1.0
    batch_limit: int = 100
    policy: str = "requeue"
    forget_workers_after_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if self.interval_seconds <= 0 or self.batch_limit < 1:
            raise ValueError("interval_seconds must be positive and batch_limit at least 1")
        if self.policy not in ("requeue", "fail"):
            raise ValueError("policy must be requeue or fail")


class _BatchFailed(Exception):
    """Recording the expiry of these runs failed (the cause is chained)."""

    def __init__(self, run_ids: list[str]) -> None:
        super().__init__(f"{len(run_ids)} run(s)")
        self.run_ids = run_ids


class Reaper:
    """One loop: `run_once(now)` does the work, `run(stop)` repeats it every interval.

    A batch that fails is retried run by run, so one run that cannot be reaped never blocks the
    others; such a run is set aside for `quarantine_seconds`, counted in `counters["failures"]`,
    logged, and reported through `on_health(False)` until every run could be reaped again.

    `counters` also counts cycles (`cycles_ok`, `cycles_failed`) and what became of expired leases
    (`lease_expired`, `requeued`, `failed`, `canceled`); the metrics read them. `on_ended` is told of
    the runs a cycle ended, after its commit: (workflow, status, started_at, finished_at) each.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        config: ReaperConfig,
        on_health: Callable[[bool], Awaitable[None]] | None = None,
        quarantine_seconds: float = 60.0,
        on_ended: Callable[[list[Ended]], None] | None = None,
    ) -> None:
        self.engine = engine
        self.on_ended = on_ended
        self.config = config
        self.counters: Counter[str] = Counter()
        self.on_health = on_health
        self.quarantine_seconds = quarantine_seconds
        self.quarantine: dict[str, datetime] = {}  # run id -> when to try it again

    async def run_once(self, now: datetime | None = None) -> Counter[str]:
        """Reap what has expired by `now`; returns what was done (empty when another replica holds the lock)."""
        now = now or utcnow()
        self.quarantine = {r: until for r, until in self.quarantine.items() if until > now}
        try:
            try:
                done = await self._reap(now)
            except _BatchFailed as failure:
                done = Counter()
                for run_id in failure.run_ids:
                    try:
                        done.update(await self._reap(now, only=run_id))
                    except _BatchFailed as one:
                        self._set_aside(run_id, one.__cause__ or one, now)
        except Exception as err:
            self.counters["failures"] += 1
            self.counters["cycles_failed"] += 1
            await self._health(False)
            log.warning("reaper cycle failed: %s: %s", type(err).__name__, err)
            raise
        self.counters["cycles_ok"] += 1
        await self._health(not self.quarantine)
        return done

    def _set_aside(self, run_id: str, err: BaseException, now: datetime) -> None:
        self.counters["failures"] += 1
        self.quarantine[run_id] = now + timedelta(seconds=self.quarantine_seconds)
        log.error(
            "reaper could not record the lease expiry of a run (%s: %s); other runs go on, this one is tried "
            "again in %.0fs", type(err).__name__, err, self.quarantine_seconds, extra={"run_id": run_id},
        )

    async def _health(self, ok: bool) -> None:
        if self.on_health is not None:
            await self.on_health(ok)

    async def _reap(self, now: datetime, only: str | None = None) -> Counter[str]:
        done: Counter[str] = Counter()
        async with UnitOfWork(self.engine) as uow:
            if not (await uow.conn.execute(Q.reaper_try_lock)).scalar_one():
                return done
            if only is None:
                await uow.conn.execute(
                    Q.workers_forget_silent,
                    {"before": now - timedelta(seconds=self.config.forget_workers_after_seconds)},
                )
            params = {"now": now, "limit": self.config.batch_limit, "skip_run_ids": sorted(self.quarantine),
                      "only_run_id": only}
            ids = [r.run_id for r in (await uow.conn.execute(Q.run_find_expired_leases, params)).all()]
            if not ids:
                await uow.commit()
                return done
            ended: list[Ended] = []
            try:
                rows = await self._expire(uow, ids, now, done, ended)
                await uow.commit()
            except Exception as err:
                if isinstance(translate(err), StoreUnavailable):
                    raise  # the database is unreachable: nothing to set aside, the next cycle tries again
                raise _BatchFailed(ids) from err
        for row in rows:
            log.warning("lease expired", extra={"run_id": row.run_id, "worker_id": row.worker_id,
                                                "attempt": row.attempt})
        log.info("reaper cycle: %s", dict(done))
        self.counters.update(done)
        if self.on_ended is not None and ended:
            try:
                self.on_ended(ended)
            except Exception:
                log.exception("reaper: on_ended failed")
        return done

    async def _expire(
        self, uow: UnitOfWork, ids: list[str], now: datetime, done: Counter[str], ended: list[Ended]
    ) -> list[Any]:
        """Record the expiry of these runs' leases and what the policy makes of them (`ended`: runs it ends)."""
        rows = (await uow.conn.execute(Q.run_lock_many, {"run_ids": ids})).all()
        new: list[store.NewEvent] = []
        for row in rows:
            expired = {"worker_id": row.worker_id, "lease_expires_at": row.lease_expires_at.isoformat()}
            new.append(self._event(row.run_id, EventType.RUN_LEASE_EXPIRED, row.attempt, now, expired))
            error = f"lease expired: worker {row.worker_id} stopped heartbeating"
            if row.cancel_requested_at is not None:
                new.append(self._event(row.run_id, EventType.RUN_CANCELED, row.attempt, now,
                                       {"reason": "cancel requested; the worker was gone"}))
                done["canceled"] += 1
                ended.append((row.workflow, "CANCELED", row.started_at, now))
            elif self.config.policy == "fail" or counted_attempts(row) >= row.max_attempts:
                new.append(self._event(row.run_id, EventType.RUN_FAILED, row.attempt, now,
                                       {"error": error, "stop_reason": str(StopReason.LEASE_EXPIRED)}))
                done["failed"] += 1
                ended.append((row.workflow, "FAILED", row.started_at, now))
            else:
                delay = backoff_seconds(counted_attempts(row), row.retry_backoff_seconds, row.retry_backoff_max_seconds)
                new.append(self._event(row.run_id, EventType.RUN_REQUEUED, row.attempt, now, {
                    "reason": "lease_expired",
                    "error": error,
                    "next_attempt_at": (now + timedelta(seconds=delay)).isoformat(),
                }))
                done["requeued"] += 1
            done["lease_expired"] += 1
        await store.append(uow.conn, new, dedupe=False)
        return list(rows)

    @staticmethod
    def _event(run_id: str, type_: str, attempt: int, now: datetime, payload: dict[str, object]) -> store.NewEvent:
        return store.NewEvent(run_id, type_, attempt, store.new_event_id(), payload, occurred_at=now)

    async def run(self, stop: asyncio.Event) -> None:
        """Reap every interval until stopped; a failed cycle (database down) is retried next time."""
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception:
                pass  # logged, counted and reported to health by run_once; tried again next interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.interval_seconds)
