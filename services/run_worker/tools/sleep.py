"""The stock tool sleep: sleeps `seconds`, cancellable mid-sleep."""

from __future__ import annotations

import asyncio

from services.run_worker.tools.base import Json, Tool, ToolContext, check_args
from shared.tool_args import SLEEP


async def sleep(args: Json, ctx: ToolContext) -> Json:
    """Sleep `seconds` (cancellable mid-sleep)."""
    check_args(SLEEP, args)
    seconds = float(SLEEP.get(args, "seconds"))
    await asyncio.sleep(seconds)
    return {"slept_seconds": seconds}


TOOL = Tool("sleep", sleep, version="1", deterministic=False, schema=SLEEP)
