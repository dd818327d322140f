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
    "CREATE INDEX runs_tenant_finished_idx ON runs (tenant_id, finished_at) WHERE finished_at IS NOT NULL",
    """
    CREATE INDEX runs_idempotency_prefix_idx ON runs (tenant_id, (idempotency_key COLLATE "C"))
        WHERE idempotency_key IS NOT NULL
    """,
]

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


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
