"""Attempts a worker gave back (released while shutting down) do not count against max_attempts.

`runs.released_attempts` counts the run's run.requeued events with reason "released" (projected like
every other column, so a replay gives the same). The retry decisions (a failed report, an expired
lease) compare `attempt - released_attempts` with `max_attempts`, and the run's display says how many
were released instead of showing "4/3". A constant default: adding it does not rewrite the table.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    op.execute("ALTER TABLE runs ADD COLUMN released_attempts integer NOT NULL DEFAULT 0")


def downgrade() -> None:
    op.execute("ALTER TABLE runs DROP COLUMN released_attempts")
