"""`runs stats`: the caller's tenant's counters (OpsService.GetStats, an admin key when the API requires keys):
runs by status, run events by kind, step cache hits by layer and misses by reason."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from services.cli.common import EXIT_OK, UNARY_DEADLINE_SECONDS, Api, dumps, format_table, out, to_dict
from shared.gen.runs.v1 import ops_service_pb2, run_pb2

EVENT_COUNTERS = ("claimed", "completed", "failed", "canceled", "requeued", "lease_expired", "readopted")


def add_parsers(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """The `stats` command."""
    add(
        "stats",
        "Show your tenant's counters: runs by status, run events, step cache hits and misses "
        "(OpsService.GetStats; needs an admin key when the API requires keys).",
    )


def _status_order(name: str) -> tuple[int, str]:
    """Runs by status in the lifecycle's order (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED), others after."""
    key = "RUN_STATUS_" + name.upper()
    return (run_pb2.RunStatus.Value(key) if key in run_pb2.RunStatus.keys() else 99, name)


def format_stats(stats: ops_service_pb2.GetStatsResponse) -> str:
    """The counters as one table: WHAT (runs, event, cache hit, cache miss), NAME and COUNT."""
    rows: list[tuple[str, str, str]] = [
        ("runs", name.upper(), str(stats.runs_by_status[name]))
        for name in sorted(stats.runs_by_status, key=_status_order)
    ]
    rows += [("event", name, str(getattr(stats, name))) for name in EVENT_COUNTERS]
    rows += [("cache hit", layer, str(n)) for layer, n in sorted(stats.cache_hits_by_layer.items())]
    rows += [("cache miss", reason, str(n)) for reason, n in sorted(stats.cache_misses_by_reason.items())]
    if stats.reaper_failures:
        rows.append(("reaper", "failed cycles", str(stats.reaper_failures)))
    header = f"tenant: {stats.tenant_id or '-'}"
    return header + "\n" + format_table(("WHAT", "NAME", "COUNT"), rows)


def stats_json(stats: ops_service_pb2.GetStatsResponse) -> dict[str, Any]:
    """The JSON document of `stats --json`: every field, counters as numbers (zeros included)."""
    document = {name: getattr(stats, name) for name in (*EVENT_COUNTERS, "reaper_failures")}
    document["tenant_id"] = stats.tenant_id
    document.update(to_dict(stats))
    for field in ("runs_by_status", "cache_hits_by_layer", "cache_misses_by_reason"):
        document.setdefault(field, {})
    return document


def cmd_stats(api: Api, args: argparse.Namespace) -> int:
    """`runs stats`: GetStats, as a table or with --json as JSON."""
    stats = api.ops.GetStats(ops_service_pb2.GetStatsRequest(), timeout=UNARY_DEADLINE_SECONDS)
    out(dumps(stats_json(stats)) if args.json else format_stats(stats))
    return EXIT_OK


COMMANDS = {"stats": cmd_stats}
