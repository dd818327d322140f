"""Checks of the plain fields every request carries: text PostgreSQL can store, bounded identifiers, page sizes."""

from __future__ import annotations

from services.run_api.errors import InvalidRequest

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Identifiers a client or worker sends (worker instance, workspace, project, tenant, step key, tool
# call id, event id, run id) are at most this long: they travel in NOTIFY payloads (8,000 bytes at
# most) and log lines.
MAX_IDENTIFIER = 128


def check_text(field: str, value: str, limit: int | None = None) -> None:
    """Refuse a string field PostgreSQL cannot store (U+0000) or longer than `limit`, naming the field."""
    if limit is not None and len(value) > limit:
        raise InvalidRequest.field(field, f"{field} is {len(value)} characters; at most {limit}")
    if "\x00" in value:
        raise InvalidRequest.field(field, f"{field} must not contain the character U+0000")


def check_identifier(field: str, value: str, required: bool = False, limit: int = MAX_IDENTIFIER) -> None:
    """Refuse an identifier that is missing (when required), too long, or holds control characters."""
    if not value:
        if required:
            raise InvalidRequest.field(field, f"{field} is required")
        return
    check_text(field, value, limit)
    if not value.isprintable() or value != value.strip():
        raise InvalidRequest.field(field, f"{field} must be printable text without surrounding spaces")


def page_bounds(page_size: int) -> int:
    """The page size to use for a request's page_size (0: the default; capped)."""
    if page_size < 0:
        raise InvalidRequest.field("page_size", "page_size must not be negative")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
