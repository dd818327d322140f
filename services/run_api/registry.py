"""The workflow registry: register, resolve, list and get workflow versions; load the built-ins.

A version is immutable: the same spec registered again returns the same version (matched by the
sha256 of its RFC 8785 canonical JSON), a changed one gets the next number. Tenants see their own
workflows and the built-ins (tenant '*', registered from RUNS_WORKFLOWS_DIR at start); a tenant
cannot register a name a built-in uses.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format, struct_pb2
from sqlalchemy.ext.asyncio import AsyncEngine

from services.run_api.auth import Caller
from services.run_api.errors import InvalidRequest, NotFound, shorten
from services.run_api.store import queries as Q
from services.run_api.store import registry as log_store
from services.run_api.store.registry import BUILTIN_TENANT
from services.run_api.store.uow import UnitOfWork
from shared.gen.runs.v1 import workflow_service_pb2
from shared.workflow import (
    SpecError,
    WorkflowSpec,
    from_proto_dict,
    load_spec_text,
    parse_spec,
    spec_to_dict,
    spec_version_hash,
    to_proto_dict,
)

log = logging.getLogger(__name__)

SPEC_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}
MAX_SPEC_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Registered:
    """A workflow version as stored, and whether this registration created it."""

    row: Any
    created: bool


def spec_from_proto(message: workflow_service_pb2.WorkflowSpec) -> dict[str, Any]:
    """The plain (file) form of a proto spec, for validation."""
    # MessageToDict raises on NaN and Infinity in a Struct; args are converted here, so that
    # validation names the field that holds one.
    without_args = workflow_service_pb2.WorkflowSpec()
    without_args.CopyFrom(message)
    for step in without_args.steps:
        step.ClearField("args")
    data = json_format.MessageToDict(without_args, preserving_proto_field_name=True)
    for plain, step in zip(data.get("steps", []), message.steps, strict=True):
        if step.HasField("args"):
            plain["args"] = {name: _plain_value(value) for name, value in step.args.fields.items()}
    return from_proto_dict(data)


def _plain_value(value: struct_pb2.Value) -> Any:
    """A google.protobuf.Value as a plain Python value, NaN and Infinity kept (as floats)."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {name: _plain_value(item) for name, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_plain_value(item) for item in value.list_value.values]
    if kind in (None, "null_value"):
        return None
    return getattr(value, kind)


def spec_to_proto(plain: dict[str, Any]) -> workflow_service_pb2.WorkflowSpec:
    """The proto form of a stored (plain) spec."""
    return json_format.ParseDict(to_proto_dict(plain), workflow_service_pb2.WorkflowSpec())


@functools.cache
def _validator() -> ThreadPoolExecutor:
    """The one thread that validates specs (made on first use, not at import)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="spec-validation")


def _checked(data: dict[str, Any]) -> tuple[WorkflowSpec, dict[str, Any], str]:
    """The spec of plain data with its canonical form and version hash; SpecError lists every problem."""
    spec = parse_spec(data)
    return spec, spec_to_dict(spec), spec_version_hash(spec)


async def register(uow: UnitOfWork, data: dict[str, Any], tenant_id: str, created_by: str | None,
                   builtin: bool = False, field_prefix: str = "spec") -> Registered:
    """Validate and store a spec (plain form) for a tenant; the same spec again returns its version."""
    try:
        # Validation of a large spec takes CPU time (up to about 2 s at the limits): off the event loop,
        # one at a time (jmespath's parser cache is not meant for threads).
        spec, plain, spec_hash = await asyncio.get_running_loop().run_in_executor(_validator(), _checked, data)
    except SpecError as err:
        raise InvalidRequest(
            [(f"{field_prefix}.{v.field}" if v.field else field_prefix, v.description) for v in err.violations]
        ) from None
    tenant = BUILTIN_TENANT if builtin else tenant_id
    await uow.conn.execute(Q.workflows_register_lock, {"tenant_id": tenant, "name": spec.name})
    state = (await uow.conn.execute(Q.workflow_latest_version, {"tenant_id": tenant, "name": spec.name})).one()
    if builtin:
        found = await _version_with_hash(uow, tenant, spec.name, spec_hash, builtin=True)
        version = state.latest_builtin + 1
    else:
        found = (await uow.conn.execute(
            Q.workflow_by_hash, {"tenant_id": tenant, "name": spec.name, "spec_hash": spec_hash})).first()
        if found is None and state.latest_builtin and not state.latest_own:
            raise InvalidRequest.field(
                f"{field_prefix}.name", f"{shorten(spec.name)!r} is a built-in workflow's name; choose another name"
            )
        version = state.latest_own + 1
    if found is not None:
        await uow.commit()
        return Registered(found, False)
    payload = {"name": spec.name, "version": version, "spec_hash": spec_hash, "spec": plain,
               "builtin": builtin, "created_by": created_by}
    await log_store.append_registered(uow.conn, tenant, payload)
    row = await _version_with_hash(uow, tenant, spec.name, spec_hash, builtin=builtin)
    await uow.commit()
    log.info("workflow %s registered as version %d", spec.name, version, extra={"tenant_id": tenant})
    return Registered(row, True)


async def _version_with_hash(uow: UnitOfWork, tenant: str, name: str, spec_hash: str, builtin: bool) -> Any:
    """The stored version of a name with this hash: a built-in, or the tenant's own (None when there is none)."""
    params = {"tenant_id": tenant, "name": name, "spec_hash": spec_hash, "builtin": builtin}
    return (await uow.conn.execute(Q.workflow_own_by_hash, params)).first()


async def get(uow: UnitOfWork, name: str, version: int, caller: Caller) -> Any:
    """One version (0: the latest) of a workflow the caller sees; NotFound names what is missing."""
    row = (
        await uow.conn.execute(Q.workflow_get, {"tenant_id": caller.tenant_id, "name": name, "version": version})
    ).first()
    if row is None:
        which = f"version {version} of workflow" if version else "workflow"
        raise NotFound(f"{which} {shorten(name)!r} not found")
    return row


async def resolve_for_run(uow: UnitOfWork, name: str, version: int, tenant_id: str) -> Any:
    """The version a new run pins; InvalidRequest naming `workflow` (with the known ones) or `workflow_version`."""
    row = (await uow.conn.execute(Q.workflow_get, {"tenant_id": tenant_id, "name": name, "version": version})).first()
    if row is not None:
        return row
    names = [r.name for r in (await uow.conn.execute(Q.workflow_names, {"tenant_id": tenant_id})).all()]
    if version and name in names:
        raise InvalidRequest.field("workflow_version", f"workflow {shorten(name)!r} has no version {version}")
    raise InvalidRequest.field(
        "workflow", f"unknown workflow {shorten(name)!r}; known workflows: {', '.join(names) or 'none'}"
    )


async def list_page(uow: UnitOfWork, caller: Caller, page_size: int, page_token: str) -> tuple[list[Any], str]:
    """The latest version of each workflow the caller sees, by name; returns (rows, next page token)."""
    rows = (
        await uow.conn.execute(
            Q.workflow_list, {"tenant_id": caller.tenant_id, "after_name": page_token, "limit": page_size + 1}
        )
    ).all()
    page = list(rows[:page_size])
    return page, (page[-1].name if len(rows) > page_size and page else "")


class SpecCache:
    """Specs by hash, as the proto a claim carries. A hash names one content forever, so entries never go stale."""

    def __init__(self) -> None:
        self._specs: dict[str, workflow_service_pb2.WorkflowSpec] = {}

    async def get_many(self, engine: AsyncEngine, hashes: set[str]) -> dict[str, workflow_service_pb2.WorkflowSpec]:
        """The specs of these hashes (loaded from the registry the first time)."""
        missing = sorted(h for h in hashes if h not in self._specs)
        if missing:
            async with engine.connect() as conn:
                rows = (await conn.execute(Q.workflow_specs_by_hash, {"hashes": missing})).all()
            for row in rows:
                self._specs[row.spec_hash] = spec_to_proto(row.spec)
        return {h: self._specs[h] for h in hashes if h in self._specs}


async def load_builtins(engine: AsyncEngine, folder: str, required: bool = True) -> list[Registered]:
    """Register every spec file in `folder` as a built-in; a bad file stops the start with its name and problems.

    A missing folder stops the start too, unless `required` is false (the default folder of a
    source checkout, absent from an installed package): then only a warning is logged.
    """
    if not folder:
        return []
    if not os.path.isdir(folder):
        if not required:
            log.warning("no workflows folder at %s: no built-in workflows registered (set RUNS_WORKFLOWS_DIR)",
                        folder)
            return []
        raise RuntimeError(f"RUNS_WORKFLOWS_DIR {folder!r} is not a folder")
    out: list[Registered] = []
    for name in sorted(os.listdir(folder)):
        fmt = SPEC_SUFFIXES.get(os.path.splitext(name)[1].lower())
        path = os.path.join(folder, name)
        if fmt is None or not os.path.isfile(path):
            continue
        if os.path.getsize(path) > MAX_SPEC_FILE_BYTES:
            raise RuntimeError(f"workflow file {path} is over {MAX_SPEC_FILE_BYTES} bytes")
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        try:
            spec = load_spec_text(text, fmt)  # type: ignore[arg-type]
        except SpecError as err:
            raise RuntimeError(f"workflow file {path} is not a valid spec: {err}") from None
        async with UnitOfWork(engine) as uow:
            registered = await register(uow, spec_to_dict(spec), BUILTIN_TENANT, "builtin", builtin=True)
        if registered.created:
            log.info("built-in workflow %s version %d loaded from %s", spec.name, registered.row.version, path)
        out.append(registered)
    return out

