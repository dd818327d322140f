"""Limits of what an event may carry, known to both services: the API refuses past them, the worker checks first.

The API refuses a reported event whose payload is larger than MAX_EVENT_PAYLOAD_BYTES or nests deeper
than MAX_JSON_DEPTH (services/run_api/payloads.py); the worker checks a tool's output against the same
numbers, so an output past them fails its step (code tool_failed) instead of the whole report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# JSON nesting a value may have (an object or array inside another counts one level). Protobuf's
# decoders stop at 100 message levels, and each Struct level costs three (Struct, map entry, Value),
# so 20 leaves room for the messages a run's input travels in later (claims, reports, watch events).
MAX_JSON_DEPTH = 20
# The largest payload one reported event may carry (a tool's output or input included).
MAX_EVENT_PAYLOAD_BYTES = 1024 * 1024


_SCALARS = frozenset({str, int, float, bool, type(None)})


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep `value` nests (a scalar is 0); stops counting once past `limit`, so it is cheap on hostile input."""
    depth = 0
    level = [value]
    while depth <= limit:
        # JSON scalars are most of what a payload holds: their exact types skip the slower ABC check
        containers = [i for i in level if type(i) not in _SCALARS and isinstance(i, Mapping | list | tuple)]
        if not containers:
            break
        depth += 1
        level = [c for i in containers for c in (i.values() if isinstance(i, Mapping) else i)]
    return depth
