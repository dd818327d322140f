"""The stock tool fail: fails on purpose, to exercise retries and failure paths."""

from __future__ import annotations

from services.run_worker.tools.base import Json, Tool, ToolContext, ToolError, check_args
from shared.tool_args import FAIL


async def fail(args: Json, ctx: ToolContext) -> Json:
    """Fail with `message`; with `times` N only on the first N attempts; `retryable` (default true)."""
    check_args(FAIL, args)
    times = args.get("times")
    if times is not None and ctx.attempt > times:
        return {"ok": True, "attempt": ctx.attempt}
    raise ToolError(str(FAIL.get(args, "message")), retryable=FAIL.get(args, "retryable"))


TOOL = Tool("fail", fail, version="1", deterministic=False, schema=FAIL, instant=True)
