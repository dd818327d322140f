"""The worker's tool registry: noop, sleep, fail and shell (opt-in: WorkerSettings.tools).

A tool is an async callable taking its arguments and a ToolContext and returning a JSON-able dict.
It raises ToolError to fail (retryable or not). Cancellation arrives as asyncio.CancelledError:
tools clean up (shell kills its process group) and let it propagate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from services.run_worker import launcher

Json = dict[str, Any]


class ToolError(Exception):
    """A tool failed; `retryable` False ends the run at once instead of retrying."""

    def __init__(self, message: str, retryable: bool = True, output: Json | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.output = output


@dataclass(frozen=True)
class ToolContext:
    """What a tool may know about the call."""

    run_id: str
    attempt: int
    step_key: str


Tool = Callable[[Json, ToolContext], Awaitable[Json]]


def _number(args: Json, name: str, default: float, minimum: float = 0.0) -> float:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ToolError(f"{name} must be a number >= {minimum}", retryable=False)
    return float(value)


async def noop(args: Json, ctx: ToolContext) -> Json:
    """Do nothing, successfully."""
    return {"ok": True}


async def sleep(args: Json, ctx: ToolContext) -> Json:
    """Sleep `seconds` (cancellable mid-sleep)."""
    seconds = _number(args, "seconds", 1.0)
    await asyncio.sleep(seconds)
    return {"slept_seconds": seconds}


async def fail(args: Json, ctx: ToolContext) -> Json:
    """Fail with `message`; with `times` N only on the first N attempts; `retryable` (default true)."""
    message = str(args.get("message", "failed on purpose"))
    times = args.get("times")
    if times is not None and ctx.attempt > _number(args, "times", 0):
        return {"ok": True, "attempt": ctx.attempt}
    raise ToolError(message, retryable=bool(args.get("retryable", True)))


MAX_CAPTURE = 64 * 1024
LAUNCHER = launcher.__file__
_EXEC_FAILED = launcher.EXEC_FAILED_MARKER.encode()


async def shell(args: Json, ctx: ToolContext) -> Json:
    """Run `command` (a list: program and arguments; a string only with `shell: true`) with a timeout.

    Captures the exit code and up to 64 KiB of stdout and stderr; kills the process group on cancel
    or timeout, and the launcher kills it when the worker dies. A non-zero exit fails the tool
    (retryable unless `retryable: false`).
    """
    command = args.get("command")
    timeout = _number(args, "timeout_seconds", 60.0, minimum=0.001)
    if args.get("shell", False):
        if not isinstance(command, str) or not command:
            raise ToolError("with shell: true, command must be a non-empty string", retryable=False)
        argv = ["/bin/sh", "-c", command]
    else:
        if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
            raise ToolError("command must be a non-empty list of strings", retryable=False)
        argv = command
    # The launcher leads the new session's process group and kills it if this process dies.
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", LAUNCHER, str(os.getpid()), "--", *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as err:  # out of processes or descriptors, say: another attempt may do better
        raise ToolError(f"cannot start the command launcher: {err.strerror or err}") from None
    try:
        (stdout, out_cut), (stderr, err_cut), _ = await asyncio.wait_for(
            asyncio.gather(_capture(proc.stdout), _capture(proc.stderr), proc.wait()), timeout
        )
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        raise ToolError(f"command timed out after {timeout:g}s", output={"timed_out": True}) from None
    except asyncio.CancelledError:
        _kill_group(proc)
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    if proc.returncode == launcher.EXEC_FAILED_CODE and not stdout and stderr.startswith(_EXEC_FAILED):
        reason = stderr[len(_EXEC_FAILED):].decode(errors="replace").strip()
        raise ToolError(f"cannot start {argv[0]!r}: {reason}", retryable=False)
    output = {
        "exit_code": proc.returncode,
        "stdout": stdout.decode(errors="replace"),
        "stderr": stderr.decode(errors="replace"),
        "truncated": out_cut or err_cut,
    }
    if proc.returncode != 0:
        raise ToolError(
            f"command exited with code {proc.returncode}",
            retryable=bool(args.get("retryable", True)),
            output=output,
        )
    return output


async def _capture(stream: asyncio.StreamReader | None) -> tuple[bytes, bool]:
    """The first MAX_CAPTURE bytes of a pipe, and whether there was more; the rest is read and dropped,
    so a noisy command never fills the worker's memory (nor blocks on a full pipe)."""
    if stream is None:
        return b"", False
    kept = bytearray()
    cut = False
    while chunk := await stream.read(65536):
        room = MAX_CAPTURE - len(kept)
        kept += chunk[:room]
        cut = cut or len(chunk) > room
    return bytes(kept), cut


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


STOCK: dict[str, Tool] = {"noop": noop, "sleep": sleep, "fail": fail, "shell": shell}


def default_registry(allowed: Iterable[str]) -> dict[str, Tool]:
    """The stock tools named in `allowed` (WorkerSettings.tools), by name; unknown names are ignored."""
    names = set(allowed)
    return {name: tool for name, tool in STOCK.items() if name in names}
