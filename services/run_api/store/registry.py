"""The workflow registry's log and its projection: the only code that writes registry_events and workflows.

A registration appends a `workflow.registered` event and projects it into `workflows` in the same
transaction; `replay` rebuilds `workflows` from the log alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from services.run_api.store import queries as Q

WORKFLOW_REGISTERED = "workflow.registered"
BUILTIN_TENANT = "*"  # the tenant of the built-in workflows: every tenant sees them


async def append_registered(conn: AsyncConnection, tenant_id: str, payload: Mapping[str, Any]) -> Any:
    """Record a new workflow version (payload: name, version, spec_hash, spec, builtin, created_by) and project it."""
    row = (
        await conn.execute(
            Q.registry_events_append,
            {"type": WORKFLOW_REGISTERED, "tenant_id": tenant_id, "payload": json.dumps(dict(payload))},
        )
    ).one()
    await apply(conn, row.sequence, tenant_id, payload, row.recorded_at)
    return row


async def apply(
    conn: AsyncConnection, sequence: int, tenant_id: str, payload: Mapping[str, Any], recorded_at: datetime
) -> None:
    """Project one registry event into `workflows`."""
    await conn.execute(
        Q.workflows_project_registered,
        {
            "tenant_id": tenant_id,
            "name": payload["name"],
            "version": payload["version"],
            "spec_hash": payload["spec_hash"],
            "spec": json.dumps(payload["spec"]),
            "builtin": bool(payload.get("builtin", False)),
            "created_by": payload.get("created_by"),
            "recorded_at": recorded_at,
            "sequence": sequence,
        },
    )


async def replay(conn: AsyncConnection) -> int:
    """Rebuild `workflows` from registry_events; returns how many events were applied."""
    await conn.execute(Q.workflows_clear)
    count, after = 0, 0
    while True:
        rows = (await conn.execute(Q.registry_events_page, {"after": after, "limit": 1000})).all()
        if not rows:
            return count
        for row in rows:
            if row.type == WORKFLOW_REGISTERED:
                await apply(conn, row.sequence, row.tenant_id, row.payload, row.recorded_at)
                count += 1
        after = rows[-1].sequence
