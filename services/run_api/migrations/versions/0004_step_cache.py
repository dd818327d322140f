"""The step cache and partial rebuilds.

`step_cache` is projected from `step.succeeded` events that carry cache components (the cold layer;
Redis is the optional hot layer in front). `cache_invalidations` is the append-only log of
InvalidateCache calls, so replay removes what was removed. Runs record why they exist (start or
rebuild) and, for a rebuild, their base run and the steps they re-execute; steps record their cache
key and whether the lookup hit.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"

UPGRADE = [
    """
    CREATE TABLE step_cache (
        tenant_id text NOT NULL,
        cache_key text NOT NULL,
        base_key text NOT NULL,
        scope text NOT NULL CHECK (scope IN ('global', 'run_only')),
        workflow text NOT NULL,
        step_key text NOT NULL,
        display text NOT NULL,
        components jsonb NOT NULL,
        output jsonb,
        artifacts jsonb NOT NULL DEFAULT '[]'::jsonb,
        source_run_id text NOT NULL,
        source_step_key text NOT NULL,
        created_at timestamptz NOT NULL,
        expires_at timestamptz,
        hit_count bigint NOT NULL DEFAULT 0,
        last_hit_at timestamptz,
        PRIMARY KEY (tenant_id, cache_key)
    )
    """,
    "CREATE INDEX step_cache_step_idx ON step_cache (tenant_id, workflow, step_key, created_at)",
    "CREATE INDEX step_cache_base_idx ON step_cache (tenant_id, base_key)",
    """
    CREATE TABLE cache_invalidations (
        sequence bigserial PRIMARY KEY,
        tenant_id text NOT NULL,
        workflow text NOT NULL,
        step_key text,
        cache_key text,
        requested_by text,
        recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
    )
    """,
    """
    CREATE FUNCTION cache_invalidations_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'cache_invalidations is append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END
    $$
    """,
    """
    CREATE TRIGGER cache_invalidations_append_only BEFORE UPDATE OR DELETE ON cache_invalidations
        FOR EACH ROW EXECUTE FUNCTION cache_invalidations_refuse_change()
    """,
    "ALTER TABLE runs ADD COLUMN trigger text NOT NULL DEFAULT 'start'",
    "ALTER TABLE runs ADD COLUMN base_run_id text",
    "ALTER TABLE runs ADD COLUMN change_request text",
    "ALTER TABLE runs ADD COLUMN rebuild_rerun text[]",
    "ALTER TABLE run_steps ADD COLUMN cache_key text",
    "ALTER TABLE run_steps ADD COLUMN cache_display text",
    "ALTER TABLE run_steps ADD COLUMN cache_result text",
    "ALTER TABLE run_steps ADD COLUMN cache_reason text",
    "ALTER TABLE run_steps ADD COLUMN source_run_id text",
    "CREATE INDEX run_steps_cache_key_idx ON run_steps (cache_key) WHERE cache_key IS NOT NULL",
]

DOWNGRADE = [
    "DROP INDEX run_steps_cache_key_idx",
    "ALTER TABLE run_steps DROP COLUMN source_run_id",
    "ALTER TABLE run_steps DROP COLUMN cache_reason",
    "ALTER TABLE run_steps DROP COLUMN cache_result",
    "ALTER TABLE run_steps DROP COLUMN cache_display",
    "ALTER TABLE run_steps DROP COLUMN cache_key",
    "ALTER TABLE runs DROP COLUMN rebuild_rerun",
    "ALTER TABLE runs DROP COLUMN change_request",
    "ALTER TABLE runs DROP COLUMN base_run_id",
    "ALTER TABLE runs DROP COLUMN trigger",
    "DROP TABLE cache_invalidations",
    "DROP FUNCTION cache_invalidations_refuse_change()",
    "DROP TABLE step_cache",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
