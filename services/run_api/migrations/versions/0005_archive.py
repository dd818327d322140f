"""Retention: the archiver may delete the events of finished runs; nothing else may.

run_events stays append-only for every session and every live run. The one exception is the
archive command (`python -m services.run_api archive`): in a transaction that has said
`SET LOCAL runs.archiving = 'on'` (after writing the runs to the archive), a DELETE of an event is
allowed when its run is SUCCEEDED, FAILED or CANCELED. UPDATE and TRUNCATE stay refused. The
setting is a guard against accidents, not a permission: who may DELETE at all is the database's
GRANTs' business.

The archiver keeps runs that live data points to: the source run of a step_cache entry and the base
run of a rebuild that has not finished. Two small indexes serve those checks (rebuilds are rare, so
the partial index costs the hot path nothing; step_cache is written once per cached step result).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"

REFUSE_ALWAYS = """
    CREATE OR REPLACE FUNCTION run_events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'run_events is append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END
    $$
"""

UPGRADE = [
    """
    CREATE OR REPLACE FUNCTION run_events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' AND current_setting('runs.archiving', true) = 'on' AND EXISTS (
            SELECT 1 FROM runs r
            WHERE r.run_id = OLD.run_id AND r.status IN ('SUCCEEDED', 'FAILED', 'CANCELED')
        ) THEN
            RETURN OLD;
        END IF;
        RAISE EXCEPTION 'run_events is append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END
    $$
    """,
    "CREATE INDEX step_cache_source_idx ON step_cache (source_run_id)",
    "CREATE INDEX runs_base_run_idx ON runs (base_run_id) WHERE base_run_id IS NOT NULL",
]

DOWNGRADE = [
    "DROP INDEX runs_base_run_idx",
    "DROP INDEX step_cache_source_idx",
    REFUSE_ALWAYS,
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
