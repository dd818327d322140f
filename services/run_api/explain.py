"""ExplainRun: why a run is where it is, computed from the database in one call.

A QUEUED run: its place in its tenant's workspace queue (claim order: next_attempt_at, run_id),
whether it is due or backing off after a failed attempt, and the live workers (heartbeat lease not
expired) that serve its workspace, with or without the tools its workflow's steps invoke. A RUNNING
run: its holder, when the attempt was claimed, the holder's last heartbeat and lease, the steps
running now, a cancel request. A finished run: how it ended, the first failing step, the attempts.

At most four statements whatever the run's state: the run, its attempts (from its log), and for a
queued run the pinned spec and one row of queue and worker counts (runs_explain_queue), for a
running one one row of its holder and running steps (runs_explain_holder), for a finished one its
first failed step.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.run_api import convert, handlers
from services.run_api.auth import Caller
from services.run_api.store import queries as Q
from services.run_api.store.uow import UnitOfWork
from shared.events import RunStatus, attempt_text
from shared.gen.runs.v1 import run_service_pb2

MAX_WORKER_IDS = 20


@dataclass
class Queue:
    """Where a QUEUED run stands (QueueExplanation)."""

    workspace_id: str
    runs_ahead: int
    due_ahead: int
    due: bool
    next_attempt_at: datetime
    backoff_seconds: float
    live_workers: int
    live_workers_with_tools: int
    live_workers_tools_unknown: int
    free_slots: int
    live_workers_elsewhere: int
    tools_needed: list[str]
    tools_available: str
    worker_ids: list[str]


@dataclass
class Holder:
    """Who runs a RUNNING run (HolderExplanation)."""

    worker_id: str
    claimed_at: datetime | None
    last_heartbeat_at: datetime | None
    lease_expires_at: datetime | None
    worker_live: bool
    running_steps: list[str]
    cancel_requested: bool
    cancel_reason: str
    attempt: int
    max_attempts: int


@dataclass
class Ending:
    """How a finished run ended (EndingExplanation)."""

    finished_at: datetime | None
    stop_reason: str
    error: str
    failed_step: str
    failed_step_error: str


@dataclass
class Explanation:
    """ExplainRun's answer before it becomes a message."""

    run: Any
    state: str
    summary: str
    attempts: list[handlers.AttemptRecord]
    queue: Queue | None = None
    holder: Holder | None = None
    ending: Ending | None = None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else "-"


async def explain_run(uow: UnitOfWork, run_id: str, caller: Caller, now: datetime | None = None) -> Explanation:
    """Why the run is where it is (RunNotFound for a missing run or another tenant's, as GetRun)."""
    now = now or handlers.utcnow()
    row = await handlers.run_exists(uow, run_id, caller)  # checks run_id (INVALID_ARGUMENT) and visibility
    tries = await handlers.attempts(uow, run_id)
    if row.status == RunStatus.QUEUED:
        return await _queued(uow, row, tries, now)
    if row.status == RunStatus.RUNNING:
        return await _running(uow, row, tries, now)
    return await _finished(uow, row, tries)


async def _queued(uow: UnitOfWork, row: Any, tries: list[handlers.AttemptRecord], now: datetime) -> Explanation:
    needed = list(row.required_tools) if row.required_tools is not None else None
    if needed is None and row.spec_hash:  # queued before runs recorded the tools they need
        found = (await uow.conn.execute(Q.workflow_specs_by_hash, {"hashes": [row.spec_hash]})).first()
        needed = handlers.tools_needed(found.spec if found is not None else None, row.input)
    facts = (await uow.conn.execute(Q.runs_explain_queue, {
        "tenant_id": row.tenant_id, "workspace_id": row.workspace_id, "run_id": row.run_id,
        "next_attempt_at": row.next_attempt_at, "now": now, "tools": needed or [],
    })).one()
    due = row.next_attempt_at <= now
    if needed is None or row.required_tools is None:
        # unknown, or queued before tools were recorded: claims route it to any worker, whatever its tools
        available = "unknown" if needed is None or not facts.live_workers else "yes"
    elif facts.live_workers_with_tools:
        available = "yes"
    elif facts.live_workers_tools_unknown:
        available = "unknown"
    else:
        available = "no"
    queue = Queue(
        workspace_id=row.workspace_id, runs_ahead=facts.runs_ahead, due_ahead=facts.due_ahead, due=due,
        next_attempt_at=row.next_attempt_at,
        backoff_seconds=0.0 if due else (row.next_attempt_at - now).total_seconds(),
        live_workers=facts.live_workers, live_workers_with_tools=facts.live_workers_with_tools,
        live_workers_tools_unknown=facts.live_workers_tools_unknown, free_slots=int(facts.free_slots),
        live_workers_elsewhere=facts.live_workers_elsewhere, tools_needed=needed or [], tools_available=available,
        worker_ids=list(facts.worker_ids or [])[:MAX_WORKER_IDS],
    )
    return Explanation(row, "queued" if due else "backing_off", queue_summary(queue, row, tries), tries, queue=queue)


def queue_summary(queue: Queue, row: Any, tries: list[handlers.AttemptRecord]) -> str:
    """One line: why a queued run waits."""
    parts = []
    if not queue.due:
        last = tries[-1].error if tries else ""
        after = (f" after attempt {attempt_text(row.attempt, row.max_attempts, row.released_attempts)} failed"
                 if row.attempt else "")
        parts.append(f"backing off until {_when(queue.next_attempt_at)} ({queue.backoff_seconds:.0f}s){after}"
                     + (f": {last}" if last else ""))
        parts.append(f"then {_plural(queue.runs_ahead, 'run')} ahead in workspace {queue.workspace_id}")
    else:
        parts.append(f"waiting: {_plural(queue.runs_ahead, 'run')} ahead in workspace {queue.workspace_id}")
    if not queue.live_workers:
        elsewhere = (f" ({_plural(queue.live_workers_elsewhere, 'live worker')} serve other workspaces)"
                     if queue.live_workers_elsewhere else "")
        parts.append(f"no live worker serves workspace {queue.workspace_id}{elsewhere}")
        return "; ".join(parts)
    serve = "serves" if queue.live_workers == 1 else "serve"
    parts.append(f"{_plural(queue.live_workers, 'live worker')} {serve} it")
    if queue.tools_needed:
        tools = ", ".join(queue.tools_needed)
        if queue.tools_available == "no":
            parts.append(f"none of them declared the tools it needs ({tools}): it waits for a worker that has them")
        elif queue.tools_available == "unknown":
            parts.append(f"whether they have the tools it needs ({tools}) is unknown: they declared none "
                         "(such a worker takes any run)")
        else:
            verb = "has" if queue.live_workers_with_tools == 1 else "have"
            parts.append(f"{queue.live_workers_with_tools} of them {verb} the tools it needs ({tools})")
    else:
        parts.append("the tools it needs are unknown")
    if queue.free_slots == 0:
        parts.append("all their slots are busy")
    return "; ".join(parts)


async def _running(uow: UnitOfWork, row: Any, tries: list[handlers.AttemptRecord], now: datetime) -> Explanation:
    facts = (await uow.conn.execute(
        Q.runs_explain_holder, {"run_id": row.run_id, "worker_id": row.worker_id or "", "now": now}
    )).one()
    claimed = next((t.claimed_at for t in reversed(tries) if t.attempt == row.attempt), None) or row.started_at
    holder = Holder(
        worker_id=row.worker_id or "", claimed_at=claimed, last_heartbeat_at=facts.last_heartbeat_at,
        lease_expires_at=facts.lease_expires_at or row.lease_expires_at, worker_live=bool(facts.worker_live),
        running_steps=list(facts.running_steps or []), cancel_requested=row.cancel_requested_at is not None,
        cancel_reason=row.cancel_reason or "", attempt=row.attempt, max_attempts=row.max_attempts,
    )
    parts = [f"running on worker {holder.worker_id or '-'} since {_when(holder.claimed_at)} "
             f"(attempt {attempt_text(holder.attempt, holder.max_attempts, row.released_attempts)})"]
    if holder.running_steps:
        parts.append(f"on step {', '.join(holder.running_steps)}")
    parts.append(f"last heartbeat {_when(holder.last_heartbeat_at)}, lease until {_when(holder.lease_expires_at)}")
    if not holder.worker_live:
        parts.append("the holder's lease has expired: the run is requeued or failed when the lease is reaped")
    if holder.cancel_requested:
        parts.append("cancel requested" + (f": {holder.cancel_reason}" if holder.cancel_reason else ""))
    return Explanation(row, "running", "; ".join(parts), tries, holder=holder)


async def _finished(uow: UnitOfWork, row: Any, tries: list[handlers.AttemptRecord]) -> Explanation:
    failed = None
    if row.status != RunStatus.SUCCEEDED:
        failed = (await uow.conn.execute(Q.run_steps_first_failed, {"run_id": row.run_id})).first()
    ending = Ending(
        finished_at=row.finished_at, stop_reason=row.stop_reason or "", error=row.error or "",
        failed_step=failed.step_key if failed is not None else "",
        failed_step_error=(failed.error or "") if failed is not None else "",
    )
    status = str(row.status).lower()
    head = f"{status} at {_when(ending.finished_at)}"
    if ending.stop_reason:
        head += f" ({ending.stop_reason})"
    parts = [head + (f": {ending.error}" if ending.error else "")]
    if ending.failed_step:
        parts.append(f"step {ending.failed_step} failed" + (f": {ending.failed_step_error}"
                                                          if ending.failed_step_error else ""))
    parts.append(_plural(len(tries), "attempt"))
    return Explanation(row, "finished", "; ".join(parts), tries, ending=ending)


def to_message(explanation: Explanation) -> run_service_pb2.ExplainRunResponse:
    """The ExplainRunResponse of an explanation."""
    out = run_service_pb2.ExplainRunResponse(
        run=convert.run(explanation.run), state=explanation.state, summary=explanation.summary,
        attempts=[convert.attempt(a) for a in explanation.attempts],
    )
    if explanation.queue is not None:
        q = explanation.queue
        out.queue.CopyFrom(run_service_pb2.QueueExplanation(
            workspace_id=q.workspace_id, runs_ahead=q.runs_ahead, due_ahead=q.due_ahead, due=q.due,
            backoff_seconds=q.backoff_seconds, live_workers=q.live_workers,
            live_workers_with_tools=q.live_workers_with_tools, live_workers_tools_unknown=q.live_workers_tools_unknown,
            free_slots=q.free_slots, live_workers_elsewhere=q.live_workers_elsewhere, tools_needed=q.tools_needed,
            tools_available=q.tools_available, worker_ids=q.worker_ids,
        ))
        out.queue.next_attempt_at.FromDatetime(q.next_attempt_at)
    if explanation.holder is not None:
        h = explanation.holder
        out.holder.CopyFrom(run_service_pb2.HolderExplanation(
            worker_id=h.worker_id, worker_live=h.worker_live, running_steps=h.running_steps,
            cancel_requested=h.cancel_requested, cancel_reason=h.cancel_reason, attempt=h.attempt,
            max_attempts=h.max_attempts,
        ))
        for name in ("claimed_at", "last_heartbeat_at", "lease_expires_at"):
            if getattr(h, name) is not None:
                getattr(out.holder, name).FromDatetime(getattr(h, name))
    if explanation.ending is not None:
        e = explanation.ending
        out.ending.CopyFrom(run_service_pb2.EndingExplanation(
            stop_reason=e.stop_reason, error=e.error, failed_step=e.failed_step, failed_step_error=e.failed_step_error,
        ))
        if e.finished_at is not None:
            out.ending.finished_at.FromDatetime(e.finished_at)
    return out
