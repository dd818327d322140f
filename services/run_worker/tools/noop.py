"""The stock tool noop: does nothing, successfully (the step of runtime.noop)."""

from __future__ import annotations

from services.run_worker.tools.base import Json, Tool, ToolContext, check_args
from shared.tool_args import NOOP


async def noop(args: Json, ctx: ToolContext) -> Json:
    """Do nothing, successfully."""
    check_args(NOOP, args)
    return {"ok": True}


TOOL = Tool("noop", noop, version="1", schema=NOOP, instant=True)
