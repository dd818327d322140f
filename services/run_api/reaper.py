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
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from services.run_api.handlers import backoff_seconds, utcnow
from services.run_api.store import events as store
from services.run_api.store import queries as Q
from services.run_api.store.uow import UnitOfWork
from shared.events import EventType, StopReason

log = logging.getLogger(__name__)


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


class Reaper:
    """One loop: `run_once(now)` does the work, `run(stop)` repeats it every interval."""

    def __init__(self, engine: AsyncEngine, config: ReaperConfig) -> None:
        self.engine = engine
        self.config = config
        self.counters: Counter[str] = Counter()

    async def run_once(self, now: datetime | None = None) -> Counter[str]:
        """Reap what has expired by `now`; returns what was done (empty when another replica holds the lock)."""
        now = now or utcnow()
        done: Counter[str] = Counter()
        async with UnitOfWork(self.engine) as uow:
            if not (await uow.conn.execute(Q.reaper_try_lock)).scalar_one():
                return done
            await uow.conn.execute(
                Q.workers_forget_silent, {"before": now - timedelta(seconds=self.config.forget_workers_after_seconds)}
            )
            ids = [r.run_id for r in (
                await uow.conn.execute(Q.run_find_expired_leases, {"now": now, "limit": self.config.batch_limit})
            ).all()]
            if not ids:
                await uow.commit()
                return done
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
                elif self.config.policy == "fail" or row.attempt >= row.max_attempts:
                    new.append(self._event(row.run_id, EventType.RUN_FAILED, row.attempt, now,
                                           {"error": error, "stop_reason": str(StopReason.LEASE_EXPIRED)}))
                    done["failed"] += 1
                else:
                    delay = backoff_seconds(row.attempt, row.retry_backoff_seconds, row.retry_backoff_max_seconds)
                    new.append(self._event(row.run_id, EventType.RUN_REQUEUED, row.attempt, now, {
                        "reason": "lease_expired",
                        "error": error,
                        "next_attempt_at": (now + timedelta(seconds=delay)).isoformat(),
                    }))
                    done["requeued"] += 1
                done["lease_expired"] += 1
            await store.append(uow.conn, new, dedupe=False)
            await uow.commit()
        for row in rows:
            log.warning("lease expired", extra={"run_id": row.run_id, "worker_id": row.worker_id,
                                                "attempt": row.attempt})
        log.info("reaper cycle: %s", dict(done))
        self.counters.update(done)
        return done

    @staticmethod
    def _event(run_id: str, type_: str, attempt: int, now: datetime, payload: dict[str, object]) -> store.NewEvent:
        return store.NewEvent(run_id, type_, attempt, store.new_event_id(), payload, occurred_at=now)

    async def run(self, stop: asyncio.Event) -> None:
        """Reap every interval until stopped; a failed cycle (database down) is retried next time."""
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception as err:
                log.warning("reaper cycle failed: %s", type(err).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.interval_seconds)
