"""The event log and its projections: the only code that writes run_events, runs, run_steps, tool_calls.

Every append takes the run's row lock, assigns the next gapless sequence, checks that the event
fits the run's state and attempt (the fencing token), inserts it, and applies the projection in
the same transaction. Replaying the log through `apply` rebuilds the projections exactly.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection
from ulid import ULID

from services.run_api.errors import EventRejected, shorten
from services.run_api.store import queries as Q
from services.run_api.store import registry
from shared.events import STEP_DONE, EventType, RunStatus, StepStatus, StopReason, ToolCallStatus

CHANNEL_EVENTS = "runs_events"  # payload: run_id; wakes watchers of that run
CHANNEL_QUEUED = "runs_queued"  # payload: queued_key(tenant_id, workspace_id); wakes claimers
CHANNEL_WORKER = "runs_worker"  # payload: worker_id; a run of that worker ended, a slot is free
CHANNEL_CANCEL = "runs_cancel"  # payload: worker_id; a run that worker holds was asked to cancel

# The statuses a run must be in for each event type to be recorded.
ALLOWED_FROM: dict[str, frozenset[str]] = {
    EventType.RUN_CLAIMED: frozenset({RunStatus.QUEUED}),
    EventType.RUN_CANCEL_REQUESTED: frozenset({RunStatus.QUEUED, RunStatus.RUNNING}),
    EventType.RUN_CANCELED: frozenset({RunStatus.QUEUED, RunStatus.RUNNING}),
}
_RUNNING_ONLY = frozenset({RunStatus.RUNNING})
# Run-level events whose projection itself sets the run's last_sequence and updated_at.
RUN_PROJECTED = frozenset(
    {
        EventType.RUN_QUEUED,
        EventType.RUN_CLAIMED,
        EventType.RUN_STARTED,
        EventType.RUN_COMPLETED,
        EventType.RUN_FAILED,
        EventType.RUN_CANCELED,
        EventType.RUN_REQUEUED,
        EventType.RUN_CANCEL_REQUESTED,
    }
)


def queued_key(tenant_id: str, workspace_id: str) -> str:
    """The CHANNEL_QUEUED payload for a tenant's workspace."""
    return f"{tenant_id}/{workspace_id}"


def new_event_id() -> str:
    """A server-side event id."""
    return str(ULID())


@dataclass(frozen=True)
class NewEvent:
    """An event to append; the sequence and recorded_at are assigned by the store."""

    run_id: str
    type: str
    attempt: int
    event_id: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    worker_id: str | None = None
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class StoredEvent:
    """An event as the log holds it."""

    run_id: str
    sequence: int
    type: str
    attempt: int
    worker_id: str | None
    event_id: str
    occurred_at: datetime
    recorded_at: datetime
    payload: Mapping[str, Any]

    @classmethod
    def from_row(cls, row: Any) -> StoredEvent:
        """Build from a run_events row."""
        return cls(
            run_id=row.run_id,
            sequence=row.sequence,
            type=row.type,
            attempt=row.attempt,
            worker_id=row.worker_id,
            event_id=row.event_id,
            occurred_at=row.occurred_at,
            recorded_at=row.recorded_at,
            payload=row.payload or {},
        )


class Outcome(enum.Enum):
    """What became of one appended event."""

    RECORDED = "recorded"
    DUPLICATE = "duplicate"
    STALE = "stale"


@dataclass(frozen=True)
class AppendResult:
    """The outcome of one event of an append, with its sequence when recorded (or already recorded)."""

    event: NewEvent
    outcome: Outcome
    sequence: int = 0
    message: str = ""
    stored: StoredEvent | None = None


@dataclass
class _RunState:
    status: str
    attempt: int
    workspace_id: str
    worker_id: str | None
    last_sequence: int
    tenant_id: str = "default"


_STEP_EVENTS = frozenset(
    {EventType.STEP_CREATED, EventType.STEP_STARTED, EventType.STEP_SUCCEEDED, EventType.STEP_FAILED,
     EventType.STEP_SKIPPED, EventType.STEP_CANCELED}
)
_TOOL_EVENTS = frozenset({EventType.TOOL_INVOKED, EventType.TOOL_SUCCEEDED, EventType.TOOL_FAILED})
# The state a step must be in, in the event's attempt, for each step event (None: it must not exist yet).
_STEP_NEEDS: dict[str, frozenset[str] | None] = {
    EventType.STEP_CREATED: None,
    # A failed try is followed by the next one (step.failed with will_retry) in the same attempt.
    EventType.STEP_STARTED: frozenset({StepStatus.CREATED, StepStatus.FAILED}),
    EventType.STEP_SUCCEEDED: frozenset({StepStatus.RUNNING}),
    EventType.STEP_FAILED: frozenset({StepStatus.RUNNING}),
    EventType.STEP_SKIPPED: frozenset({StepStatus.CREATED, StepStatus.RUNNING}),
    EventType.STEP_CANCELED: frozenset({StepStatus.CREATED, StepStatus.RUNNING, StepStatus.FAILED}),
    EventType.TOOL_INVOKED: frozenset({StepStatus.RUNNING}),
}
_STEP_AFTER: dict[str, str] = {
    EventType.STEP_CREATED: StepStatus.CREATED,
    EventType.STEP_STARTED: StepStatus.RUNNING,
    EventType.STEP_SUCCEEDED: StepStatus.SUCCEEDED,
    EventType.STEP_FAILED: StepStatus.FAILED,
    EventType.STEP_SKIPPED: StepStatus.SKIPPED,
    EventType.STEP_CANCELED: StepStatus.CANCELED,
}


class _Steps:
    """The steps and tool calls of a batch's runs, moved along as the batch's events are decided.

    A step event must follow its step (started after created, finished after started) and a tool
    result must follow its invocation, all in the event's own attempt, or in an earlier attempt the
    same worker kept by re-adopting the run: a worker cannot record the end of a step that never
    started.
    """

    def __init__(self, steps: Sequence[Any], calls: Sequence[Any]) -> None:
        self.steps: dict[tuple[str, str], tuple[str, int]] = {
            (r.run_id, r.step_key): (r.status, r.attempt) for r in steps
        }
        self.calls: dict[tuple[str, str], tuple[str, int]] = {
            (r.run_id, r.tool_call_id): (r.status, r.attempt) for r in calls
        }
        self.readopted: set[tuple[str, int]] = set()

    @classmethod
    def from_locked(cls, rows: Sequence[Any]) -> _Steps:
        """From the rows of run_lock_many_for_report (each run's steps and calls as JSON arrays)."""
        out = cls([], [])
        for row in rows:
            out.steps.update({(row.run_id, key): (status, attempt) for key, status, attempt in row.steps})
            out.calls.update({(row.run_id, call): (status, attempt) for call, status, attempt in row.calls})
        return out

    async def load_readopted(self, conn: AsyncConnection, events: Sequence[NewEvent]) -> None:
        """Only when an event continues a step or call of an earlier attempt: was the run re-adopted since?"""
        earliest: dict[str, int] = {}
        for (run_id, _), (_, attempt) in [*self.steps.items(), *self.calls.items()]:
            earliest[run_id] = min(attempt, earliest.get(run_id, attempt))
        runs = sorted({e.run_id for e in events if e.run_id in earliest and earliest[e.run_id] < e.attempt})
        if runs:
            rows = (await conn.execute(Q.run_events_readopted, {"run_ids": runs})).all()
            self.readopted = {(r.run_id, r.attempt) for r in rows}

    def _held_since(self, run_id: str, since: int | None, attempt: int) -> bool:
        """Whether `since` is `attempt`, or every attempt after it up to `attempt` was a re-adoption."""
        if since is None or since > attempt:
            return False
        return all((run_id, a) in self.readopted for a in range(since + 1, attempt + 1))

    def problem(self, event: NewEvent) -> str | None:
        """Why `event` does not follow its step or tool call, or None when it does."""
        p, t = event.payload, event.type
        if t in _STEP_NEEDS:
            key = str(p.get("step_key", ""))
            status, attempt = self.steps.get((event.run_id, key), (None, None))
            if status in STEP_DONE:
                # Succeeded (or skipped) in this run already: it is never run again, in any attempt.
                return f"step {shorten(key)!r} is {status}; a done step takes no more events"
            current = status if self._held_since(event.run_id, attempt, event.attempt) else None
            needed = _STEP_NEEDS[t]
            if needed is None:
                return f"step {shorten(key)!r} was already created in attempt {event.attempt}" if current else None
            if current not in needed:
                state = f"is {current}" if current else "was never created"
                return f"step {shorten(key)!r} {state} in attempt {event.attempt}"
        if t == EventType.RUN_COMPLETED:
            # A run succeeds when every step has: never before a step's success is recorded.
            unfinished = sorted(k for (run, k), (status, _) in self.steps.items()
                                if run == event.run_id and status not in STEP_DONE)
            if unfinished:
                return f"run.completed while step {shorten(unfinished[0])!r} has not succeeded"
        if t == EventType.TOOL_INVOKED and (event.run_id, str(p.get("tool_call_id"))) in self.calls:
            return f"tool call {shorten(str(p.get('tool_call_id')))!r} was already invoked"
        if t in (EventType.TOOL_SUCCEEDED, EventType.TOOL_FAILED):
            call = str(p.get("tool_call_id", ""))
            status, attempt = self.calls.get((event.run_id, call), (None, None))
            if status != ToolCallStatus.INVOKED or not self._held_since(event.run_id, attempt, event.attempt):
                return f"tool call {shorten(call)!r} was not invoked (or has ended) in attempt {event.attempt}"
        return None

    def advance(self, event: NewEvent) -> None:
        """Move the step or tool call the way the projection will."""
        p, t = event.payload, event.type
        if t in _STEP_AFTER:
            self.steps[(event.run_id, str(p.get("step_key")))] = (_STEP_AFTER[t], event.attempt)
        elif t == EventType.TOOL_INVOKED:
            self.calls[(event.run_id, str(p.get("tool_call_id")))] = (ToolCallStatus.INVOKED, event.attempt)
        elif t in (EventType.TOOL_SUCCEEDED, EventType.TOOL_FAILED):
            status = ToolCallStatus.SUCCEEDED if t == EventType.TOOL_SUCCEEDED else ToolCallStatus.FAILED
            self.calls[(event.run_id, str(p.get("tool_call_id")))] = (status, event.attempt)


async def _load_steps(conn: AsyncConnection, events: Sequence[NewEvent]) -> _Steps:
    """The step and tool call state a batch's step and tool events are checked against."""
    runs = sorted({e.run_id for e in events if e.type in _STEP_EVENTS or e.type in _TOOL_EVENTS})
    if not runs:
        return _Steps([], [])
    calls = sorted({str(e.payload.get("tool_call_id")) for e in events if e.type in _TOOL_EVENTS})
    steps = (await conn.execute(Q.run_steps_state, {"run_ids": runs})).all()
    found = (await conn.execute(Q.tool_calls_state, {"run_ids": runs, "tool_call_ids": calls})).all() if calls else []
    return _Steps(steps, found)


def _clean(value: Any) -> Any:
    """PostgreSQL's jsonb cannot hold U+0000: replace it in keys and strings (U+FFFD)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(_clean(value), separators=(",", ":"), default=str)


def _int(value: Any) -> int | None:
    """A whole number from a payload (Struct numbers arrive as floats), or None."""
    return None if value is None else int(value)


def _rows_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of a set-based statement as one JSON array (U+0000 replaced only when there is one)."""
    text = json.dumps(rows, separators=(",", ":"), default=str)
    if "\\u0000" in text:
        text = json.dumps(_clean(rows), separators=(",", ":"), default=str)
    return text


def _ts(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _check(state: _RunState | None, event: NewEvent) -> str | None:
    """Why `event` may not be recorded for a run in `state`, or None when it may."""
    if state is None:
        return "run not found"
    if event.type == EventType.RUN_CLAIMED:
        if state.status != RunStatus.QUEUED:
            return f"run is {state.status}, not QUEUED"
        if event.attempt != state.attempt + 1:
            return f"claim attempt {event.attempt} does not follow attempt {state.attempt}"
        return None
    allowed = ALLOWED_FROM.get(event.type, _RUNNING_ONLY)
    if event.worker_id is not None and event.type == EventType.RUN_CANCELED:
        allowed = _RUNNING_ONLY  # a worker cancels only the attempt it runs; queued runs are the API's
    if state.status not in allowed:
        return f"run is {state.status}"
    if event.attempt != state.attempt:
        return f"attempt {event.attempt} is stale; the run is on attempt {state.attempt}"
    return None


def _advance(state: _RunState, type_: str, sequence: int, payload: Mapping[str, Any]) -> None:
    """Move the in-memory run state the way `apply` will move the row."""
    state.last_sequence = sequence
    if type_ == EventType.RUN_CLAIMED:
        state.status, state.attempt = RunStatus.RUNNING, state.attempt + 1
        state.worker_id = payload.get("worker_id")
    elif type_ == EventType.RUN_COMPLETED:
        state.status = RunStatus.SUCCEEDED
    elif type_ == EventType.RUN_FAILED:
        state.status = RunStatus.FAILED
    elif type_ == EventType.RUN_CANCELED:
        state.status = RunStatus.CANCELED
    elif type_ == EventType.RUN_REQUEUED:
        state.status, state.worker_id = RunStatus.QUEUED, None


def _queued_params(p: Mapping[str, Any]) -> dict[str, Any]:
    """The runs row a run.queued payload describes (live and in a replay alike)."""
    return {
        "tenant_id": p.get("tenant_id", "default"),
        "project_id": p.get("project_id", "default"),
        "created_by": p.get("created_by"),
        "workspace_id": p["workspace_id"],
        "workflow": p["workflow"],
        "input": _dumps(p.get("input", {})),
        "max_attempts": p["max_attempts"],
        "retry_backoff_seconds": p["retry_backoff_seconds"],
        "retry_backoff_max_seconds": p["retry_backoff_max_seconds"],
        "idempotency_key": p.get("idempotency_key"),
        "request_hash": p["request_hash"],
        "trace_context": _dumps(p.get("trace_context", {})),
        "workflow_version": p.get("workflow_version", 1),
        "spec_hash": p.get("spec_hash"),
        "trigger": p.get("trigger") or "start",
        "base_run_id": p.get("base_run_id"),
        "change_request": p.get("change_request"),
        "rebuild_rerun": p.get("rebuild_rerun"),
        "required_tools": p.get("required_tools"),
    }


async def queue_run(conn: AsyncConnection, event: NewEvent) -> Any | None:
    """Create a run from its run.queued event and return its row; None when its idempotency key is taken."""
    return (await queue_runs(conn, [event]))[0]


async def queue_runs(conn: AsyncConnection, events: Sequence[NewEvent]) -> list[Any | None]:
    """Create runs from their run.queued events in one statement; each one's row, or None when its
    idempotency key is taken (by an earlier run or an earlier event of the same batch)."""
    if not events:
        return []
    rows = [
        {"ord": i, "run_id": e.run_id, "event_id": e.event_id, "occurred_at": e.occurred_at,
         "payload": e.payload, **_queued_params(e.payload),
         "input": e.payload.get("input", {}), "trace_context": e.payload.get("trace_context", {})}
        for i, e in enumerate(events)
    ]
    keys = sorted({queued_key(row["tenant_id"], row["workspace_id"]) for row in rows})
    params = {"rows": _rows_json(rows), "channel_queued": CHANNEL_QUEUED, "queued_keys": keys}
    created = {row.run_id: row for row in (await conn.execute(Q.runs_queue_many, params)).all()}
    return [created.get(e.run_id) for e in events]


async def claim(
    conn: AsyncConnection, *, worker_id: str, session_token_hash: str | None, tenant_id: str, workspace_id: str,
    project_id: str | None, capacity: int, batch_limit: int, now: datetime, lease_expires_at: datetime,
    tools: Sequence[str] | None = None,
) -> tuple[Any, list[Any]]:
    """Claim due queued runs for a worker in one statement: (the worker's state, the claimed runs' rows).

    The rows are projected already (RUNNING, the next attempt, held by the worker); each run's
    run.claimed event is recorded with them and its watchers are notified. Nothing is claimed when
    the worker is full, its heartbeat lease lapsed, or `session_token_hash` is not its session's.
    With `tools` (what the worker declared) only runs whose required_tools are all among them are
    claimed; None claims any run.
    """
    rows = (
        await conn.execute(Q.runs_claim, {
            "worker_id": worker_id, "session_token_hash": session_token_hash, "tenant_id": tenant_id,
            "workspace_id": workspace_id, "project_id": project_id, "capacity": capacity,
            "batch_limit": batch_limit, "now": now, "lease_expires_at": lease_expires_at,
            "lease_text": lease_expires_at.isoformat(), "event_ids": [new_event_id() for _ in range(batch_limit)],
            "channel_events": CHANNEL_EVENTS, "tools": None if tools is None else sorted(set(tools)),
        })
    ).all()
    return rows[0], [row for row in rows if row.run_id is not None]


async def append(
    conn: AsyncConnection, events: Sequence[NewEvent], dedupe: bool = True, locked: Sequence[Any] | None = None
) -> list[AppendResult]:
    """Append events about existing runs, each checked against its run's state and attempt.

    One result per event, in order: RECORDED with its new sequence, DUPLICATE when its event_id is
    in the log already, STALE when its attempt or the run's state no longer allows it. Events the
    server makes itself carry fresh ids and may skip the duplicate check (`dedupe=False`). `locked`:
    the rows of run_lock_many_for_report when the caller has locked the runs already.
    """
    if not events:
        return []
    if locked is None:
        rows = (await conn.execute(Q.run_lock_many, {"run_ids": sorted({e.run_id for e in events})})).all()
        steps = await _load_steps(conn, events)
    else:
        rows, steps = list(locked), _Steps.from_locked(locked)
    await steps.load_readopted(conn, events)
    states: dict[str, _RunState] = {}
    for row in rows:
        states[row.run_id] = _RunState(
            status=row.status,
            attempt=row.attempt,
            workspace_id=row.workspace_id,
            worker_id=row.worker_id,
            last_sequence=row.last_sequence,
            tenant_id=row.tenant_id,
        )
    known: dict[tuple[str, str], int] = {}
    if locked is not None:  # run_lock_many_for_report found the reported event ids the log holds already
        known = {(row.run_id, event_id): sequence for row in rows for event_id, sequence in row.known}
    elif dedupe and states:
        pairs = sorted({(e.run_id, e.event_id) for e in events if e.run_id in states})
        params = {"run_ids": [r for r, _ in pairs], "event_ids": [e for _, e in pairs]}
        for row in (await conn.execute(Q.run_events_find_ids, params)).all():
            known[(row.run_id, row.event_id)] = row.sequence

    # Decide every event's fate and sequence first, then insert all recorded ones in one statement.
    results: list[AppendResult] = []
    accepted: list[tuple[int, NewEvent, int, dict[str, Any], str | None]] = []
    for index, event in enumerate(events):
        key = (event.run_id, event.event_id)
        if key in known:
            results.append(AppendResult(event, Outcome.DUPLICATE, sequence=known[key]))
            continue
        state = states.get(event.run_id)
        reason = _check(state, event)
        if reason is not None or state is None:
            results.append(AppendResult(event, Outcome.STALE, message=reason or "run not found"))
            continue
        problem = steps.problem(event)
        if problem is not None:
            # Nothing of the batch is inserted yet: refusing here records nothing.
            raise EventRejected(f"events[{index}] ({event.type}): {problem}; nothing was recorded")
        steps.advance(event)
        sequence = state.last_sequence + 1
        payload = dict(event.payload)
        holder = state.worker_id
        _advance(state, event.type, sequence, payload)
        known[key] = sequence
        accepted.append((len(results), event, sequence, payload, holder))
        results.append(AppendResult(event, Outcome.RECORDED, sequence=sequence))
    if not accepted:
        return results

    inserts: list[dict[str, Any]] = [
        {"run_id": e.run_id, "sequence": seq, "type": e.type, "attempt": e.attempt, "worker_id": e.worker_id,
         "event_id": e.event_id, "occurred_at": e.occurred_at, "payload": p}
        for _, e, seq, p, _ in accepted
    ]
    text = json.dumps(inserts, separators=(",", ":"), default=str)
    if "\\u0000" in text:  # jsonb cannot hold U+0000: the payloads are recorded (and returned) without it
        accepted = [(i, e, seq, _clean(p), holder) for i, e, seq, p, holder in accepted]
        for insert, (_, _, _, p, _) in zip(inserts, accepted, strict=True):
            insert["payload"] = p
        text = json.dumps(_clean(inserts), separators=(",", ":"), default=str)
    notices: set[tuple[str, str]] = set()
    for _, event, _, _, holder in accepted:
        notices.add((CHANNEL_EVENTS, event.run_id))
        if event.type == EventType.RUN_REQUEUED:
            notices.add((CHANNEL_QUEUED, queued_key(states[event.run_id].tenant_id, states[event.run_id].workspace_id)))
        if event.type == EventType.RUN_CANCEL_REQUESTED and event.attempt > 0 and holder:
            notices.add((CHANNEL_CANCEL, holder))
        if event.type in (EventType.RUN_COMPLETED, EventType.RUN_FAILED, EventType.RUN_CANCELED,
                          EventType.RUN_REQUEUED) and holder:
            notices.add((CHANNEL_WORKER, holder))
    channels = sorted(notices)  # sent at commit, whichever statement asks
    insert = {"rows": text, "channels": [c for c, _ in channels], "payloads": [p for _, p in channels]}
    stamped = {(row.run_id, row.sequence): row for row in (await conn.execute(Q.run_events_append_many, insert)).all()}
    last: dict[str, StoredEvent] = {}
    applied: list[StoredEvent] = []
    for index, event, sequence, payload, _ in accepted:
        row = stamped[(event.run_id, sequence)]
        stored = StoredEvent(
            run_id=event.run_id,
            sequence=sequence,
            type=event.type,
            attempt=event.attempt,
            worker_id=event.worker_id,
            event_id=event.event_id,
            occurred_at=row.occurred_at,
            recorded_at=row.recorded_at,
            payload=payload,
        )
        applied.append(stored)
        last[event.run_id] = stored
        results[index] = AppendResult(event, Outcome.RECORDED, sequence=sequence, stored=stored)
    await apply_many(conn, applied)
    await _touch_many(conn, list(last.values()))
    return results


def _row_of(event: StoredEvent) -> tuple[str, ...]:
    """The projection row an event changes: its run's, its step's or its tool call's."""
    p, t = event.payload, event.type
    if t in _STEP_EVENTS:
        return ("step", event.run_id, str(p.get("step_key")))
    if t in _TOOL_EVENTS:
        return ("call", event.run_id, str(p.get("tool_call_id")))
    return ("run", event.run_id)


@dataclass(frozen=True)
class _Folded:
    """A row's whole life in one batch, written once: a run started and completed, a step created, started
    and finished, a tool call invoked and finished (what a fast run reports in one call). The values are
    those the events would leave one at a time; replay with one event per page checks it."""

    kind: str
    row: tuple[str, ...]
    events: tuple[StoredEvent, ...]

    def values(self) -> dict[str, Any]:
        """The row's final values for the kind's statement."""
        first, last = self.events[0], self.events[-1]
        if self.kind == "run_done":
            status, reason = _RUN_ENDED[EventType(last.type)]
            p = last.payload
            return {"run_id": last.run_id, "attempt": last.attempt, "sequence": last.sequence,
                    "recorded_at": last.recorded_at, "started_at": first.recorded_at, "status": str(status),
                    "stop_reason": p.get("stop_reason") or str(reason), "error": p.get("error"),
                    "output": p.get("output")}
        if self.kind == "step_done":
            created, started = self.events[0].payload, self.events[1].payload
            done = _step_finished(last)
            begun = _cache_columns(started)
            return {**done, "created_at": first.recorded_at, "tool": created.get("tool", ""),
                    "depends_on": [str(d) for d in created.get("depends_on") or []],
                    "started_at": self.events[1].recorded_at, "try": _int(started.get("try")),
                    **{name: done[name] if done[name] is not None else begun[name] for name in begun}}
        invoked, ended = first.payload, last.payload
        call = ToolCallStatus.SUCCEEDED if last.type == EventType.TOOL_SUCCEEDED else ToolCallStatus.FAILED
        return {"run_id": first.run_id, "attempt": first.attempt, "recorded_at": first.recorded_at,
                "tool_call_id": invoked["tool_call_id"], "step_key": invoked.get("step_key", ""),
                "tool": invoked.get("tool", ""), "input": invoked.get("input", {}),
                "step_attempt": _int(invoked.get("try")) or 1, "status": str(call), "output": ended.get("output"),
                "error": ended.get("error"), "finished_at": last.recorded_at}


# The lives a batch folds: a row's events in the batch, exactly these types in this order.
_FOLDS: dict[str, tuple[frozenset[str], ...]] = {
    "run_done": (frozenset({EventType.RUN_STARTED}), frozenset({EventType.RUN_COMPLETED})),
    "step_done": (frozenset({EventType.STEP_CREATED}), frozenset({EventType.STEP_STARTED}),
                  frozenset({EventType.STEP_SUCCEEDED, EventType.STEP_FAILED})),
    "call_done": (frozenset({EventType.TOOL_INVOKED}), frozenset({EventType.TOOL_SUCCEEDED, EventType.TOOL_FAILED})),
}


def _fold(events: Sequence[StoredEvent]) -> list[StoredEvent | _Folded]:
    """The batch with each row whose events are a whole fold written as one item (at its last event's place)."""
    rows: dict[tuple[str, ...], list[int]] = {}
    for i, event in enumerate(events):
        rows.setdefault(_row_of(event), []).append(i)
    folded: dict[int, _Folded] = {}
    dropped: set[int] = set()
    for row, places in rows.items():
        kind = {"run": "run_done", "step": "step_done", "call": "call_done"}[row[0]]
        pattern = _FOLDS[kind]
        lives = tuple(events[i] for i in places)
        if len(lives) != len(pattern) or any(e.type not in want for e, want in zip(lives, pattern, strict=True)):
            continue
        if kind == "step_done" and lives[1].payload.get("try") is None:
            continue  # the try count would depend on the row's earlier value
        folded[places[-1]] = _Folded(kind, row, lives)
        dropped.update(places[:-1])
    return [folded.get(i, e) for i, e in enumerate(events) if i not in dropped]


def _rounds(events: Sequence[StoredEvent]) -> list[list[StoredEvent | _Folded]]:
    """Fold what can be folded, then split the batch into rounds, each holding at most one item per run,
    step and tool call row.

    A row's items land in successive rounds in log order; a run's failure or cancellation (which
    also ends its open steps) comes after every earlier event of the run's steps.
    """
    rounds: list[list[StoredEvent | _Folded]] = []
    next_round: dict[tuple[str, ...], int] = {}
    run_last: dict[str, int] = {}
    for item in _fold(events):
        row = item.row if isinstance(item, _Folded) else _row_of(item)
        run_id = row[1]
        index = next_round.get(row, 0)
        if isinstance(item, StoredEvent) and item.type in (EventType.RUN_FAILED, EventType.RUN_CANCELED):
            index = max(index, run_last.get(run_id, -1) + 1)
        next_round[row] = index + 1
        run_last[run_id] = max(run_last.get(run_id, -1), index)
        while len(rounds) <= index:
            rounds.append([])
        rounds[index].append(item)
    return rounds


async def _execute_many(conn: AsyncConnection, statement: Any, rows: list[dict[str, Any]], what: str,
                        check: bool = True) -> None:
    """One set-based statement over `rows`; each row must match exactly one row of the table when `check`."""
    if not rows:
        return
    result = await conn.execute(statement, {"rows": _rows_json(rows)})
    if check and result.rowcount != len(rows):
        runs = sorted({row["run_id"] for row in rows})[:3]
        raise RuntimeError(f"projection of {len(rows)} {what} event(s) matched {result.rowcount} rows (runs {runs})")


_RUN_ENDED = {
    EventType.RUN_COMPLETED: (RunStatus.SUCCEEDED, StopReason.COMPLETED),
    EventType.RUN_FAILED: (RunStatus.FAILED, StopReason.FAILED),
    EventType.RUN_CANCELED: (RunStatus.CANCELED, StopReason.CANCELED),
}


async def apply_many(conn: AsyncConnection, events: Sequence[StoredEvent]) -> None:
    """Apply stored events to the projections (live, right after their insert, or in a replay).

    The events are in log order per run. Each round runs one statement per kind of event in it, so
    a batch of many runs costs a few statements, not one per event.
    """
    for batch in _rounds(events):
        kinds: dict[str, list[dict[str, Any]]] = {}
        singles: list[StoredEvent] = []
        for event in batch:
            if isinstance(event, _Folded):
                kinds.setdefault(event.kind, []).append(event.values())
                if event.kind == "step_done":
                    singles.append(event.events[-1])  # its artifacts and cache entry, when it has them
                continue
            p, t = event.payload, event.type
            base = {"run_id": event.run_id, "attempt": event.attempt, "recorded_at": event.recorded_at}
            seq = {**base, "sequence": event.sequence}
            if t == EventType.RUN_QUEUED:
                singles.append(event)
            elif t == EventType.RUN_CLAIMED:
                kinds.setdefault("claimed", []).append(
                    {**seq, "worker_id": p.get("worker_id"), "lease_expires_at": _ts(p.get("lease_expires_at"))})
            elif t == EventType.RUN_STARTED:
                kinds.setdefault("started", []).append(seq)
            elif t in _RUN_ENDED:
                status, reason = _RUN_ENDED[EventType(t)]
                kinds.setdefault("finished", []).append({
                    **seq, "status": str(status), "stop_reason": p.get("stop_reason") or str(reason),
                    "error": p.get("error"),
                    "output": p.get("output") if t == EventType.RUN_COMPLETED else None,
                })
                if t != EventType.RUN_COMPLETED:
                    kinds.setdefault("run_ended", []).append({
                        "run_id": event.run_id, "recorded_at": event.recorded_at,
                        "reason": "canceled" if t == EventType.RUN_CANCELED else "run_failed"})
            elif t == EventType.RUN_REQUEUED:
                kinds.setdefault("requeued", []).append({
                    **seq, "next_attempt_at": _ts(p.get("next_attempt_at")) or event.recorded_at,
                    "error": p.get("error"), "released": p.get("reason") == "released"})
            elif t == EventType.RUN_CANCEL_REQUESTED:
                kinds.setdefault("cancel_requested", []).append(
                    {**seq, "reason": p.get("reason"), "requested_by": p.get("requested_by")})
            elif t == EventType.STEP_CREATED:
                kinds.setdefault("step_created", []).append({
                    **base, "step_key": p["step_key"], "tool": p.get("tool", ""),
                    "depends_on": [str(d) for d in p.get("depends_on") or []]})
            elif t == EventType.STEP_STARTED:
                kinds.setdefault("step_started", []).append(
                    {**base, "step_key": p["step_key"], "try": _int(p.get("try")), **_cache_columns(p)})
            elif t in _STEP_AFTER:
                kinds.setdefault("step_finished", []).append(_step_finished(event))
                singles.append(event)  # its artifacts and cache entry, when it has them
            elif t == EventType.TOOL_INVOKED:
                kinds.setdefault("call_invoked", []).append({
                    **base, "tool_call_id": p["tool_call_id"], "step_key": p.get("step_key", ""),
                    "tool": p.get("tool", ""), "input": p.get("input", {}),
                    "step_attempt": _int(p.get("try")) or 1})
            elif t in (EventType.TOOL_SUCCEEDED, EventType.TOOL_FAILED):
                ended = ToolCallStatus.SUCCEEDED if t == EventType.TOOL_SUCCEEDED else ToolCallStatus.FAILED
                kinds.setdefault("call_finished", []).append({
                    "run_id": event.run_id, "recorded_at": event.recorded_at, "tool_call_id": p["tool_call_id"],
                    "status": str(ended), "output": p.get("output"), "error": p.get("error")})
        for event in singles:
            if event.type == EventType.RUN_QUEUED:
                await conn.execute(Q.runs_project_queued, {
                    "run_id": event.run_id, "recorded_at": event.recorded_at, "sequence": event.sequence,
                    **_queued_params(event.payload)})
        for kind, statement in _MANY:
            rows = kinds.get(kind)
            if rows:
                await _execute_many(conn, statement, rows, kind, check=kind not in _UNCHECKED)
        for event in singles:
            if event.type != EventType.RUN_QUEUED:
                await _apply_step_extras(conn, event)


# The set-based statement of each kind, in the order a round runs them (a run's row before its steps').
_MANY: list[tuple[str, Any]] = [
    ("claimed", Q.runs_project_claimed_many),
    ("started", Q.runs_project_started_many),
    ("finished", Q.runs_project_finished_many),
    ("requeued", Q.runs_project_requeued_many),
    ("cancel_requested", Q.runs_project_cancel_requested_many),
    ("run_ended", Q.run_steps_project_run_ended_many),
    ("run_done", Q.runs_project_done_many),
    ("step_done", Q.run_steps_project_done_many),
    ("call_done", Q.tool_calls_project_done_many),
    ("step_created", Q.run_steps_project_created_many),
    ("step_started", Q.run_steps_project_started_many),
    ("step_finished", Q.run_steps_project_finished_many),
    ("call_invoked", Q.tool_calls_project_invoked_many),
    ("call_finished", Q.tool_calls_project_finished_many),
]
# Kinds whose rows may match none or many table rows (the step and tool events always matched one
# row each before; a run's end cancels however many of its steps were still open).
_UNCHECKED = frozenset({"run_ended", "step_created", "step_started", "step_finished", "call_finished"})


async def _touch_many(conn: AsyncConnection, last: Sequence[StoredEvent]) -> None:
    """Set each run's last_sequence and updated_at from the last event applied to it."""
    await _execute_many(conn, Q.runs_project_sequence_many, [
        {"run_id": e.run_id, "attempt": e.attempt, "sequence": e.sequence, "recorded_at": e.recorded_at}
        for e in last if e.type not in RUN_PROJECTED
    ], "last-sequence")


def _cache_columns(p: Mapping[str, Any]) -> dict[str, Any]:
    """The run_steps cache columns a step event sets (None leaves a column as it is)."""
    cache = p.get("cache") if isinstance(p.get("cache"), Mapping) else {}
    assert isinstance(cache, Mapping)
    hit = p.get("reason") == "cache_hit"
    result = "hit" if hit else ("miss" if cache.get("reason") else None)
    return {
        "cache_key": cache.get("key"),
        "cache_display": cache.get("display"),
        "cache_result": result,
        "cache_reason": cache.get("layer") if hit else cache.get("reason"),
    }


def _step_finished(event: StoredEvent) -> dict[str, Any]:
    """The run_steps row values of step.succeeded / failed / skipped / canceled."""
    p, t = event.payload, event.type
    step_error = None
    if t == EventType.STEP_FAILED:
        step_error = {
            "code": p.get("code") or "tool_failed",
            "message": p.get("error") or "",
            "retryable": bool(p.get("retryable", False)),
            "tool": p.get("tool") or "",
            "attempt": p.get("try") or 0,
            "will_retry": bool(p.get("will_retry", False)),
        }
    return {
        "run_id": event.run_id, "attempt": event.attempt, "recorded_at": event.recorded_at,
        "step_key": p["step_key"],
        "status": str(_STEP_AFTER[t]),
        "error": p.get("error"),
        "output": p.get("output"),
        "step_error": step_error,
        "reason": p.get("reason"),
        **_cache_columns(p),
        "source_run_id": p.get("source_run_id"),
    }


async def _apply_step_extras(conn: AsyncConnection, event: StoredEvent) -> None:
    """A finished step's artifacts and step cache entry (or cache hit), when it has them."""
    p, t = event.payload, event.type
    base = {"run_id": event.run_id, "attempt": event.attempt, "recorded_at": event.recorded_at}
    if t in (EventType.STEP_SUCCEEDED, EventType.STEP_SKIPPED) and p.get("artifacts"):
        await conn.execute(
            Q.run_artifacts_project, {**base, "step_key": p["step_key"], "artifacts": _dumps(p["artifacts"])}
        )
    cache = p.get("cache")
    if t == EventType.STEP_SUCCEEDED and isinstance(cache, Mapping) and cache.get("key"):
        ttl = cache.get("ttl_seconds")
        components = cache.get("components") or {}
        await conn.execute(Q.step_cache_project_written, {
            "run_id": event.run_id, "step_key": p["step_key"], "recorded_at": event.recorded_at,
            "cache_key": cache["key"], "base_key": cache.get("base_key") or cache["key"],
            "scope": cache.get("scope") or "global", "workflow": components.get("workflow", ""),
            "display": cache.get("display") or "", "components": _dumps(components),
            "output": _dumps(p.get("output")), "artifacts": _dumps(p.get("artifacts") or []),
            "expires_at": event.recorded_at + timedelta(seconds=float(ttl)) if ttl else None,
        })
    if t == EventType.STEP_SKIPPED and p.get("reason") == "cache_hit" and isinstance(cache, Mapping):
        await conn.execute(Q.step_cache_project_hit, {"run_id": event.run_id, "cache_key": cache.get("key"),
                                                      "recorded_at": event.recorded_at})


async def replay(conn: AsyncConnection, page_size: int = 5000) -> int:
    """Rebuild workflows (from registry_events) and runs, run_steps, tool_calls, run_artifacts (from
    run_events); returns how many events were applied."""
    count = await registry.replay(conn)
    await conn.execute(Q.projections_clear)
    await conn.execute(Q.step_cache_clear)
    after = ("", 0)
    while True:
        rows = (
            await conn.execute(
                Q.run_events_page, {"after_run_id": after[0], "after_sequence": after[1], "limit": page_size}
            )
        ).all()
        if not rows:
            await _replay_cache(conn)
            return count
        page = [StoredEvent.from_row(row) for row in rows]
        await apply_many(conn, page)
        last: dict[str, StoredEvent] = {}
        for event in page:
            last[event.run_id] = event
        # A run whose events go on in the next page is touched again there; the last touch wins.
        await _touch_many(conn, list(last.values()))
        count += len(rows)
        after = (rows[-1].run_id, rows[-1].sequence)


async def _replay_cache(conn: AsyncConnection) -> None:
    """After the runs' events: apply the invalidations in order, then count each entry's hits again."""
    for row in (await conn.execute(Q.cache_invalidations_all)).all():
        await conn.execute(Q.step_cache_invalidate, {
            "tenant_id": row.tenant_id, "workflow": row.workflow, "step_key": row.step_key,
            "cache_key": row.cache_key, "recorded_at": row.recorded_at,
        })
    await conn.execute(Q.step_cache_recount_hits)
