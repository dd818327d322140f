"""The step cache: keys, the two layers (Redis hot, PostgreSQL cold), lookups and invalidation.

The event store writes the cold layer (step_cache) with the step.succeeded it comes from; this module
only reads it, writes Redis after commit, and records invalidations through the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.workflow import cache_display, cache_key


@dataclass(frozen=True)
class Keys:
    """A step's cache key in a tenant, the key its components would have in scope global (base), and the display."""

    key: str
    base_key: str
    display: str


def keys_for(components: dict[str, Any], tenant: str) -> Keys:
    """The keys of a step's components in a tenant (the API's own computation: the worker sends components only)."""
    base = {k: v for k, v in components.items() if k != "run_id"}
    return Keys(cache_key(components, tenant), cache_key(base, tenant), cache_display(components))
