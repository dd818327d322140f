"""The stock tool echo: returns its input as its output."""

from __future__ import annotations

from services.run_worker.tools.base import Json, Tool, ToolContext, check_args
from shared.tool_args import ECHO


async def echo(args: Json, ctx: ToolContext) -> Json:
    """Return the input as the output."""
    check_args(ECHO, args)
    return dict(args)


TOOL = Tool("echo", echo, version="1", schema=ECHO, instant=True)
