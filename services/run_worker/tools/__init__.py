"""The worker's tools: the registry of the stock tools and of the `runs.tools` entry point group.

The tool contract (Tool, ToolContext, ToolError, ...) lives in `base.py`, each stock tool in a module
of its own (noop, echo, sleep, fail, shell; shell is opt-in: WorkerSettings.tools), and each stock
tool's argument schema in shared/tool_args.py, which the API checks too. Other packages add tools
through the entry point group `runs.tools`, whose entries load a `Tool` or an async callable with a
`version` attribute. Every name of `base.py` is importable from here; `tools.shell` and its siblings
are the modules (the tool function and its `TOOL` are inside).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable

from services.run_worker.tools import echo, fail, noop, shell, sleep
from services.run_worker.tools.base import (
    MAX_ARTIFACTS,
    ArtifactError,
    Fetcher,
    Json,
    LocalArtifact,
    Tool,
    ToolContext,
    ToolError,
    ToolFn,
    as_tool,
    check_args,
    check_artifact_name,
    sha256_file,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "MAX_ARTIFACTS",
    "STOCK",
    "ArtifactError",
    "Fetcher",
    "Json",
    "LocalArtifact",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolFn",
    "UnknownTools",
    "as_tool",
    "check_args",
    "check_artifact_name",
    "known_tools",
    "registry",
    "sha256_file",
]

ENTRY_POINT_GROUP = "runs.tools"


class UnknownTools(ValueError):
    """RUN_WORKER_TOOLS names tools that are neither stock nor in the `runs.tools` entry point group."""


STOCK: dict[str, Tool] = {t.name: t for t in (noop.TOOL, echo.TOOL, sleep.TOOL, fail.TOOL, shell.TOOL)}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_tools() -> list[str]:
    """Every tool name a worker could run: the stock tools and those of the `runs.tools` entry points."""
    return sorted({*STOCK, *_entry_points()})


def registry(allowed: Iterable[str]) -> dict[str, Tool]:
    """The tools named in `allowed` (WorkerSettings.tools): stock ones, else loaded from their entry point.

    Raises UnknownTools naming the known tools when a name is neither.
    """
    names = list(dict.fromkeys(allowed))
    points = _entry_points() if any(n not in STOCK for n in names) else {}
    unknown = [n for n in names if n not in STOCK and n not in points]
    if unknown:
        raise UnknownTools(
            f"unknown tool{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known tools: {', '.join(sorted({*STOCK, *points}))}"
        )
    tools: dict[str, Tool] = {}
    for name in names:
        if name in STOCK:
            tools[name] = STOCK[name]
            continue
        try:
            tools[name] = as_tool(name, points[name].load())
        except Exception as err:
            raise UnknownTools(f"cannot load tool {name!r} ({points[name].value}): {err}") from err
    return tools
