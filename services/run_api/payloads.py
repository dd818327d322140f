"""What a worker may put in an event's payload: one schema per event type, checked before anything is stored.

The log is append-only, so a malformed payload would poison every later read of its run; here it
is refused at the edge with the field it is about. The same module bounds how deep any JSON value
(a run's input, a tool's output) may nest, well below what protobuf decoders accept anywhere the
value travels later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.events import EventType
from shared.limits import MAX_JSON_DEPTH, json_depth
from shared.text import shorten

MAX_ERROR_CHARS = 8192
MAX_REASON_CHARS = 1024
MAX_KEY_CHARS = 128

_STR = "string"
_BOOL = "boolean"
_OBJECT = "object"  # a JSON object, or null
_INT = "integer"  # a whole number >= 1 (a try number)
_KEYS = "keys"  # a list of at most MAX_LIST strings of at most `limit` characters
_ARTIFACTS = "artifacts"  # a list of at most MAX_ARTIFACTS_PER_STEP artifact objects

MAX_LIST = 1000
MAX_ARTIFACTS_PER_STEP = 100
# The fields of one artifact in step.succeeded (the API checks the blob is in the store).
ARTIFACT_FIELDS = ("name", "uri", "sha256", "size", "media_type")
STEP_ERROR_CODES = frozenset(
    {"tool_failed", "tool_timeout", "tool_unavailable", "selector_failed", "artifact_failed", "interrupted"}
)


# Per event type: field -> (kind, required, max characters for strings).
_Field = tuple[str, bool, int]
SCHEMAS: dict[str, dict[str, _Field]] = {
    EventType.RUN_STARTED: {},
    EventType.RUN_COMPLETED: {"output": (_OBJECT, False, 0)},
    EventType.RUN_FAILED: {
        "error": (_STR, False, MAX_ERROR_CHARS),
        "retryable": (_BOOL, False, 0),
        "released": (_BOOL, False, 0),
        "stop_reason": (_STR, False, MAX_KEY_CHARS),  # only "step_failed" (checked below)
        "step_key": (_STR, False, MAX_KEY_CHARS),
    },
    EventType.RUN_CANCELED: {"reason": (_STR, False, MAX_REASON_CHARS)},
    EventType.STEP_CREATED: {
        "step_key": (_STR, True, MAX_KEY_CHARS),
        "tool": (_STR, False, MAX_KEY_CHARS),
        "depends_on": (_KEYS, False, MAX_KEY_CHARS),
    },
    # cache: {result: "miss", reason, detail, components, scope} when the step is cacheable
    EventType.STEP_STARTED: {"step_key": (_STR, True, MAX_KEY_CHARS), "try": (_INT, False, 0),
                             "cache": (_OBJECT, False, 0)},
    EventType.STEP_SUCCEEDED: {
        "step_key": (_STR, True, MAX_KEY_CHARS),
        "output": (_OBJECT, False, 0),
        "artifacts": (_ARTIFACTS, False, 0),
        "try": (_INT, False, 0),
        "cache": (_OBJECT, False, 0),  # {components, scope, ttl_seconds}: the API keys and stores it
    },
    EventType.STEP_FAILED: {
        "step_key": (_STR, True, MAX_KEY_CHARS),
        "error": (_STR, False, MAX_ERROR_CHARS),
        "code": (_STR, False, MAX_KEY_CHARS),
        "retryable": (_BOOL, False, 0),
        "will_retry": (_BOOL, False, 0),
        "tool": (_STR, False, MAX_KEY_CHARS),
        "try": (_INT, False, 0),
    },
    EventType.STEP_SKIPPED: {
        "step_key": (_STR, True, MAX_KEY_CHARS),
        "reason": (_STR, False, MAX_REASON_CHARS),  # cache_hit or reused_from_base
        "output": (_OBJECT, False, 0),
        "artifacts": (_ARTIFACTS, False, 0),
        "cache": (_OBJECT, False, 0),  # a hit: {key, display, layer}
        "source_run_id": (_STR, False, MAX_KEY_CHARS),
        "source_step_key": (_STR, False, MAX_KEY_CHARS),
    },
    EventType.STEP_CANCELED: {"step_key": (_STR, True, MAX_KEY_CHARS), "reason": (_STR, False, MAX_REASON_CHARS)},
    EventType.TOOL_INVOKED: {
        "tool_call_id": (_STR, True, MAX_KEY_CHARS),
        "step_key": (_STR, True, MAX_KEY_CHARS),
        "tool": (_STR, True, MAX_KEY_CHARS),
        "input": (_OBJECT, False, 0),
        "try": (_INT, False, 0),
        "tool_version": (_STR, False, MAX_KEY_CHARS),
    },
    EventType.TOOL_SUCCEEDED: {"tool_call_id": (_STR, True, MAX_KEY_CHARS), "output": (_OBJECT, False, 0)},
    EventType.TOOL_FAILED: {
        "tool_call_id": (_STR, True, MAX_KEY_CHARS),
        "error": (_STR, False, MAX_ERROR_CHARS),
        "output": (_OBJECT, False, 0),
    },
}


def problems(event_type: str, payload: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What is wrong with a payload for `event_type`, as (field under payload, description) pairs."""
    schema = SCHEMAS.get(event_type)
    if schema is None:
        return [("", f"workers may not report {event_type} events")]
    out: list[tuple[str, str]] = []
    for name in payload:
        if name not in schema:
            allowed = ", ".join(sorted(schema)) or "no fields"
            out.append((shorten(name, 40), f"{event_type} does not take this field (it takes {allowed})"))
    for name, (kind, required, limit) in schema.items():
        if name not in payload or payload[name] is None:
            if required:
                out.append((name, f"{event_type} needs payload.{name}"))
            continue
        value = payload[name]
        if kind == _STR:
            if not isinstance(value, str) or (required and not value):
                out.append((name, f"payload.{name} must be a{' non-empty' if required else ''} string"))
            elif len(value) > limit:
                out.append((name, f"payload.{name} is {len(value)} characters; at most {limit}"))
            elif "\x00" in value:
                out.append((name, f"payload.{name} must not contain the character U+0000"))
        elif kind == _BOOL and not isinstance(value, bool):
            out.append((name, f"payload.{name} must be true or false"))
        elif kind == _OBJECT and not isinstance(value, Mapping):
            out.append((name, f"payload.{name} must be an object"))
        elif kind == _INT and (isinstance(value, bool) or not isinstance(value, int | float)
                               or value != int(value) or not 1 <= value <= 1_000_000):
            out.append((name, f"payload.{name} must be a whole number from 1"))
        elif kind == _KEYS and not (
            isinstance(value, list) and len(value) <= MAX_LIST
            and all(isinstance(v, str) and 0 < len(v) <= limit for v in value)
        ):
            out.append((name, f"payload.{name} must be a list of at most {MAX_LIST} step keys"))
        elif kind == _ARTIFACTS:
            out.extend(_artifact_problems(name, value))
    if event_type == EventType.RUN_FAILED and payload.get("stop_reason") not in (None, "step_failed"):
        out.append(("stop_reason", "payload.stop_reason may only be step_failed"))
    if event_type == EventType.STEP_SKIPPED and payload.get("reason") not in ("cache_hit", "reused_from_base"):
        out.append(("reason", "payload.reason must be cache_hit or reused_from_base"))
    if isinstance(payload.get("cache"), Mapping):
        out.extend(_cache_problems(event_type, payload["cache"]))
    if event_type == EventType.STEP_FAILED and payload.get("code") not in (None, *STEP_ERROR_CODES):
        out.append(("code", f"payload.code must be one of {', '.join(sorted(STEP_ERROR_CODES))}"))
    if json_depth(payload) > MAX_JSON_DEPTH + 1:
        out.append(("", f"the payload nests deeper than {MAX_JSON_DEPTH} levels"))
    return out




def _artifact_problems(name: str, value: Any) -> list[tuple[str, str]]:
    """What is wrong with a step.succeeded artifact list (its shape; the store check is the handler's)."""
    if not isinstance(value, list):
        return [(name, f"payload.{name} must be a list")]
    if len(value) > MAX_ARTIFACTS_PER_STEP:
        return [(name, f"a step may record at most {MAX_ARTIFACTS_PER_STEP} artifacts; it sent {len(value)}")]
    out: list[tuple[str, str]] = []
    names: set[str] = set()
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(item, Mapping) or set(item) - set(ARTIFACT_FIELDS):
            out.append((where, f"an artifact is an object with {', '.join(ARTIFACT_FIELDS)}"))
            continue
        sha = item.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            out.append((f"{where}.sha256", "sha256 must be 64 lowercase hex digits"))
        size = item.get("size")
        if isinstance(size, bool) or not isinstance(size, int | float) or size < 0:
            out.append((f"{where}.size", "size must be a number of bytes >= 0"))
        for text in ("name", "uri", "media_type"):
            v = item.get(text)
            if not isinstance(v, str) or len(v) > 1024 or "\x00" in v or (text == "name" and not v):
                out.append((f"{where}.{text}", f"{text} must be a string of at most 1024 characters"))
        if isinstance(item.get("name"), str):
            if item["name"] in names:
                out.append((f"{where}.name", f"artifact name {shorten(item['name'])!r} appears twice"))
            names.add(item["name"])
    return out


CACHE_SCOPES = ("global", "run_only")
CACHE_MISS_REASONS = ("no_entry", "expired", "artifact_missing", "artifact_changed", "scope_run_only", "refresh")
CACHE_LAYERS = ("hot", "cold")
_COMPONENT_FIELDS = ("workflow", "step", "tool", "tool_version", "spec", "input", "input_artifacts", "run_id")


def _cache_problems(event_type: str, cache: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What is wrong with a payload's `cache` object (its shape; the API computes keys itself)."""
    out: list[tuple[str, str]] = []
    components = cache.get("components")
    if event_type == EventType.STEP_SUCCEEDED or components is not None:
        if not isinstance(components, Mapping) or set(components) - set(_COMPONENT_FIELDS) or not all(
            isinstance(components.get(k), str) and components.get(k) for k in ("workflow", "step", "tool")
        ):
            out.append(("cache.components", f"cache.components must be an object of {', '.join(_COMPONENT_FIELDS)}"))
        if cache.get("scope") not in CACHE_SCOPES:
            out.append(("cache.scope", "cache.scope must be global or run_only"))
    ttl = cache.get("ttl_seconds")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0):
        out.append(("cache.ttl_seconds", "cache.ttl_seconds must be a number >= 0"))
    if event_type == EventType.STEP_STARTED and cache.get("reason") not in (None, *CACHE_MISS_REASONS):
        out.append(("cache.reason", f"cache.reason must be one of {', '.join(CACHE_MISS_REASONS)}"))
    if event_type == EventType.STEP_SKIPPED and cache.get("layer") not in (None, *CACHE_LAYERS):
        out.append(("cache.layer", "cache.layer must be hot or cold"))
    for name in ("key", "display", "detail", "reason", "layer"):
        value = cache.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_REASON_CHARS):
            out.append((f"cache.{name}", f"cache.{name} must be a string of at most {MAX_REASON_CHARS} characters"))
    return out
