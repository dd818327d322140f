"""`runs keys`: create, list and revoke API keys over runs.v1.KeyService (every call needs an admin key).

A new key's secret is printed once, by `create`; the server keeps only a hash of it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from services.cli.common import (
    EXIT_OK,
    UNARY_DEADLINE_SECONDS,
    Api,
    cell,
    collect_pages,
    dumps,
    enum_name,
    err,
    format_fields,
    format_table,
    iso_time,
    out,
    positive_int,
    print_page,
    subcommands,
    to_dict,
)
from shared.gen.runs.v1 import key_service_pb2

ROLE_CHOICES = ("client", "worker", "admin")
SECRET_NOTE = (
    "note: this is the only time the secret is shown; it cannot be retrieved later. "
    "Store it now; clients send it as RUNS_API_KEY."
)


def add_parsers(
    keys: argparse.ArgumentParser, common: argparse.ArgumentParser, epilog: str
) -> dict[str, argparse.ArgumentParser]:
    """Add `create`, `list` and `revoke` under the `keys` parser; returns them by name."""
    parsers, add = subcommands(keys, common, epilog, "keys_command")

    create = add("create", "Create an API key and print its secret (shown this once only).")
    create.add_argument("--role", type=str.lower, choices=ROLE_CHOICES, required=True,
                        help="client: runs; worker: claims and reports; admin: keys, stats and runs")
    create.add_argument("--tenant", default="", metavar="T", help="the key's tenant [the caller's tenant]")
    create.add_argument("--project", default="", metavar="P", help="only runs of this project [any project]")
    create.add_argument("--workspace", default="", metavar="W", help="only runs of this workspace [any workspace]")
    create.add_argument("--ttl", type=positive_int, default=None, metavar="SECONDS",
                        help="the key expires after this many seconds [never]")
    create.add_argument("--description", default="", metavar="D", help="what the key is for (shown by list)")

    lst = add("list", "List API keys, newest first (never their secrets).")
    lst.add_argument("--include-revoked", action="store_true", help="also revoked keys")
    lst.add_argument("--page-size", type=positive_int, default=0, metavar="N",
                     help="keys per page [server default: 50, at most 500]")
    lst.add_argument("--page-token", default="", metavar="TOKEN", help="continue from this page token")
    lst.add_argument("--all", action="store_true", help="follow next_page_token until the last page")

    revoke = add("revoke", "Revoke an API key at once (revoking twice gives the same answer).")
    revoke.add_argument("key_id", metavar="KEY_ID")
    return parsers


# --- requests ----------------------------------------------------------------------------------


def create_request(args: argparse.Namespace) -> key_service_pb2.CreateKeyRequest:
    """The CreateKeyRequest for parsed `keys create` arguments."""
    return key_service_pb2.CreateKeyRequest(
        role=key_service_pb2.KeyRole.Value("KEY_ROLE_" + args.role.upper()),
        tenant_id=args.tenant,
        project_id=args.project,
        workspace_id=args.workspace,
        ttl_seconds=args.ttl or 0,
        description=args.description,
    )


def list_request(args: argparse.Namespace, page_token: str) -> key_service_pb2.ListKeysRequest:
    """The ListKeysRequest for parsed `keys list` arguments and a page token."""
    return key_service_pb2.ListKeysRequest(
        page_size=args.page_size, page_token=page_token, include_revoked=args.include_revoked
    )


# --- formatting --------------------------------------------------------------------------------


def role_name(value: int) -> str:
    """A KeyRole without its KEY_ROLE_ prefix."""
    return enum_name(key_service_pb2.KeyRole, value, "KEY_ROLE_")


def key_state(key: key_service_pb2.ApiKey, now: datetime) -> str:
    """revoked, expired or active."""
    if key.HasField("revoked_at"):
        return "revoked"
    if key.HasField("expires_at") and key.expires_at.ToDatetime(tzinfo=UTC) <= now:
        return "expired"
    return "active"


def _key_fields(key: key_service_pb2.ApiKey, now: datetime) -> list[tuple[str, str]]:
    pairs = [
        ("key_id", key.key_id),
        ("role", role_name(key.role)),
        ("state", key_state(key, now)),
        ("tenant_id", key.tenant_id),
        ("project_id", key.project_id or "any"),
        ("workspace_id", key.workspace_id or "any"),
        ("created_at", iso_time(key, "created_at")),
        ("created_by", key.created_by or "no key (the API host, or auth off)"),
        ("expires_at", iso_time(key, "expires_at") if key.HasField("expires_at") else "never"),
    ]
    if key.HasField("revoked_at"):
        pairs.append(("revoked_at", iso_time(key, "revoked_at")))
    pairs.append(("description", key.description))
    return pairs


def format_key(key: key_service_pb2.ApiKey, now: datetime) -> str:
    """A key as aligned key/value lines."""
    return format_fields(_key_fields(key, now))


def format_created(response: key_service_pb2.CreateKeyResponse, now: datetime) -> str:
    """A created key as aligned key/value lines, its secret on the last line."""
    return format_fields([*_key_fields(response.key, now), ("secret", response.secret)])


def format_keys_table(keys: Sequence[key_service_pb2.ApiKey], now: datetime) -> str:
    """Keys as a table, one line each."""
    if not keys:
        return "no keys"
    return format_table(
        ("KEY_ID", "ROLE", "STATE", "TENANT", "PROJECT", "WORKSPACE", "CREATED_AT", "EXPIRES_AT", "DESCRIPTION"),
        (
            (
                k.key_id,
                role_name(k.role),
                key_state(k, now),
                cell(k.tenant_id),
                cell(k.project_id or "any"),
                cell(k.workspace_id or "any"),
                iso_time(k, "created_at"),
                iso_time(k, "expires_at") if k.HasField("expires_at") else "never",
                cell(k.description),
            )
            for k in keys
        ),
    )


def created_json(response: key_service_pb2.CreateKeyResponse) -> dict[str, Any]:
    """The JSON document of `keys create --json`."""
    return {"key": to_dict(response.key), "secret": response.secret}


def list_json(keys: Sequence[key_service_pb2.ApiKey], next_page_token: str) -> dict[str, Any]:
    """The JSON document of `keys list --json`."""
    return {"keys": [to_dict(k) for k in keys], "next_page_token": next_page_token}


# --- commands ----------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def cmd_create(api: Api, args: argparse.Namespace) -> int:
    """`runs keys create`: create a key; print it with its secret, and a note that it is shown once."""
    response = api.keys.CreateKey(create_request(args), timeout=UNARY_DEADLINE_SECONDS)
    out(dumps(created_json(response)) if args.json else format_created(response, _now()))
    err(SECRET_NOTE)
    return EXIT_OK


def cmd_list(api: Api, args: argparse.Namespace) -> int:
    """`runs keys list`: one page of keys, or every page with --all."""

    def fetch(token: str) -> tuple[Sequence[key_service_pb2.ApiKey], str]:
        response = api.keys.ListKeys(list_request(args, token), timeout=UNARY_DEADLINE_SECONDS)
        return response.keys, response.next_page_token

    keys, token = collect_pages(fetch, args.page_token, args.all)
    print_page(args, list_json(keys, token), format_keys_table(keys, _now()), "runs keys list")
    return EXIT_OK


def cmd_revoke(api: Api, args: argparse.Namespace) -> int:
    """`runs keys revoke KEY_ID`: revoke the key and print it."""
    response = api.keys.RevokeKey(key_service_pb2.RevokeKeyRequest(key_id=args.key_id), timeout=UNARY_DEADLINE_SECONDS)
    out(dumps(to_dict(response.key)) if args.json else format_key(response.key, _now()))
    return EXIT_OK


COMMANDS: dict[str, Callable[[Api, argparse.Namespace], int]] = {
    "create": cmd_create,
    "list": cmd_list,
    "revoke": cmd_revoke,
}


def cmd_keys(api: Api, args: argparse.Namespace) -> int:
    """`runs keys COMMAND` on a KeyService api.keys."""
    return COMMANDS[args.keys_command](api, args)

