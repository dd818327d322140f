"""The first hour with Runs (issue 11 item 5): what `make up` and a worker print, and how Ctrl-C stops them.

Real processes only: the API with its --with-worker worker as `make up` starts it, plain worker processes,
the CLI; PostgreSQL from TEST_DATABASE_URL (or the suite's own server).
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from features.harness import ROOT, Api, Client, Process, Worker, base_env, free_port, wait_until
from services.run_api.__main__ import _runs_command

pytestmark = pytest.mark.timeout(90)


def stopped(*processes: Process) -> None:
    """Stop them, print their logs' tails (pytest shows them when the test failed) and remove the logs."""
    for process in processes:
        process.stop()
        print(f"--- {process.name} ---\n{process.output()[-6000:]}")
        process.log_path.unlink(missing_ok=True)


def line_with(process: Process, pattern: str, timeout: float = 30) -> re.Match[str]:
    """The first line of the process's output matching `pattern`, waited for."""
    def find() -> re.Match[str] | None:
        if not process.running:
            raise AssertionError(f"{process.name} exited:\n{process.output()}")
        return re.search(pattern, process.output(), re.M)

    return wait_until(find, timeout, f"{pattern!r} in the output of {process.name}", interval=0.05)


def ctrl_c_twice(process: Process) -> None:
    """SIGINT: the worker says it drains its one run, for how long; SIGINT again: it releases it and exits 0 at once."""
    process.signal(signal.SIGINT)
    line_with(process, r"draining 1 run\(s\) for up to 30s \(RUN_WORKER_DRAIN_SECONDS\); "
                       r"stop again \(Ctrl-C\) to release them now")
    process.signal(signal.SIGINT)
    assert process.proc is not None and process.proc.wait(15) == 0, process.output()  # not after the 30 s drain
    assert "releasing 1 unfinished run(s) back to the queue as asked" in process.output()


def make_up(database_url: str, **env: str) -> Api:
    """The API with its worker, as `make up` runs it (python -m services.run_api --with-worker), serving."""
    api = Api(database_url, **env)
    api.args.append("--with-worker")
    api.start()
    return api


@pytest.fixture(scope="module")
def up(make_database: Callable[[], contextlib.AbstractContextManager[str]]) -> Iterator[Api]:
    with make_database() as url:
        api = make_up(url)
        try:
            yield api
        finally:
            stopped(api)


def test_make_up_ends_with_a_ready_banner(up: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the worker's claim stream is open: the API address, the dashboard, a command to try, how to stop."""
    line_with(up, r"^Runs is ready")
    worker_pid = line_with(up, r"started worker process pid (\d+)").group(1)
    lines = up.output().split("Runs is ready", 1)[1].splitlines()
    assert lines[0] == f": the API on {up.addr} and one worker (pid {worker_pid}, tools: " \
        "echo, fail, noop, shell, sleep)."
    assert lines[1] == f"  dashboard  {up.http_url}/"
    # The worker has the shell tool (a loopback API's local worker): the sample campaign, as the README shows it.
    monkeypatch.chdir(ROOT)  # the API's working directory
    runs = _runs_command()  # .venv/bin/runs in a checkout
    assert lines[2] == f"  try        {runs} --addr {up.addr} start --workflow campaign.build --input " \
        """'{"product": "Acme Rockets", "audience": "coyotes"}' --wait"""
    assert lines[3] == "  stop       Ctrl-C: runs in progress get up to 30s to finish (RUN_WORKER_DRAIN_SECONDS); " \
        "Ctrl-C again gives them back to the queue at once"
    assert f"dashboard on {up.http_url}/" in up.output()  # the API's own line stays


def test_the_worker_logs_its_tools_its_connection_and_one_line_per_finished_run(up: Api) -> None:
    line_with(up, r"worker started; claiming from .*; tools: echo, fail, noop, shell, sleep")
    line_with(up, rf"connected to {re.escape(up.addr)} as \S+ \(capacity")
    client = Client(up.addr)
    try:
        run_ids = [client.start_tool("echo", {"n": 1}).run_id, client.start().run.run_id]
    finally:
        client.close()
    echo = line_with(up, rf"run finished: runtime\.tool \(echo\) succeeded in [\d.]+s .*run_id={run_ids[0]}")
    line_with(up, rf"run finished: runtime\.noop succeeded in [\d.]+s .*run_id={run_ids[1]}")
    # One line per run, not one per event: nothing else of the worker's names the run at info level.
    worker_lines = [line for line in up.output().splitlines() if "actor=worker" in line and run_ids[0] in line]
    assert len(worker_lines) == 1 and echo.group(0) in worker_lines[0], worker_lines


def test_a_worker_reconnects_and_on_ctrl_c_twice_gives_its_run_to_another_worker_at_once(database_url: str) -> None:
    """"reconnected" after the API restarts (each failure logged once); then Ctrl-C drains, Ctrl-C again
    releases the run and exits, and another worker claims it well within the 60 s lease it had."""
    api = Api(database_url, RUN_LEASE_SECONDS="60")
    api.start()
    first = Worker(api.addr, RUN_WORKER_ID="first")
    second = Worker(api.addr, RUN_WORKER_ID="second", RUN_WORKER_DRAIN_SECONDS="1")
    client = Client(api.addr)
    try:
        first.start()
        line_with(first, rf"connected to {re.escape(api.addr)} as first \(capacity")
        api.stop()
        api.start()  # the same port
        line_with(first, rf"reconnected to {re.escape(api.addr)}  ")
        warnings = [line.split(" ", 1)[1] for line in first.output().splitlines() if " WARNING " in line]
        assert warnings and len(warnings) == len(set(warnings)), first.output()

        run_id = client.start_tool("sleep", {"seconds": 60}).run_id
        wait_until(lambda: client.status(run_id) == "RUNNING", 30, "the first worker to run it")
        ctrl_c_twice(first)
        assert re.search(rf"run finished: runtime\.tool \(sleep\) released in .*run_id={run_id}", first.output())
        second.start()
        wait_until(lambda: [(a.attempt, a.worker_id, a.outcome) for a in client.get(run_id).attempts]
                   == [(1, "first", "released"), (2, "second", "running")], 20, "the second worker to claim it")
        assert "Traceback" not in first.output()
    finally:
        client.close()
        stopped(first, second, api)


@pytest.mark.parametrize("processes", [1, 2])
def test_the_embedded_worker_drains_on_ctrl_c_and_releases_on_the_second(database_url: str, processes: int) -> None:
    """RUN_WORKER_EMBEDDED: the worker inside the API says the same, and the API passes the second Ctrl-C on;
    with RUN_API_PROCESSES=2 the parent passes it on to its processes, each with its embedded worker."""
    api = Api(database_url, processes=processes, RUN_WORKER_EMBEDDED="true")
    api.start()
    client = Client(api.addr)
    try:
        run_id = client.start_tool("sleep", {"seconds": 60}).run_id
        wait_until(lambda: client.status(run_id) == "RUNNING", 30, "the embedded worker to run it")
        ctrl_c_twice(api)
        assert re.search(rf"run run\.requeued .*run_id={run_id} .*status=QUEUED", api.output()), api.output()
    finally:
        client.close()
        stopped(api)


def test_worker_once_with_the_api_down_says_what_the_cli_says() -> None:
    addr = f"127.0.0.1:{free_port()}"  # nobody listens there
    env = base_env()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60, check=False)

    worker = run("-m", "services.run_worker", "--once", "--api-addr", addr)
    cli = run("-m", "services.cli", "--addr", addr, "get", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert cli.returncode == 5 and cli.stderr.startswith(f"error: UNAVAILABLE: the Run API at {addr} is unavailable")
    assert (worker.returncode, worker.stderr, worker.stdout) == (cli.returncode, cli.stderr, ""), worker.stderr


def test_ctrl_c_twice_at_make_up_releases_the_runs_and_stops(up: Api) -> None:
    """Last of the module's tests on `up`: it stops it. The first Ctrl-C drains (the worker says so), the
    second is passed on to the worker, which gives its run back to the queue; the API exits 0 at once."""
    line_with(up, r"^Runs is ready")
    client = Client(up.addr)
    try:
        run_id = client.start_tool("sleep", {"seconds": 60}).run_id
        wait_until(lambda: client.status(run_id) == "RUNNING", 30, "the run to start")
    finally:
        client.close()
    ctrl_c_twice(up)
    # Given back before the API stopped: queued again at once, no lease expiry to wait for.
    assert re.search(rf"run run\.requeued .*run_id={run_id} .*status=QUEUED", up.output()), up.output()
    assert "Traceback" not in up.output()
