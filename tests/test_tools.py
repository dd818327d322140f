"""The worker's tools: the registry and its entry points, echo, shell (timeouts and cancellation kill the whole
process group; opt-in; its working directory, artifacts, inputs and RUNS_* files)."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from services.run_worker import __main__ as worker_main
from services.run_worker.tools import (
    STOCK,
    ArtifactError,
    Tool,
    ToolContext,
    ToolError,
    UnknownTools,
    known_tools,
    registry,
)
from services.run_worker.tools.echo import echo
from services.run_worker.tools.fail import fail
from services.run_worker.tools.shell import shell
from services.run_worker.tools.sleep import sleep
from services.run_worker.worker import Worker
from shared.settings import STOCK_TOOLS, WorkerSettings
from shared.tool_args import STOCK_TOOL_ARGS
from shared.workflows import WorkflowInputError, check_tool_args

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


async def test_stock_tools_refuse_what_the_api_refuses_in_the_same_words() -> None:
    """One schema a tool (shared/tool_args.py): the API's up-front check and the tool itself read the same rules."""
    assert {name: tool.schema for name, tool in STOCK.items()} == dict(STOCK_TOOL_ARGS)
    for tool, args, field in [
        ("sleep", {"seconds": -1}, "seconds"),
        ("fail", {"times": None}, "times"),
        ("fail", {"retryable": "no"}, "retryable"),
        ("shell", {"command": "ls"}, "command"),
        ("shell", {"command": ["ls"], "shell": True}, "command"),
        ("shell", {"command": ["ls"], "timeout_seconds": 0}, "timeout_seconds"),
    ]:
        with pytest.raises(WorkflowInputError) as api:
            check_tool_args(tool, args)
        with pytest.raises(ToolError) as refused:
            await STOCK[tool](args, CTX)
        assert api.value.field == f"input.args.{field}"
        assert (refused.value.message, refused.value.retryable) == (api.value.message, False)


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
    assert set(registry(WorkerSettings().tools)) == {"noop", "echo", "sleep", "fail"}
    assert set(registry(WorkerSettings.from_env({"RUN_WORKER_TOOLS": "noop, shell"}).tools)) == {"noop", "shell"}
    assert set(registry(STOCK_TOOLS)) == {"noop", "echo", "sleep", "fail", "shell"}


async def test_a_worker_registers_only_the_tools_its_settings_allow() -> None:
    for tools, expected in [((), {"noop", "echo", "sleep", "fail"}), (("noop", "shell"), {"noop", "shell"})]:
        settings = WorkerSettings(tools=tools) if tools else WorkerSettings()
        worker = Worker(settings)
        try:
            assert set(worker.tools) == expected
        finally:
            await worker.close()


def test_the_tools_flag_overrides_the_environment(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    seen: list[tuple[WorkerSettings, list[str]]] = []

    async def fake_main(settings: WorkerSettings, once: bool, tools: dict[str, Tool], ready_fd: int | None) -> int:
        seen.append((settings, list(tools)))
        return 0

    monkeypatch.setattr(worker_main, "_main", fake_main)
    monkeypatch.setattr(worker_main, "configure_logging", lambda *a, **k: None)
    monkeypatch.setattr(worker_main, "configure_tracing", lambda *a, **k: None)
    monkeypatch.delenv("RUN_WORKER_TOOLS", raising=False)
    assert worker_main.main([]) == 0
    monkeypatch.setenv("RUN_WORKER_TOOLS", "noop,fail")
    assert worker_main.main([]) == 0
    assert worker_main.main(["--tools", "shell, noop"]) == 0
    assert [s.tools for s, _ in seen] == [("noop", "echo", "sleep", "fail"), ("noop", "fail"), ("shell", "noop")]
    assert [t for _, t in seen][-1] == ["shell", "noop"]
    with pytest.raises(SystemExit) as exited:  # not a tool name at all
        worker_main.main(["--tools", "noop,rm -rf"])
    assert exited.value.code == 2
    capsys.readouterr()
    # a well-formed name no registry knows: refused at start, naming the known tools
    assert worker_main.main(["--tools", "noop,rm"]) == 2
    err = capsys.readouterr().err
    assert "unknown tool 'rm'" in err and "known tools: echo, fail, noop, shell, sleep" in err
    assert len(seen) == 3


def _entry_point_package(root: Path, name: str, body: str, ep: str) -> None:
    """A tiny installed distribution under `root` with one `runs.tools` entry point."""
    (root / f"{name}.py").write_text(body)
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[runs.tools]\n{ep}\n")


async def test_entry_points_add_tools_with_their_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = (
        "from services.run_worker.tools import Tool\n"
        "async def shout(args, ctx):\n    return {'said': str(args.get('text', '')).upper()}\n"
        "shout.version = '2.5'\n"
        "async def _whisper(args, ctx):\n    return {'said': 'psst'}\n"
        "whisper = Tool('whisper', _whisper, version='7', deterministic=False)\n"
    )
    _entry_point_package(tmp_path, "loudtools", body, "shout = loudtools:shout\nwhisper = loudtools:whisper")
    _entry_point_package(tmp_path, "brokentools", "raise ImportError('nope')\n", "broken = brokentools:x")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        assert {"shout", "whisper", "broken", "echo"} <= set(known_tools())
        tools = registry(["noop", "shout", "whisper"])  # the broken one is not loaded unless asked for
        assert (tools["shout"].version, tools["shout"].deterministic) == ("2.5", True)
        assert (tools["whisper"].version, tools["whisper"].deterministic) == ("7", False)
        assert await tools["shout"]({"text": "hi"}, CTX) == {"said": "HI"}
        with pytest.raises(UnknownTools, match="cannot load tool 'broken'"):
            registry(["broken"])
        with pytest.raises(UnknownTools, match=r"unknown tools 'x', 'y'; known tools: .*shout"):
            registry(["x", "noop", "y"])
    finally:
        for mod in ("loudtools", "brokentools"):
            sys.modules.pop(mod, None)


async def test_echo_returns_its_input() -> None:
    assert await echo({"a": [1, {"b": None}]}, CTX) == {"a": [1, {"b": None}]}
    assert registry(["echo"])["echo"].version == "1"


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


async def test_shell_runs_in_its_workdir_with_the_runs_files_and_collects_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNS_API_KEY", "secret-worker-key")
    script = (
        "import json, os, pathlib\n"
        "args = json.loads(pathlib.Path(os.environ['RUNS_INPUT']).read_text())\n"
        "pathlib.Path('site').mkdir()\n"
        "pathlib.Path('site/index.html').write_text('<p>' + args['title'] + '</p>')\n"
        "pathlib.Path('notes.md').write_text('not an artifact')\n"
        "pathlib.Path('a.svg').write_text('<svg/>')\n"
        "pathlib.Path(os.environ['RUNS_OUTPUT']).write_text(json.dumps({'cwd': os.getcwd(), "
        "'run': os.environ['RUNS_RUN_ID'], 'step': os.environ['RUNS_STEP_KEY'], "
        "'key': os.environ.get('RUNS_API_KEY')}))\n"
    )
    ctx = ToolContext("run-1", 1, "page", workdir=str(tmp_path))
    args = {"command": [sys.executable, "-c", script], "title": "Hi", "artifacts": ["site/*.html", "*.svg"]}
    out = await shell(args, ctx)
    assert out["result"] == {"cwd": str(tmp_path), "run": "run-1", "step": "page", "key": None}
    assert [(a.name, a.media_type) for a in ctx.artifacts] == [("site/index.html", "text/html"),
                                                               ("a.svg", "image/svg+xml")]
    assert Path(ctx.artifacts[0].path).read_text() == "<p>Hi</p>"


async def test_shell_fails_when_an_artifact_pattern_matches_nothing_or_runs_output_is_not_an_object(
    tmp_path: Path,
) -> None:
    ctx = ToolContext("r", 1, "s", workdir=str(tmp_path))
    with pytest.raises(ArtifactError, match=r"artifacts: '\*.zip' matched no file") as info:
        await shell({"command": ["true"], "artifacts": ["*.zip"]}, ctx)
    assert info.value.retryable is False
    with pytest.raises(ToolError, match="must be relative"):
        await shell({"command": ["true"], "artifacts": ["../x"]}, ctx)
    with pytest.raises(ToolError, match="RUNS_OUTPUT must hold a JSON object"):
        await shell({"command": "echo '[1]' > \"$RUNS_OUTPUT\"", "shell": True}, ctx)
    out = await shell({"command": ["true"]}, ToolContext("r", 1, "s"))  # no workdir: a temporary one
    assert "result" not in out and out["exit_code"] == 0


async def test_shell_fetches_its_inputs_into_the_workdir_first(tmp_path: Path) -> None:
    blobs = {hashlib.sha256(b"one").hexdigest(): b"one", hashlib.sha256(b"two").hexdigest(): b"two"}
    fetched: list[str] = []

    async def fetcher(artifact: Any, dest: str) -> None:
        fetched.append(dest)
        Path(dest).write_bytes(blobs[artifact["sha256"]])

    one, two = ({"name": n, "sha256": h} for n, h in zip(["dir/one.txt", "two.txt"], blobs, strict=True))
    ctx = ToolContext("r", 1, "s", workdir=str(tmp_path), fetcher=fetcher)
    out = await shell({"command": ["sh", "-c", "cat dir/one.txt two.txt"], "inputs": [one, two]}, ctx)
    assert out["stdout"] == "onetwo"
    ctx = ToolContext("r", 1, "s", workdir=str(tmp_path / "w2"), fetcher=fetcher)
    (tmp_path / "w2").mkdir()
    out = await shell({"command": ["cat", "renamed.txt"], "inputs": {"renamed.txt": two}}, ctx)
    assert out["stdout"] == "two"
    assert fetched[-1] == str(tmp_path / "w2" / "renamed.txt")
    with pytest.raises(ArtifactError, match="must be a relative path"):
        await shell({"command": ["true"], "inputs": {"../evil": two}}, ctx)
    with pytest.raises(ArtifactError, match="cannot fetch"):
        await shell({"command": ["true"], "inputs": [one]}, ToolContext("r", 1, "s", workdir=str(tmp_path)))


def test_add_artifact_checks_names_duplicates_and_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    ctx = ToolContext("r", 1, "s", workdir=str(tmp_path))
    assert ctx.add_artifact("a.txt").name == "a.txt"
    with pytest.raises(ArtifactError, match="appears twice"):
        ctx.add_artifact(str(tmp_path / "a.txt"))
    with pytest.raises(ArtifactError, match="not a file"):
        ctx.add_artifact("missing.txt")
    with pytest.raises(ArtifactError, match="must be a relative path"):
        ctx.add_artifact("a.txt", name="bad name")
    assert ctx.add_artifact("a.txt", name="copy.bin", media_type="x/y").media_type == "x/y"
    assert [a.name for a in ctx.artifacts] == ["a.txt", "copy.bin"]
