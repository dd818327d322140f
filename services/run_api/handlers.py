"""Command handlers: plain functions that do one thing inside a unit of work.

Servicers translate proto to these commands and results back to proto; only the store talks SQL.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from ulid import ULID

from services.run_api import registry
from services.run_api.auth import Caller, hash_secret
from services.run_api.cache import component_problems, keys_for
from services.run_api.checks import MAX_IDENTIFIER, check_identifier, check_text, page_bounds
from services.run_api.errors import (
    IdempotencyConflict,
    IllegalTransition,
    InvalidRequest,
    PermissionDenied,
    RequestTooLarge,
    shorten,
)
from services.run_api.payloads import MAX_REASON_CHARS
from services.run_api.store import events as store
from services.run_api.store import queries as Q
from services.run_api.store.uow import UnitOfWork
from shared.backoff import backoff_seconds
from shared.events import EventType, RunStatus, StepStatus
from shared.limits import MAX_JSON_DEPTH, json_depth
from shared.workflows import DEFAULT_WORKFLOW, TOOL_WORKFLOW, WorkflowInputError, plan

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 255
MAX_INPUT_BYTES = 256 * 1024
MAX_ATTEMPTS_LIMIT = 100
MAX_BACKOFF_SECONDS = 86400.0
# Claim streams: what a worker may ask for, clamped to these (documented in the README).
MIN_POLL_MS = 100
MAX_POLL_MS = 60_000
MAX_CAPACITY = 256
MAX_BATCH_LIMIT = 100


def utcnow() -> datetime:
    """The API's clock."""
    return datetime.now(UTC)


# --- commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartRun:
    """Queue a run of `workflow` with `input`."""

    workflow: str
    input: dict[str, Any]
    input_size: int
    idempotency_key: str = ""
    max_attempts: int = 0
    workspace_id: str = ""
    trace_context: dict[str, str] = field(default_factory=dict)
    retry_backoff_seconds: float = 0.0
    retry_backoff_max_seconds: float = 0.0
    project_id: str = ""
    workflow_version: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    """Server defaults for runs that do not set their own."""

    max_attempts: int = 3
    backoff_seconds: float = 1.0
    backoff_max_seconds: float = 60.0


@dataclass(frozen=True)
class Claim:
    """A worker asks for up to `batch_limit` runs within its free `capacity`."""

    worker_id: str
    workspace_id: str
    capacity: int
    batch_limit: int
    lease_seconds: float
    tenant_id: str = "default"
    project_id: str | None = None  # a worker key limited to a project claims only its runs
    session_token_hash: str | None = None  # the stream's session: claims stop once it is replaced
    # The tools the worker declared: it is handed only runs whose required_tools are all among them.
    # None (it declared none: an older client) takes any run, as before tools were routed.
    tools: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ReportedEvent:
    """One event a worker reports about a run it holds."""

    run_id: str
    attempt: int
    event_id: str
    type: str
    occurred_at: datetime | None
    payload: dict[str, Any]


# --- validation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a new run lives: tenant, project and workspace, after the key's limits."""

    tenant_id: str
    project_id: str
    workspace_id: str


def check_input_size(size: int) -> None:
    """Refuse an input over MAX_INPUT_BYTES, by its size on the wire (before it is converted at all)."""
    if size > MAX_INPUT_BYTES:
        raise RequestTooLarge([("input", f"input is {size} bytes; at most {MAX_INPUT_BYTES} bytes are accepted")])


def validate_start(cmd: StartRun, policy: RetryPolicy, caller: Caller) -> tuple[str, Placement, int]:
    """Check a StartRun command; returns (workflow, placement, max_attempts) with defaults applied."""
    violations: list[tuple[str, str]] = []
    workflow = cmd.workflow or DEFAULT_WORKFLOW
    check_input_size(cmd.input_size)
    check_text("workflow", cmd.workflow, limit=MAX_IDENTIFIER)
    check_text("idempotency_key", cmd.idempotency_key, limit=MAX_IDEMPOTENCY_KEY)
    for name in ("workspace_id", "project_id"):
        check_identifier(name, getattr(cmd, name))
    check_input_value(cmd.input)
    if workflow in (DEFAULT_WORKFLOW, TOOL_WORKFLOW):
        # The built-in one-step workflows check their input up front (the tool and its arguments).
        try:
            plan(workflow, cmd.input)
        except WorkflowInputError as err:
            violations.append((err.field, err.message))
    if cmd.workflow_version < 0:
        violations.append(("workflow_version", "workflow_version must be 0 (the latest) or a version number"))
    if cmd.max_attempts < 0 or cmd.max_attempts > MAX_ATTEMPTS_LIMIT:
        violations.append(("max_attempts", f"max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}"))
    for name in ("retry_backoff_seconds", "retry_backoff_max_seconds"):
        value = getattr(cmd, name)
        if not 0 <= value <= MAX_BACKOFF_SECONDS:
            violations.append((name, f"{name} must be between 0 and {MAX_BACKOFF_SECONDS:g} seconds"))
    if violations:
        raise InvalidRequest(violations)
    placement = Placement(
        tenant_id=caller.tenant_id,
        project_id=caller.scoped("project_id", cmd.project_id),
        workspace_id=caller.scoped("workspace_id", cmd.workspace_id),
    )
    return workflow, placement, cmd.max_attempts or policy.max_attempts


def check_input_value(run_input: Any, field: str = "input") -> None:
    """Refuse a run input that nests too deep or holds U+0000, naming `field`."""
    if json_depth(run_input) > MAX_JSON_DEPTH:
        raise InvalidRequest.field(field, f"{field} nests deeper than {MAX_JSON_DEPTH} levels")
    if _has_nul(run_input):
        raise InvalidRequest.field(field, f"{field} must not contain the character U+0000")


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def run_request_hash(
    workflow: str, place: Placement, run_input: dict[str, Any], max_attempts: int, backoff: float, cap: float,
    version: int = 0,
) -> str:
    """What identifies a run request (an idempotency key's reuse must match it): sha256 of its fields."""
    canonical = json.dumps(
        {
            "workflow": workflow,
            **({"workflow_version": version} if version else {}),
            "workspace_id": place.workspace_id,
            "project_id": place.project_id,
            "input": run_input,
            "max_attempts": max_attempts,
            "backoff": backoff,
            "cap": cap,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


# The step tool that invokes the tool named by the run's input (workflows/runtime.tool.yaml).
DISPATCH = "runtime.dispatch"


def tools_needed(spec: dict[str, Any] | None, run_input: Any) -> list[str] | None:
    """The distinct tools a workflow version's steps invoke, sorted (a runtime.dispatch step: the run's
    input.tool), or None when they cannot be known (no spec, or a dispatch step whose tool is not the
    run's input.tool). A run's required_tools, and what ExplainRun says a queued run needs."""
    if not spec or not isinstance(spec.get("steps"), list):
        return None
    out: set[str] = set()
    for step in spec["steps"]:
        tool = step.get("tool") if isinstance(step, dict) else None
        if not isinstance(tool, str):
            return None
        if tool == DISPATCH:
            named = run_input.get("tool") if isinstance(run_input, dict) else None
            expression = (step.get("input") or {}).get("tool") if isinstance(step.get("input"), dict) else None
            if expression != "input.tool" or not isinstance(named, str) or not named:
                return None
            tool = named
        out.add(tool)
    return sorted(out)


def queued_event(
    workflow: str, version: int, spec_hash: str | None, place: Placement, caller: Caller, run_input: dict[str, Any],
    max_attempts: int, backoff: tuple[float, float], request_hash: str, trace_context: dict[str, str],
    idempotency_key: str | None = None, required_tools: list[str] | None = None, **extra: Any,
) -> store.NewEvent:
    """A new run's run.queued event (StartRun's; a rebuild adds its fields through `extra`).

    `required_tools` (tools_needed of its pinned spec; None: unknown, any worker may take it) routes
    its claims: only a worker that declared all of them is handed the run.
    """
    return store.NewEvent(
        run_id=str(ULID()),
        type=EventType.RUN_QUEUED,
        attempt=0,
        event_id=store.new_event_id(),
        occurred_at=utcnow(),
        payload={
            "workflow": workflow,
            "workflow_version": version,
            "spec_hash": spec_hash,
            "tenant_id": place.tenant_id,
            "project_id": place.project_id,
            "workspace_id": place.workspace_id,
            "created_by": caller.key_id,
            "input": run_input,
            "max_attempts": max_attempts,
            "retry_backoff_seconds": backoff[0],
            "retry_backoff_max_seconds": backoff[1],
            "idempotency_key": idempotency_key,
            "request_hash": request_hash,
            "trace_context": trace_context,
            "required_tools": required_tools,
            **extra,
        },
    )


# --- run API -----------------------------------------------------------------------------------


MAX_START_RUNS = 1000  # requests in one StartRuns call


@dataclass(frozen=True)
class _Checked:
    """A StartRun command after validation: what queueing it needs."""

    cmd: StartRun
    workflow: str
    place: Placement
    max_attempts: int
    pinned: Any


async def _check_start(
    uow: UnitOfWork, cmd: StartRun, policy: RetryPolicy, caller: Caller, pins: dict[tuple[str, int], Any] | None = None
) -> _Checked:
    """Validate a StartRun command and pin its workflow version (`pins`: versions already looked up)."""
    workflow, place, max_attempts = validate_start(cmd, policy, caller)
    pins = {} if pins is None else pins
    if (workflow, cmd.workflow_version) not in pins:
        pins[(workflow, cmd.workflow_version)] = await registry.resolve_for_run(
            uow, workflow, cmd.workflow_version, place.tenant_id
        )
    return _Checked(cmd, workflow, place, max_attempts, pins[(workflow, cmd.workflow_version)])


def _queued(checked: _Checked, policy: RetryPolicy, caller: Caller) -> store.NewEvent:
    """A checked run's run.queued event."""
    cmd, place = checked.cmd, checked.place
    request_hash = run_request_hash(
        checked.workflow, place, cmd.input, checked.max_attempts, cmd.retry_backoff_seconds,
        cmd.retry_backoff_max_seconds, cmd.workflow_version,
    )
    backoff = (cmd.retry_backoff_seconds or policy.backoff_seconds,
               cmd.retry_backoff_max_seconds or policy.backoff_max_seconds)
    return queued_event(
        checked.workflow, checked.pinned.version, checked.pinned.spec_hash, place, caller, cmd.input,
        checked.max_attempts, backoff, request_hash, cmd.trace_context, idempotency_key=cmd.idempotency_key or None,
        required_tools=tools_needed(checked.pinned.spec, cmd.input),
    )


async def _queue(
    uow: UnitOfWork, checked: list[_Checked], policy: RetryPolicy, caller: Caller
) -> list[tuple[Any, bool]]:
    """Record checked runs' run.queued events in one statement (not committed); each (run row, deduplicated).

    A run whose idempotency key is taken is the run that holds it, when its request was the same;
    else IdempotencyConflict (`requests[i]: ` names which one, for more than one run).
    """
    events = [_queued(one, policy, caller) for one in checked]
    created = await store.queue_runs(uow.conn, events)
    out: list[tuple[Any, bool]] = []
    for i, (one, event, row) in enumerate(zip(checked, events, created, strict=True)):
        if row is not None:
            out.append((row, False))
            continue
        place, key, request_hash = one.place, event.payload["idempotency_key"], event.payload["request_hash"]
        existing = (
            await uow.conn.execute(
                Q.run_get_by_idempotency_key,
                {"tenant_id": place.tenant_id, "workspace_id": place.workspace_id, "key": key},
            )
        ).first()
        where = f"requests[{i}]: " if len(checked) > 1 else ""
        if existing is None:  # pragma: no cover - the conflicting row was committed before we looked
            raise IdempotencyConflict(f"{where}idempotency key is being used by a concurrent request; retry")
        if existing.request_hash != request_hash or not caller.sees(existing):
            # Another project's run is not named (nor returned): the caller may not see it.
            shown = f" (run {existing.run_id})" if caller.sees(existing) else ""
            raise IdempotencyConflict(
                f"{where}idempotency_key was already used for a different request{shown}; use a new key")
        out.append((existing, True))
    return out


async def start_run(uow: UnitOfWork, cmd: StartRun, policy: RetryPolicy, caller: Caller) -> tuple[Any, bool]:
    """Queue a run (run.queued) in the caller's tenant and return (run row, deduplicated)."""
    ((row, deduplicated),) = await _queue(uow, [await _check_start(uow, cmd, policy, caller)], policy, caller)
    await uow.commit()
    log.debug("run queued", extra={"run_id": row.run_id, "status": row.status})
    return row, deduplicated


def indexed_violations(i: int, err: InvalidRequest) -> list[tuple[str, str]]:
    """A StartRuns request's violations, each field under `requests[i]`."""
    return [(f"requests[{i}].{name}" if name else f"requests[{i}]", d) for name, d in err.violations]


async def start_runs(
    uow: UnitOfWork, cmds: list[StartRun], policy: RetryPolicy, caller: Caller
) -> list[tuple[Any, bool]]:
    """Queue many runs in one transaction: every request is checked first, and any problem refuses them all.

    Problems are field violations indexed by request (`requests[3].workflow`); an idempotency key
    reused for a different request refuses the call too (ALREADY_EXISTS naming the request).
    """
    if not cmds:
        raise InvalidRequest.field("requests", "give at least one request")
    if len(cmds) > MAX_START_RUNS:
        raise RequestTooLarge([("requests", f"at most {MAX_START_RUNS} requests per call; got {len(cmds)}")])
    checked: list[_Checked] = []
    violations: list[tuple[str, str]] = []
    too_large = False
    pins: dict[tuple[str, int], Any] = {}
    for i, cmd in enumerate(cmds):
        try:
            checked.append(await _check_start(uow, cmd, policy, caller, pins))
        except InvalidRequest as err:
            too_large = too_large or isinstance(err, RequestTooLarge)
            violations += indexed_violations(i, err)
    if violations:
        raise (RequestTooLarge if too_large else InvalidRequest)(violations)
    out = await _queue(uow, checked, policy, caller)
    await uow.commit()
    log.debug("runs queued", extra={"count": len(out)})
    return out


async def get_run(uow: UnitOfWork, run_id: str, caller: Caller) -> tuple[Any, list[Any], list[Any]]:
    """The run with its steps (and their artifacts) and tool calls."""
    row = await run_exists(uow, run_id, caller)
    steps = (await uow.conn.execute(Q.run_steps_for_run, {"run_id": run_id, "status": None})).all()
    calls = (await uow.conn.execute(Q.tool_calls_for_run, {"run_id": run_id})).all()
    return row, list(steps), list(calls)


def steps_summary(steps: list[Any]) -> dict[str, int]:
    """How many steps are in each state (pending: created, not started yet)."""
    out = {"total": len(steps), "pending": 0, "running": 0, "succeeded": 0, "failed": 0, "skipped": 0, "canceled": 0}
    names = {StepStatus.CREATED: "pending", StepStatus.RUNNING: "running", StepStatus.SUCCEEDED: "succeeded",
             StepStatus.FAILED: "failed", StepStatus.SKIPPED: "skipped", StepStatus.CANCELED: "canceled"}
    for step in steps:
        out[names[StepStatus(step.status)]] += 1
    return out


async def list_run_steps(uow: UnitOfWork, run_id: str, status: str | None, caller: Caller) -> list[Any]:
    """A run's steps, only those in `status` when given."""
    await run_exists(uow, run_id, caller)
    return list((await uow.conn.execute(Q.run_steps_for_run, {"run_id": run_id, "status": status})).all())


async def list_run_artifacts(uow: UnitOfWork, run_id: str, caller: Caller) -> list[Any]:
    """Every artifact of a run."""
    await run_exists(uow, run_id, caller)
    return list((await uow.conn.execute(Q.run_artifacts_for_run, {"run_id": run_id})).all())


MAX_QUERY_CHARS = MAX_IDEMPOTENCY_KEY
_ULID_CHARS = frozenset("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
_ULID_LENGTH = 26


def search_ranges(query: str) -> dict[str, str | None]:
    """The ranges ListRuns' text search reads: run ids starting with `query` (ULIDs: any case), and
    idempotency keys starting with it, in byte order ([key_low, key_high), the prefix's successor)."""
    upper = query.upper()
    run_low: str | None
    run_high: str | None
    if len(upper) <= _ULID_LENGTH and set(upper) <= _ULID_CHARS:
        run_low, run_high = upper, upper + "Z" * (_ULID_LENGTH - len(upper))
    else:
        run_low = run_high = None  # no run id can start with it
    high = query
    while high:
        code = ord(high[-1]) + 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates are no text: the next code point is U+E000
            code = 0xE000
        if code <= 0x10FFFF:
            high = high[:-1] + chr(code)
            break
        high = high[:-1]
    return {"run_low": run_low, "run_high": run_high, "key_low": query, "key_high": high or query + "\U0010ffff"}


async def list_runs(
    uow: UnitOfWork, caller: Caller, status: str | None, workflow: str | None, page_size: int, page_token: str,
    query: str = "",
) -> tuple[list[Any], str]:
    """A page of the caller's runs, newest first, and the token of the next page ('' on the last one).

    With `query`, only runs whose id or idempotency key starts with it (search_ranges).
    """
    size = page_bounds(page_size)
    check_text("workflow", workflow or "", limit=MAX_IDENTIFIER)
    check_text("query", query, limit=MAX_QUERY_CHARS)
    after = None
    if page_token:
        try:
            after = str(ULID.from_str(page_token))
        except (ValueError, TypeError):
            raise InvalidRequest.field("page_token", "page_token is not a valid page token") from None
    params = {"tenant_id": caller.tenant_id, "project_id": caller.project_id, "workspace_id": caller.workspace_id,
              "status": status, "workflow": workflow or None, "after_run_id": after, "limit": size + 1}
    query = query.strip()
    if query:
        rows = (await uow.conn.execute(Q.run_search, {**params, **search_ranges(query)})).all()
    else:
        rows = (await uow.conn.execute(Q.run_list, params)).all()
    next_token = rows[size - 1].run_id if len(rows) > size else ""
    return list(rows[:size]), next_token


async def cancel_run(uow: UnitOfWork, run_id: str, reason: str, caller: Caller) -> Any:
    """Cancel a queued run at once, or ask a running one to stop; terminal runs are refused."""
    check_identifier("run_id", run_id, required=True)
    check_text("reason", reason, limit=MAX_REASON_CHARS)
    row = caller.check_visible((await uow.conn.execute(Q.run_lock_many, {"run_ids": [run_id]})).first(), run_id)
    if row.status in (RunStatus.SUCCEEDED, RunStatus.FAILED):
        raise IllegalTransition(f"run {run_id} has already ended {row.status}; it cannot be canceled")
    if row.status == RunStatus.CANCELED or (row.status == RunStatus.RUNNING and row.cancel_requested_at):
        return row
    payload: dict[str, Any] = {"reason": reason or "canceled by request"}
    new = [store.NewEvent(run_id, EventType.RUN_CANCEL_REQUESTED, row.attempt, store.new_event_id(),
                          {**payload, "requested_by": caller.key_id}, occurred_at=utcnow())]
    if row.status == RunStatus.QUEUED:
        new.append(store.NewEvent(run_id, EventType.RUN_CANCELED, row.attempt, store.new_event_id(), payload,
                                  occurred_at=utcnow()))
    await store.append(uow.conn, new, dedupe=False)
    updated = (await uow.conn.execute(Q.run_get, {"run_id": run_id})).one()
    await uow.commit()
    log.info("cancel requested", extra={"run_id": run_id, "status": updated.status})
    return updated


async def events_after(uow: UnitOfWork, run_id: str, after_sequence: int, limit: int = 500) -> list[Any]:
    """A run's events after a sequence."""
    rows = await uow.conn.execute(
        Q.run_events_after, {"run_id": run_id, "after_sequence": after_sequence, "limit": limit}
    )
    return list(rows.all())


async def run_exists(uow: UnitOfWork, run_id: str, caller: Caller) -> Any:
    """The run row, or RunNotFound when it is missing or not the caller's to see."""
    check_identifier("run_id", run_id, required=True)
    return caller.check_visible((await uow.conn.execute(Q.run_get, {"run_id": run_id})).first(), run_id)


# --- worker sessions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Declared:
    """What a worker says about itself when its session opens (shown by ListWorkers and ExplainRun; its
    claims are routed by the tools its claim stream declares, Claim.tools)."""

    tools: tuple[str, ...] = ()
    capacity: int | None = None
    workspace_id: str | None = None


async def open_session(
    uow: UnitOfWork, worker_id: str, tenant_id: str, token: str, lease_seconds: float, now: datetime | None = None,
    declared: Declared | None = None,
) -> str:
    """Open or resume a worker's session; returns its secret token (the one given, when it resumes).

    A worker id whose session is live (heartbeat lease not lapsed, or runs still held) can only be
    resumed with its token: a client that knows only the id cannot take it over. What the worker
    `declared` is stored on its row (a new session also restarts its started_at).
    """
    declared = declared or Declared()
    now = now or utcnow()
    await uow.conn.execute(Q.workers_session_serialize, {"worker_id": worker_id})
    row = (await uow.conn.execute(Q.workers_session_lock, {"worker_id": worker_id})).first()
    resumed = (
        row is not None
        and bool(token)
        and row.session_token_hash is not None
        and hmac.compare_digest(row.session_token_hash, hash_secret(token))
    )
    if row is not None and (row.tenant_id != tenant_id or (not resumed and (row.lease_expires_at >= now or row.held))):
        raise PermissionDenied(
            f"worker id {shorten(worker_id)!r} belongs to a live session (its lease has not lapsed or it holds "
            "runs): give this worker another id, or wait until that session's lease lapses"
        )
    if not resumed:
        token = secrets.token_urlsafe(32)
    await uow.conn.execute(
        Q.workers_session_open,
        {"worker_id": worker_id, "tenant_id": tenant_id, "session_token_hash": hash_secret(token),
         "lease_expires_at": now + timedelta(seconds=lease_seconds), "now": now, "resumed": resumed,
         "tools": list(declared.tools) or None, "capacity": declared.capacity, "workspace_id": declared.workspace_id},
    )
    await uow.commit()
    if not resumed:
        log.info("worker session opened", extra={"worker_id": worker_id})
    return token


async def check_session(uow: UnitOfWork, worker_id: str, token: str) -> None:
    """Refuse (PERMISSION_DENIED) a heartbeat or report that does not carry the worker's session token."""
    row = (await uow.conn.execute(Q.workers_session_get, {"worker_id": worker_id})).first()
    _check_token(None if row is None else row.session_token_hash, token)


def _check_token(stored_hash: str | None, token: str) -> None:
    if not token or stored_hash is None or not hmac.compare_digest(stored_hash, hash_secret(token)):
        raise PermissionDenied(
            "no session of this worker matches the session token: open a ClaimQueuedRuns stream to get one"
        )


# --- worker API --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimResult:
    """What one claim pass found: the runs claimed, whether the worker was full, its cancel requests."""

    runs: list[Any]
    full: bool
    cancel_run_ids: list[str]
    steps: dict[str, list[Any]] = field(default_factory=dict)  # run id -> its steps, for resumed runs


async def claim_runs(uow: UnitOfWork, claim: Claim, now: datetime | None = None) -> ClaimResult:
    """Claim due queued runs with FOR UPDATE SKIP LOCKED, within the worker's free capacity (one statement)."""
    now = now or utcnow()
    worker, rows = await store.claim(
        uow.conn, worker_id=claim.worker_id, session_token_hash=claim.session_token_hash,
        tenant_id=claim.tenant_id, workspace_id=claim.workspace_id, project_id=claim.project_id,
        capacity=claim.capacity, batch_limit=claim.batch_limit, now=now,
        lease_expires_at=now + timedelta(seconds=claim.lease_seconds), tools=claim.tools,
    )
    if claim.session_token_hash is not None and worker.claim_session_token_hash != claim.session_token_hash:
        raise PermissionDenied("this worker's session was replaced or has ended: open a new claim stream")
    cancels = list(worker.claim_cancel_run_ids)
    if worker.claim_limit <= 0:
        return ClaimResult([], True, cancels)
    if not rows:
        return ClaimResult([], False, cancels)
    claimed = [SimpleNamespace(**{k: v for k, v in row._mapping.items() if not k.startswith("claim_")})
               for row in rows]
    # A resumed run gets what its earlier attempts left: done steps are not run again. A rebuild gets
    # its base run's steps too: those it does not re-execute are reused with their exact results.
    steps: dict[str, list[Any]] = {}
    resumed = [run.run_id for run in claimed if run.attempt > 1]
    bases = sorted({run.base_run_id for run in claimed if run.base_run_id})
    if resumed or bases:
        for step in (await uow.conn.execute(Q.run_steps_for_claims, {"run_ids": resumed + bases})).all():
            steps.setdefault(step.run_id, []).append(step)
    for run in claimed:
        if run.spec_hash is None:  # queued before workflows had versions: the built-in's first version
            pinned = (
                await uow.conn.execute(Q.workflow_get, {"tenant_id": run.tenant_id, "name": run.workflow, "version": 1})
            ).first()
            run.spec_hash = pinned.spec_hash if pinned is not None else None
    await uow.commit()
    for run in claimed:
        log.debug("run claimed", extra={"run_id": run.run_id, "worker_id": claim.worker_id, "attempt": run.attempt})
    return ClaimResult(claimed, False, cancels, steps)


_STATUS_AFTER: dict[str, str] = {
    EventType.RUN_COMPLETED: RunStatus.SUCCEEDED,
    EventType.RUN_FAILED: RunStatus.FAILED,
    EventType.RUN_CANCELED: RunStatus.CANCELED,
    EventType.RUN_REQUEUED: RunStatus.QUEUED,
}
_STOP_REASON: dict[str, str] = {
    EventType.RUN_COMPLETED: "completed",
    EventType.RUN_FAILED: "failed",
    EventType.RUN_CANCELED: "canceled",
}


def counted_attempts(run: Any) -> int:
    """The attempts of a runs row that count against its max_attempts: those a worker released while
    shutting down (given back, not failed) do not."""
    return int(run.attempt) - int(run.released_attempts or 0)


async def report_events(
    uow: UnitOfWork, worker_id: str, session_token: str, reported: list[ReportedEvent], now: datetime | None = None
) -> list[store.AppendResult]:
    """Append a worker's events in one transaction; a failed attempt with attempts left is re-queued.

    The session, the holder and the steps are checked first: a report that fails them records nothing.
    """
    now = now or utcnow()
    by_run: dict[str, list[str]] = {}
    for e in reported:
        by_run.setdefault(e.run_id, []).append(e.event_id)
    params = {"run_ids": sorted(by_run), "worker_id": worker_id, "event_ids_by_run": json.dumps(by_run)}
    locked = (await uow.conn.execute(Q.run_lock_many_for_report, params)).all()
    if locked:
        _check_token(locked[0].session_token_hash, session_token)
    else:
        await check_session(uow, worker_id, session_token)
    rows = {r.run_id: r for r in locked}
    await _check_holder(uow, worker_id, rows, reported)
    await _check_step_results(uow, rows, reported)
    new_events: list[store.NewEvent] = []
    for e in reported:
        event_type, payload = e.type, dict(e.payload)
        run = rows.get(e.run_id)
        if e.type == EventType.RUN_CANCELED and run is not None and run.cancel_reason:
            payload["reason"] = run.cancel_reason  # the reason the client gave, not the worker's wording
        elif e.type == EventType.RUN_FAILED and run is not None and run.cancel_requested_at is not None:
            # Asked to cancel: a failed or released attempt ends the run CANCELED, never a retry.
            event_type = EventType.RUN_CANCELED
            payload.setdefault("reason", run.cancel_reason or "canceled by request")
        elif e.type == EventType.RUN_FAILED and payload.get("released") is True:
            # Given back by a worker shutting down: due again at once, not the run's fault.
            event_type = EventType.RUN_REQUEUED
            payload.update({"reason": "released", "next_attempt_at": now.isoformat()})
        elif (
            e.type == EventType.RUN_FAILED
            and run is not None
            and payload.get("retryable", True) is not False
            and run.attempt == e.attempt
            and counted_attempts(run) < run.max_attempts
        ):
            delay = backoff_seconds(counted_attempts(run), run.retry_backoff_seconds, run.retry_backoff_max_seconds)
            event_type = EventType.RUN_REQUEUED
            payload.update(
                {"reason": "retry", "next_attempt_at": (now + timedelta(seconds=delay)).isoformat()}
            )
        new_events.append(
            store.NewEvent(
                run_id=e.run_id,
                type=event_type,
                attempt=e.attempt,
                event_id=e.event_id,
                payload=payload,
                worker_id=worker_id,
                occurred_at=e.occurred_at,
            )
        )
    results = await store.append(uow.conn, new_events, locked=locked)
    await uow.commit()
    stale = [r for r in results if r.outcome is store.Outcome.STALE]
    if stale:
        # One line per report, however many events it held (a report may carry thousands).
        log.warning(
            "refused %d stale event(s) about %d run(s): %s", len(stale), len({r.event.run_id for r in stale}),
            stale[0].message,
            extra={"run_id": stale[0].event.run_id, "worker_id": worker_id, "attempt": stale[0].event.attempt},
        )
    for r in results:
        if r.outcome is store.Outcome.RECORDED and r.event.type in (
            EventType.RUN_COMPLETED, EventType.RUN_FAILED, EventType.RUN_CANCELED, EventType.RUN_REQUEUED
        ):
            log.info(
                "run %s", r.event.type,
                extra={"run_id": r.event.run_id, "worker_id": worker_id, "attempt": r.event.attempt,
                       "status": _STATUS_AFTER.get(r.event.type),
                       "stop_reason": r.event.payload.get("stop_reason") or _STOP_REASON.get(r.event.type),
                       "error": r.event.payload.get("error")},
            )
    return results


async def _check_step_results(uow: UnitOfWork, rows: dict[str, Any], reported: list[ReportedEvent]) -> None:
    """Key the cache entries step.succeeded events write and check what step.skipped events reuse.

    An entry's components must name its run's workflow and step (and the run for run_only); the API
    computes the keys with the run's tenant. A skipped step's source must be a run of the same tenant,
    and a reused one the rebuild's base run. The entries' workflows are then locked shared, so an
    invalidation of one happens wholly before or after this report (see cache.CacheLayers.invalidate).
    """
    workflows: set[tuple[str, str]] = set()
    sources: dict[str, list[tuple[int, str]]] = {}
    for i, e in enumerate(reported):
        run = rows.get(e.run_id)
        if run is None:
            continue  # not a run this worker holds: the store refuses the event as stale
        where = f"events[{i}].payload"
        cache = e.payload.get("cache")
        if e.type == EventType.STEP_SUCCEEDED and isinstance(cache, dict):
            components = cache.get("components") or {}
            wrong = component_problems(components, str(e.payload.get("step_key")), str(cache.get("scope")),
                                       e.run_id, run.workflow)
            if wrong:
                raise InvalidRequest([(f"{where}.cache.components" + (f".{name}" if name else ""), d)
                                      for name, d in wrong])
            try:
                keys = keys_for(components, run.tenant_id)
            except ValueError as err:  # RFC 8785 refuses some numbers (e.g. integers past 2**53)
                raise InvalidRequest.field(f"{where}.cache.components", f"cannot be hashed: {err}") from None
            cache.update({"key": keys.key, "base_key": keys.base_key, "display": keys.display})
            workflows.add((run.tenant_id, run.workflow))
        if e.type == EventType.STEP_SKIPPED:
            source = e.payload.get("source_run_id")
            if e.payload.get("reason") == "reused_from_base" and source != run.base_run_id:
                raise InvalidRequest.field(f"{where}.source_run_id", "a reused step comes from the rebuild's base run")
            if source:
                sources.setdefault(run.tenant_id, []).append((i, str(source)))
    for tenant, named in sources.items():
        found = {r.run_id for r in await uow.conn.execute(
            Q.runs_of_tenant, {"tenant_id": tenant, "run_ids": sorted({s for _, s in named})})}
        for i, source in named:
            if source not in found:
                raise InvalidRequest.field(f"events[{i}].payload.source_run_id", "names no run of this tenant")
    for tenant, workflow in sorted(workflows):
        await uow.conn.execute(Q.step_cache_write_lock_shared, {"tenant_id": tenant, "workflow": workflow})


async def _claimers(uow: UnitOfWork, pairs: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """Which worker claimed each (run, attempt) pair (pairs never claimed are absent)."""
    found = await uow.conn.execute(
        Q.run_events_claimers, {"run_ids": [r for r, _ in pairs], "attempts": [a for _, a in pairs]}
    )
    return {(row.run_id, row.attempt): row.worker_id for row in found.all()}


async def _check_holder(uow: UnitOfWork, worker_id: str, rows: dict[str, Any], reported: list[ReportedEvent]) -> None:
    """Refuse the whole report (PERMISSION_DENIED, nothing recorded) if it is about an attempt this worker never held.

    A report must come from the run's current (or last) holder, or from the worker that claimed the
    attempt it names (a worker that lost the run: its report is then stale, not forged).
    """
    suspect = sorted(
        {
            (e.run_id, e.attempt)
            for e in reported
            if (run := rows.get(e.run_id)) is None or run.worker_id != worker_id
        }
    )
    if not suspect:
        return
    claimers = await _claimers(uow, suspect)
    foreign = [(run_id, attempt) for run_id, attempt in suspect if claimers.get((run_id, attempt)) != worker_id]
    if foreign:
        run_id, attempt = foreign[0]
        log.warning(
            "refused a report about %d run attempt(s) this worker never held", len(foreign),
            extra={"worker_id": worker_id, "run_id": shorten(run_id), "attempt": attempt},
        )
        raise PermissionDenied(
            f"this worker does not hold run {shorten(run_id)!r} attempt {attempt}; nothing was recorded"
        )


@dataclass(frozen=True)
class HeartbeatResult:
    """What a heartbeat tells the worker."""

    lease_expires_at: datetime
    cancel_run_ids: list[str]
    lost_run_ids: list[str]
    readopted: list[tuple[str, int]]


async def _requeued_for_lease(uow: UnitOfWork, run_id: str) -> bool:
    """Whether the run's last event re-queued it for an expired lease (not a retry or a release)."""
    row = (await uow.conn.execute(Q.run_events_last, {"run_id": run_id})).first()
    return row is not None and row.type == EventType.RUN_REQUEUED and row.reason == "lease_expired"


async def heartbeat(
    uow: UnitOfWork,
    worker_id: str,
    held: list[tuple[str, int]],
    lease_seconds: float,
    now: datetime | None = None,
) -> HeartbeatResult:
    """Extend the worker's lease (one row per worker) and say which held runs to cancel or drop.

    A held run whose lease lapsed and that was re-queued but not yet claimed again is adopted back
    by the worker that still runs it ("adopt first"), under a new attempt: only by the worker that
    claimed that attempt, so no other worker (or tenant) can take a run over this way.
    """
    if not worker_id:
        raise InvalidRequest.field("worker_id", "worker_id is required")
    now = now or utcnow()
    lease = now + timedelta(seconds=lease_seconds)
    await uow.conn.execute(
        Q.workers_heartbeat,
        {"worker_id": worker_id, "lease_expires_at": lease, "now": now, "held_run_ids": sorted({r for r, _ in held})},
    )
    cancel: list[str] = []
    lost: list[str] = []
    adopt: list[store.NewEvent] = []
    if held:
        attempts = dict(held)
        # A plain read: the adopt path below re-checks under the row lock when it appends.
        rows = {r.run_id: r for r in (await uow.conn.execute(Q.run_held_state, {"run_ids": sorted(attempts)})).all()}
        for run_id, attempt in sorted(attempts.items()):
            row = rows.get(run_id)
            if row is None:
                lost.append(run_id)
            elif row.status == RunStatus.RUNNING and row.attempt == attempt and row.worker_id == worker_id:
                if row.cancel_requested_at is not None:
                    cancel.append(run_id)
            elif (
                row.status == RunStatus.QUEUED
                and row.attempt == attempt
                and row.cancel_requested_at is None
                and row.attempt < row.max_attempts
                and await _requeued_for_lease(uow, run_id)
                and await _claimers(uow, [(run_id, attempt)]) == {(run_id, attempt): worker_id}
            ):
                adopt.append(
                    store.NewEvent(
                        run_id=run_id,
                        type=EventType.RUN_CLAIMED,
                        attempt=attempt + 1,
                        event_id=store.new_event_id(),
                        worker_id=worker_id,
                        occurred_at=now,
                        payload={"worker_id": worker_id, "lease_expires_at": lease.isoformat(), "readopted": True},
                    )
                )
            else:
                lost.append(run_id)
    readopted: list[tuple[str, int]] = []
    if adopt:
        for r in await store.append(uow.conn, adopt, dedupe=False):
            if r.outcome is store.Outcome.RECORDED:
                readopted.append((r.event.run_id, r.event.attempt))
                log.warning(
                    "worker re-adopted a run whose lease had lapsed",
                    extra={"run_id": r.event.run_id, "worker_id": worker_id, "attempt": r.event.attempt},
                )
            else:
                lost.append(r.event.run_id)
    await uow.commit()
    return HeartbeatResult(lease, cancel, lost, readopted)


# --- attempts, stats ---------------------------------------------------------------------------

_ATTEMPT_OUTCOMES = {
    EventType.RUN_COMPLETED: "completed",
    EventType.RUN_FAILED: "failed",
    EventType.RUN_CANCELED: "canceled",
    EventType.RUN_LEASE_EXPIRED: "lease_expired",
}


@dataclass
class AttemptRecord:
    """One claim of a run and how it ended."""

    attempt: int
    worker_id: str
    claimed_at: datetime
    ended_at: datetime | None = None
    outcome: str = "running"
    error: str = ""


async def attempts(uow: UnitOfWork, run_id: str) -> list[AttemptRecord]:
    """The run's attempts, folded from its log."""
    out: list[AttemptRecord] = []
    for row in (await uow.conn.execute(Q.run_events_attempts, {"run_id": run_id})).all():
        if row.type == EventType.RUN_CLAIMED:
            out.append(AttemptRecord(row.attempt, row.worker_id or "", row.recorded_at))
            continue
        if not out or out[-1].attempt != row.attempt:
            continue  # canceled while queued: no attempt to close
        current = out[-1]
        if row.type == EventType.RUN_REQUEUED:
            if current.outcome == "running":
                reason = (row.payload or {}).get("reason")
                current.outcome = "released" if reason == "released" else "retried"
                current.ended_at = row.recorded_at
            current.error = current.error or (row.payload or {}).get("error") or ""
            continue
        if current.outcome in ("running", "lease_expired"):
            if current.outcome == "running":
                current.outcome = _ATTEMPT_OUTCOMES[EventType(row.type)]
            current.ended_at = current.ended_at or row.recorded_at
            current.error = current.error or (row.payload or {}).get("error") or ""
    return out


@dataclass(frozen=True)
class Stats:
    """Cluster-wide counters."""

    events: dict[str, int]
    readopted: int
    runs_by_status: dict[str, int]


async def stats(uow: UnitOfWork, tenant_id: str) -> Stats:
    """A tenant's counters of events by kind and runs by status."""
    events: dict[str, int] = {}
    readopted = 0
    params = {"tenant_id": tenant_id}
    for row in (await uow.conn.execute(Q.stats_event_counts, params)).all():
        events[row.type] = row.n
        readopted += row.readopted
    by_status = {row.status: row.n for row in (await uow.conn.execute(Q.stats_runs_by_status, params)).all()}
    return Stats(events, readopted, by_status)


# --- operators: workers, throughput ------------------------------------------------------------

MAX_DECLARED_TOOLS = 100
DEFAULT_THROUGHPUT_MINUTES = 60
MAX_THROUGHPUT_MINUTES = 1440


def check_declared_tools(tools: list[str]) -> tuple[str, ...]:
    """A worker's declared tool names, checked (field `tools[i]`), de-duplicated and sorted."""
    if len(tools) > MAX_DECLARED_TOOLS:
        raise InvalidRequest.field("tools", f"at most {MAX_DECLARED_TOOLS} tools")
    for i, name in enumerate(tools):
        check_identifier(f"tools[{i}]", name, required=True)
    return tuple(sorted(set(tools)))


async def list_workers(
    uow: UnitOfWork, caller: Caller, page_size: int, page_token: str, now: datetime | None = None
) -> tuple[list[Any], str, int]:
    """A page of the caller's tenant's workers by id, the next page's token ('' on the last) and how
    many of the tenant's workers are connected (their heartbeat lease has not lapsed at `now`).

    A worker's tenant is its key's (recorded when its session opens); without auth every worker is
    in the default tenant, as every caller is.
    """
    now = now or utcnow()
    size = page_bounds(page_size)
    check_text("page_token", page_token, limit=2 * MAX_IDENTIFIER + 1)
    params = {"tenant_id": caller.tenant_id, "after_worker_id": page_token or None, "limit": size + 1, "now": now}
    rows = (await uow.conn.execute(Q.workers_list, params)).all()
    connected = (await uow.conn.execute(Q.workers_connected_count, params)).scalar_one()
    token = rows[size - 1].worker_id if len(rows) > size else ""
    return list(rows[:size]), token, int(connected)


@dataclass(frozen=True)
class Bucket:
    """One minute of throughput: its start, runs finished in it by status, queue depth at its end."""

    start: datetime
    finished: dict[str, int]
    queue_depth: int


async def throughput(uow: UnitOfWork, tenant_id: str, minutes: int, now: datetime | None = None) -> list[Bucket]:
    """A tenant's last `minutes` minutes (0: 60; the current one last), one bucket per minute."""
    if minutes < 0 or minutes > MAX_THROUGHPUT_MINUTES:
        raise InvalidRequest.field("minutes", f"minutes must be between 1 and {MAX_THROUGHPUT_MINUTES} (0: 60)")
    minutes = minutes or DEFAULT_THROUGHPUT_MINUTES
    now = now or utcnow()
    until = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    since = until - timedelta(minutes=minutes)
    params = {"tenant_id": tenant_id, "since": since, "until": until, "minutes": minutes}
    finished: dict[int, dict[str, int]] = {}
    for row in (await uow.conn.execute(Q.runs_throughput_finished, params)).all():
        finished.setdefault(row.minute, {})[row.status] = int(row.n)
    depth = {row.minute: int(row.depth) for row in (await uow.conn.execute(Q.runs_throughput_queue_depth, params))}
    return [
        Bucket(since + timedelta(minutes=i), finished.get(i, {}), max(0, depth.get(i, 0)))
        for i in range(minutes)
    ]
