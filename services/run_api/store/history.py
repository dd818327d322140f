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

The other end of a history: `archive_runs` (the `archive` command) writes old finished runs to JSON
lines files and deletes them, the one DELETE the run_events trigger allows (migration 0005).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import posixpath
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import fsspec
import psycopg
from fsspec.implementations.local import LocalFileSystem
from ulid import ULID

from services.run_api.store import queries as Q
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
    last_sequence, workflow_version, spec_hash, output, trigger, required_tools)
SELECT s.run_id, 'default', 'default', 'default', %(workflow)s, '{}'::jsonb, 'SUCCEEDED', 1, %(max_attempts)s,
    %(backoff)s, %(backoff_max)s, NULL, %(request_hash)s, s.trace_context, NULL,
    s.t0, s.w2_rec + interval '0.08 ms', s.w1_rec, s.w2_rec + interval '0.08 ms', s.t0, s.worker_id, NULL,
    'completed', 9, %(version)s, %(spec_hash)s, '{"runtime": {"ok": true}}'::jsonb, 'start', ARRAY[%(tool)s]
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
            "retry_backoff_max_seconds": settings.retry_backoff_max_seconds, "required_tools": [NOOP_TOOL],
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


def fill_history(conninfo: str, runs: int, *, chunk: int = 100_000, jobs: int = 1, days: float = 90.0,
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


# --- retention: archive old finished runs, then delete them ----------------------------------------

# What keeps a finished run out of the archive: live data points to it (a step_cache entry it wrote,
# a rebuild of it that has not finished). Shared by the dry run's count and the batch query.
_ARCHIVABLE = """
    r.status IN ('SUCCEEDED', 'FAILED', 'CANCELED') AND r.finished_at < %(before)s
    AND NOT EXISTS (SELECT 1 FROM step_cache c WHERE c.source_run_id = r.run_id)
    AND NOT EXISTS (SELECT 1 FROM runs l WHERE l.base_run_id = r.run_id AND l.status IN ('QUEUED', 'RUNNING'))
"""

# The next batch to archive, locked: in run id order after :after. Ids are ULIDs of the creation time,
# so a run that finished before the cutoff has an id below :id_bound, and the scan stays in that range.
archive_batch = f"""
SELECT r.run_id FROM runs r
WHERE r.run_id > %(after)s AND r.run_id < %(id_bound)s AND {_ARCHIVABLE}
ORDER BY r.run_id
LIMIT %(batch)s
FOR UPDATE OF r SKIP LOCKED
"""

# The dry run: how many runs and events an archive would move, and how many old finished runs it keeps.
archive_count = f"""
SELECT count(*) FILTER (WHERE {_ARCHIVABLE}) AS runs,
       COALESCE(sum(r.last_sequence) FILTER (WHERE {_ARCHIVABLE}), 0) AS events,
       count(*) FILTER (WHERE NOT ({_ARCHIVABLE})) AS kept
FROM runs r
WHERE r.run_id < %(id_bound)s AND r.status IN ('SUCCEEDED', 'FAILED', 'CANCELED') AND r.finished_at < %(before)s
"""

# One JSON line per run: its row, its events in order, its steps, tool calls and artifacts (as stored).
archive_lines = """
SELECT r.run_id, r.last_sequence, json_build_object(
    'run', to_json(r),
    'events', (SELECT json_agg(to_json(e) ORDER BY e.sequence) FROM run_events e WHERE e.run_id = r.run_id),
    'steps', (SELECT COALESCE(json_agg(to_json(s) ORDER BY s.step_key), '[]') FROM run_steps s
              WHERE s.run_id = r.run_id),
    'tool_calls', (SELECT COALESCE(json_agg(to_json(c) ORDER BY c.tool_call_id), '[]') FROM tool_calls c
                   WHERE c.run_id = r.run_id),
    'artifacts', (SELECT COALESCE(json_agg(to_json(a) ORDER BY a.step_key, a.name), '[]') FROM run_artifacts a
                  WHERE a.run_id = r.run_id)
)::text AS line
FROM runs r WHERE r.run_id = ANY(%(run_ids)s) ORDER BY r.run_id
"""

# Whether these runs hit cache entries (their entries' hit counts come from the log: they are counted again).
archive_hit_cache = """
SELECT EXISTS (SELECT 1 FROM run_steps WHERE run_id = ANY(%(run_ids)s) AND reason = 'cache_hit') AS hit
"""

# The trigger on run_events lets this transaction delete events of finished runs (migration 0005).
archive_allow = "SELECT set_config('runs.archiving', 'on', true)"
archive_delete_events = "DELETE FROM run_events WHERE run_id = ANY(%(run_ids)s)"
# run_steps, tool_calls and run_artifacts go with their runs (ON DELETE CASCADE).
archive_delete_runs = "DELETE FROM runs WHERE run_id = ANY(%(run_ids)s)"


@dataclass
class ArchiveResult:
    """What an archive moved (or, in a dry run, would move) and where to."""

    runs: int = 0
    events: int = 0
    kept: int = 0  # finished before the cutoff, kept because live data points to them (dry run only)
    files: list[str] = field(default_factory=list)


def parse_cutoff(text: str, now: datetime | None = None) -> datetime:
    """`30d` (days before now) or an ISO 8601 date or time (UTC unless it says otherwise)."""
    value = text.strip()
    now = now or datetime.now(UTC)
    if value[:-1].isdigit() and value[-1:].lower() == "d":
        return now - timedelta(days=int(value[:-1]))
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--finished-before must be Nd or an ISO date or time, got {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _id_bound(before: datetime) -> str:
    """The smallest ULID of an hour after the cutoff (room for the clock skew of whoever made the ids)."""
    ms = int((before + timedelta(hours=1)).timestamp() * 1000)
    return str(ULID.from_bytes(ms.to_bytes(6, "big") + bytes(10)))


def _write_archive(fs: Any, path: str, lines: list[str]) -> None:
    """Write JSON lines (gzip) to `path` and make them durable before the runs are deleted."""
    with fs.open(path, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz:
            for line in lines:
                gz.write(line.encode() + b"\n")
        raw.flush()
        if isinstance(fs, LocalFileSystem):
            os.fsync(raw.fileno())


def archive_runs(conninfo: str, before: datetime, to_url: str, *, batch: int = 1000,
                 dry_run: bool = False) -> ArchiveResult:
    """Move finished runs that ended before `before` out of the database into JSON lines files under
    `to_url` (any fsspec URL), `batch` runs per file and per transaction: a file is written, flushed
    and fsynced, then its runs are deleted (events under the archiver's setting, then the runs with
    their steps, tool calls and artifact rows) and the transaction commits; only then does the file
    lose its `.partial` suffix. Runs live data points to are kept. Artifact bytes stay in the store."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    conninfo = conninfo.replace("postgresql+psycopg://", "postgresql://", 1)
    params: dict[str, Any] = {"before": before, "id_bound": _id_bound(before), "after": "", "batch": batch}
    result = ArchiveResult()
    with psycopg.connect(conninfo) as conn:
        if dry_run:
            runs, events, kept = conn.execute(archive_count, params).fetchone() or (0, 0, 0)
            return ArchiveResult(runs=int(runs), events=int(events), kept=int(kept))
        fs, root = fsspec.core.url_to_fs(to_url)
        fs.makedirs(root, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        while True:
            partial = ""
            try:
                with conn.transaction():
                    ids = [row[0] for row in conn.execute(archive_batch, params)]
                    if not ids:
                        break
                    rows = conn.execute(archive_lines, {"run_ids": ids}).fetchall()
                    final = posixpath.join(root, f"runs-{stamp}-{len(result.files) + 1:06d}.jsonl.gz")
                    partial = final + ".partial"
                    _write_archive(fs, partial, [row[2] for row in rows])
                    hit = conn.execute(archive_hit_cache, {"run_ids": ids}).fetchone()
                    conn.execute(archive_allow)
                    conn.execute(archive_delete_events, {"run_ids": ids})
                    conn.execute(archive_delete_runs, {"run_ids": ids})
                    if hit and hit[0]:
                        conn.execute(Q.step_cache_recount_hits.text)
            except BaseException:
                if partial and fs.exists(partial):  # not committed: the runs are still in the database
                    fs.rm(partial)
                raise
            fs.mv(partial, final)
            result.runs += len(ids)
            result.events += sum(int(row[1]) for row in rows)
            result.files.append(final)
            params["after"] = ids[-1]
            log.info("archive: %d runs (%d events) so far, last file %s", result.runs, result.events, final)
    return result
