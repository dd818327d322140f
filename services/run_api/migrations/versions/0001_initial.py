"""Initial schema: the append-only event log and its projections.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None

UPGRADE = [
    """
    CREATE TABLE runs (
        run_id text PRIMARY KEY,
        workspace_id text NOT NULL,
        workflow text NOT NULL,
        input jsonb NOT NULL,
        status text NOT NULL
            CHECK (status IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELED')),
        attempt integer NOT NULL DEFAULT 0,
        max_attempts integer NOT NULL CHECK (max_attempts >= 1),
        retry_backoff_seconds double precision NOT NULL,
        retry_backoff_max_seconds double precision NOT NULL,
        idempotency_key text,
        request_hash text NOT NULL,
        trace_context jsonb NOT NULL DEFAULT '{}'::jsonb,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        started_at timestamptz,
        finished_at timestamptz,
        cancel_requested_at timestamptz,
        cancel_reason text,
        next_attempt_at timestamptz NOT NULL,
        worker_id text,
        lease_expires_at timestamptz,
        stop_reason text,
        error text,
        last_sequence bigint NOT NULL DEFAULT 0
    )
    """,
    # Same key, same run: the unique index is what makes StartRun idempotent under concurrency.
    """
    CREATE UNIQUE INDEX runs_idempotency_key_uq ON runs (workspace_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL
    """,
    # Serves the claim query: only queued rows, in the order they become due.
    """
    CREATE INDEX runs_claim_idx ON runs (workspace_id, next_attempt_at, run_id)
        WHERE status = 'QUEUED'
    """,
    # Serves the capacity count per worker and the lease reaper.
    "CREATE INDEX runs_running_worker_idx ON runs (worker_id) WHERE status = 'RUNNING'",
    "CREATE INDEX runs_running_lease_idx ON runs (lease_expires_at) WHERE status = 'RUNNING'",
    "CREATE INDEX runs_status_idx ON runs (status, run_id)",
    """
    CREATE TABLE run_events (
        run_id text NOT NULL,
        sequence bigint NOT NULL CHECK (sequence >= 1),
        type text NOT NULL,
        attempt integer NOT NULL,
        worker_id text,
        event_id text NOT NULL,
        occurred_at timestamptz NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        payload jsonb NOT NULL DEFAULT '{}'::jsonb,
        CONSTRAINT run_events_pk PRIMARY KEY (run_id, sequence),
        CONSTRAINT run_events_event_id_uq UNIQUE (run_id, event_id)
    )
    """,
    """
    CREATE FUNCTION run_events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'run_events is append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END
    $$
    """,
    """
    CREATE TRIGGER run_events_append_only BEFORE UPDATE OR DELETE ON run_events
        FOR EACH ROW EXECUTE FUNCTION run_events_refuse_change()
    """,
    """
    CREATE TRIGGER run_events_no_truncate BEFORE TRUNCATE ON run_events
        FOR EACH STATEMENT EXECUTE FUNCTION run_events_refuse_change()
    """,
    """
    CREATE TABLE run_steps (
        run_id text NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
        step_key text NOT NULL,
        tool text NOT NULL,
        status text NOT NULL
            CHECK (status IN ('CREATED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'SKIPPED')),
        attempt integer NOT NULL,
        created_at timestamptz NOT NULL,
        started_at timestamptz,
        finished_at timestamptz,
        error text,
        output jsonb,
        PRIMARY KEY (run_id, step_key)
    )
    """,
    """
    CREATE TABLE tool_calls (
        run_id text NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
        tool_call_id text NOT NULL,
        step_key text NOT NULL,
        tool text NOT NULL,
        status text NOT NULL CHECK (status IN ('INVOKED', 'SUCCEEDED', 'FAILED')),
        attempt integer NOT NULL,
        input jsonb NOT NULL DEFAULT '{}'::jsonb,
        output jsonb,
        error text,
        invoked_at timestamptz NOT NULL,
        finished_at timestamptz,
        PRIMARY KEY (run_id, tool_call_id)
    )
    """,
    # One heartbeat row per worker: leases are extended here, not by rewriting every run row.
    """
    CREATE TABLE workers (
        worker_id text PRIMARY KEY,
        lease_expires_at timestamptz NOT NULL,
        last_heartbeat_at timestamptz NOT NULL,
        started_at timestamptz NOT NULL,
        -- The runs the worker said it holds at its last heartbeat: a run it no longer holds can expire.
        held_run_ids text[] NOT NULL DEFAULT '{}'
    )
    """,
]

DOWNGRADE = [
    "DROP TABLE workers",
    "DROP TABLE tool_calls",
    "DROP TABLE run_steps",
    "DROP TABLE run_events",
    "DROP FUNCTION run_events_refuse_change()",
    "DROP TABLE runs",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
