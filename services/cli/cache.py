"""`runs cache ls` and `runs cache rm`: the caller's tenant's step cache (ListCacheEntries, InvalidateCache).

`rm` removes entries from both layers (Redis and PostgreSQL): every entry of a workflow, of one of
its steps, or one key.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from services.cli.common import (
    EXIT_OK,
    UNARY_DEADLINE_SECONDS,
    Api,
    cell,
    collect_pages,
    dumps,
    format_table,
    iso_time,
    out,
    positive_int,
    print_page,
    subcommands,
    to_dict,
)
from shared.gen.runs.v1 import run_pb2, run_service_pb2

KEY_SHOWN = 12  # hex digits of a key in the table


def add_parsers(
    cache: argparse.ArgumentParser, common: argparse.ArgumentParser, epilog: str
) -> dict[str, argparse.ArgumentParser]:
    """Add `ls` and `rm` under the `cache` parser; returns them by name."""
    parsers, add = subcommands(cache, common, epilog, "cache_command")

    ls = add("ls", "List step cache entries, newest first.")
    ls.add_argument("--workflow", default="", metavar="W", help="only entries of this workflow")
    ls.add_argument("--step", default="", metavar="S", help="only entries of this step")
    ls.add_argument("--page-size", type=positive_int, default=0, metavar="N", help="entries per page [server default]")
    ls.add_argument("--page-token", default="", metavar="TOKEN", help="continue from this page token")
    ls.add_argument("--all", action="store_true", help="follow next_page_token until the last page")

    rm = add("rm", "Remove step cache entries (of a workflow, one of its steps, or one key) from every layer.")
    rm.add_argument("--workflow", required=True, metavar="W", help="the workflow whose entries go")
    rm.add_argument("--step", default="", metavar="S", help="only this step's entries")
    rm.add_argument("--key", default="", metavar="K", help="only the entry with this key (the full sha256)")
    return parsers


def format_entries(entries: Sequence[run_pb2.CacheEntry]) -> str:
    """Entries as a table: display form, key digits, scope, hits, times and the run that wrote it."""
    if not entries:
        return "no cache entries"
    return format_table(
        ("DISPLAY", "KEY", "SCOPE", "HITS", "CREATED_AT", "EXPIRES_AT", "LAST_HIT_AT", "SOURCE_RUN"),
        (
            (
                cell(e.display),
                e.cache_key[:KEY_SHOWN] or "-",
                e.scope or "-",
                str(e.hit_count),
                iso_time(e, "created_at"),
                iso_time(e, "expires_at") if e.HasField("expires_at") else "never",
                iso_time(e, "last_hit_at"),
                cell(e.source_run_id),
            )
            for e in entries
        ),
    )


def cmd_ls(api: Api, args: argparse.Namespace) -> int:
    """`runs cache ls`: one page of entries, or every page with --all."""

    def fetch(token: str) -> tuple[Sequence[run_pb2.CacheEntry], str]:
        request = run_service_pb2.ListCacheEntriesRequest(
            workflow=args.workflow, step_key=args.step, page_size=args.page_size, page_token=token
        )
        response = api.runs.ListCacheEntries(request, timeout=UNARY_DEADLINE_SECONDS)
        return response.entries, response.next_page_token

    entries, token = collect_pages(fetch, args.page_token, args.all)
    document = {"entries": [to_dict(e) for e in entries], "next_page_token": token}
    print_page(args, document, format_entries(entries), "runs cache ls")
    return EXIT_OK


def cmd_rm(api: Api, args: argparse.Namespace) -> int:
    """`runs cache rm --workflow W [--step S] [--key K]`: remove entries and say how many went."""
    request = run_service_pb2.InvalidateCacheRequest(workflow=args.workflow, step_key=args.step, cache_key=args.key)
    removed = api.runs.InvalidateCache(request, timeout=UNARY_DEADLINE_SECONDS).removed
    if args.json:
        out(dumps({"removed": removed}))
    else:
        out(f"removed {removed} cache entr{'y' if removed == 1 else 'ies'}")
    return EXIT_OK


COMMANDS: dict[str, Callable[[Api, argparse.Namespace], int]] = {"ls": cmd_ls, "rm": cmd_rm}


def cmd_cache(api: Api, args: argparse.Namespace) -> int:
    """`runs cache COMMAND` on a RunService api.runs."""
    return COMMANDS[args.cache_command](api, args)
