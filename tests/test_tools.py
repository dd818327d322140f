"""The worker's stock tools: shell timeouts and cancellation kill the whole process group; shell is opt-in."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from services.run_worker import __main__ as worker_main
from services.run_worker.tools import ToolContext, ToolError, default_registry, fail, shell, sleep
from services.run_worker.worker import Worker
from shared.settings import STOCK_TOOLS, WorkerSettings

pytestmark = pytest.mark.timeout(30)
CTX = ToolContext(run_id="r", attempt=1, step_key="runtime")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


async def test_shell_runs_without_a_shell_and_captures_output() -> None:
    out = await shell({"command": ["echo", "$HOME"]}, CTX)
    assert (out["exit_code"], out["stdout"]) == (0, "$HOME\n")


async def test_shell_timeout_kills_the_command() -> None:
    started = time.monotonic()
    with pytest.raises(ToolError, match="timed out"):
        await shell({"command": ["sleep", "30"], "timeout_seconds": 0.2}, CTX)
    assert time.monotonic() - started < 5


async def test_cancelling_shell_kills_its_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"sleep 30 & echo $! > {pid_file}; wait"
    task = asyncio.create_task(shell({"command": script, "shell": True}, CTX))
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline, "the command did not start"
        await asyncio.sleep(0.02)
    child = int(pid_file.read_text())
    assert _alive(child)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 5
    while _alive(child):
        assert time.monotonic() < deadline, "the grandchild survived the cancel"
        await asyncio.sleep(0.02)


async def test_sleep_is_cancellable_and_fail_fails_only_the_first_attempts() -> None:
    task = asyncio.create_task(sleep({"seconds": 30}, CTX))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ToolError) as info:
        await fail({"message": "no", "times": 1, "retryable": False}, CTX)
    assert (info.value.message, info.value.retryable) == ("no", False)
    assert await fail({"times": 1}, ToolContext("r", 2, "runtime")) == {"ok": True, "attempt": 2}


async def test_shell_reports_a_program_it_cannot_start_as_not_retryable(tmp_path: Path) -> None:
    with pytest.raises(ToolError) as info:
        await shell({"command": ["no-such-program-here", "x"]}, CTX)
    missing = "cannot start 'no-such-program-here': No such file or directory"
    assert (info.value.message, info.value.retryable) == (missing, False)
    with pytest.raises(ToolError) as info:
        await shell({"command": [str(tmp_path)]}, CTX)
    assert (info.value.message, info.value.retryable) == (f"cannot start {str(tmp_path)!r}: Permission denied", False)
    with pytest.raises(ToolError) as info:  # through a shell it is the command's own failure, as before
        await shell({"command": "no-such-program-here", "shell": True}, CTX)
    assert info.value.message == "command exited with code 127" and info.value.retryable


async def test_shell_reports_a_command_killed_by_a_signal_as_a_negative_exit_code() -> None:
    with pytest.raises(ToolError) as info:
        await shell({"command": ["sh", "-c", "echo partial; kill -TERM $$"]}, CTX)
    assert info.value.message == "command exited with code -15"
    assert info.value.output is not None and info.value.output["stdout"] == "partial\n"


async def test_shell_commands_read_an_empty_stdin() -> None:
    out = await shell({"command": ["cat"], "timeout_seconds": 10}, CTX)
    assert (out["exit_code"], out["stdout"]) == (0, "")


def test_shell_is_not_enabled_by_default() -> None:
    assert "shell" not in WorkerSettings().tools
    assert "shell" not in WorkerSettings.from_env({}).tools
    assert set(default_registry(WorkerSettings().tools)) == {"noop", "sleep", "fail"}
    assert set(default_registry(WorkerSettings.from_env({"RUN_WORKER_TOOLS": "noop, shell"}).tools)) == {
        "noop",
        "shell",
    }
    assert set(default_registry(STOCK_TOOLS)) == {"noop", "sleep", "fail", "shell"}


async def test_a_worker_registers_only_the_tools_its_settings_allow() -> None:
    for tools, expected in [((), {"noop", "sleep", "fail"}), (("noop", "shell"), {"noop", "shell"})]:
        settings = WorkerSettings(tools=tools) if tools else WorkerSettings()
        worker = Worker(settings)
        try:
            assert set(worker.tools) == expected
        finally:
            await worker.close()


def test_the_tools_flag_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[WorkerSettings] = []

    async def fake_main(settings: WorkerSettings, once: bool) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(worker_main, "_main", fake_main)
    monkeypatch.setattr(worker_main, "configure_logging", lambda *a, **k: None)
    monkeypatch.setattr(worker_main, "configure_tracing", lambda *a, **k: None)
    monkeypatch.delenv("RUN_WORKER_TOOLS", raising=False)
    assert worker_main.main([]) == 0
    monkeypatch.setenv("RUN_WORKER_TOOLS", "noop,fail")
    assert worker_main.main([]) == 0
    assert worker_main.main(["--tools", "shell, noop"]) == 0
    assert [s.tools for s in seen] == [("noop", "sleep", "fail"), ("noop", "fail"), ("shell", "noop")]
    with pytest.raises(SystemExit) as exited:
        worker_main.main(["--tools", "noop,rm"])
    assert exited.value.code == 2


async def test_shell_keeps_only_the_first_64_kib_of_a_noisy_command() -> None:
    """200 MB of output: the tool keeps 64 KiB of each stream and drops the rest as it reads it
    (communicate() held all of it in the worker's memory before cutting)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = await shell(
        {"command": ["sh", "-c", "head -c 200000000 /dev/zero; head -c 100 /dev/zero >&2"], "timeout_seconds": 60}, CTX
    )
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert (len(out["stdout"]), len(out["stderr"]), out["truncated"]) == (64 * 1024, 100, True)
    assert grown_kib < 100_000, f"the worker's peak memory grew by {grown_kib} KiB"
