"""Run events on NATS JetStream: the outbox publisher of the API process (on when RUNS_NATS_URL is set).

It tails the event log (`run_events`) in commit order from a checkpoint kept in PostgreSQL
(`outbox_checkpoints`, migration 0008) and publishes each event to JetStream on the subject
`runs.events.<workflow>.<type>` with the header `Nats-Msg-Id: <run_id>:<event_id>`, so JetStream drops a
message it already holds (within the stream's duplicate window, 2 minutes by default). The checkpoint
moves only after JetStream has acknowledged every message before it: at least once, in order per run,
nothing skipped across restarts of the API, of PostgreSQL or of NATS.

One publisher is active across API replicas and the processes of RUN_API_PROCESSES: the one whose
dedicated database session holds a session-level advisory lock (`pg_try_advisory_lock`). The others
keep their session open and try the lock again every STANDBY_SECONDS; the lock goes with the session
when its process dies (the session asks PostgreSQL for TCP keepalives, so a vanished host's lock is
freed within about half a minute, not hours).

**Commit order.** Each event row carries the id of the transaction that wrote it (`tx_id`). Rows with
a `tx_id` below the current snapshot's xmin are final: every transaction with a smaller id has ended,
so no row can still appear there. The tail reads those rows after the checkpoint's key (tx_id, run_id,
sequence), in that order, in batches.

**Order within a run.** Sequences of a run are gapless and assigned under the run's row lock, so the
events before sequence s were committed before the transaction writing s got the lock. But a
transaction B can get its id before another transaction A of the same run (B locked another run first)
and write its events after A committed: B's sequences are higher, its tx_id lower, and the tx_id order
would publish them first. So when a row's previous sequence has a higher tx_id (`behind`), the run's
earlier events that the tail has not reached yet are published first, in sequence order (they are
committed, as said), and their keys are stored with the checkpoint (`ahead`): when the tail reaches
them it skips them. Checking the previous sequence alone is enough: by induction, each event published
in tail order had every earlier event of its run published before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
import nats.js.errors
import psycopg
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from services.run_api.convert import _INTERNAL_PAYLOAD_KEYS
from services.run_api.listener import _sleep_or_stop as sleep_or_stop

log = logging.getLogger(__name__)

SUBJECT_PREFIX = "runs.events"
STREAM_SUBJECTS = f"{SUBJECT_PREFIX}.>"
STANDBY_SECONDS = 2.0  # how often a standby API process tries to become the publisher

Key = tuple[int, str, int]  # (tx_id, run_id, sequence): the tail's order

# Each event's message body is built by PostgreSQL (json keeps the keys in this order): the publisher
# only passes it on. Times in UTC, RFC 3339 with microseconds; the payload without the keys the API keeps
# for itself.
_COLUMNS = """e.tx_id::text AS tx, e.run_id, e.sequence, e.type, e.event_id, r.workflow, json_build_object(
    'event_id', e.event_id, 'run_id', e.run_id, 'sequence', e.sequence, 'type', e.type, 'attempt', e.attempt,
    'worker_id', e.worker_id,
    'occurred_at', to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    'recorded_at', to_char(e.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    'workflow', r.workflow, 'workflow_version', r.workflow_version, 'tenant_id', r.tenant_id,
    'workspace_id', r.workspace_id, 'payload', e.payload - CAST(%(internal)s AS text[]))::text AS body"""
INTERNAL = sorted(_INTERNAL_PAYLOAD_KEYS)
# The final rows after the checkpoint, in commit order, each with whether its run's previous event was
# written by a later transaction.
TAIL = f"""
SELECT {_COLUMNS}, p.tx_id > e.tx_id AS behind
FROM run_events e
LEFT JOIN run_events p ON p.run_id = e.run_id AND p.sequence = e.sequence - 1
LEFT JOIN runs r ON r.run_id = e.run_id
WHERE e.tx_id IS NOT NULL
  AND (e.tx_id, e.run_id COLLATE "C", e.sequence) > (%(tx)s::xid8, %(run_id)s COLLATE "C", %(sequence)s)
  AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY e.tx_id, e.run_id COLLATE "C", e.sequence
LIMIT %(limit)s
"""
# A run's events before `sequence` that the tail reaches later (written by later transactions).
EARLIER = f"""
SELECT {_COLUMNS}
FROM run_events e LEFT JOIN runs r ON r.run_id = e.run_id
WHERE e.run_id = %(run_id)s AND e.sequence < %(sequence)s AND e.tx_id > %(tx)s::xid8
ORDER BY e.sequence
"""
# The first start begins at "now": with the oldest running transaction, so nothing that commits later is missed.
CHECKPOINT_INIT = """
INSERT INTO outbox_checkpoints (name, tx_id, run_id, sequence)
VALUES (%(name)s, pg_snapshot_xmin(pg_current_snapshot()), '', 0)
ON CONFLICT (name) DO NOTHING
"""
CHECKPOINT_READ = "SELECT tx_id::text AS tx, run_id, sequence, ahead FROM outbox_checkpoints WHERE name = %(name)s"
CHECKPOINT_WRITE = """
UPDATE outbox_checkpoints
SET tx_id = %(tx)s::xid8, run_id = %(run_id)s, sequence = %(sequence)s, ahead = %(ahead)s, updated_at = now()
WHERE name = %(name)s
"""
TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended(%(lock)s, 0)) AS locked"

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def subject_tokens(name: str) -> str:
    """A dotted name as subject tokens: each part keeps letters, digits, '_' and '-' ('_' for the rest)."""
    return ".".join(_UNSAFE.sub("_", part) or "_" for part in name.split("."))


@functools.lru_cache(maxsize=4096)
def subject(workflow: str | None, event_type: str) -> str:
    """runs.events.<workflow>.<type>, e.g. runs.events.campaign.build.step.succeeded."""
    return f"{SUBJECT_PREFIX}.{subject_tokens(workflow or '_')}.{subject_tokens(event_type)}"


def msg_id(row: dict[str, Any]) -> str:
    """Nats-Msg-Id: event ids are unique within a run (a worker chooses them), so the run id goes first."""
    return f"{row['run_id']}:{row['event_id']}"


def redact(url: str) -> str:
    """A server URL without its user and password (for logs)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url


def key_of(row: dict[str, Any]) -> Key:
    """A row's place in the tail's order."""
    return (int(row["tx"]), row["run_id"], row["sequence"])


@dataclass(frozen=True)
class OutboxConfig:
    """Where to publish and how the publisher paces itself."""

    nats_url: str  # one URL or several, comma-separated
    stream: str = "RUNS"
    batch: int = 500  # events read per query
    poll_seconds: float = 0.2  # how often an idle publisher looks for new events
    standby_seconds: float = STANDBY_SECONDS
    retry_min_seconds: float = 0.2  # backoff after a failure, doubling up to the max
    retry_max_seconds: float = 5.0
    publish_timeout_seconds: float = 5.0  # wait for one acknowledgement
    runs_at_once: int = 64  # runs whose events are published concurrently (each run's one after another)

    @property
    def servers(self) -> list[str]:
        """The NATS server URLs."""
        return [s.strip() for s in self.nats_url.split(",") if s.strip()]

    @property
    def name(self) -> str:
        """The checkpoint's name, and the advisory lock's: one publisher per stream."""
        return f"nats:{self.stream}"


class Trouble:
    """Logs a failure once when it starts and once when it ends, not on every retry."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: datetime | None = None

    def failed(self, err: BaseException) -> None:
        """A failure: logged if it starts an outage."""
        if self.since is None:
            self.since = datetime.now(UTC)
            log.warning("outbox publisher: %s failed (%s: %s); retrying until it recovers",
                        self.what, type(err).__name__, str(err)[:200] or "no detail")
        else:
            log.debug("outbox publisher: %s still failing (%s)", self.what, type(err).__name__)

    def ok(self) -> None:
        """A success: logged if it ends an outage."""
        if self.since is not None:
            log.info("outbox publisher: %s recovered after %.1fs", self.what,
                     (datetime.now(UTC) - self.since).total_seconds())
            self.since = None


class OutboxPublisher:
    """The API process's outbox publisher; `run(stop)` until stop is set (supervised like the other loops)."""

    def __init__(self, config: OutboxConfig, conninfo: str) -> None:
        self.config = config
        self.conninfo = conninfo
        self.active = False  # this process holds the lock
        self.counters = {"published": 0, "duplicates": 0, "batches": 0, "early": 0}
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._stream_ready = False
        self._db = Trouble("the database")
        self._nats = Trouble(f"NATS ({', '.join(map(redact, self.config.servers))})")
        self._bug = Trouble("publishing")
        self._closing = False

    def metrics(self) -> dict[str, int]:
        """What /metrics shows of the publisher (runs_outbox_*)."""
        return {**self.counters, "active": int(self.active)}

    async def run(self, stop: asyncio.Event) -> None:
        """Hold a database session, take the lock when it is free, publish; reconnect after failures."""
        delay = self.config.retry_min_seconds
        try:
            while not stop.is_set():
                try:
                    await self._session(stop)
                    delay = self.config.retry_min_seconds
                except psycopg.Error as err:
                    self._db.failed(err)
                except Exception as err:  # never take the API down: log it once, start over from the checkpoint
                    if self._bug.since is None:
                        log.exception("outbox publisher: unexpected error")
                    self._bug.failed(err)
                if self.active and not stop.is_set():
                    log.info("outbox publisher: lost its database session; another API process may take over")
                    self.active = False
                if not stop.is_set():
                    await sleep_or_stop(stop, delay)
                    delay = min(delay * 2, self.config.retry_max_seconds)
        finally:
            await self._close_nats()

    async def _session(self, stop: asyncio.Event) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, row_factory=dict_row, connect_timeout=5,
            application_name=f"runs-outbox-{os.getpid()}",
            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
        )
        async with conn:
            # The server drops the session (and the lock with it) when this host stops answering.
            await conn.execute("SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; "
                               "SET tcp_keepalives_count = 3")
            self._db.ok()
            while not stop.is_set():
                locked = await (await conn.execute(TRY_LOCK, {"lock": f"runs.outbox:{self.config.name}"})).fetchone()
                if locked and locked["locked"]:
                    break
                await sleep_or_stop(stop, self.config.standby_seconds)
            else:
                return
            self.active = True
            log.info("outbox publisher active (pid %d): run events go to NATS stream %s",
                     os.getpid(), self.config.stream)
            await conn.execute(CHECKPOINT_INIT, {"name": self.config.name})
            await self._publish_loop(conn, stop)

    async def _publish_loop(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        row = await (await conn.execute(CHECKPOINT_READ, {"name": self.config.name})).fetchone()
        assert row is not None  # CHECKPOINT_INIT made it
        checkpoint: Key = key_of(row)
        ahead: set[Key] = {(int(t), r, s) for t, r, s in row["ahead"]}
        delay = self.config.retry_min_seconds
        while not stop.is_set():
            js = await self._ready(stop)
            if js is None:
                if self._nc is not None and self._nc.is_reconnecting:
                    # nats-py reconnects by itself; publishing meanwhile would only fill its buffer.
                    await sleep_or_stop(stop, self.config.poll_seconds)
                    continue
                await sleep_or_stop(stop, delay)
                delay = min(delay * 2, self.config.retry_max_seconds)
                continue
            rows = await (await conn.execute(TAIL, {
                "tx": str(checkpoint[0]), "run_id": checkpoint[1], "sequence": checkpoint[2],
                "limit": self.config.batch, "internal": INTERNAL,
            })).fetchall()
            if not rows:
                await sleep_or_stop(stop, self.config.poll_seconds)
                continue
            plan, last, still_ahead = await self._plan(conn, rows, ahead)
            try:
                await self._publish(js, plan)
            except (nats.errors.Error, TimeoutError, OSError) as err:
                self._nats.failed(err)
                self._stream_ready = False  # a NATS that came back empty needs its stream again
                await sleep_or_stop(stop, delay)
                delay = min(delay * 2, self.config.retry_max_seconds)
                continue  # from the checkpoint again: what was acknowledged comes again and JetStream drops it
            self._nats.ok()
            delay = self.config.retry_min_seconds
            await conn.execute(CHECKPOINT_WRITE, {
                "name": self.config.name, "tx": str(last[0]), "run_id": last[1], "sequence": last[2],
                "ahead": Jsonb([[str(t), r, s] for t, r, s in sorted(still_ahead)]),
            })
            checkpoint, ahead = last, still_ahead
            self.counters["batches"] += 1
            self._bug.ok()
            if len(rows) < self.config.batch:
                await sleep_or_stop(stop, self.config.poll_seconds)

    async def _plan(
        self, conn: psycopg.AsyncConnection[Any], rows: list[dict[str, Any]], ahead: set[Key]
    ) -> tuple[dict[str, list[dict[str, Any]]], Key, set[Key]]:
        """Each run's events to publish, in its sequence order; the batch's last key; the keys still ahead."""
        plan: dict[str, list[dict[str, Any]]] = {}
        ahead = set(ahead)
        for row in rows:
            if key_of(row) in ahead:
                continue  # published before its place in the tail, to keep its run's order
            if row["behind"]:
                earlier = await (await conn.execute(EARLIER, {
                    "run_id": row["run_id"], "sequence": row["sequence"], "tx": row["tx"], "internal": INTERNAL,
                })).fetchall()
                for early in earlier:
                    if key_of(early) not in ahead:
                        ahead.add(key_of(early))
                        plan.setdefault(row["run_id"], []).append(early)
                        self.counters["early"] += 1
            plan.setdefault(row["run_id"], []).append(row)
        last = key_of(rows[-1])
        return plan, last, {k for k in ahead if k > last}

    async def _publish(self, js: JetStreamContext, plan: dict[str, list[dict[str, Any]]]) -> None:
        """Publish every run's events, runs concurrently, each run's in order (the next after the last's ack)."""
        gate = asyncio.Semaphore(self.config.runs_at_once)

        async def one_run(events: list[dict[str, Any]]) -> None:
            async with gate:
                for event in events:
                    ack = await js.publish(
                        subject(event["workflow"], event["type"]), event["body"].encode(),
                        timeout=self.config.publish_timeout_seconds, headers={"Nats-Msg-Id": msg_id(event)},
                    )
                    self.counters["published"] += 1
                    if ack.duplicate:
                        self.counters["duplicates"] += 1

        try:
            async with asyncio.TaskGroup() as group:
                for events in plan.values():
                    group.create_task(one_run(events))
        except BaseExceptionGroup as group_err:
            raise group_err.exceptions[0] from None

    async def _ready(self, stop: asyncio.Event) -> JetStreamContext | None:
        """The JetStream context once connected and the stream is there; None while NATS cannot be used."""
        try:
            if self._nc is None:
                self._nc = await self._connect(stop)
                if self._nc is None:
                    return None
                self._js = self._nc.jetstream()
                self._nats.ok()
            if not self._nc.is_connected or self._js is None:
                return None
            if not self._stream_ready:
                await self._ensure_stream(self._js)
                self._stream_ready = True
        except (nats.errors.Error, TimeoutError, OSError) as err:
            self._nats.failed(err)
            if self._nc is not None and self._nc.is_closed:
                self._nc = self._js = None
            return None
        return self._js

    async def _connect(self, stop: asyncio.Event) -> NatsClient | None:
        """Connect, trying until NATS answers (nats-py's own loop, which never gives up) or `stop` is set."""
        nc = NatsClient()
        connecting = asyncio.create_task(nc.connect(
            servers=self.config.servers,
            name=f"runs-outbox-{os.getpid()}",
            connect_timeout=2,
            allow_reconnect=True,
            max_reconnect_attempts=-1,  # the first connection too, and every reconnection after an outage
            reconnect_time_wait=0.5,  # type: ignore[arg-type]
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        ))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if connecting.done():
            connecting.result()
            return nc
        self._closing = True  # stopping: the aborted client's callbacks are not an outage
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        with contextlib.suppress(Exception):
            await nc.close()
        return None

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        """Create the stream (subjects runs.events.>) unless it exists; an existing one is used as it is."""
        try:
            info = await js.stream_info(self.config.stream)
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(name=self.config.stream, subjects=[STREAM_SUBJECTS])
                log.info("outbox publisher: created NATS stream %s for %s", self.config.stream, STREAM_SUBJECTS)
            except nats.js.errors.BadRequestError as err:
                # E.g. another stream already takes these subjects: publishing goes to that one.
                log.warning("outbox publisher: cannot create stream %s (%s); publishing to whichever stream "
                            "takes %s", self.config.stream, err.description, STREAM_SUBJECTS)
            return
        subjects = list(info.config.subjects or [])
        if STREAM_SUBJECTS not in subjects:
            log.warning("outbox publisher: stream %s exists with subjects %s (not %s); it is used as it is",
                        self.config.stream, subjects, STREAM_SUBJECTS)

    async def _on_error(self, err: Exception) -> None:
        if not self._closing:
            self._nats.failed(err)  # logged once per outage; nats-py calls this on every reconnect attempt

    async def _on_disconnected(self) -> None:
        if not self._closing:
            self._nats.failed(ConnectionError("disconnected"))

    async def _on_reconnected(self) -> None:
        self._nats.ok()

    async def _close_nats(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self._closing = True
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)
