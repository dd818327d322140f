"""A large history, fast: `fill_history` inserts finished runs straight into the tables, set-based.

For benchmarks and plan tests (issue 9, item 6): "the same drain with a million finished runs already
in the tables". Each run is a `runtime.noop` run that SUCCEEDED on its first attempt, recorded exactly
as the live path leaves one (the nine events a real worker reports, with payloads of the same shape,
and the runs, run_steps and tool_calls rows their projection makes), so a replay of the log rebuilds
the same rows. Run ids and event ids are ULIDs of their times; the runs are spread over the past
`days` days, oldest first, so each chunk appends at the right end of the indexes.

Nothing goes through the API: per chunk, one staging statement computes every run's ids and times
into a temporary table (`INSERT ... SELECT ... FROM generate_series`), then one statement per table
copies them out; ANALYZE at the end. Inserts only, so the append-only trigger on run_events is not
involved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg

from shared.settings import PROJECT_WORKFLOWS_DIR, ApiSettings
from shared.workflow.keys import spec_version_hash
from shared.workflow.spec import load_spec_text

log = logging.getLogger(__name__)

NOOP_WORKFLOW = "runtime.noop"
NOOP_STEP = "runtime"
NOOP_TOOL = "noop"

# Crockford base32 of the low 50 bits of a bigint (10 characters): the time part of a ULID, and
# (right-trimmed) its random part. A temporary function: it lives as long as the loader's session.
HIST_B32_FUNCTION = """
CREATE OR REPLACE FUNCTION pg_temp.runs_hist_b32(v bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 45) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 40) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 35) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 30) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 25) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 20) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 15) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 10) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v >> 5) & 31)::int + 1, 1)
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', (v & 31)::int + 1, 1)
$$
"""

# The builtin runtime.noop version a run pins (the newest the database has).
hist_noop_version = """
SELECT version, spec_hash FROM workflows WHERE builtin AND name = %(workflow)s ORDER BY version DESC LIMIT 1
"""

# Stage one chunk: every run's ids, times (offsets like a live noop run's, in epoch seconds), worker
# and trace. Run g is created at start + (g + 0.5 ± 0.4) * spacing, so ids grow with g.
hist_stage = """
CREATE TEMP TABLE runs_hist_stage ON COMMIT DROP AS
WITH r AS MATERIALIZED (
    SELECT g, %(start)s + (g + 0.5 + (random() - 0.5) * 0.8) * %(spacing)s AS e0,
        random() AS r1, random() AS r2, random() AS r3, random() AS r4, random() AS r5,
        (random() * 1099511627776)::bigint AS rnd1, (random() * 34359738368)::bigint AS rnd2,
        floor(random() * 32)::int AS k, md5(random()::text) AS trace_id
    FROM generate_series(%(lo)s::bigint, %(hi)s::bigint - 1) AS g
), t AS MATERIALIZED (
    SELECT g, k, trace_id, e0, e0 - (0.0003 + r1 * 0.0012) AS e_q, e0 + (0.002 + r2 * 0.006) AS e_c,
        e0 + (0.002 + r2 * 0.006) + (0.003 + r3 * 0.004) AS e_crec,
        e0 + (0.002 + r2 * 0.006) + (0.008 + r4 * 0.012) AS e_w1,
        e0 + (0.002 + r2 * 0.006) + (0.008 + r4 * 0.012) + (0.005 + r5 * 0.004) AS e_w1rec,
        e0 + (0.002 + r2 * 0.006) + (0.008 + r4 * 0.012) + (0.010 + r3 * 0.010) AS e_w2,
        e0 + (0.002 + r2 * 0.006) + (0.008 + r4 * 0.012) + (0.010 + r3 * 0.010) + (0.005 + r4 * 0.004) AS e_w2rec,
        -- The random part the run's ULIDs share: 8 + 7 characters; a last one counts up per id.
        right(pg_temp.runs_hist_b32(rnd1), 8) || right(pg_temp.runs_hist_b32(rnd2), 7) AS rnd,
        g / 20000 AS shift
    FROM r
)
SELECT g, k, '0123456789ABCDEFGHJKMNPQRSTVWXYZ'::text AS a,
    to_timestamp(e0) AS t0, to_timestamp(e_q) AS q_occ, to_timestamp(e_c) AS c_occ, to_timestamp(e_crec) AS c_rec,
    to_timestamp(e_w1) AS w1_occ, to_timestamp(e_w1rec) AS w1_rec, to_timestamp(e_w2) AS w2_occ,
    to_timestamp(e_w2rec) AS w2_rec,
    pg_temp.runs_hist_b32(floor(e0 * 1000)::bigint) || rnd
        || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', k + 1, 1) AS run_id,
    pg_temp.runs_hist_b32(floor(e_q * 1000)::bigint) || rnd AS q_base,
    pg_temp.runs_hist_b32(floor(e_c * 1000)::bigint) || rnd AS c_base,
    pg_temp.runs_hist_b32(floor(e_w1 * 1000)::bigint) || rnd AS w1_base,
    pg_temp.runs_hist_b32(floor(e_w2 * 1000)::bigint) || rnd AS w2_base,
    'vm-' || (4000 + shift %% 5000) || '-' || substr(md5(shift::text), 1, 6) AS worker_id,
    jsonb_build_object('traceparent', '00-' || trace_id || '-' || substr(md5(trace_id), 1, 16) || '-03')
        AS trace_context
FROM t
ORDER BY g
"""

# The runs rows, as the projection leaves a run that completed on its first attempt.
hist_runs_insert = """
INSERT INTO runs (run_id, tenant_id, project_id, workspace_id, workflow, input, status, attempt, max_attempts,
    retry_backoff_seconds, retry_backoff_max_seconds, idempotency_key, request_hash, trace_context, created_by,
    created_at, updated_at, started_at, finished_at, next_attempt_at, worker_id, lease_expires_at, stop_reason,
    last_sequence, workflow_version, spec_hash, output, trigger)
SELECT s.run_id, 'default', 'default', 'default', %(workflow)s, '{}'::jsonb, 'SUCCEEDED', 1, %(max_attempts)s,
    %(backoff)s, %(backoff_max)s, NULL, %(request_hash)s, s.trace_context, NULL,
    s.t0, s.w2_rec + interval '0.08 ms', s.w1_rec, s.w2_rec + interval '0.08 ms', s.t0, s.worker_id, NULL,
    'completed', 9, %(version)s, %(spec_hash)s, '{"runtime": {"ok": true}}'::jsonb, 'start'
FROM runs_hist_stage s ORDER BY s.g
"""

# The nine events of each run, in order, with the payloads a real run records.
hist_events_insert = """
INSERT INTO run_events (run_id, sequence, type, attempt, worker_id, event_id, occurred_at, recorded_at, payload)
SELECT s.run_id, e.sequence, e.type, e.attempt, e.worker_id,
    e.base || substr(s.a, (s.k + e.n) %% 32 + 1, 1), e.occurred_at, e.recorded_at, e.payload
FROM runs_hist_stage s
CROSS JOIN LATERAL (VALUES
    (1, 'run.queued', 0, NULL, s.q_base, 1, s.q_occ, s.t0,
        %(run_queued)s::jsonb || jsonb_build_object('trace_context', s.trace_context)),
    (2, 'run.claimed', 1, s.worker_id, s.c_base, 0, s.c_occ, s.c_rec, jsonb_build_object(
        'worker_id', s.worker_id,
        'lease_expires_at', to_char((s.c_occ + %(lease)s::interval) AT TIME ZONE 'UTC',
                                    'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'))),
    (3, 'run.started', 1, s.worker_id, s.w1_base, 1, s.w1_occ, s.w1_rec, '{}'::jsonb),
    (4, 'step.created', 1, s.worker_id, s.w1_base, 2, s.w1_occ + interval '0.06 ms',
        s.w1_rec + interval '0.03 ms', %(step_created)s::jsonb),
    (5, 'step.started', 1, s.worker_id, s.w1_base, 4, s.w1_occ + interval '0.8 ms',
        s.w1_rec + interval '0.04 ms', %(step_started)s::jsonb),
    (6, 'tool.invoked', 1, s.worker_id, s.w1_base, 5, s.w1_occ + interval '0.85 ms',
        s.w1_rec + interval '0.05 ms', %(tool_invoked)s::jsonb
        || jsonb_build_object('tool_call_id', s.w1_base || substr(s.a, (s.k + 3) %% 32 + 1, 1))),
    (7, 'tool.succeeded', 1, s.worker_id, s.w2_base, 0, s.w2_occ, s.w2_rec,
        jsonb_build_object('output', '{"ok": true}'::jsonb,
                           'tool_call_id', s.w1_base || substr(s.a, (s.k + 3) %% 32 + 1, 1))),
    (8, 'step.succeeded', 1, s.worker_id, s.w2_base, 1, s.w2_occ + interval '0.07 ms',
        s.w2_rec + interval '0.04 ms', %(step_succeeded)s::jsonb),
    (9, 'run.completed', 1, s.worker_id, s.w2_base, 2, s.w2_occ + interval '0.15 ms',
        s.w2_rec + interval '0.08 ms', '{"output": {"runtime": {"ok": true}}}'::jsonb)
) AS e(sequence, type, attempt, worker_id, base, n, occurred_at, recorded_at, payload)
ORDER BY s.g, e.sequence
"""

# The run's one step, succeeded on its first try.
hist_steps_insert = """
INSERT INTO run_steps (run_id, step_key, tool, status, attempt, created_at, started_at, finished_at, output, tries,
    depends_on)
SELECT s.run_id, %(step)s, %(tool)s, 'SUCCEEDED', 1, s.w1_rec + interval '0.03 ms', s.w1_rec + interval '0.04 ms',
    s.w2_rec + interval '0.04 ms', '{"ok": true}'::jsonb, 1, '{}'
FROM runs_hist_stage s ORDER BY s.g
"""

# Its one tool call.
hist_tool_calls_insert = """
INSERT INTO tool_calls (run_id, tool_call_id, step_key, tool, status, attempt, input, output, invoked_at,
    finished_at, step_attempt)
SELECT s.run_id, s.w1_base || substr(s.a, (s.k + 3) %% 32 + 1, 1), %(step)s, %(tool)s, 'SUCCEEDED', 1, '{}'::jsonb,
    '{"ok": true}'::jsonb, s.w1_rec + interval '0.05 ms', s.w2_rec, 1
FROM runs_hist_stage s ORDER BY s.g
"""

def noop_request_hash(max_attempts: int) -> str:
    """The request hash StartRun gives a runtime.noop run with input {}, no version and no backoff asked for,
    in the default placement (the fields of handlers.run_request_hash; tests/test_history.py checks they agree)."""
    canonical = json.dumps(
        {"workflow": NOOP_WORKFLOW, "workspace_id": "default", "project_id": "default", "input": {},
         "max_attempts": max_attempts, "backoff": 0.0, "cap": 0.0},
        sort_keys=True, separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _noop_version(conn: psycopg.Connection) -> tuple[int, str]:
    """The builtin runtime.noop version runs pin: the database's, else version 1 of the project's file."""
    row = conn.execute(hist_noop_version, {"workflow": NOOP_WORKFLOW}).fetchone()
    if row is not None:
        return int(row[0]), str(row[1])
    with open(os.path.join(PROJECT_WORKFLOWS_DIR, f"{NOOP_WORKFLOW}.yaml"), encoding="utf-8") as handle:
        return 1, spec_version_hash(load_spec_text(handle.read(), "yaml"))


# The loader's session: room for a chunk's staging table and sorts in memory; no JIT for one-off statements.
hist_session = ["SET temp_buffers = '256MB'", "SET work_mem = '256MB'", "SET jit = off"]

hist_analyze = "ANALYZE runs, run_events, run_steps, tool_calls"


def _params(conn: psycopg.Connection, runs: int, days: float, end: datetime) -> dict[str, object]:
    """What every chunk's statements share: the pinned version, the constant payloads, the time scale."""
    version, spec_hash = _noop_version(conn)
    settings = ApiSettings()
    request_hash = noop_request_hash(settings.default_max_attempts)
    return {
        "start": (end - timedelta(days=days)).timestamp(), "spacing": days * 86400.0 / max(runs, 1),
        "workflow": NOOP_WORKFLOW, "version": version, "spec_hash": spec_hash, "request_hash": request_hash,
        "max_attempts": settings.default_max_attempts, "lease": f"{settings.lease_seconds} seconds",
        "backoff": settings.retry_backoff_seconds, "backoff_max": settings.retry_backoff_max_seconds,
        "step": NOOP_STEP, "tool": NOOP_TOOL,
        "run_queued": json.dumps({
            "input": {}, "workflow": NOOP_WORKFLOW, "spec_hash": spec_hash, "tenant_id": "default", "created_by": None,
            "project_id": "default", "max_attempts": settings.default_max_attempts, "request_hash": request_hash,
            "workspace_id": "default", "idempotency_key": None, "workflow_version": version,
            "retry_backoff_seconds": settings.retry_backoff_seconds,
            "retry_backoff_max_seconds": settings.retry_backoff_max_seconds,
        }),
        "step_created": json.dumps({"tool": NOOP_TOOL, "step_key": NOOP_STEP, "depends_on": []}),
        "step_started": json.dumps({"try": 1.0, "step_key": NOOP_STEP}),
        "tool_invoked": json.dumps({"try": 1.0, "tool": NOOP_TOOL, "input": {}, "step_key": NOOP_STEP,
                                    "tool_version": "1"}),
        "step_succeeded": json.dumps({"try": 1.0, "output": {"ok": True}, "step_key": NOOP_STEP, "artifacts": []}),
    }


def _fill_chunks(conninfo: str, params: dict[str, object], chunks: list[tuple[int, int]], progress: Progress) -> None:
    """Insert these chunks of runs, one transaction each, on a connection of their own."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for statement in [*hist_session, HIST_B32_FUNCTION]:
            conn.execute(statement)
        for lo, hi in chunks:
            bounds = {**params, "lo": lo, "hi": hi}
            with conn.transaction():
                for statement in (hist_stage, hist_runs_insert, hist_events_insert, hist_steps_insert,
                                  hist_tool_calls_insert):
                    conn.execute(statement, bounds)
            progress.done(hi - lo)


class Progress:
    """Counts filled runs across the loader's connections and logs each chunk."""

    def __init__(self, total: int) -> None:
        self.total, self.filled, self.began = total, 0, time.monotonic()
        self._lock = threading.Lock()

    def done(self, n: int) -> None:
        with self._lock:
            self.filled += n
            log.info("history: %d of %d runs in %.1fs", self.filled, self.total, time.monotonic() - self.began)


def fill_history(conninfo: str, runs: int, *, chunk: int = 100_000, jobs: int = 2, days: float = 90.0,
                 end: datetime | None = None) -> None:
    """Insert `runs` SUCCEEDED runtime.noop runs spread over the `days` before `end` (default: a minute
    ago), `chunk` runs per transaction on `jobs` connections at once, then ANALYZE the four tables.
    `conninfo` is a libpq URL (a SQLAlchemy `postgresql+psycopg://` one is accepted too)."""
    if runs < 0 or chunk < 1 or jobs < 1 or days <= 0:
        raise ValueError("runs must be >= 0, chunk and jobs >= 1 and days > 0")
    conninfo = conninfo.replace("postgresql+psycopg://", "postgresql://", 1)
    end = end or datetime.now(UTC) - timedelta(minutes=1)
    progress = Progress(runs)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        params = _params(conn, runs, days, end)
        bounds = [(lo, min(lo + chunk, runs)) for lo in range(0, runs, chunk)]
        # Each job takes a stretch of consecutive chunks: it appends to its own part of the indexes.
        per = -(-len(bounds) // jobs)
        shares = [bounds[i:i + per] for i in range(0, len(bounds), per)]
        with ThreadPoolExecutor(max_workers=max(len(shares), 1), thread_name_prefix="history") as pool:
            for future in [pool.submit(_fill_chunks, conninfo, params, share, progress) for share in shares]:
                future.result()
        conn.execute(hist_analyze)
    log.info("history: %d finished runs filled in %.1fs", runs, time.monotonic() - progress.began)
