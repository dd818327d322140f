"""RebuildRun and ExplainStep: partial rebuilds of a SUCCEEDED run, and why each step of a run ran or did not.

A rebuild is a new run (`run.queued` with trigger "rebuild") of the base run's pinned workflow
version whose impacted steps (shared.workflow.plan) re-execute while the worker records the others
as reused from the base. An explanation is read from the run's log: the step events' cache data,
the cache entry a hit used, and for a miss the nearest earlier entry of the same step with the key
components that differ from it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.run_api import convert
from services.run_api.auth import Caller
from services.run_api.checks import MAX_IDENTIFIER, check_identifier, check_text
from services.run_api.errors import IllegalTransition, InvalidRequest, NotFound, shorten
from services.run_api.handlers import (
    Placement,
    check_input_size,
    check_input_value,
    queued_event,
    run_exists,
    run_request_hash,
    tools_needed,
)
from services.run_api.store import events as store
from services.run_api.store import queries as Q
from services.run_api.store.uow import UnitOfWork
from shared.events import EventType, RunStatus, StepStatus
from shared.merge_patch import merge_patch
from shared.workflow import WorkflowSpec, canonical_json, parse_spec, spec_to_dict
from shared.workflow.plan import RERUN, PlanError, PlanStep, rebuild_plan
from shared.workflow.spec import MAX_STEPS

log = logging.getLogger(__name__)

MAX_DIFFERENCES = 50  # component paths listed per step
MAX_VALUE_CHARS = 2048  # of a differing value's JSON; a longer one is shown by its size and digest
MAX_SOURCE_HOPS = 8  # a reused step's components are looked up through at most this many source runs


@dataclass(frozen=True)
class RebuildRun:
    """Re-execute what a change touches in a SUCCEEDED run; reuse the rest."""

    base_run_id: str
    change_request_type: str = ""
    input_patch: dict[str, Any] = field(default_factory=dict)
    steps: tuple[str, ...] = ()
    dry_run: bool = False
    trace_context: dict[str, str] = field(default_factory=dict)


async def _pinned_spec(uow: UnitOfWork, run: Any) -> WorkflowSpec | None:
    """The workflow version a run pinned (by its spec hash; a run from before versions: version 1)."""
    if run.spec_hash is not None:
        row = (await uow.conn.execute(Q.workflow_specs_by_hash, {"hashes": [run.spec_hash]})).first()
    else:
        params = {"tenant_id": run.tenant_id, "name": run.workflow, "version": run.workflow_version or 1}
        row = (await uow.conn.execute(Q.workflow_get, params)).first()
    return None if row is None else parse_spec(row.spec)


async def rebuild_run(uow: UnitOfWork, cmd: RebuildRun, caller: Caller) -> tuple[Any | None, list[PlanStep]]:
    """Plan a rebuild of a SUCCEEDED run and, unless `dry_run`, queue it; returns (the new run row or None, plan)."""
    check_identifier("base_run_id", cmd.base_run_id, required=True)
    check_text("change_request_type", cmd.change_request_type, limit=MAX_IDENTIFIER)
    if len(cmd.steps) > MAX_STEPS:
        raise InvalidRequest.field("steps", f"steps names {len(cmd.steps)} steps; a workflow has at most {MAX_STEPS}")
    for i, key in enumerate(cmd.steps):
        check_identifier(f"steps[{i}]", key, required=True)
    base = await run_exists(uow, cmd.base_run_id, caller)
    if base.status != RunStatus.SUCCEEDED:
        raise IllegalTransition(f"run {base.run_id} is {base.status}; only a SUCCEEDED run can be rebuilt")
    spec = await _pinned_spec(uow, base)
    if spec is None:  # pragma: no cover - versions are never deleted
        raise IllegalTransition(f"run {base.run_id}'s workflow version is not stored; it cannot be rebuilt")
    try:
        plan = rebuild_plan(spec, cmd.change_request_type or None, cmd.steps)
    except PlanError as err:
        raise InvalidRequest.field(err.field, err.message) from None
    run_input = merge_patch(base.input or {}, cmd.input_patch)
    check_input_value(run_input)
    as_struct = convert.struct(run_input)
    check_input_size(as_struct.ByteSize() if as_struct is not None else 0)  # as StartRun counts it on the wire
    if cmd.dry_run:
        return None, plan
    place = Placement(base.tenant_id, base.project_id, base.workspace_id)
    backoff = (base.retry_backoff_seconds, base.retry_backoff_max_seconds)
    event = queued_event(
        base.workflow, base.workflow_version, base.spec_hash, place, caller, run_input, base.max_attempts, backoff,
        run_request_hash(base.workflow, place, run_input, base.max_attempts, *backoff, base.workflow_version),
        cmd.trace_context,
        required_tools=tools_needed(spec_to_dict(spec), run_input),  # the whole version's, as StartRun's
        trigger="rebuild",
        base_run_id=base.run_id,
        change_request=cmd.change_request_type or None,
        rebuild_rerun=sorted(p.step_key for p in plan if p.action == RERUN),
    )
    if (await uow.conn.execute(Q.run_hold_finished, {"run_id": base.run_id})).first() is None:
        # `archive` took it meanwhile (it keeps the bases of unfinished rebuilds, but this one is not queued yet)
        raise NotFound(f"run {base.run_id} was archived; it cannot be rebuilt")
    row = await store.queue_run(uow.conn, event)
    await uow.commit()
    log.info(
        "rebuild of run %s queued: %d step(s) re-execute", base.run_id, len(event.payload["rebuild_rerun"]),
        extra={"run_id": event.run_id},
    )
    return row, plan


# --- ExplainStep -------------------------------------------------------------------------------


def _shown(value: Any) -> Any:
    """A component value for an explanation: as it is, or its size and digest when its JSON is long."""
    text = canonical_json(value)
    if len(text) <= MAX_VALUE_CHARS:
        return value
    return f"({len(text)} bytes of JSON, sha256 {hashlib.sha256(text).hexdigest()[:12]})"


def component_differences(before: Any, after: Any, path: str = "") -> list[dict[str, Any]]:
    """The paths (a.b.c) where two key component trees differ, with both values (None where one has none).

    Objects are compared member by member; any other value (lists too) is compared whole, as the key's
    canonical JSON sees it (1 and 1.0 are the same).
    """
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        out: list[dict[str, Any]] = []
        for name in sorted(set(before) | set(after)):
            sub = f"{path}.{name}" if path else str(name)
            if name not in before or name not in after:
                out.append({"path": sub, "before": before.get(name), "after": after.get(name)})
            else:
                out.extend(component_differences(before[name], after[name], sub))
        return out
    if canonical_json(before) == canonical_json(after):
        return []
    return [{"path": path, "before": before, "after": after}]


@dataclass
class _StepLog:
    """What a run's log says about one step's cache decisions."""

    first_started: Any = None
    started: Any = None  # the last step.started that carried cache data
    succeeded: Any = None
    skipped: Any = None


def _cache(event: Any) -> Mapping[str, Any]:
    cache = (event.payload or {}).get("cache") if event is not None else None
    return cache if isinstance(cache, Mapping) else {}


async def _step_logs(uow: UnitOfWork, run_id: str, step_key: str | None) -> dict[str, _StepLog]:
    found: dict[str, _StepLog] = {}
    rows = (await uow.conn.execute(Q.run_events_step_decisions, {"run_id": run_id, "step_key": step_key})).all()
    for row in rows:
        entry = found.setdefault(str((row.payload or {}).get("step_key")), _StepLog())
        if row.type == EventType.STEP_STARTED:
            entry.first_started = entry.first_started or row
            if _cache(row) or entry.started is None:
                entry.started = row
        elif row.type == EventType.STEP_SUCCEEDED:
            entry.succeeded = row
        elif row.type == EventType.STEP_SKIPPED:
            entry.skipped = row
    return found


async def _source_components(uow: UnitOfWork, run_id: str, step_key: str, tenant_id: str) -> Any:
    """The key components of the step whose result a reused step carries (following reuses of reuses),
    never looking outside the tenant."""
    for _ in range(MAX_SOURCE_HOPS):
        if not (await uow.conn.execute(Q.runs_of_tenant, {"tenant_id": tenant_id, "run_ids": [run_id]})).first():
            return None
        entry = (await _step_logs(uow, run_id, step_key)).get(step_key)
        if entry is None:
            return None
        if entry.succeeded is not None:
            return _cache(entry.succeeded).get("components")
        payload = entry.skipped.payload if entry.skipped is not None else {}
        if not payload.get("source_run_id"):
            return None
        run_id, step_key = payload["source_run_id"], payload.get("source_step_key") or step_key
    return None


_DECISIONS = {
    StepStatus.CREATED: "pending",
    StepStatus.RUNNING: "executed",
    StepStatus.SUCCEEDED: "executed",
    StepStatus.FAILED: "failed",
    StepStatus.CANCELED: "canceled",
}

_MISS_TEXT = {
    "no_entry": "no cache entry had its key",
    "expired": "its cache entry had expired",
    "artifact_missing": "an artifact of its cache entry is missing from the artifact store",
    "artifact_changed": "an artifact of its cache entry changed in the artifact store",
    "scope_run_only": "its cache scope is run_only: another run's entry for the same inputs is never used",
    "refresh": "a rebuild re-executes it, bypassing the cache",
}


def _summary(decision: str, row: Any, log_: _StepLog, run: Any, diffs: list[dict[str, Any]], nearest: Any) -> str:
    """The sentence people read."""
    if decision == "pending":
        return "pending: not started yet" if row is not None else "pending: not created yet"
    if decision == "cache_hit":
        cache = _cache(log_.skipped)
        return (
            f"skipped: cache hit in the {cache.get('layer') or 'cold'} layer; its output and artifacts come from "
            f"run {row.source_run_id or '?'} step {(log_.skipped.payload or {}).get('source_step_key') or row.step_key}"
        )
    if decision == "reused_from_base":
        return (
            f"skipped: reused from base run {row.source_run_id or run.base_run_id} (the rebuild does not touch it); "
            "its output and artifacts are the base run's"
        )
    if decision == "failed":
        tries = row.tries or 1
        return f"failed after {tries} tr{'y' if tries == 1 else 'ies'}: {row.error or 'no error text'}"
    if decision == "canceled":
        return f"canceled: {row.reason or 'the run ended'}"
    cache = _cache(log_.started)
    reason = cache.get("reason")
    if not reason:
        text = "executed: not cacheable (its cache scope is none or its tool is not deterministic)"
    else:
        text = f"executed: cache miss ({reason}): {_MISS_TEXT.get(str(reason), str(reason))}"
        if cache.get("detail"):
            text += f" ({cache['detail']})"
    if row.status == StepStatus.RUNNING:
        text += "; running now"
    if nearest is not None and diffs:
        paths = ", ".join(d["path"] for d in diffs[:5]) + (", ..." if len(diffs) > 5 else "")
        text += f"; the nearest earlier entry (run {nearest.source_run_id}) differs in {paths}"
    elif nearest is not None:
        # A miss means the key differs; equal components can only mean what differs is outside them.
        text += f"; the nearest earlier entry (run {nearest.source_run_id}) differs only in what the key adds"
    return text


async def _explain(uow: UnitOfWork, run: Any, key: str, row: Any, log_: _StepLog) -> dict[str, Any]:
    """One step's explanation, as the fields of a StepExplanation."""
    decision = "pending" if row is None else _DECISIONS.get(row.status, "executed")
    if row is not None and row.status == StepStatus.SKIPPED:
        decision = row.reason or "cache_hit"
    started, succeeded, skipped = _cache(log_.started), _cache(log_.succeeded), _cache(log_.skipped)
    cache_key = succeeded.get("key") or started.get("key") or skipped.get("key") or (row.cache_key if row else None)
    display = (succeeded.get("display") or started.get("display") or skipped.get("display")
               or (row.cache_display if row else None))
    components = succeeded.get("components") or started.get("components")
    source_run_id = (row.source_run_id if row is not None else None) or ""
    if components is None and decision == "cache_hit" and cache_key:
        entry = (await uow.conn.execute(Q.step_cache_get, {"tenant_id": run.tenant_id, "cache_key": cache_key})).first()
        components = entry.components if entry is not None else None
    if components is None and decision in ("cache_hit", "reused_from_base") and log_.skipped is not None:
        payload = log_.skipped.payload or {}
        if payload.get("source_run_id"):
            components = await _source_components(uow, payload["source_run_id"], payload.get("source_step_key") or key,
                                                  run.tenant_id)
    nearest, diffs = None, []
    if started.get("reason") and log_.first_started is not None:
        params = {"tenant_id": run.tenant_id, "workflow": (components or {}).get("workflow") or run.workflow,
                  "step_key": key, "before": log_.first_started.recorded_at}
        candidates = (await uow.conn.execute(Q.step_cache_nearest, params)).all()
        if candidates and isinstance(components, Mapping):
            scored = [(len(component_differences(c.components, components)), i) for i, c in enumerate(candidates)]
            nearest = candidates[min(scored)[1]]
            diffs = component_differences(nearest.components, components)
        # Without the step's components (an older worker's events) no entry can be compared: none is named.
    reason = skipped.get("layer") if decision == "cache_hit" else started.get("reason")
    return {
        "step_key": key,
        "decision": decision,
        "summary": _summary(decision, row, log_, run, diffs, nearest),
        "cache_key": cache_key or "",
        "cache_display": display or "",
        "components": dict(components) if isinstance(components, Mapping) else None,
        "cache_reason": reason or "",
        "source_run_id": source_run_id,
        "nearest_cache_key": nearest.cache_key if nearest is not None else "",
        "nearest_source_run_id": nearest.source_run_id if nearest is not None else "",
        "differences": [
            {"path": d["path"], "before": _shown(d["before"]), "after": _shown(d["after"])}
            for d in diffs[:MAX_DIFFERENCES]
        ],
    }


async def explain_steps(uow: UnitOfWork, run_id: str, step_key: str, caller: Caller) -> list[dict[str, Any]]:
    """Why each step of a run (or only `step_key`) ran, hit the cache, was reused or has not run, from the log.

    Each item has the fields of runs.v1.StepExplanation (components None when the log has none).
    """
    run = await run_exists(uow, run_id, caller)
    check_identifier("step_key", step_key)
    rows = {r.step_key: r for r in (await uow.conn.execute(Q.run_steps_for_run, {"run_id": run_id, "status": None}))}
    spec = await _pinned_spec(uow, run)
    keys = [*(spec.keys if spec is not None else []), *(k for k in rows if spec is None or k not in spec.keys)]
    if step_key:
        if step_key not in keys:
            raise NotFound(f"run {run_id} has no step {shorten(step_key)!r}")
        keys = [step_key]
    logs = await _step_logs(uow, run_id, step_key or None)
    return [await _explain(uow, run, key, rows.get(key), logs.get(key, _StepLog())) for key in keys]
