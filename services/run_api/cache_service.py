"""Step cache RPCs: a worker's LookupStepCache, a client's ListCacheEntries and InvalidateCache, GetStats' counters.

The servicers delegate here. A lookup is fenced like an artifact fetch (the worker's session and its
hold on the run's attempt); its keys are the API's own (the components the worker sent, hashed with
the run's tenant). Entries, their listing and invalidation belong to the caller's tenant.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from services.run_api import convert, payloads
from services.run_api.artifact_service import _check_worker_fields, held_run
from services.run_api.artifacts import check_sha256
from services.run_api.auth import Caller
from services.run_api.cache import CacheLayers, LookupResult, component_problems, keys_for
from services.run_api.checks import MAX_IDENTIFIER, check_identifier, check_text, page_bounds
from services.run_api.errors import InvalidRequest, RequestTooLarge
from services.run_api.store import queries as Q
from services.run_api.store.uow import UnitOfWork
from shared.events import EventType
from shared.gen.runs.v1 import run_pb2, run_service_pb2, worker_service_pb2
from shared.limits import MAX_EVENT_PAYLOAD_BYTES
from shared.logs import log_context

MAX_PAGE_TOKEN_CHARS = 200


def _components(request: worker_service_pb2.LookupStepCacheRequest) -> dict[str, Any]:
    """The request's components as a dict, checked by the rules a step.succeeded's cache object follows."""
    if request.components.ByteSize() > MAX_EVENT_PAYLOAD_BYTES:
        raise RequestTooLarge([("components", f"components are over {MAX_EVENT_PAYLOAD_BYTES} bytes")])
    try:
        components = convert.to_dict(request.components)
    except (ValueError, RecursionError):
        raise InvalidRequest.field("components", "components must be JSON: no NaN or Infinity") from None
    payload = {"step_key": request.step_key, "cache": {"components": components, "scope": request.scope}}
    wrong = payloads.problems(EventType.STEP_SUCCEEDED, payload)
    if wrong:
        raise InvalidRequest([(name.removeprefix("cache.") or "components", d) for name, d in wrong])
    return components


def lookup_response(result: LookupResult) -> worker_service_pb2.LookupStepCacheResponse:
    """A lookup's result as the RPC's response (a hit's artifacts belong to the run and step that made them)."""
    out = worker_service_pb2.LookupStepCacheResponse(
        cache_key=result.keys.key, display=result.keys.display, hit=result.hit, layer=result.layer,
        miss_reason=result.reason, detail=result.detail,
    )
    entry = result.entry
    if entry is not None:
        source_run, source_step = entry.get("source_run_id") or "", entry.get("source_step_key") or ""
        out.source_run_id, out.source_step_key = source_run, source_step
        if (output := convert.struct(entry.get("output"))) is not None:
            out.output.CopyFrom(output)
        out.artifacts.extend(convert.artifact(source_run, source_step, a) for a in entry.get("artifacts") or [])
    return out


async def lookup_step_cache(
    engine: AsyncEngine, layers: CacheLayers, request: worker_service_pb2.LookupStepCacheRequest, caller: Caller
) -> worker_service_pb2.LookupStepCacheResponse:
    """LookupStepCache: a valid entry for a step of a run the calling worker holds, or the miss's reason."""
    _check_worker_fields("", request.worker_id, request.session_token, request.run_id, request.attempt)
    check_identifier("step_key", request.step_key, required=True, limit=MAX_IDENTIFIER)
    if request.scope not in payloads.CACHE_SCOPES:
        raise InvalidRequest.field("scope", "scope must be global or run_only")
    components = _components(request)
    worker_id = caller.worker_id(request.worker_id)
    async with UnitOfWork(engine) as uow:
        run = await held_run(uow, worker_id, request.session_token, request.run_id, request.attempt)
    wrong = component_problems(components, request.step_key, request.scope, request.run_id, run.workflow)
    if wrong:
        raise InvalidRequest([(f"components.{name}" if name else "components", d) for name, d in wrong])
    try:
        keys = keys_for(components, run.tenant_id)
    except ValueError as err:  # RFC 8785 refuses some numbers (e.g. integers past 2**53)
        raise InvalidRequest.field("components", f"components cannot be hashed: {err}") from None
    with log_context(run_id=request.run_id, worker_id=worker_id, attempt=request.attempt):
        result = await layers.lookup(engine, run.tenant_id, keys, request.scope)
    return lookup_response(result)


def cache_entry(row: Any) -> run_pb2.CacheEntry:
    """A step_cache row as a CacheEntry."""
    out = run_pb2.CacheEntry(
        cache_key=row.cache_key, display=row.display, scope=row.scope, workflow=row.workflow,
        step_key=row.step_key, source_run_id=row.source_run_id or "", source_step_key=row.source_step_key or "",
        hit_count=row.hit_count or 0,
    )
    if (output := convert.struct(row.output)) is not None:
        out.output.CopyFrom(output)
    out.artifacts.extend(convert.artifact(out.source_run_id, out.source_step_key, a) for a in row.artifacts or [])
    for name in ("created_at", "expires_at", "last_hit_at"):
        if (value := convert.ts(getattr(row, name))) is not None:
            getattr(out, name).CopyFrom(value)
    return out


def _page_after(token: str) -> tuple[datetime | None, str | None]:
    """The (created_at, cache_key) a page token continues after; (None, None) for the first page."""
    if not token:
        return None, None
    check_text("page_token", token, limit=MAX_PAGE_TOKEN_CHARS)
    created, _, key = token.rpartition("|")
    try:
        after = datetime.fromisoformat(created)
        check_sha256(key)
    except (ValueError, InvalidRequest):
        raise InvalidRequest.field("page_token", "page_token is not a valid page token") from None
    if after.tzinfo is None:
        raise InvalidRequest.field("page_token", "page_token is not a valid page token")
    return after, key


async def list_cache_entries(
    engine: AsyncEngine, request: run_service_pb2.ListCacheEntriesRequest, caller: Caller
) -> run_service_pb2.ListCacheEntriesResponse:
    """ListCacheEntries: a page of the caller's tenant's entries (optionally one workflow, one step), newest first."""
    check_identifier("workflow", request.workflow)
    check_identifier("step_key", request.step_key)
    size = page_bounds(request.page_size)
    after_created_at, after_key = _page_after(request.page_token)
    params = {
        "tenant_id": caller.tenant_id, "workflow": request.workflow or None, "step_key": request.step_key or None,
        "after_created_at": after_created_at, "after_key": after_key, "limit": size + 1,
    }
    async with UnitOfWork(engine) as uow:
        rows = (await uow.conn.execute(Q.step_cache_list, params)).all()
    page = rows[:size]
    token = f"{page[-1].created_at.isoformat()}|{page[-1].cache_key}" if len(rows) > size else ""
    return run_service_pb2.ListCacheEntriesResponse(entries=[cache_entry(r) for r in page], next_page_token=token)


async def invalidate_cache(
    engine: AsyncEngine, layers: CacheLayers, request: run_service_pb2.InvalidateCacheRequest, caller: Caller
) -> run_service_pb2.InvalidateCacheResponse:
    """InvalidateCache: remove a workflow's entries (optionally one step's, one key) from both layers."""
    if not request.workflow:
        raise InvalidRequest.field(
            "workflow", "workflow is required (entries of one workflow are removed; step_key and cache_key narrow it)"
        )
    check_identifier("workflow", request.workflow)
    check_identifier("step_key", request.step_key)
    if request.cache_key:
        check_sha256(request.cache_key, "cache_key")
    removed = await layers.invalidate(
        engine, caller.tenant_id, request.workflow, request.step_key or None, request.cache_key or None,
        caller.key_id,
    )
    return run_service_pb2.InvalidateCacheResponse(removed=removed)


async def cache_stats(uow: UnitOfWork, tenant: str) -> tuple[dict[str, int], dict[str, int]]:
    """A tenant's cache hits by layer and misses by reason, counted from the event log."""
    params = {"tenant_id": tenant}
    hits = {r.layer: r.n for r in (await uow.conn.execute(Q.stats_cache_hits_by_layer, params)).all()}
    misses = {r.reason: r.n for r in (await uow.conn.execute(Q.stats_cache_misses_by_reason, params)).all()}
    return hits, misses
