"""Small text helpers both services and the shared model use."""

from __future__ import annotations


def shorten(value: str, limit: int = 64) -> str:
    """`value` cut to at most `limit` characters (ending in "…" when cut), to echo a client's value."""
    if len(value) <= limit:
        return value
    return value[: max(limit - 1, 0)] + "…"
