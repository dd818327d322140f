"""Tenants, API keys, worker sessions and audit columns.

Every run belongs to a tenant and a project; every index a tenant reads through starts with
tenant_id. API keys are stored as the sha256 of their secret. A worker row holds the hash of its
session token: only the process that opened the session can heartbeat, report or release.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"

UPGRADE = [
    "ALTER TABLE runs ADD COLUMN tenant_id text NOT NULL DEFAULT 'default'",
    "ALTER TABLE runs ADD COLUMN project_id text NOT NULL DEFAULT 'default'",
    "ALTER TABLE runs ADD COLUMN created_by text",
    "ALTER TABLE runs ADD COLUMN cancel_requested_by text",
    "DROP INDEX runs_idempotency_key_uq",
    """
    CREATE UNIQUE INDEX runs_idempotency_key_uq ON runs (tenant_id, workspace_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL
    """,
    "DROP INDEX runs_claim_idx",
    """
    CREATE INDEX runs_claim_idx ON runs (tenant_id, workspace_id, next_attempt_at, run_id)
        WHERE status = 'QUEUED'
    """,
    "DROP INDEX runs_status_idx",
    "CREATE INDEX runs_tenant_idx ON runs (tenant_id, run_id)",
    "CREATE INDEX runs_tenant_status_idx ON runs (tenant_id, status, run_id)",
    "ALTER TABLE workers ADD COLUMN tenant_id text NOT NULL DEFAULT 'default'",
    "ALTER TABLE workers ADD COLUMN session_token_hash text",
    """
    CREATE TABLE api_keys (
        key_id text PRIMARY KEY,
        secret_hash text NOT NULL,
        role text NOT NULL CHECK (role IN ('client', 'worker', 'admin')),
        tenant_id text NOT NULL,
        project_id text,
        workspace_id text,
        description text NOT NULL DEFAULT '',
        created_by text,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        expires_at timestamptz,
        revoked_at timestamptz,
        CONSTRAINT api_keys_secret_hash_uq UNIQUE (secret_hash)
    )
    """,
]

DOWNGRADE = [
    "DROP TABLE api_keys",
    "ALTER TABLE workers DROP COLUMN session_token_hash",
    "ALTER TABLE workers DROP COLUMN tenant_id",
    "DROP INDEX runs_tenant_status_idx",
    "DROP INDEX runs_tenant_idx",
    "CREATE INDEX runs_status_idx ON runs (status, run_id)",
    "DROP INDEX runs_claim_idx",
    "CREATE INDEX runs_claim_idx ON runs (workspace_id, next_attempt_at, run_id) WHERE status = 'QUEUED'",
    "DROP INDEX runs_idempotency_key_uq",
    """
    CREATE UNIQUE INDEX runs_idempotency_key_uq ON runs (workspace_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL
    """,
    "ALTER TABLE runs DROP COLUMN cancel_requested_by",
    "ALTER TABLE runs DROP COLUMN created_by",
    "ALTER TABLE runs DROP COLUMN project_id",
    "ALTER TABLE runs DROP COLUMN tenant_id",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
