"""The worker's stock tools: shell timeouts and cancellation kill the whole process group."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from services.run_worker.tools import ToolContext, ToolError, fail, shell, sleep

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
