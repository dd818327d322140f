"""Workflows as DAGs: the registry, pinned versions, DAG step fields, artifacts.

`registry_events` is the registry's append-only log (like run_events); `workflows` is its
projection. Built-in workflows (RUNS_WORKFLOWS_DIR) belong to tenant '*' and every tenant sees
them. A run pins a workflow version by name, version and spec hash. run_steps gain the DAG's
fields; run_artifacts lists the files steps produced (the bytes live in the artifact store).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"

UPGRADE = [
    """
    CREATE TABLE registry_events (
        sequence bigserial PRIMARY KEY,
        type text NOT NULL,
        tenant_id text NOT NULL,
        payload jsonb NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
    )
    """,
    """
    CREATE FUNCTION registry_events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'registry_events is append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END
    $$
    """,
    """
    CREATE TRIGGER registry_events_append_only BEFORE UPDATE OR DELETE ON registry_events
        FOR EACH ROW EXECUTE FUNCTION registry_events_refuse_change()
    """,
    """
    CREATE TRIGGER registry_events_no_truncate BEFORE TRUNCATE ON registry_events
        FOR EACH STATEMENT EXECUTE FUNCTION registry_events_refuse_change()
    """,
    """
    CREATE TABLE workflows (
        tenant_id text NOT NULL,
        name text NOT NULL,
        version integer NOT NULL CHECK (version >= 1),
        spec_hash text NOT NULL,
        spec jsonb NOT NULL,
        builtin boolean NOT NULL DEFAULT false,
        created_at timestamptz NOT NULL,
        created_by text,
        registry_sequence bigint NOT NULL,
        PRIMARY KEY (tenant_id, name, version),
        CONSTRAINT workflows_hash_uq UNIQUE (tenant_id, name, spec_hash)
    )
    """,
    "ALTER TABLE runs ADD COLUMN workflow_version integer NOT NULL DEFAULT 1",
    "ALTER TABLE runs ADD COLUMN spec_hash text",
    "ALTER TABLE runs ADD COLUMN output jsonb",
    "ALTER TABLE run_steps DROP CONSTRAINT run_steps_status_check",
    """
    ALTER TABLE run_steps ADD CONSTRAINT run_steps_status_check
        CHECK (status IN ('CREATED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'SKIPPED', 'CANCELED'))
    """,
    "ALTER TABLE run_steps ADD COLUMN tries integer NOT NULL DEFAULT 0",
    "ALTER TABLE run_steps ADD COLUMN depends_on text[] NOT NULL DEFAULT '{}'",
    "ALTER TABLE run_steps ADD COLUMN step_error jsonb",
    "ALTER TABLE run_steps ADD COLUMN reason text",
    "ALTER TABLE tool_calls ADD COLUMN step_attempt integer NOT NULL DEFAULT 1",
    """
    CREATE TABLE run_artifacts (
        run_id text NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
        step_key text NOT NULL,
        name text NOT NULL,
        uri text NOT NULL,
        sha256 text NOT NULL,
        size bigint NOT NULL,
        media_type text NOT NULL,
        created_at timestamptz NOT NULL,
        PRIMARY KEY (run_id, step_key, name)
    )
    """,
    "CREATE INDEX run_artifacts_sha_idx ON run_artifacts (run_id, sha256)",
]

DOWNGRADE = [
    "DROP TABLE run_artifacts",
    "ALTER TABLE tool_calls DROP COLUMN step_attempt",
    "ALTER TABLE run_steps DROP COLUMN reason",
    "ALTER TABLE run_steps DROP COLUMN step_error",
    "ALTER TABLE run_steps DROP COLUMN depends_on",
    "ALTER TABLE run_steps DROP COLUMN tries",
    "DELETE FROM run_steps WHERE status = 'CANCELED'",
    "ALTER TABLE run_steps DROP CONSTRAINT run_steps_status_check",
    """
    ALTER TABLE run_steps ADD CONSTRAINT run_steps_status_check
        CHECK (status IN ('CREATED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'SKIPPED'))
    """,
    "ALTER TABLE runs DROP COLUMN output",
    "ALTER TABLE runs DROP COLUMN spec_hash",
    "ALTER TABLE runs DROP COLUMN workflow_version",
    "DROP TABLE workflows",
    "DROP TABLE registry_events",
    "DROP FUNCTION registry_events_refuse_change()",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
