"""Attempts a worker gave back (released while shutting down) do not count against max_attempts.

`runs.released_attempts` counts the run's run.requeued events with reason "released" (projected like
every other column, so a replay gives the same). The retry decisions (a failed report, an expired
lease) compare `attempt - released_attempts` with `max_attempts`, and the run's display says how many
were released instead of showing "4/3". A constant default: adding it does not rewrite the table; the
runs with releases recorded before are then counted from the log (a scan of run_events' requeues).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    op.execute("ALTER TABLE runs ADD COLUMN released_attempts integer NOT NULL DEFAULT 0")
    # What a replay of the log gives (projections equal a replay): the releases recorded before this
    # migration are counted, and a run running now has no error (its claim cleared it in a replay).
    op.execute(
        """
        UPDATE runs SET released_attempts = c.n
        FROM (SELECT run_id, count(*) AS n FROM run_events
              WHERE type = 'run.requeued' AND payload->>'reason' = 'released' GROUP BY run_id) AS c
        WHERE runs.run_id = c.run_id
        """
    )
    op.execute("UPDATE runs SET error = NULL WHERE status = 'RUNNING' AND error IS NOT NULL")


def downgrade() -> None:
    op.execute("ALTER TABLE runs DROP COLUMN released_attempts")
