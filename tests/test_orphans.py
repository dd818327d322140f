"""A tool's processes die with the worker that started them (the launcher of services/run_worker)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from features.harness import ROOT, Api, Client, Worker, wait_until

pytestmark = pytest.mark.timeout(60)
LAUNCHER = str(ROOT / "services" / "run_worker" / "launcher.py")
# The tool's command: a shell that records its pid, starts a long sleep, records that pid, waits.
SCRIPT = "echo $$ > {dir}/sh.tmp && mv {dir}/sh.tmp {dir}/sh.pid; sleep 300 & echo $! > {dir}/sleep.tmp; " \
         "mv {dir}/sleep.tmp {dir}/sleep.pid; wait"


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _gone(pid: int) -> bool:
    """Dead: no such process, or a zombie nobody reaped yet (its parent died too, or init is slow)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    fields = _stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def _ppid(pid: int) -> int:
    fields = _stat(pid)
    assert fields is not None, f"process {pid} is gone"
    return int(fields[1])


def _pgid(pid: int) -> int:
    fields = _stat(pid)
    assert fields is not None, f"process {pid} is gone"
    return int(fields[2])


def _pids(directory: Path, proc: subprocess.Popen[bytes] | None = None) -> tuple[int, int]:
    """The shell's and the sleep's pids, once the command wrote both (unless `proc` exits first)."""
    done = directory / "sleep.pid"
    wait_until(lambda: done.exists() or (proc is not None and proc.poll() is not None), 20, "the sleep to start")
    assert done.exists(), f"exited with {proc and proc.returncode} before starting the command"
    return int((directory / "sh.pid").read_text()), int((directory / "sleep.pid").read_text())


def _wait_gone(pids: list[int], what: str) -> None:
    wait_until(lambda: all(_gone(p) for p in pids), 10, f"{what}: {[p for p in pids if not _gone(p)]} still alive")


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids to SIGKILL at the end whatever happened, so a failing test leaves no sleep behind."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def test_a_sigkilled_worker_leaves_no_tool_process_behind(
    database_url: str, tmp_path: Path, leftovers: list[int]
) -> None:
    api = Api(database_url)
    worker = Worker(api.addr, RUN_WORKER_TOOLS="noop,shell", RUN_WORKER_POLL_MS="100")
    client: Client | None = None
    try:
        api.start()
        worker.start()
        assert worker.proc is not None
        client = Client(api.addr)
        client.start_tool("shell", {"command": SCRIPT.format(dir=tmp_path), "shell": True, "timeout_seconds": 300})
        sh, sleep = _pids(tmp_path, worker.proc)
        tool_pids = [sh, sleep]
        if (parent := _ppid(sh)) != worker.proc.pid:  # the launcher between the worker and the command
            tool_pids.append(parent)
        leftovers.extend(tool_pids)
        assert not any(_gone(p) for p in tool_pids)
        worker.kill()
        _wait_gone(tool_pids, "the tool's processes after the worker was SIGKILLed")
    finally:
        if client is not None:
            client.close()
        worker.kill()
        api.stop()


def _parent_of_a_launcher(directory: Path) -> subprocess.Popen[bytes]:
    """A process standing in for the worker: starts the launcher in a new session, then waits forever."""
    code = (
        "import os, signal, subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-I', '-S', {LAUNCHER!r}, str(os.getpid()), '--', "
        f"'/bin/sh', '-c', {SCRIPT.format(dir=directory)!r}], start_new_session=True)\n"
        "while True: signal.pause()\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def test_the_launcher_kills_its_process_group_when_its_parent_dies(tmp_path: Path, leftovers: list[int]) -> None:
    parent = _parent_of_a_launcher(tmp_path)
    try:
        sh, sleep = _pids(tmp_path, parent)
        starter = _ppid(sh)
        leftovers.extend([sh, sleep, starter])
        assert starter != parent.pid and _ppid(starter) == parent.pid
        assert _pgid(starter) == _pgid(sh) == _pgid(sleep) == starter, "the launcher leads its command's group"
        parent.kill()
        parent.wait(10)
        _wait_gone([starter, sh, sleep], "the launcher's group after its parent was SIGKILLed")
    finally:
        parent.kill()
        parent.wait(10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_launcher_kills_its_process_group(
    tmp_path: Path, leftovers: list[int], sig: signal.Signals
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", LAUNCHER, str(os.getpid()), "--", "/bin/sh", "-c", SCRIPT.format(dir=tmp_path)],
        start_new_session=True,
    )
    try:
        sh, sleep = _pids(tmp_path, proc)
        leftovers.extend([sh, sleep])
        proc.send_signal(sig)
        assert proc.wait(10) == -signal.SIGKILL
        _wait_gone([sh, sleep], f"the launcher's group after {sig.name}")
    finally:
        proc.kill()
        proc.wait(10)


def _launch(*command: str, worker_pid: int | None = None) -> subprocess.CompletedProcess[bytes]:
    pid = os.getpid() if worker_pid is None else worker_pid
    return subprocess.run(
        [sys.executable, "-I", "-S", LAUNCHER, str(pid), "--", *command],
        capture_output=True, timeout=20, check=False, start_new_session=True,
    )


def test_the_launcher_exits_like_its_command() -> None:
    from services.run_worker import launcher

    done = _launch("/bin/sh", "-c", "read line; echo out; echo err >&2; exit 3")
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out\n", b"err\n")  # stdin is /dev/null
    assert _launch("/bin/sh", "-c", "kill -TERM $$").returncode == -signal.SIGTERM
    assert _launch("/bin/sh", "-c", "kill -KILL $$").returncode == -signal.SIGKILL
    piped = _launch("/bin/sh", "-c", "yes | head -c 2")
    assert (piped.stdout, piped.stderr) == (b"y\n", b""), "SIGPIPE is back to its default: yes dies quietly"
    missing = _launch("no-such-program-here", "arg")
    assert missing.returncode == launcher.EXEC_FAILED_CODE
    assert missing.stderr == f"{launcher.EXEC_FAILED_MARKER}No such file or directory\n".encode()


def test_the_launcher_runs_nothing_when_the_worker_died_before_it_started(tmp_path: Path) -> None:
    done = _launch("/bin/sh", "-c", f"touch {tmp_path}/ran", worker_pid=os.getppid())  # not its parent
    assert done.returncode == 1
    assert not (tmp_path / "ran").exists()
