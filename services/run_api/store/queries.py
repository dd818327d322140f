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
    lease_expires_at, stop_reason, error, last_sequence, tenant_id, project_id, created_by,
    cancel_requested_by, workflow_version, spec_hash, output, trigger, base_run_id, change_request,
    rebuild_rerun, required_tools, released_attempts
"""

# --- runs: reads -------------------------------------------------------------------------------

# Read one run.
run_get = q(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = :run_id")

# Keep a finished run from being archived until this transaction ends (a rebuild queueing on it as its base).
run_hold_finished = q("SELECT run_id FROM runs WHERE run_id = :run_id AND status = 'SUCCEEDED' FOR KEY SHARE")

# Lock the runs a batch of events is about, in a fixed order so two batches never deadlock.
run_lock_many = q(
    f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ANY(:run_ids) ORDER BY run_id FOR UPDATE"
)

# Lock the runs a worker's report is about, with what checking it needs in the same round trip:
# the worker's session token hash, each run's steps and tool calls (key or id, status, attempt) and
# which of the reported event ids it has recorded already (event id, sequence). :event_ids_by_run is a JSON
# object {run id: [its reported event ids]}, so each run's lookup searches its own few ids: with one flat
# list PostgreSQL 15 descends the (run_id, event_id) index once per run and listed id (every id of the
# report, for every run: 100 runs x 700 ids = 70,000 descents).
run_lock_many_for_report = q(
    f"""
    SELECT {RUN_COLUMNS},
        (SELECT w.session_token_hash FROM workers w WHERE w.worker_id = :worker_id) AS session_token_hash,
        (SELECT COALESCE(json_agg(json_build_array(s.step_key, s.status, s.attempt)), '[]')
           FROM run_steps s WHERE s.run_id = runs.run_id) AS steps,
        (SELECT COALESCE(json_agg(json_build_array(c.tool_call_id, c.status, c.attempt)), '[]')
           FROM tool_calls c WHERE c.run_id = runs.run_id) AS calls,
        (SELECT COALESCE(json_agg(json_build_array(e.event_id, e.sequence)), '[]')
           FROM run_events e WHERE e.run_id = runs.run_id
             AND e.event_id = ANY(ARRAY(
                 SELECT jsonb_array_elements_text(CAST(:event_ids_by_run AS jsonb) -> runs.run_id)))) AS known
    FROM runs WHERE run_id = ANY(:run_ids) ORDER BY run_id FOR UPDATE
    """
)

# Find the run that holds an idempotency key in a tenant's workspace.
run_get_by_idempotency_key = q(
    f"""
    SELECT {RUN_COLUMNS} FROM runs
    WHERE tenant_id = :tenant_id AND workspace_id = :workspace_id AND idempotency_key = :key
    """
)

# Page through runs, newest first (run ids are ULIDs, so they sort by creation time).
run_list = q(
    f"""
    SELECT {RUN_COLUMNS} FROM runs
    WHERE tenant_id = :tenant_id
      AND (CAST(:project_id AS text) IS NULL OR project_id = :project_id)
      AND (CAST(:workspace_id AS text) IS NULL OR workspace_id = :workspace_id)
      AND (CAST(:status AS text) IS NULL OR status = :status)
      AND (CAST(:workflow AS text) IS NULL OR workflow = :workflow)
      AND (CAST(:after_run_id AS text) IS NULL OR run_id < :after_run_id)
    ORDER BY run_id DESC
    LIMIT :limit
    """
)

# ListRuns' text search: the run list's filters, and a run id prefix (the range [:run_low,
# :run_high] of ULIDs, served by the primary key; NULL when the text cannot start a ULID, which the
# planner folds away) or an idempotency key prefix (the byte-order range [:key_low, :key_high),
# served by runs_idempotency_prefix_idx).
run_search = q(
    f"""
    SELECT {RUN_COLUMNS} FROM runs
    WHERE tenant_id = :tenant_id
      AND ((run_id >= :run_low AND run_id <= :run_high)
           OR (idempotency_key COLLATE "C" >= :key_low AND idempotency_key COLLATE "C" < :key_high))
      AND (CAST(:project_id AS text) IS NULL OR project_id = :project_id)
      AND (CAST(:workspace_id AS text) IS NULL OR workspace_id = :workspace_id)
      AND (CAST(:status AS text) IS NULL OR status = :status)
      AND (CAST(:workflow AS text) IS NULL OR workflow = :workflow)
      AND (CAST(:after_run_id AS text) IS NULL OR run_id < :after_run_id)
    ORDER BY run_id DESC
    LIMIT :limit
    """
)

STEP_COLUMNS = """
    s.run_id, s.step_key, s.tool, s.status, s.attempt, s.created_at, s.started_at, s.finished_at, s.error,
    s.output, s.tries, s.depends_on, s.step_error, s.reason, s.cache_key, s.cache_display, s.cache_result,
    s.cache_reason, s.source_run_id,
    (SELECT COALESCE(json_agg(json_build_object(
        'name', a.name, 'uri', a.uri, 'sha256', a.sha256, 'size', a.size, 'media_type', a.media_type,
        'created_at', a.created_at) ORDER BY a.name), '[]')
     FROM run_artifacts a WHERE a.run_id = s.run_id AND a.step_key = s.step_key) AS artifacts
"""

# Steps of a run (only those in :status when set), in the order they were created, with their artifacts.
run_steps_for_run = q(
    f"""
    SELECT {STEP_COLUMNS}
    FROM run_steps s WHERE s.run_id = :run_id AND (CAST(:status AS text) IS NULL OR s.status = :status)
    ORDER BY s.created_at, s.step_key
    """
)

# What earlier attempts left of these runs' steps (for a claim that resumes them).
run_steps_for_claims = q(
    f"SELECT {STEP_COLUMNS} FROM run_steps s WHERE s.run_id = ANY(:run_ids) ORDER BY s.run_id, s.created_at"
)

# Steps of a run by state (GetRun's steps_summary).
run_steps_summary = q("SELECT status, count(*) AS n FROM run_steps WHERE run_id = :run_id GROUP BY status")

ARTIFACT_COLUMNS = "run_id, step_key, name, uri, sha256, size, media_type, created_at"

# One artifact of a run by its step and name (a client's download).
run_artifacts_get = q(
    f"SELECT {ARTIFACT_COLUMNS} FROM run_artifacts WHERE run_id = :run_id AND step_key = :step_key AND name = :name"
)

# Any artifact of a run with these bytes (a worker's fetch of an upstream step's file).
run_artifacts_by_sha256 = q(
    f"SELECT {ARTIFACT_COLUMNS} FROM run_artifacts WHERE run_id = :run_id AND sha256 = :sha256 LIMIT 1"
)

# Artifacts of a run, step by step.
run_artifacts_for_run = q(
    f"SELECT {ARTIFACT_COLUMNS} FROM run_artifacts WHERE run_id = :run_id ORDER BY created_at, step_key, name"
)

# Tool calls of a run, in the order they were invoked.
tool_calls_for_run = q(
    """
    SELECT run_id, tool_call_id, step_key, tool, status, attempt, input, output, error, invoked_at,
           finished_at, step_attempt
    FROM tool_calls WHERE run_id = :run_id ORDER BY invoked_at, tool_call_id
    """
)

# --- claiming ----------------------------------------------------------------------------------

_RUNS_RETURNING = ", ".join(f"runs.{c.strip()}" for c in RUN_COLUMNS.split(","))

# A whole claim in one statement (run in autocommit: one round trip). First the worker as the claim
# loop sees it: runs held (used capacity), whether it lacks a live heartbeat lease (a worker that never
# heartbeated, or a paused or cut-off one, is given nothing new), its session, and its running runs
# asked to cancel. Then up to its free capacity (at most :batch_limit; none when its lease lapsed or
# its session was replaced) due queued runs of the tenant's workspace, locked in claim order with
# SKIP LOCKED (other claimers' rows are passed over), their run.claimed events (next sequence, next
# attempt, the event ids the caller made) and the projection runs_project_claimed_many makes of them,
# and a notification per claimed run. One row per claimed run (run columns), or one row of NULL run
# columns when none was claimed; every row carries the worker's state (claim_* columns).
# Routed by tools: a run goes only to a worker whose declared :tools contain all its required_tools
# (NULL, a run queued before tools were recorded, counts as none); :tools NULL (the worker declared
# none) takes any run. So that runs no live worker can take never slow the claims of the others, the
# queue is read per tool set (runs_claim_tools_idx: tenant, workspace, tool set, claim order): `sets`
# walks the distinct tool sets of the workspace's queue (a loose index scan, one descent per set),
# then each set the worker has every tool of gives its first due runs in claim order (a range of the
# index, locked SKIP LOCKED), merged into claim order. With more than one such set, the runs a set
# gave beyond the batch stay locked only until the statement ends.
runs_claim = q(
    f"""
    WITH RECURSIVE w AS (
        SELECT (SELECT count(*) FROM runs WHERE worker_id = :worker_id AND status = 'RUNNING') AS held,
               NOT EXISTS (SELECT 1 FROM workers WHERE worker_id = :worker_id AND lease_expires_at >= :now)
                   AS lapsed,
               (SELECT session_token_hash FROM workers WHERE worker_id = :worker_id) AS session_token_hash,
               ARRAY(SELECT run_id FROM runs WHERE worker_id = :worker_id AND status = 'RUNNING'
                       AND cancel_requested_at IS NOT NULL ORDER BY run_id) AS cancel_run_ids
    ), lim AS (
        SELECT CASE WHEN w.lapsed OR (CAST(:session_token_hash AS text) IS NOT NULL
                                      AND w.session_token_hash IS DISTINCT FROM CAST(:session_token_hash AS text))
                    THEN 0 ELSE GREATEST(LEAST(CAST(:batch_limit AS integer), :capacity - w.held), 0) END AS n
        FROM w
    ), sets (tools) AS (
        (SELECT COALESCE(required_tools, '{{}}') FROM runs
         WHERE tenant_id = :tenant_id AND workspace_id = :workspace_id AND status = 'QUEUED'
           AND (SELECT n FROM lim) > 0
         ORDER BY COALESCE(required_tools, '{{}}') LIMIT 1)
        UNION ALL
        SELECT (SELECT COALESCE(r.required_tools, '{{}}') FROM runs r
                WHERE r.tenant_id = :tenant_id AND r.workspace_id = :workspace_id AND r.status = 'QUEUED'
                  AND COALESCE(r.required_tools, '{{}}') > sets.tools
                ORDER BY COALESCE(r.required_tools, '{{}}') LIMIT 1)
        FROM sets WHERE sets.tools IS NOT NULL
    ), c AS (
        SELECT t.* FROM sets CROSS JOIN LATERAL (
            SELECT run_id, attempt, last_sequence, next_attempt_at FROM runs
            WHERE tenant_id = :tenant_id AND workspace_id = :workspace_id AND status = 'QUEUED'
              AND COALESCE(required_tools, '{{}}') = sets.tools
              AND next_attempt_at <= :now
              AND (CAST(:project_id AS text) IS NULL OR project_id = :project_id)
            ORDER BY next_attempt_at, run_id
            LIMIT (SELECT n FROM lim)
            FOR UPDATE SKIP LOCKED
        ) AS t
        WHERE sets.tools IS NOT NULL AND (CAST(:tools AS text[]) IS NULL OR sets.tools <@ CAST(:tools AS text[]))
        ORDER BY t.next_attempt_at, t.run_id
        LIMIT (SELECT n FROM lim)
    ), numbered AS (
        SELECT c.*, row_number() OVER (ORDER BY c.next_attempt_at, c.run_id) AS i FROM c
    ), e AS (
        INSERT INTO run_events (run_id, sequence, type, attempt, worker_id, event_id, occurred_at, payload,
            recorded_at)
        SELECT n.run_id, n.last_sequence + 1, 'run.claimed', n.attempt + 1, :worker_id,
            (CAST(:event_ids AS text[]))[n.i], :now,
            jsonb_build_object('worker_id', CAST(:worker_id AS text), 'lease_expires_at', CAST(:lease_text AS text)),
            clock_timestamp()
        FROM numbered n ORDER BY n.i
        RETURNING run_id, sequence, recorded_at, event_id
    ), u AS (
        UPDATE runs SET status = 'RUNNING', attempt = runs.attempt + 1, worker_id = :worker_id,
            lease_expires_at = :lease_expires_at, updated_at = e.recorded_at, last_sequence = e.sequence,
            error = NULL
        FROM e WHERE runs.run_id = e.run_id AND runs.status = 'QUEUED'
        RETURNING {_RUNS_RETURNING}
    )
    SELECT w.held AS claim_held, w.lapsed AS claim_lapsed, w.session_token_hash AS claim_session_token_hash,
        w.cancel_run_ids AS claim_cancel_run_ids, lim.n AS claim_limit,
        (SELECT count(*) FROM (SELECT pg_notify(:channel_events, u.run_id) FROM u) AS notified) AS claim_notified,
        u.*
    FROM w CROSS JOIN lim LEFT JOIN u ON true
    ORDER BY u.next_attempt_at, u.run_id
    """
)

# --- run_events --------------------------------------------------------------------------------

# Which of these (run id, event id) pairs, given as two parallel arrays, the log holds already
# (idempotent reports): one index descent per pair.
run_events_find_ids = q(
    """
    SELECT run_id, event_id, sequence FROM run_events
    WHERE (run_id, event_id) IN (SELECT * FROM unnest(CAST(:run_ids AS text[]), CAST(:event_ids AS text[])))
    """
)

# Append a batch of events at the sequences the caller computed under the runs' row locks, and send the
# notifications they call for (:channels with :payloads; delivered at commit).
run_events_append_many = q(
    """
    WITH ins AS (
        INSERT INTO run_events (run_id, sequence, type, attempt, worker_id, event_id, occurred_at, payload,
            recorded_at)
        SELECT e.run_id, e.sequence, e.type, e.attempt, e.worker_id, e.event_id,
            COALESCE(e.occurred_at, clock_timestamp()), e.payload, clock_timestamp()
        FROM jsonb_to_recordset(CAST(:rows AS jsonb))
            AS e(run_id text, sequence bigint, type text, attempt integer, worker_id text, event_id text,
                 occurred_at timestamptz, payload jsonb)
        RETURNING run_id, sequence, recorded_at, occurred_at
    )
    SELECT ins.*,
        (SELECT count(*) FROM (SELECT pg_notify(c, p)
                               FROM unnest(CAST(:channels AS text[]), CAST(:payloads AS text[])) AS t(c, p)) AS n)
            AS notified
    FROM ins
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
    INSERT INTO runs (run_id, tenant_id, project_id, workspace_id, workflow, input, status, attempt,
        max_attempts, retry_backoff_seconds, retry_backoff_max_seconds, idempotency_key, request_hash,
        trace_context, created_by, created_at, updated_at, next_attempt_at, last_sequence,
        workflow_version, spec_hash, trigger, base_run_id, change_request, rebuild_rerun, required_tools)
    SELECT :run_id, :tenant_id, :project_id, :workspace_id, :workflow, CAST(:input AS jsonb), 'QUEUED', 0,
        :max_attempts, :retry_backoff_seconds, :retry_backoff_max_seconds, :idempotency_key, :request_hash,
        CAST(:trace_context AS jsonb), :created_by, t.at, t.at, t.at, :sequence,
        :workflow_version, :spec_hash, :trigger, :base_run_id, :change_request, :rebuild_rerun,
        CAST(:required_tools AS text[])
    FROM (SELECT COALESCE(CAST(:recorded_at AS timestamptz), clock_timestamp()) AS at) AS t
    ON CONFLICT (tenant_id, workspace_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING {RUN_COLUMNS}
    """
)

# run.queued for many new runs in one statement: the runs rows and their run.queued events (sequence
# 1, recorded when the row was created), and a notification to the claimers of each of :queued_keys
# (one statement: in autocommit it is the whole StartRun). A run whose idempotency key is taken (by an
# earlier run, or by an earlier row of the same batch) inserts nothing and is absent from what is returned.
runs_queue_many = q(
    f"""
    WITH v AS (
        SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb))
            AS v(ord integer, run_id text, tenant_id text, project_id text, workspace_id text, workflow text,
                 input jsonb, max_attempts integer, retry_backoff_seconds double precision,
                 retry_backoff_max_seconds double precision, idempotency_key text, request_hash text,
                 trace_context jsonb, created_by text, workflow_version integer, spec_hash text, trigger text,
                 base_run_id text, change_request text, rebuild_rerun text[], required_tools text[],
                 event_id text, occurred_at timestamptz, payload jsonb)
    ), ins AS (
        INSERT INTO runs (run_id, tenant_id, project_id, workspace_id, workflow, input, status, attempt,
            max_attempts, retry_backoff_seconds, retry_backoff_max_seconds, idempotency_key, request_hash,
            trace_context, created_by, created_at, updated_at, next_attempt_at, last_sequence,
            workflow_version, spec_hash, trigger, base_run_id, change_request, rebuild_rerun, required_tools)
        SELECT v.run_id, v.tenant_id, v.project_id, v.workspace_id, v.workflow, v.input, 'QUEUED', 0,
            v.max_attempts, v.retry_backoff_seconds, v.retry_backoff_max_seconds, v.idempotency_key,
            v.request_hash, v.trace_context, v.created_by, t.at, t.at, t.at, 1,
            v.workflow_version, v.spec_hash, v.trigger, v.base_run_id, v.change_request, v.rebuild_rerun,
            v.required_tools
        FROM v CROSS JOIN LATERAL (SELECT clock_timestamp() AS at, v.ord) AS t
        ORDER BY v.ord
        ON CONFLICT (tenant_id, workspace_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING {RUN_COLUMNS}
    ), logged AS (
        INSERT INTO run_events (run_id, sequence, type, attempt, worker_id, event_id, occurred_at, payload,
            recorded_at)
        SELECT ins.run_id, 1, 'run.queued', 0, NULL, v.event_id, COALESCE(v.occurred_at, ins.created_at),
            v.payload, ins.created_at
        FROM ins JOIN v ON v.run_id = ins.run_id
    )
    SELECT ins.*,
        (SELECT count(*) FROM (SELECT pg_notify(:channel_queued, k) FROM unnest(CAST(:queued_keys AS text[])) AS k
                               WHERE EXISTS (SELECT 1 FROM ins)) AS n) AS notified
    FROM ins
    """
)

# step.succeeded: the artifacts it recorded.
run_artifacts_project = q(
    """
    INSERT INTO run_artifacts (run_id, step_key, name, uri, sha256, size, media_type, created_at)
    SELECT :run_id, :step_key, a.name, a.uri, a.sha256, a.size::bigint, a.media_type, :recorded_at
    FROM jsonb_to_recordset(CAST(:artifacts AS jsonb))
        AS a(name text, uri text, sha256 text, size numeric, media_type text)
    ON CONFLICT (run_id, step_key, name) DO UPDATE SET uri = EXCLUDED.uri, sha256 = EXCLUDED.sha256,
        size = EXCLUDED.size, media_type = EXCLUDED.media_type, created_at = EXCLUDED.created_at
    """
)

# --- projections, set-based: one statement applies one kind of event to many rows ------------
# The store applies a batch in rounds: a round holds at most one event per run row, step row and
# tool call row, so each statement below touches distinct rows and the rounds keep every row's
# events in log order. :rows is a JSON array of objects, one per event (one parameter, encoded once).

# run.claimed for many runs (a new attempt: the error of the one before is cleared; a queued run keeps it).
runs_project_claimed_many = q(
    """
    UPDATE runs SET status = 'RUNNING', attempt = v.attempt, worker_id = v.worker_id,
        lease_expires_at = v.lease_expires_at, updated_at = v.recorded_at, last_sequence = v.sequence,
        error = NULL
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS v(run_id text, attempt integer, sequence bigint, recorded_at timestamptz, worker_id text,
             lease_expires_at timestamptz)
    WHERE runs.run_id = v.run_id AND runs.status = 'QUEUED'
    """
)

# run.started for many runs.
runs_project_started_many = q(
    """
    UPDATE runs SET started_at = COALESCE(runs.started_at, v.recorded_at), updated_at = v.recorded_at,
        last_sequence = v.sequence
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS v(run_id text, attempt integer, sequence bigint, recorded_at timestamptz)
    WHERE runs.run_id = v.run_id AND runs.status = 'RUNNING' AND runs.attempt = v.attempt
    """
)

# run.completed / run.failed / run.canceled for many runs; terminal rows never change again.
runs_project_finished_many = q(
    """
    UPDATE runs SET status = v.status, stop_reason = v.stop_reason, error = v.error, output = v.output,
        finished_at = v.recorded_at, lease_expires_at = NULL, updated_at = v.recorded_at,
        last_sequence = v.sequence
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS v(run_id text, attempt integer, sequence bigint, recorded_at timestamptz, status text,
             stop_reason text, error text, output jsonb)
    WHERE runs.run_id = v.run_id AND runs.status IN ('QUEUED', 'RUNNING') AND runs.attempt = v.attempt
    """
)

# run.requeued for many runs.
runs_project_requeued_many = q(
    """
    UPDATE runs SET status = 'QUEUED', next_attempt_at = v.next_attempt_at, worker_id = NULL,
        lease_expires_at = NULL, error = v.error, updated_at = v.recorded_at, last_sequence = v.sequence,
        released_attempts = runs.released_attempts + CASE WHEN v.released THEN 1 ELSE 0 END
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS v(run_id text, attempt integer, sequence bigint, recorded_at timestamptz,
             next_attempt_at timestamptz, error text, released boolean)
    WHERE runs.run_id = v.run_id AND runs.status = 'RUNNING' AND runs.attempt = v.attempt
    """
)

# run.cancel_requested for many runs.
runs_project_cancel_requested_many = q(
    """
    UPDATE runs SET cancel_requested_at = v.recorded_at, cancel_reason = v.reason,
        cancel_requested_by = v.requested_by, updated_at = v.recorded_at, last_sequence = v.sequence
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS v(run_id text, attempt integer, sequence bigint, recorded_at timestamptz, reason text,
             requested_by text)
    WHERE runs.run_id = v.run_id AND runs.status IN ('QUEUED', 'RUNNING') AND runs.attempt = v.attempt
    """
)

# After a batch: each run's last sequence and update time follow its last event.
runs_project_sequence_many = q(
    """
    UPDATE runs SET updated_at = v.recorded_at, last_sequence = v.sequence
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS v(run_id text, attempt integer, sequence bigint, recorded_at timestamptz)
    WHERE runs.run_id = v.run_id AND runs.attempt = v.attempt
    """
)

# step.created for many steps (again, after an attempt that did not finish one: its tries are kept).
run_steps_project_created_many = q(
    """
    INSERT INTO run_steps (run_id, step_key, tool, status, attempt, created_at, depends_on)
    SELECT v.run_id, v.step_key, v.tool, 'CREATED', v.attempt, v.recorded_at, v.depends_on
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS v(run_id text, attempt integer, recorded_at timestamptz, step_key text, tool text, depends_on text[])
    ON CONFLICT (run_id, step_key) DO UPDATE SET tool = EXCLUDED.tool, status = 'CREATED',
        attempt = EXCLUDED.attempt, depends_on = EXCLUDED.depends_on, started_at = NULL,
        finished_at = NULL, error = NULL, output = NULL, step_error = NULL, reason = NULL
    """
)

# step.started for many steps.
run_steps_project_started_many = q(
    """
    UPDATE run_steps SET status = 'RUNNING', started_at = v.recorded_at, finished_at = NULL,
        attempt = v.attempt, tries = COALESCE(v.try, run_steps.tries + 1), error = NULL, step_error = NULL,
        cache_key = COALESCE(v.cache_key, run_steps.cache_key),
        cache_display = COALESCE(v.cache_display, run_steps.cache_display),
        cache_result = COALESCE(v.cache_result, run_steps.cache_result),
        cache_reason = COALESCE(v.cache_reason, run_steps.cache_reason)
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS v(run_id text, attempt integer, recorded_at timestamptz, step_key text, try integer, cache_key text,
             cache_display text, cache_result text, cache_reason text)
    WHERE run_steps.run_id = v.run_id AND run_steps.step_key = v.step_key
    """
)

# step.succeeded / step.failed / step.skipped / step.canceled for many steps.
run_steps_project_finished_many = q(
    """
    UPDATE run_steps SET status = v.status, finished_at = v.recorded_at, attempt = v.attempt, error = v.error,
        output = v.output, step_error = v.step_error, reason = v.reason,
        cache_key = COALESCE(v.cache_key, run_steps.cache_key),
        cache_display = COALESCE(v.cache_display, run_steps.cache_display),
        cache_result = COALESCE(v.cache_result, run_steps.cache_result),
        cache_reason = COALESCE(v.cache_reason, run_steps.cache_reason),
        source_run_id = COALESCE(v.source_run_id, run_steps.source_run_id)
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS v(run_id text, attempt integer, recorded_at timestamptz, step_key text, status text, error text,
             output jsonb, step_error jsonb, reason text, cache_key text, cache_display text, cache_result text,
             cache_reason text, source_run_id text)
    WHERE run_steps.run_id = v.run_id AND run_steps.step_key = v.step_key
    """
)

# run.failed / run.canceled for many runs: their steps that were pending, running or waiting for their
# next try will never run in the run; a worker normally records step.canceled itself, this covers a
# worker that is gone (the reaper or the API ended the run).
run_steps_project_run_ended_many = q(
    """
    UPDATE run_steps SET status = 'CANCELED', reason = v.reason, finished_at = v.recorded_at
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(run_id text, recorded_at timestamptz, reason text)
    WHERE run_steps.run_id = v.run_id AND (run_steps.status IN ('CREATED', 'RUNNING')
        OR (run_steps.status = 'FAILED' AND COALESCE((run_steps.step_error->>'will_retry')::boolean, false)))
    """
)

# tool.invoked for many tool calls.
tool_calls_project_invoked_many = q(
    """
    INSERT INTO tool_calls (run_id, tool_call_id, step_key, tool, status, attempt, input, invoked_at,
        step_attempt)
    SELECT v.run_id, v.tool_call_id, v.step_key, v.tool, 'INVOKED', v.attempt, v.input, v.recorded_at,
        v.step_attempt
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS v(run_id text, attempt integer, recorded_at timestamptz, tool_call_id text, step_key text, tool text,
             input jsonb, step_attempt integer)
    """
)

# tool.succeeded / tool.failed for many tool calls.
tool_calls_project_finished_many = q(
    """
    UPDATE tool_calls SET status = v.status, output = v.output, error = v.error, finished_at = v.recorded_at
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS v(run_id text, recorded_at timestamptz, tool_call_id text, status text, output jsonb, error text)
    WHERE tool_calls.run_id = v.run_id AND tool_calls.tool_call_id = v.tool_call_id
    """
)

# A run started and completed in one batch (runs_project_started_many, then runs_project_finished_many).
runs_project_done_many = q(
    """
    UPDATE runs SET started_at = COALESCE(runs.started_at, v.started_at), status = v.status,
        stop_reason = v.stop_reason, error = v.error, output = v.output, finished_at = v.recorded_at,
        lease_expires_at = NULL, updated_at = v.recorded_at, last_sequence = v.sequence
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS v(run_id text, attempt integer, sequence bigint, recorded_at timestamptz, started_at timestamptz,
             status text, stop_reason text, error text, output jsonb)
    WHERE runs.run_id = v.run_id AND runs.status = 'RUNNING' AND runs.attempt = v.attempt
    """
)

# A step created, started and finished in one batch (run_steps_project_created_many, _started_many and
# _finished_many one after the other, with the try the worker numbered).
run_steps_project_done_many = q(
    """
    INSERT INTO run_steps (run_id, step_key, tool, status, attempt, created_at, depends_on, started_at,
        finished_at, tries, error, output, step_error, reason, cache_key, cache_display, cache_result,
        cache_reason, source_run_id)
    SELECT v.run_id, v.step_key, v.tool, v.status, v.attempt, v.created_at, v.depends_on, v.started_at,
        v.recorded_at, v.try, v.error, v.output, v.step_error, v.reason, v.cache_key, v.cache_display,
        v.cache_result, v.cache_reason, v.source_run_id
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS v(run_id text, attempt integer, recorded_at timestamptz, step_key text, status text, error text,
             output jsonb, step_error jsonb, reason text, cache_key text, cache_display text, cache_result text,
             cache_reason text, source_run_id text, created_at timestamptz, tool text, depends_on text[],
             started_at timestamptz, try integer)
    ON CONFLICT (run_id, step_key) DO UPDATE SET tool = EXCLUDED.tool, status = EXCLUDED.status,
        attempt = EXCLUDED.attempt, depends_on = EXCLUDED.depends_on, started_at = EXCLUDED.started_at,
        finished_at = EXCLUDED.finished_at, tries = EXCLUDED.tries, error = EXCLUDED.error,
        output = EXCLUDED.output, step_error = EXCLUDED.step_error, reason = EXCLUDED.reason,
        cache_key = COALESCE(EXCLUDED.cache_key, run_steps.cache_key),
        cache_display = COALESCE(EXCLUDED.cache_display, run_steps.cache_display),
        cache_result = COALESCE(EXCLUDED.cache_result, run_steps.cache_result),
        cache_reason = COALESCE(EXCLUDED.cache_reason, run_steps.cache_reason),
        source_run_id = COALESCE(EXCLUDED.source_run_id, run_steps.source_run_id)
    """
)

# A tool call invoked and finished in one batch.
tool_calls_project_done_many = q(
    """
    INSERT INTO tool_calls (run_id, tool_call_id, step_key, tool, status, attempt, input, invoked_at,
        step_attempt, output, error, finished_at)
    SELECT v.run_id, v.tool_call_id, v.step_key, v.tool, v.status, v.attempt, v.input, v.recorded_at,
        v.step_attempt, v.output, v.error, v.finished_at
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS v(run_id text, attempt integer, recorded_at timestamptz, tool_call_id text, step_key text, tool text,
             input jsonb, step_attempt integer, status text, output jsonb, error text, finished_at timestamptz)
    """
)

# Replay starts from empty projections (run_steps, tool_calls and run_artifacts go with their runs).
projections_clear = q("DELETE FROM runs")
step_cache_clear = q("DELETE FROM step_cache")

# --- step cache (the cold layer) ---------------------------------------------------------------

STEP_CACHE_COLUMNS = """
    tenant_id, cache_key, base_key, scope, workflow, step_key, display, components, output, artifacts,
    source_run_id, source_step_key, created_at, expires_at, hit_count, last_hit_at
"""

# step.succeeded with cache components: the entry (a newer result for the key replaces an older one,
# whichever order a replay applies them in).
step_cache_project_written = q(
    """
    INSERT INTO step_cache (tenant_id, cache_key, base_key, scope, workflow, step_key, display, components,
        output, artifacts, source_run_id, source_step_key, created_at, expires_at)
    SELECT r.tenant_id, :cache_key, :base_key, :scope, :workflow, :step_key, :display,
        CAST(:components AS jsonb), CAST(:output AS jsonb), CAST(:artifacts AS jsonb), :run_id, :step_key,
        :recorded_at, :expires_at
    FROM runs r WHERE r.run_id = :run_id
    ON CONFLICT (tenant_id, cache_key) DO UPDATE SET base_key = EXCLUDED.base_key, scope = EXCLUDED.scope,
        workflow = EXCLUDED.workflow, step_key = EXCLUDED.step_key, display = EXCLUDED.display,
        components = EXCLUDED.components, output = EXCLUDED.output, artifacts = EXCLUDED.artifacts,
        source_run_id = EXCLUDED.source_run_id, source_step_key = EXCLUDED.source_step_key,
        created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at, hit_count = 0, last_hit_at = NULL
    WHERE step_cache.created_at < EXCLUDED.created_at
    """
)

# step.skipped with reason cache_hit: the entry it used counts one more hit.
step_cache_project_hit = q(
    """
    UPDATE step_cache SET hit_count = hit_count + 1, last_hit_at = :recorded_at
    WHERE tenant_id = (SELECT tenant_id FROM runs WHERE run_id = :run_id) AND cache_key = :cache_key
      AND created_at <= :recorded_at
    """
)

# One entry of a tenant.
step_cache_get = q(
    f"SELECT {STEP_CACHE_COLUMNS} FROM step_cache WHERE tenant_id = :tenant_id AND cache_key = :cache_key"
)

# When an entry was written (a hot copy is confirmed against it).
step_cache_created_at = q("SELECT created_at FROM step_cache WHERE tenant_id = :tenant_id AND cache_key = :cache_key")

# The newest entry with these components in scope global (a run_only miss: another run has it).
step_cache_by_base = q(
    f"""
    SELECT {STEP_CACHE_COLUMNS} FROM step_cache WHERE tenant_id = :tenant_id AND base_key = :base_key
    ORDER BY created_at DESC LIMIT 1
    """
)

# The newest entries of a workflow's step before a time (ExplainStep's nearest earlier entry).
step_cache_nearest = q(
    f"""
    SELECT {STEP_CACHE_COLUMNS} FROM step_cache
    WHERE tenant_id = :tenant_id AND workflow = :workflow AND step_key = :step_key AND created_at < :before
    ORDER BY created_at DESC LIMIT 20
    """
)

# A page of a tenant's entries (optionally one workflow, one step), newest first.
step_cache_list = q(
    f"""
    SELECT {STEP_CACHE_COLUMNS} FROM step_cache
    WHERE tenant_id = :tenant_id
      AND (CAST(:workflow AS text) IS NULL OR workflow = :workflow)
      AND (CAST(:step_key AS text) IS NULL OR step_key = :step_key)
      AND (CAST(:after_key AS text) IS NULL OR (created_at, cache_key) < (:after_created_at, :after_key))
    ORDER BY created_at DESC, cache_key DESC
    LIMIT :limit
    """
)

# Entries of a tenant's workflow are written (reports, shared) and invalidated (exclusive) one side at a time.
step_cache_write_lock = q(
    "SELECT pg_advisory_xact_lock(hashtext('step_cache:' || :tenant_id || ':' || :workflow))"
)
step_cache_write_lock_shared = q(
    "SELECT pg_advisory_xact_lock_shared(hashtext('step_cache:' || :tenant_id || ':' || :workflow))"
)

# The runs (of one tenant) among these ids: a step.skipped may only name its tenant's runs as its source.
runs_of_tenant = q("SELECT run_id FROM runs WHERE tenant_id = :tenant_id AND run_id = ANY(:run_ids)")

# InvalidateCache: record it (append-only), then remove the matching entries that exist now.
cache_invalidations_append = q(
    """
    INSERT INTO cache_invalidations (tenant_id, workflow, step_key, cache_key, requested_by)
    VALUES (:tenant_id, :workflow, :step_key, :cache_key, :requested_by)
    RETURNING sequence, recorded_at
    """
)
step_cache_invalidate = q(
    """
    DELETE FROM step_cache
    WHERE tenant_id = :tenant_id AND workflow = :workflow
      AND (CAST(:step_key AS text) IS NULL OR step_key = :step_key)
      AND (CAST(:cache_key AS text) IS NULL OR cache_key = :cache_key)
      AND created_at <= :recorded_at
    RETURNING cache_key
    """
)

# Replay: the invalidations in order.
cache_invalidations_all = q(
    "SELECT tenant_id, workflow, step_key, cache_key, recorded_at FROM cache_invalidations ORDER BY sequence"
)

# Replay: hit counts from the steps that hit each entry after it was written.
step_cache_recount_hits = q(
    """
    UPDATE step_cache c SET (hit_count, last_hit_at) = (
        SELECT count(*), max(s.finished_at) FROM run_steps s JOIN runs r ON r.run_id = s.run_id
        WHERE r.tenant_id = c.tenant_id AND s.cache_key = c.cache_key AND s.reason = 'cache_hit'
          AND s.finished_at >= c.created_at)
    """
)

# --- workflow registry -------------------------------------------------------------------------

WORKFLOW_COLUMNS = "tenant_id, name, version, spec_hash, spec, builtin, created_at, created_by"

# Serialize registrations of one name in one tenant (versions are numbered 1, 2, 3 ...).
workflows_register_lock = q("SELECT pg_advisory_xact_lock(hashtext('workflow:' || :tenant_id || ':' || :name))")

# Append a registry event; returns its sequence and time.
registry_events_append = q(
    """
    INSERT INTO registry_events (type, tenant_id, payload) VALUES (:type, :tenant_id, CAST(:payload AS jsonb))
    RETURNING sequence, recorded_at
    """
)

# Replay: registry events in order, a page at a time.
registry_events_page = q(
    """
    SELECT sequence, type, tenant_id, payload, recorded_at FROM registry_events
    WHERE sequence > :after ORDER BY sequence LIMIT :limit
    """
)

# workflow.registered: a new version.
workflows_project_registered = q(
    """
    INSERT INTO workflows (tenant_id, name, version, spec_hash, spec, builtin, created_at, created_by,
        registry_sequence)
    VALUES (:tenant_id, :name, :version, :spec_hash, CAST(:spec AS jsonb), :builtin, :recorded_at, :created_by,
        :sequence)
    """
)

workflows_clear = q("DELETE FROM workflows")

# Which rows of a name a tenant sees: its own, if it has registered the name at all; else the
# built-ins' (a built-in shipped later never takes over a tenant's workflow of the same name).
_WORKFLOW_VISIBLE = """
    name = :name AND CASE
        WHEN EXISTS (SELECT 1 FROM workflows o WHERE o.tenant_id = :tenant_id AND o.name = :name AND NOT o.builtin)
        THEN tenant_id = :tenant_id AND NOT builtin
        ELSE builtin END
"""

# The version of a name with this spec hash that the tenant sees.
workflow_by_hash = q(f"SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE {_WORKFLOW_VISIBLE} AND spec_hash = :spec_hash")

# The version of a name with this hash among the built-ins (:builtin) or the tenant's own.
workflow_own_by_hash = q(
    f"""
    SELECT {WORKFLOW_COLUMNS} FROM workflows
    WHERE name = :name AND spec_hash = :spec_hash AND builtin = :builtin
      AND (:builtin OR tenant_id = :tenant_id)
    """
)

# One version (:version 0: the latest) of a name the tenant sees.
workflow_get = q(
    f"""
    SELECT {WORKFLOW_COLUMNS} FROM workflows
    WHERE {_WORKFLOW_VISIBLE} AND (:version = 0 OR version = :version)
    ORDER BY version DESC LIMIT 1
    """
)

# The built-in versions of a name, and (for a tenant) its own: what a new registration numbers from.
workflow_latest_version = q(
    """
    SELECT COALESCE(max(version) FILTER (WHERE builtin), 0) AS latest_builtin,
           COALESCE(max(version) FILTER (WHERE tenant_id = :tenant_id AND NOT builtin), 0) AS latest_own
    FROM workflows WHERE name = :name AND (builtin OR tenant_id = :tenant_id)
    """
)

# The latest version of each workflow the tenant sees (its own before a built-in of the same name),
# by name, a page at a time.
workflow_list = q(
    f"""
    SELECT DISTINCT ON (name) {WORKFLOW_COLUMNS} FROM workflows
    WHERE (builtin OR tenant_id = :tenant_id) AND name > :after_name
    ORDER BY name, (tenant_id = :tenant_id AND NOT builtin) DESC, version DESC
    LIMIT :limit
    """
)

# Names of the workflows a tenant may start (for an unknown-workflow error).
workflow_names = q(
    "SELECT DISTINCT name FROM workflows WHERE builtin OR tenant_id = :tenant_id ORDER BY name LIMIT 50"
)

# Specs by hash (claims send the pinned spec; a hash names one content, whoever registered it).
workflow_specs_by_hash = q(
    "SELECT DISTINCT ON (spec_hash) spec_hash, spec FROM workflows WHERE spec_hash = ANY(:hashes)"
)

# Notifications (wake watchers of a run, claimers of a workspace, or the streams of a worker that freed a
# slot) ride on the statements that record what they announce: runs_queue_many, runs_claim,
# run_events_append_many.

# --- workers and leases ------------------------------------------------------------------------

# Record a worker's heartbeat: one row per worker (made by its session), the runs table does not churn.
workers_heartbeat = q(
    """
    UPDATE workers SET lease_expires_at = :lease_expires_at, last_heartbeat_at = :now,
        held_run_ids = :held_run_ids
    WHERE worker_id = :worker_id
    """
)

# One session change per worker id at a time (also when its row does not exist yet).
workers_session_serialize = q("SELECT pg_advisory_xact_lock(hashtext(:worker_id))")

# A worker's session as a new claim stream sees it, locked: who may resume or replace it.
workers_session_lock = q(
    """
    SELECT w.worker_id, w.tenant_id, w.session_token_hash, w.lease_expires_at,
           (SELECT count(*) FROM runs r WHERE r.worker_id = w.worker_id AND r.status = 'RUNNING') AS held
    FROM workers w WHERE w.worker_id = :worker_id
    FOR UPDATE
    """
)

# A worker's session token hash and tenant, to check a heartbeat or report against (FOR SHARE: a
# session is not replaced while a call of it is being recorded).
workers_session_get = q(
    "SELECT tenant_id, session_token_hash FROM workers WHERE worker_id = :worker_id FOR SHARE"
)

# Open (or resume) a worker's session: its token hash, tenant, a first heartbeat lease and what the
# worker declared (tools, capacity, workspace); a new session (not a resumed one) restarts started_at.
workers_session_open = q(
    """
    INSERT INTO workers (worker_id, tenant_id, session_token_hash, lease_expires_at, last_heartbeat_at,
        started_at, held_run_ids, tools, capacity, workspace_id)
    VALUES (:worker_id, :tenant_id, :session_token_hash, :lease_expires_at, :now, :now, '{}',
        :tools, :capacity, :workspace_id)
    ON CONFLICT (worker_id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id,
        session_token_hash = EXCLUDED.session_token_hash, lease_expires_at = EXCLUDED.lease_expires_at,
        last_heartbeat_at = EXCLUDED.last_heartbeat_at, tools = EXCLUDED.tools, capacity = EXCLUDED.capacity,
        workspace_id = EXCLUDED.workspace_id,
        started_at = CASE WHEN :resumed THEN workers.started_at ELSE EXCLUDED.started_at END
    """
)

# A page of a tenant's workers by id, with the runs each holds now (runs_running_worker_idx).
workers_list = q(
    """
    SELECT w.worker_id, w.started_at, w.last_heartbeat_at, w.lease_expires_at, w.lease_expires_at >= :now AS connected,
        COALESCE(w.tools, '{}') AS tools, w.capacity, w.workspace_id,
        ARRAY(SELECT r.run_id FROM runs r WHERE r.worker_id = w.worker_id AND r.status = 'RUNNING'
              ORDER BY r.run_id) AS held_run_ids
    FROM workers w
    WHERE w.tenant_id = :tenant_id AND (CAST(:after_worker_id AS text) IS NULL OR w.worker_id > :after_worker_id)
    ORDER BY w.worker_id
    LIMIT :limit
    """
)

# How many of a tenant's workers hold a live heartbeat lease.
workers_connected_count = q(
    "SELECT count(*) AS n FROM workers WHERE tenant_id = :tenant_id AND lease_expires_at >= :now"
)

# Who claimed these (run, attempt) pairs: the holder check for reports that are not about a run's
# current attempt.
run_events_claimers = q(
    """
    SELECT e.run_id, e.attempt, e.worker_id FROM run_events e
    JOIN unnest(CAST(:run_ids AS text[]), CAST(:attempts AS integer[])) AS p(run_id, attempt)
      ON e.run_id = p.run_id AND e.attempt = p.attempt
    WHERE e.type = 'run.claimed'
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
      AND NOT (r.run_id = ANY(CAST(:skip_run_ids AS text[])))
      AND (CAST(:only_run_id AS text) IS NULL OR r.run_id = :only_run_id)
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

# A tenant's counters of what happened to runs, from the log.
stats_event_counts = q(
    """
    SELECT e.type, count(*) AS n, count(*) FILTER (WHERE (e.payload->>'readopted')::boolean) AS readopted
    FROM run_events e JOIN runs r ON r.run_id = e.run_id
    WHERE r.tenant_id = :tenant_id
      AND e.type IN ('run.claimed', 'run.completed', 'run.failed', 'run.lease_expired', 'run.requeued',
                     'run.canceled')
    GROUP BY e.type
    """
)

# A tenant's runs by current status.
stats_runs_by_status = q("SELECT status, count(*) AS n FROM runs WHERE tenant_id = :tenant_id GROUP BY status")

# A tenant's runs that finished in [:since, :until), by minute (0 is the one starting at :since) and
# final status (runs_tenant_finished_idx).
runs_throughput_finished = q(
    """
    SELECT CAST(floor(extract(epoch FROM finished_at - :since) / 60) AS integer) AS minute, status, count(*) AS n
    FROM runs
    WHERE tenant_id = :tenant_id AND finished_at >= :since AND finished_at < :until
    GROUP BY 1, 2
    """
)

# A tenant's queue depth at the end of each minute of [:since, :until) (minute 0 starts at :since),
# approximately: a run waits from created_at until it first starts or ends. Only runs that may have
# waited in the window are read: those queued or running now (runs_tenant_status_idx) and those
# that ended in it (runs_tenant_finished_idx); a run created in the window is one or the other.
# Each contributes +1 at its creation and -1 when it left; the depth at a minute's end is the
# running sum (marks before :since fold into minute -1).
runs_throughput_queue_depth = q(
    """
    WITH per_minute AS (
        SELECT GREATEST(CAST(floor(extract(epoch FROM m.at - :since) / 60) AS integer), -1) AS minute,
            sum(m.delta) AS delta
        FROM runs
        CROSS JOIN LATERAL (VALUES (created_at, 1), (LEAST(started_at, finished_at), -1)) AS m(at, delta)
        WHERE tenant_id = :tenant_id
          AND (status IN ('QUEUED', 'RUNNING') OR finished_at >= :since)
          AND m.at < :until
        GROUP BY 1
    )
    SELECT m.minute, CAST(sum(COALESCE(p.delta, 0)) OVER (ORDER BY m.minute) AS integer) AS depth
    FROM generate_series(-1, :minutes - 1) AS m(minute)
    LEFT JOIN per_minute p ON p.minute = m.minute
    ORDER BY m.minute
    """
)

# --- step and tool state, for checking worker reports ------------------------------------------

# The steps of these runs (the projection), to check that step and tool events follow their step.
run_steps_state = q("SELECT run_id, step_key, status, attempt FROM run_steps WHERE run_id = ANY(:run_ids)")

# The attempts of these runs that their worker re-adopted (it kept executing across them).
run_events_readopted = q(
    """
    SELECT run_id, attempt FROM run_events
    WHERE run_id = ANY(:run_ids) AND type = 'run.claimed' AND (payload->>'readopted')::boolean
    """
)

# These tool calls of these runs, to check that a tool's result follows its invocation.
tool_calls_state = q(
    """
    SELECT run_id, tool_call_id, status, attempt FROM tool_calls
    WHERE run_id = ANY(:run_ids) AND tool_call_id = ANY(:tool_call_ids)
    """
)

# --- api keys ----------------------------------------------------------------------------------

API_KEY_COLUMNS = """
    key_id, role, tenant_id, project_id, workspace_id, description, created_by, created_at, expires_at,
    revoked_at
"""

# Create a key (its secret is stored only as a hash).
api_keys_insert = q(
    f"""
    INSERT INTO api_keys (key_id, secret_hash, role, tenant_id, project_id, workspace_id, description,
        created_by, expires_at)
    VALUES (:key_id, :secret_hash, :role, :tenant_id, :project_id, :workspace_id, :description, :created_by,
        :expires_at)
    RETURNING {API_KEY_COLUMNS}
    """
)

# The bootstrap admin key: created once; a changed secret replaces the stored hash; a revoked one stays revoked.
api_keys_bootstrap = q(
    """
    INSERT INTO api_keys (key_id, secret_hash, role, tenant_id, description)
    VALUES (:key_id, :secret_hash, 'admin', :tenant_id, 'bootstrap admin key (RUNS_BOOTSTRAP_ADMIN_KEY)')
    ON CONFLICT (key_id) DO UPDATE SET secret_hash = EXCLUDED.secret_hash
    """
)

# The key a secret belongs to (by the secret's hash).
api_keys_by_hash = q(f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE secret_hash = :secret_hash")

# Page through keys (of one tenant, or all when :tenant_id is null), newest first.
api_keys_list = q(
    f"""
    SELECT {API_KEY_COLUMNS} FROM api_keys
    WHERE (CAST(:tenant_id AS text) IS NULL OR tenant_id = :tenant_id)
      AND (CAST(:after_key_id AS text) IS NULL OR key_id < :after_key_id)
      AND (CAST(:include_revoked AS boolean) OR revoked_at IS NULL)
    ORDER BY key_id DESC
    LIMIT :limit
    """
)

# Revoke a key (of one tenant, or any when :tenant_id is null); the first revocation time stays.
api_keys_revoke = q(
    f"""
    UPDATE api_keys SET revoked_at = COALESCE(revoked_at, :now)
    WHERE key_id = :key_id AND (CAST(:tenant_id AS text) IS NULL OR tenant_id = :tenant_id)
    RETURNING {API_KEY_COLUMNS}
    """
)

# --- rebuild and explain (services/run_api/rebuild.py) -----------------------------------------

# A run's step events that carry the cache decisions (started, succeeded, skipped), of one step when
# :step_key is set, in log order.
run_events_step_decisions = q(
    """
    SELECT sequence, type, attempt, recorded_at, payload FROM run_events
    WHERE run_id = :run_id AND type IN ('step.started', 'step.succeeded', 'step.skipped')
      AND (CAST(:step_key AS text) IS NULL OR payload->>'step_key' = :step_key)
    ORDER BY sequence
    """
)

# --- step cache counters (helper api-cache: services/run_api/cache_service.cache_stats) -------------

# A tenant's cache hits by layer (hot, cold): the steps recorded skipped with reason cache_hit.
stats_cache_hits_by_layer = q(
    """
    SELECT COALESCE(e.payload->'cache'->>'layer', '') AS layer, count(*) AS n
    FROM run_events e JOIN runs r ON r.run_id = e.run_id
    WHERE r.tenant_id = :tenant_id AND e.type = 'step.skipped' AND e.payload->>'reason' = 'cache_hit'
    GROUP BY 1
    """
)

# A tenant's cache misses by reason: the step tries whose step.started carries a cache reason.
stats_cache_misses_by_reason = q(
    """
    SELECT e.payload->'cache'->>'reason' AS reason, count(*) AS n
    FROM run_events e JOIN runs r ON r.run_id = e.run_id
    WHERE r.tenant_id = :tenant_id AND e.type = 'step.started' AND e.payload->'cache'->>'reason' IS NOT NULL
    GROUP BY 1
    """
)

# --- metrics (services/run_api/metrics.py) -----------------------------------------------------

# Queued runs per workflow, and the earliest next_attempt_at among those due by :now (the oldest waiting).
runs_queue_by_workflow = q(
    """
    SELECT workflow, count(*) AS queued, min(next_attempt_at) FILTER (WHERE next_attempt_at <= :now) AS oldest_due
    FROM runs WHERE status = 'QUEUED' GROUP BY workflow
    """
)
# Workers of every tenant whose heartbeat lease is live at :now.
workers_connected_all = q("SELECT count(*) FROM workers WHERE lease_expires_at >= :now")
# How far the NATS publisher is behind: the age of the first event after its checkpoint in its tail order
# (run_events_outbox_idx, one row), or nothing when it is caught up.
outbox_lag = q(
    """
    SELECT EXTRACT(EPOCH FROM clock_timestamp() - e.recorded_at)::float AS lag
    FROM outbox_checkpoints c
    CROSS JOIN LATERAL (
        SELECT recorded_at FROM run_events e
        WHERE e.tx_id IS NOT NULL
          AND (e.tx_id, e.run_id COLLATE "C", e.sequence) > (c.tx_id, c.run_id COLLATE "C", c.sequence)
        ORDER BY e.tx_id, e.run_id COLLATE "C", e.sequence
        LIMIT 1
    ) AS e
    WHERE c.name = :name
    """
)
# What the metrics need of some runs (by primary key): workflow, state and times.
runs_metrics_facts = q(
    """
    SELECT run_id, workflow, status, attempt, next_attempt_at, started_at, finished_at
    FROM runs WHERE run_id = ANY(:run_ids)
    """
)

# --- ExplainRun (services/run_api/explain.py) --------------------------------------------------

# Where a QUEUED run stands in its tenant's workspace queue and which live workers could take it, in
# one row: the queued runs before it in claim order (runs_claim_idx: a range of the index, the row
# comparison is its key order), those of them due now, and over the live workers (heartbeat lease not
# expired at :now) of the tenant serving the workspace: how many, how many declared every tool in
# :tools (tools NULL: declared nothing, counted apart), their free slots (capacity minus runs held,
# runs_running_worker_idx), up to 20 ids; and the tenant's live workers serving other workspaces.
runs_explain_queue = q(
    """
    SELECT
        (SELECT count(*) FROM runs r
         WHERE r.tenant_id = :tenant_id AND r.workspace_id = :workspace_id AND r.status = 'QUEUED'
           AND (r.next_attempt_at, r.run_id) < (CAST(:next_attempt_at AS timestamptz), CAST(:run_id AS text)))
            AS runs_ahead,
        (SELECT count(*) FROM runs r
         WHERE r.tenant_id = :tenant_id AND r.workspace_id = :workspace_id AND r.status = 'QUEUED'
           AND (r.next_attempt_at, r.run_id) < (CAST(:next_attempt_at AS timestamptz), CAST(:run_id AS text))
           AND r.next_attempt_at <= :now) AS due_ahead,
        count(w.worker_id) AS live_workers,
        count(w.worker_id) FILTER (WHERE w.tools @> CAST(:tools AS text[])) AS live_workers_with_tools,
        count(w.worker_id) FILTER (WHERE w.tools IS NULL) AS live_workers_tools_unknown,
        COALESCE(sum(GREATEST(COALESCE(w.capacity, 1) - (
            SELECT count(*) FROM runs h WHERE h.worker_id = w.worker_id AND h.status = 'RUNNING'), 0)), 0)
            AS free_slots,
        COALESCE((array_agg(w.worker_id ORDER BY w.worker_id))[1:20], '{}') AS worker_ids,
        (SELECT count(*) FROM workers o
         WHERE o.tenant_id = :tenant_id AND o.lease_expires_at >= :now
           AND o.workspace_id IS DISTINCT FROM :workspace_id) AS live_workers_elsewhere
    FROM workers w
    WHERE w.tenant_id = :tenant_id AND w.workspace_id = :workspace_id AND w.lease_expires_at >= :now
    """
)

# A RUNNING run's holder as the workers table sees it (no row: the holder's session is gone) and the
# run's steps RUNNING now, in one row.
runs_explain_holder = q(
    """
    SELECT w.last_heartbeat_at, w.lease_expires_at, COALESCE(w.lease_expires_at >= :now, false) AS worker_live,
        ARRAY(SELECT s.step_key FROM run_steps s WHERE s.run_id = :run_id AND s.status = 'RUNNING'
              ORDER BY s.started_at, s.step_key) AS running_steps
    FROM (VALUES (1)) AS one (n) LEFT JOIN workers w ON w.worker_id = :worker_id
    """
)

# The first step of a run that failed (by when it finished), with its error.
run_steps_first_failed = q(
    """
    SELECT step_key, error FROM run_steps WHERE run_id = :run_id AND status = 'FAILED'
    ORDER BY finished_at NULLS LAST, step_key LIMIT 1
    """
)
