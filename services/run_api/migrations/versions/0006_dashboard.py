"""What the dashboard reads: worker declarations, run search and throughput.

`workers` is an operational table (one row per worker session, written by the claim stream and
heartbeats), not a projection of the event log, so what a worker declares when its session opens
(tools, capacity, workspace) is stored on its row as it is; nullable, as rows from before are
silent about it. Its tenant was stored already (0002).

Two partial indexes on `runs`, each holding only the rows it serves:
- `runs_tenant_finished_idx` (tenant, finished_at) for finished runs: GetThroughput reads the last
  minutes' finishes (and the queue's recent leavers) without scanning the tenant's history;
- `runs_idempotency_prefix_idx` (tenant, idempotency key in byte order) for ListRuns' text search:
  a prefix is the range [q, q + 1) in the "C" collation, which a btree serves with a bound
  parameter (LIKE 'q%' needs the pattern at plan time, which a generic plan does not have).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"

UPGRADE = [
    "ALTER TABLE workers ADD COLUMN tools text[]",
    "ALTER TABLE workers ADD COLUMN capacity integer",
    "ALTER TABLE workers ADD COLUMN workspace_id text",
]
# Built CONCURRENTLY, outside a transaction: on a large `runs` a plain CREATE INDEX would block every
# StartRun and claim while the API migrates on start. A build that failed half-way leaves an INVALID
# index behind and this migration unrecorded, so each is dropped first when it exists.
INDEXES = {
    "runs_tenant_finished_idx": "ON runs (tenant_id, finished_at) WHERE finished_at IS NOT NULL",
    "runs_idempotency_prefix_idx":
        'ON runs (tenant_id, (idempotency_key COLLATE "C")) WHERE idempotency_key IS NOT NULL',
}

DOWNGRADE = [
    "DROP INDEX runs_idempotency_prefix_idx",
    "DROP INDEX runs_tenant_finished_idx",
    "ALTER TABLE workers DROP COLUMN workspace_id",
    "ALTER TABLE workers DROP COLUMN capacity",
    "ALTER TABLE workers DROP COLUMN tools",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)
    with op.get_context().autocommit_block():
        for name, definition in INDEXES.items():
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            op.execute(f"CREATE INDEX CONCURRENTLY {name} {definition}")


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
