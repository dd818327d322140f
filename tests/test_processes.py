"""RUN_API_PROCESSES: several API processes on one port (SO_REUSEPORT), as real processes on a real PostgreSQL.

Which process serves a connection is read from the kernel: /proc/net/tcp{,6} gives each TCP
socket's ports and inode, /proc/PID/fd which process holds it. Both ends of a loopback connection
are listed, so a client's local port names the API process that holds the other end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from features.harness import ROOT, Api, Client, Process, Worker, base_env, free_port, wait_until
from services.run_api import db, registry
from shared.gen.runs.v1 import run_service_pb2, run_service_pb2_grpc
from shared.settings import ApiSettings, SettingsError

pytestmark = pytest.mark.timeout(120)

# Leases of 2 s and a reaper every 0.2 s, so a lost worker's run comes back within seconds.
SHORT_LEASES = dict(RUN_LEASE_SECONDS="2", RUN_HEARTBEAT_SECONDS="0.4", RUN_REAPER_INTERVAL_SECONDS="0.2",
                    RUN_RETRY_BACKOFF_SECONDS="0.1", RUN_WORKER_DRAIN_SECONDS="0.5", RUN_WORKER_POLL_MS="200")
LISTEN, ESTABLISHED = "0A", "01"
SPEC = "name: procs.concurrent\ndescription: registered by two API processes starting at once\n" \
       "steps:\n  - key: only\n    tool: noop\n"


# --- which process holds which socket ------------------------------------------------------------


def _tcp() -> list[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every TCP socket in this network namespace."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                out.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), f[3], int(f[9])))
    return out


def _inodes(pid: int) -> set[int]:
    """The socket inodes process `pid` holds."""
    found = set()
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    found.add(int(link[8:-1]))
    return found


def listens(pid: int, port: int) -> bool:
    """Whether `pid` holds a listening socket on `port`."""
    mine = _inodes(pid)
    return any(lp == port and st == LISTEN and ino in mine for lp, _, st, ino in _tcp())


def served_peers(pid: int, port: int) -> set[int]:
    """Client ports of the connections `pid` accepted on `port`."""
    mine = _inodes(pid)
    return {rp for lp, rp, st, ino in _tcp() if lp == port and st == ESTABLISHED and ino in mine}


def client_ports(pid: int, port: int) -> set[int]:
    """Local ports of the connections `pid` opened to `port`."""
    mine = _inodes(pid)
    return {lp for lp, rp, st, ino in _tcp() if rp == port and st == ESTABLISHED and ino in mine}


def serving(children: list[int], ports: set[int], port: int) -> set[int]:
    """The API processes holding the other end of connections from these client ports."""
    return {child for child in children if served_peers(child, port) & ports}


def gone(pid: int) -> bool:
    """No such process, or a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    return True


def children_of(api: Process) -> list[int]:
    """The API processes a parent started (from its 'listening ... with N processes (pids ...)' line)."""
    match = re.search(r"with \d+ processes \(pids ([\d ]+)\)", api.output())
    assert match, api.output()
    return [int(p) for p in match.group(1).split()]


def health_channel(addr: str) -> grpc.Channel:
    """A channel with a connection of its own (no subchannel shared with other channels), used once."""
    channel = grpc.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)])
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return channel


@contextlib.contextmanager
def channel_to_each(api: Api, children: list[int]) -> Iterator[dict[int, grpc.Channel]]:
    """Open connections until each API process serves one; yields {pid: channel}, closes all after."""
    opened: list[grpc.Channel] = []
    by_child: dict[int, grpc.Channel] = {}
    try:
        for _ in range(40):
            before = client_ports(os.getpid(), api.port)
            channel = health_channel(api.addr)
            opened.append(channel)
            (child,) = serving(children, client_ports(os.getpid(), api.port) - before, api.port)
            by_child.setdefault(child, channel)
            if len(by_child) == len(children):
                break
        assert len(by_child) == len(children), f"40 connections all landed on {set(by_child)}"
        yield by_child
    finally:
        for channel in opened:
            channel.close()


def worker_on(api: Api, children: list[int], worker: Worker) -> int:
    """The API process that serves this worker's connection (the worker opens one)."""
    assert worker.proc is not None
    pid = worker.proc.pid

    def found() -> set[int]:
        assert worker.running, worker.output()
        return serving(children, client_ports(pid, api.port), api.port)

    (child,) = wait_until(found, 30, "the worker to connect")
    return child


def workers_on_each(api: Api, children: list[int], **env: str) -> dict[int, Worker]:
    """One worker served by each API process: a worker that lands where one already is is stopped and replaced."""
    placed: dict[int, Worker] = {}
    for i in range(30):
        worker = Worker(api.addr, **{"RUN_WORKER_ID": f"w{i}", **env})
        worker.start()
        child = worker_on(api, children, worker)
        if child in placed:
            worker.stop()
            worker.log_path.unlink(missing_ok=True)
            continue
        placed[child] = worker
        if len(placed) == len(children):
            return placed
    raise AssertionError(f"30 workers all landed on {set(placed)}")


def start_group(database_url: str, **env: str) -> Api:
    api = Api(database_url, processes=2, **env)
    api.start()
    return api


def counts(sql: psycopg.Connection, run_ids: list[str], type_: str) -> Counter[str]:
    rows = sql.execute("SELECT run_id FROM run_events WHERE run_id = ANY(%s) AND type = %s", (run_ids, type_))
    return Counter(r[0] for r in rows)


def all_succeeded(sql: psycopg.Connection, run_ids: list[str]) -> bool:
    row = sql.execute(
        "SELECT count(*) FROM runs WHERE run_id = ANY(%s) AND status = 'SUCCEEDED'", (run_ids,)
    ).fetchone()
    return row is not None and row[0] == len(run_ids)


# --- tests ---------------------------------------------------------------------------------------


def test_the_setting_is_a_whole_number_of_at_least_one() -> None:
    assert ApiSettings.from_env({}).processes == 1
    assert ApiSettings.from_env({"RUN_API_PROCESSES": "4"}).processes == 4
    for bad, says in (("0", "at least 1"), ("two", "whole number"), ("1.5", "whole number")):
        with pytest.raises(SettingsError, match=f"RUN_API_PROCESSES.*{says}"):
            ApiSettings.from_env({"RUN_API_PROCESSES": bad})
    done = subprocess.run([sys.executable, "-m", "services.run_api", "--processes", "0"], cwd=ROOT,
                          env=base_env(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "RUN_API_PROCESSES must be at least 1" in done.stderr, done.stderr


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_taken_port_is_refused_not_shared(database_url: str, processes: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        done = subprocess.run(
            [sys.executable, "-m", "services.run_api", "--addr", addr, "--database-url", database_url],
            cwd=ROOT, env=base_env(RUN_API_PROCESSES=processes), capture_output=True, text=True, timeout=60,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on {addr}: is another process using it?" in done.stderr


def test_two_processes_share_the_port_claims_watch_and_reaper_keep_their_guarantees(
    database_url: str, sql: psycopg.Connection, tmp_path: Path
) -> None:
    (tmp_path / "procs.yaml").write_text(SPEC)
    api = start_group(database_url, RUNS_WORKFLOWS_DIR=str(tmp_path), **SHORT_LEASES)
    workers: dict[int, Worker] = {}
    client = Client(api.addr)
    try:
        assert api.proc is not None
        children = children_of(api)
        assert len(set(children)) == 2 and api.proc.pid not in children
        # Both listen on the one port; the parent only holds it (bound, never listening).
        assert all(listens(child, api.port) for child in children)
        assert not listens(api.proc.pid, api.port)
        # The built-in both registered at the same moment exists once.
        assert sql.execute("SELECT count(*) FROM workflows WHERE name = 'procs.concurrent'").fetchone() == (1,)
        assert sql.execute(
            "SELECT count(*) FROM registry_events WHERE payload->>'name' = 'procs.concurrent'"
        ).fetchone() == (1,)

        # A worker on each process: every run claimed exactly once, by both workers, through both processes.
        workers = workers_on_each(api, children, **SHORT_LEASES)
        run_ids = [client.start().run.run_id for _ in range(200)]
        wait_until(lambda: all_succeeded(sql, run_ids), 60, "200 runs to succeed", interval=0.1)
        assert set(counts(sql, run_ids, "run.claimed").values()) == {1}
        assert set(counts(sql, run_ids, "run.completed").values()) == {1}
        claimers = {r[0] for r in sql.execute(
            "SELECT DISTINCT worker_id FROM run_events WHERE run_id = ANY(%s) AND type = 'run.claimed'", (run_ids,))}
        assert claimers == {w.env["RUN_WORKER_ID"] for w in workers.values()}

        # WatchRun through each process sees every event, whichever process the worker reports to.
        run_id = client.start_tool("sleep", {"seconds": 0.5}).run_id
        seen: dict[int, list[int]] = {}

        def watch(child: int, channel: grpc.Channel) -> None:
            stub = run_service_pb2_grpc.RunServiceStub(channel)
            request = run_service_pb2.WatchRunRequest(run_id=run_id)
            seen[child] = [m.event.sequence for m in stub.WatchRun(request, timeout=30)]

        with channel_to_each(api, children) as channels:
            threads = [threading.Thread(target=watch, args=item) for item in channels.items()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(40)
        last = sql.execute("SELECT max(sequence) FROM run_events WHERE run_id = %s", (run_id,)).fetchone()
        assert last is not None
        assert seen == {child: list(range(1, last[0] + 1)) for child in children}
        assert sql.execute("SELECT type FROM run_events WHERE run_id = %s AND sequence = %s",
                           (run_id, last[0])).fetchone() == ("run.completed",)

        # Two reapers, one per process, record a lost worker's expiry once.
        run_id = client.start_tool("sleep", {"seconds": 3}).run_id
        holder_id = wait_until(lambda: sql.execute(
            "SELECT worker_id FROM run_events WHERE run_id = %s AND type = 'tool.invoked'", (run_id,)
        ).fetchone(), 20, "the tool to be invoked")[0]
        (holder,) = [w for w in workers.values() if w.env["RUN_WORKER_ID"] == holder_id]
        holder.kill()
        wait_until(lambda: all_succeeded(sql, [run_id]), 40, "the other worker to finish the run", interval=0.1)
        types = Counter(r[0] for r in sql.execute("SELECT type FROM run_events WHERE run_id = %s", (run_id,)))
        assert (types["run.lease_expired"], types["run.requeued"], types["run.claimed"], types["run.completed"]) \
            == (1, 1, 2, 1), types

        # SIGTERM: the parent stops both processes and exits 0.
        client.close()
        for worker in workers.values():
            worker.stop()
        assert api.stop() == 0, api.output()
        assert all(gone(child) for child in children)
        assert "stopping 2 API processes" in api.output()
    finally:
        client.close()
        for worker in workers.values():
            worker.stop()
            worker.log_path.unlink(missing_ok=True)
        api.stop()
        api.log_path.unlink(missing_ok=True)


def test_a_process_that_dies_stops_the_group_and_a_new_group_finishes_the_runs(
    database_url: str, sql: psycopg.Connection
) -> None:
    first = start_group(database_url, **SHORT_LEASES)
    worker = Worker(first.addr, RUN_WORKER_ID="survivor", **SHORT_LEASES)
    apis = [first]
    try:
        worker.start()
        client = Client(first.addr)
        run_ids = [client.start_tool("sleep", {"seconds": 1}).run_id for _ in range(6)]
        client.close()
        wait_until(lambda: sql.execute(
            "SELECT count(*) FROM runs WHERE run_id = ANY(%s) AND status = 'RUNNING'", (run_ids,)
        ).fetchone()[0] > 0, 20, "a run to be running")  # type: ignore[index]
        victim, other = children_of(first)
        os.kill(victim, signal.SIGKILL)
        # Fail-fast: the parent stops the other process and exits non-zero.
        assert first.proc is not None
        code = first.proc.wait(30)
        assert code == 1, first.output()
        assert gone(other)
        assert f"API process pid {victim} exited unexpectedly with signal SIGKILL" in first.output()
        # What runs the API starts it again on the same port: the worker reconnects, nothing is lost.
        second = Api(database_url, port=first.port, processes=2, **SHORT_LEASES)
        apis.append(second)
        second.start()
        wait_until(lambda: all_succeeded(sql, run_ids), 60, "every run to succeed", interval=0.1)
        assert set(counts(sql, run_ids, "run.completed").values()) == {1}
        # A parent killed with SIGKILL takes its API processes with it (they get SIGTERM and stop).
        grandchildren = children_of(second)
        second.kill()
        wait_until(lambda: all(gone(child) for child in grandchildren), 30, "the orphaned API processes to stop")
    finally:
        worker.stop()
        worker.log_path.unlink(missing_ok=True)
        for api in apis:
            api.stop()
            api.log_path.unlink(missing_ok=True)


def test_with_worker_starts_one_worker_for_the_group(database_url: str, sql: psycopg.Connection) -> None:
    port = free_port()
    api = Process([sys.executable, "-m", "services.run_api", "--addr", f"127.0.0.1:{port}",
                   "--database-url", database_url, "--with-worker"],
                  base_env(RUN_API_PROCESSES="2", RUN_WORKER_POLL_MS="200"), "api")
    try:
        api.start()
        match = wait_until(lambda: re.search(r"started worker process pid (\d+)", api.output()), 60,
                           "the worker to start", interval=0.05)
        worker_pid = int(match.group(1))
        children = children_of(api)
        assert api.proc is not None
        ps = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(api.proc.pid)], capture_output=True,
                            text=True, check=True).stdout
        assert sorted(int(line.split()[0]) for line in ps.splitlines()) == sorted([*children, worker_pid])
        assert sum("services.run_worker" in line for line in ps.splitlines()) == 1
        client = Client(f"127.0.0.1:{port}")
        run_id = client.start().run.run_id
        client.close()
        wait_until(lambda: all_succeeded(sql, [run_id]), 30, "the run to succeed")
        assert api.stop() == 0, api.output()
        assert gone(worker_pid) and all(gone(child) for child in children)
    finally:
        api.stop()
        api.log_path.unlink(missing_ok=True)


async def test_builtins_loaded_by_two_processes_at_once_are_registered_once(database_url: str, tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"spec{i}.yaml").write_text(SPEC.replace("procs.concurrent", f"procs.race{i}"))
    engines = [db.make_engine(database_url, 2) for _ in range(2)]
    try:
        results = await asyncio.gather(*(registry.load_builtins(e, str(tmp_path)) for e in engines))
    finally:
        for engine in engines:
            await engine.dispose()
    created = [r.created for loaded in results for r in loaded]
    assert sorted(created) == [False] * 5 + [True] * 5
    with psycopg.connect(db.libpq_url(database_url)) as conn:
        rows = conn.execute(
            "SELECT name, count(*) FROM workflows WHERE name LIKE 'procs.race%' GROUP BY name"
        ).fetchall()
    assert dict(rows) == {f"procs.race{i}": 1 for i in range(5)}


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_taken_http_port_is_refused_by_name(database_url: str, processes: str) -> None:
    """RUN_API_HTTP_ADDR on a port another process holds: the API exits 1 naming the variable, not shared."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http = f"127.0.0.1:{taken.getsockname()[1]}"
        done = subprocess.run(
            [sys.executable, "-m", "services.run_api", "--addr", f"127.0.0.1:{free_port()}", "--database-url",
             database_url],
            cwd=ROOT, env=base_env(RUN_API_PROCESSES=processes, RUN_API_HTTP_ADDR=http), capture_output=True,
            text=True, timeout=60, check=False,
        )
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on {http} (RUN_API_HTTP_ADDR): is another process using it?" in done.stderr


def test_a_second_group_cannot_share_the_http_port_of_a_first(database_url: str) -> None:
    """Review of issue 10: the group's processes bound RUN_API_HTTP_ADDR with SO_REUSEPORT and nobody held it,
    so a second group of the same user on the same HTTP port started and the kernel split dashboard requests
    between two unrelated APIs. The parent now holds the HTTP port as it holds the gRPC one."""
    first = Api(database_url, processes=2)
    first.start()
    try:
        assert httpx.get(f"{first.http_url}/healthz", timeout=10).status_code == 200
        http = f"127.0.0.1:{first.http_port}"
        done = subprocess.run(
            [sys.executable, "-m", "services.run_api", "--addr", f"127.0.0.1:{free_port()}", "--database-url",
             database_url],
            cwd=ROOT, env=base_env(RUN_API_PROCESSES="2", RUN_API_HTTP_ADDR=http), capture_output=True, text=True,
            timeout=60, check=False,
        )
        assert done.returncode == 1, done.stderr
        assert f"cannot listen on {http} (RUN_API_HTTP_ADDR): is another process using it?" in done.stderr
    finally:
        first.stop()
