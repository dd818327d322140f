"""The event outbox: run_events in commit order, and where the NATS publisher has got to.

`run_events.tx_id` is the id of the transaction that wrote the event (`pg_current_xact_id()`, set by
the column's default, so no writer changes). It is added in two steps so that a large table is not
rewritten: the column first (NULL for every existing row), then its default (for new rows only). Rows
from before this migration keep NULL and are never published: the publisher starts from "now" the
first time it runs. Adding a column is not an UPDATE, so the append-only trigger (0001, 0005) is not
involved.

`run_events_outbox_idx` (tx_id, run_id in the "C" collation, sequence) serves the publisher's tail: the rows after its
checkpoint whose transactions have all ended, in that order. Built CONCURRENTLY, outside a
transaction, as 0006 builds its indexes: on a large log a plain CREATE INDEX would block every append
while the API migrates on start. A build that failed half-way leaves an INVALID index behind and this
migration unrecorded, so it is dropped first when it exists.

`outbox_checkpoints` holds one row per publisher (its name): the key (tx_id, run_id, sequence) of the
last event it has published and had acknowledged, and the keys of the events it published ahead of
that point to keep a run's order (see services/run_api/outbox.py).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"

UPGRADE = [
    "ALTER TABLE run_events ADD COLUMN tx_id xid8",
    "ALTER TABLE run_events ALTER COLUMN tx_id SET DEFAULT pg_current_xact_id()",
    """
    CREATE TABLE outbox_checkpoints (
        name text PRIMARY KEY,
        tx_id xid8 NOT NULL,
        run_id text NOT NULL,
        sequence bigint NOT NULL,
        ahead jsonb NOT NULL DEFAULT '[]'::jsonb,
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
]
INDEX = "run_events_outbox_idx"
# run_id in the "C" collation: byte order, which is the order the publisher compares keys in.
INDEX_DEFINITION = 'ON run_events (tx_id, run_id COLLATE "C", sequence) WHERE tx_id IS NOT NULL'

DOWNGRADE = [
    f"DROP INDEX IF EXISTS {INDEX}",
    "DROP TABLE outbox_checkpoints",
    "ALTER TABLE run_events DROP COLUMN tx_id",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
        op.execute(f"CREATE INDEX CONCURRENTLY {INDEX} {INDEX_DEFINITION}")


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
