"""Every SQL statement the API runs, in one place, each named entity-first with a one-line purpose.

Times such as `now` are parameters so tests control the clock. No SQL is built from strings.
"""

from __future__ import annotations

from sqlalchemy import TextClause, text


def q(sql: str) -> TextClause:
    """Wrap one statement."""
    return text(sql)


RUN_COLUMNS = """
    run_id, workspace_id, workflow, input, status, attempt, max_attempts, retry_backoff_seconds,
    retry_backoff_max_seconds, idempotency_key, request_hash, trace_context, created_at, updated_at,
    started_at, finished_at, cancel_requested_at, cancel_reason, next_attempt_at, worker_id,
    lease_expires_at, stop_reason, error, last_sequence
"""

# --- runs: reads -------------------------------------------------------------------------------

# Read one run.
run_get = q(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = :run_id")

# Lock the runs a batch of events is about, in a fixed order so two batches never deadlock.
run_lock_many = q(
    f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ANY(:run_ids) ORDER BY run_id FOR UPDATE"
)

# Find the run that holds an idempotency key.
run_get_by_idempotency_key = q(
    f"SELECT {RUN_COLUMNS} FROM runs WHERE workspace_id = :workspace_id AND idempotency_key = :key"
)

# Page through runs, newest first (run ids are ULIDs, so they sort by creation time).
run_list = q(
    f"""
    SELECT {RUN_COLUMNS} FROM runs
    WHERE (CAST(:status AS text) IS NULL OR status = :status)
      AND (CAST(:workflow AS text) IS NULL OR workflow = :workflow)
      AND (CAST(:after_run_id AS text) IS NULL OR run_id < :after_run_id)
    ORDER BY run_id DESC
    LIMIT :limit
    """
)

# Steps of a run, in the order they were created.
run_steps_for_run = q(
    """
    SELECT run_id, step_key, tool, status, attempt, created_at, started_at, finished_at, error, output
    FROM run_steps WHERE run_id = :run_id ORDER BY created_at, step_key
    """
)

# Tool calls of a run, in the order they were invoked.
tool_calls_for_run = q(
    """
    SELECT run_id, tool_call_id, step_key, tool, status, attempt, input, output, error, invoked_at,
           finished_at
    FROM tool_calls WHERE run_id = :run_id ORDER BY invoked_at, tool_call_id
    """
)

# --- claiming ----------------------------------------------------------------------------------

# A worker as the claim loop sees it: runs held (used capacity), whether it lacks a live heartbeat
# lease (a worker that never heartbeated, or a paused or cut-off one, is given nothing new), and its
# running runs asked to cancel.
worker_claim_state = q(
    """
    SELECT (SELECT count(*) FROM runs WHERE worker_id = :worker_id AND status = 'RUNNING') AS held,
           NOT EXISTS (SELECT 1 FROM workers WHERE worker_id = :worker_id AND lease_expires_at >= :now) AS lapsed,
           ARRAY(SELECT run_id FROM runs WHERE worker_id = :worker_id AND status = 'RUNNING'
                   AND cancel_requested_at IS NOT NULL ORDER BY run_id) AS cancel_run_ids
    """
)

# Lock up to :limit due queued runs of a workspace, skipping rows other claimers hold.
run_claim_candidates = q(
    f"""
    SELECT {RUN_COLUMNS} FROM runs
    WHERE workspace_id = :workspace_id AND status = 'QUEUED' AND next_attempt_at <= :now
    ORDER BY next_attempt_at, run_id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)

# --- run_events --------------------------------------------------------------------------------

# Append one event at the sequence the caller computed under the run's row lock.
run_events_append = q(
    """
    INSERT INTO run_events (run_id, sequence, type, attempt, worker_id, event_id, occurred_at, payload,
        recorded_at)
    SELECT :run_id, :sequence, :type, :attempt, :worker_id, :event_id,
        COALESCE(CAST(:occurred_at AS timestamptz), t.at), CAST(:payload AS jsonb), t.at
    FROM (SELECT COALESCE(CAST(:recorded_at AS timestamptz), clock_timestamp()) AS at) AS t
    RETURNING recorded_at, occurred_at
    """
)

# Which of these event ids the runs have recorded already (idempotent reports; the caller pairs them).
run_events_find_ids = q(
    """
    SELECT run_id, event_id, sequence FROM run_events
    WHERE run_id = ANY(:run_ids) AND event_id = ANY(:event_ids)
    """
)

# Append a batch of events at the sequences the caller computed under the runs' row locks.
run_events_append_many = q(
    """
    INSERT INTO run_events (run_id, sequence, type, attempt, worker_id, event_id, occurred_at, payload,
        recorded_at)
    SELECT e.run_id, e.sequence, e.type, e.attempt, e.worker_id, e.event_id,
        COALESCE(e.occurred_at, clock_timestamp()), CAST(e.payload AS jsonb), clock_timestamp()
    FROM unnest(CAST(:run_ids AS text[]), CAST(:sequences AS bigint[]), CAST(:types AS text[]),
                CAST(:attempts AS integer[]), CAST(:worker_ids AS text[]), CAST(:event_ids AS text[]),
                CAST(:occurred_ats AS timestamptz[]), CAST(:payloads AS text[]))
        AS e(run_id, sequence, type, attempt, worker_id, event_id, occurred_at, payload)
    RETURNING run_id, sequence, recorded_at, occurred_at
    """
)

# A run's last event (type and reason), for the heartbeat's adopt-first rule.
run_events_last = q(
    """
    SELECT type, payload->>'reason' AS reason FROM run_events WHERE run_id = :run_id
    ORDER BY sequence DESC LIMIT 1
    """
)

# A run's events after a sequence, in order.
run_events_after = q(
    """
    SELECT run_id, sequence, type, attempt, worker_id, event_id, occurred_at, recorded_at, payload
    FROM run_events WHERE run_id = :run_id AND sequence > :after_sequence
    ORDER BY sequence LIMIT :limit
    """
)

# The log in replay order, a page at a time (keyset on run_id, sequence).
run_events_page = q(
    """
    SELECT run_id, sequence, type, attempt, worker_id, event_id, occurred_at, recorded_at, payload
    FROM run_events WHERE (run_id, sequence) > (:after_run_id, :after_sequence)
    ORDER BY run_id, sequence LIMIT :limit
    """
)

# --- projections (written only by the projector) -----------------------------------------------

# run.queued: create the run row (a conflicting idempotency key inserts nothing).
runs_project_queued = q(
    f"""
    INSERT INTO runs (run_id, workspace_id, workflow, input, status, attempt, max_attempts,
        retry_backoff_seconds, retry_backoff_max_seconds, idempotency_key, request_hash, trace_context,
        created_at, updated_at, next_attempt_at, last_sequence)
    SELECT :run_id, :workspace_id, :workflow, CAST(:input AS jsonb), 'QUEUED', 0, :max_attempts,
        :retry_backoff_seconds, :retry_backoff_max_seconds, :idempotency_key, :request_hash,
        CAST(:trace_context AS jsonb), t.at, t.at, t.at, :sequence
    FROM (SELECT COALESCE(CAST(:recorded_at AS timestamptz), clock_timestamp()) AS at) AS t
    ON CONFLICT (workspace_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING {RUN_COLUMNS}
    """
)

# run.claimed: the run is RUNNING under a new attempt, held by a worker until its lease expires.
runs_project_claimed = q(
    """
    UPDATE runs SET status = 'RUNNING', attempt = :attempt, worker_id = :worker_id,
        lease_expires_at = :lease_expires_at, updated_at = :recorded_at, last_sequence = :sequence
    WHERE run_id = :run_id AND status = 'QUEUED'
    """
)

# run.started: first start time.
runs_project_started = q(
    """
    UPDATE runs SET started_at = COALESCE(started_at, :recorded_at), updated_at = :recorded_at,
        last_sequence = :sequence
    WHERE run_id = :run_id AND status = 'RUNNING' AND attempt = :attempt
    """
)

# run.completed / run.failed / run.canceled: the run ends; terminal rows never change again.
runs_project_finished = q(
    """
    UPDATE runs SET status = :status, stop_reason = :stop_reason, error = :error,
        finished_at = :recorded_at, lease_expires_at = NULL, updated_at = :recorded_at,
        last_sequence = :sequence
    WHERE run_id = :run_id AND status IN ('QUEUED', 'RUNNING') AND attempt = :attempt
    """
)

# run.requeued: back to QUEUED for the next attempt, due at next_attempt_at.
runs_project_requeued = q(
    """
    UPDATE runs SET status = 'QUEUED', next_attempt_at = :next_attempt_at, worker_id = NULL,
        lease_expires_at = NULL, error = :error, updated_at = :recorded_at, last_sequence = :sequence
    WHERE run_id = :run_id AND status = 'RUNNING' AND attempt = :attempt
    """
)

# run.cancel_requested: remember the request; the worker stops at the next boundary.
runs_project_cancel_requested = q(
    """
    UPDATE runs SET cancel_requested_at = :recorded_at, cancel_reason = :reason, updated_at = :recorded_at,
        last_sequence = :sequence
    WHERE run_id = :run_id AND status IN ('QUEUED', 'RUNNING') AND attempt = :attempt
    """
)

# After a batch: the run's last sequence and update time follow its last event.
runs_project_sequence = q(
    """
    UPDATE runs SET updated_at = :recorded_at, last_sequence = :sequence
    WHERE run_id = :run_id AND attempt = :attempt
    """
)

# step.created: the step (re)starts in this attempt.
run_steps_project_created = q(
    """
    INSERT INTO run_steps (run_id, step_key, tool, status, attempt, created_at)
    VALUES (:run_id, :step_key, :tool, 'CREATED', :attempt, :recorded_at)
    ON CONFLICT (run_id, step_key) DO UPDATE SET tool = EXCLUDED.tool, status = 'CREATED',
        attempt = EXCLUDED.attempt, created_at = EXCLUDED.created_at, started_at = NULL,
        finished_at = NULL, error = NULL, output = NULL
    """
)

# step.started.
run_steps_project_started = q(
    """
    UPDATE run_steps SET status = 'RUNNING', started_at = :recorded_at
    WHERE run_id = :run_id AND step_key = :step_key
    """
)

# step.succeeded / step.failed / step.skipped.
run_steps_project_finished = q(
    """
    UPDATE run_steps SET status = :status, finished_at = :recorded_at, error = :error,
        output = CAST(:output AS jsonb)
    WHERE run_id = :run_id AND step_key = :step_key
    """
)

# tool.invoked: a new tool call.
tool_calls_project_invoked = q(
    """
    INSERT INTO tool_calls (run_id, tool_call_id, step_key, tool, status, attempt, input, invoked_at)
    VALUES (:run_id, :tool_call_id, :step_key, :tool, 'INVOKED', :attempt, CAST(:input AS jsonb),
            :recorded_at)
    """
)

# tool.succeeded / tool.failed.
tool_calls_project_finished = q(
    """
    UPDATE tool_calls SET status = :status, output = CAST(:output AS jsonb), error = :error,
        finished_at = :recorded_at
    WHERE run_id = :run_id AND tool_call_id = :tool_call_id
    """
)

# Replay starts from empty projections (run_steps and tool_calls go with their runs).
projections_clear = q("DELETE FROM runs")

# --- notifications -----------------------------------------------------------------------------

# Wake watchers of a run, claimers of a workspace, or the streams of a worker that freed a slot.
notify = q("SELECT pg_notify(:channel, :payload)")
notify_many = q(
    "SELECT pg_notify(c, p) FROM unnest(CAST(:channels AS text[]), CAST(:payloads AS text[])) AS t(c, p)"
)

# --- workers and leases ------------------------------------------------------------------------

# Record a worker's heartbeat: one row per worker, the runs table does not churn.
workers_heartbeat = q(
    """
    INSERT INTO workers (worker_id, lease_expires_at, last_heartbeat_at, started_at, held_run_ids)
    VALUES (:worker_id, :lease_expires_at, :now, :now, :held_run_ids)
    ON CONFLICT (worker_id) DO UPDATE SET lease_expires_at = EXCLUDED.lease_expires_at,
        last_heartbeat_at = EXCLUDED.last_heartbeat_at, held_run_ids = EXCLUDED.held_run_ids
    """
)

# Held runs of a worker as the database sees them (to answer cancels and lost runs).
run_held_state = q(
    """
    SELECT run_id, status, attempt, max_attempts, worker_id, cancel_requested_at FROM runs
    WHERE run_id = ANY(:run_ids)
    """
)

# Runs whose lease has lapsed: the claim-time lease expired, and the worker's heartbeat lease did
# too or its last heartbeat no longer listed the run.
run_find_expired_leases = q(
    """
    SELECT r.run_id FROM runs r
    LEFT JOIN workers w ON w.worker_id = r.worker_id
    WHERE r.status = 'RUNNING' AND r.lease_expires_at < :now
      AND (w.worker_id IS NULL OR w.lease_expires_at < :now OR NOT (r.run_id = ANY(w.held_run_ids)))
    ORDER BY r.lease_expires_at
    LIMIT :limit
    FOR UPDATE OF r SKIP LOCKED
    """
)

# Forget workers that have been silent for a long time and hold nothing.
workers_forget_silent = q(
    """
    DELETE FROM workers w
    WHERE w.lease_expires_at < :before
      AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.worker_id = w.worker_id AND r.status = 'RUNNING')
    """
)

# Cluster-wide singleton for the reaper: only the holder of this lock reaps.
reaper_try_lock = q("SELECT pg_try_advisory_xact_lock(7206157372)")

# Database liveness, for the health service.
db_ping = q("SELECT 1")

# The events that open and close attempts, for GetRun's attempt history.
run_events_attempts = q(
    """
    SELECT type, attempt, worker_id, recorded_at, payload FROM run_events
    WHERE run_id = :run_id AND type IN ('run.claimed', 'run.requeued', 'run.lease_expired', 'run.completed',
                                        'run.failed', 'run.canceled')
    ORDER BY sequence
    """
)

# Cluster-wide counters of what happened to runs, from the log.
stats_event_counts = q(
    """
    SELECT type, count(*) AS n, count(*) FILTER (WHERE (payload->>'readopted')::boolean) AS readopted
    FROM run_events
    WHERE type IN ('run.claimed', 'run.completed', 'run.failed', 'run.lease_expired', 'run.requeued',
                   'run.canceled')
    GROUP BY type
    """
)

# Runs by current status.
stats_runs_by_status = q("SELECT status, count(*) AS n FROM runs GROUP BY status")
