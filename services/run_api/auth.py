"""API keys and the caller: who is calling, checked once per call.

A key is `runs_<random>`, stored only as its sha256. It has a role (client, worker, admin), a
tenant, optional project and workspace limits and an optional expiry. The error interceptor runs
every /runs.v1. call inside `Authenticator.calling`, which reads the `authorization: Bearer <key>`
metadata, finds the key (cached for a few seconds, so a revocation takes effect within the cache
time), checks the role against the service, and puts the Caller in a contextvar for the
servicers, which hand it to the handlers. Health and reflection stay open. With auth off every
call is the anonymous caller of tenant "default", with every role.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine
from ulid import ULID

from services.run_api.checks import check_identifier, check_text, page_bounds
from services.run_api.errors import (
    InvalidRequest,
    PermissionDenied,
    RunNotFound,
    RunsError,
    Unauthenticated,
    shorten,
)
from services.run_api.store import queries as Q
from services.run_api.store.registry import BUILTIN_TENANT
from services.run_api.store.uow import UnitOfWork

log = logging.getLogger(__name__)

ROLES = ("client", "worker", "admin")
DEFAULT_TENANT = "default"
BOOTSTRAP_KEY_ID = "bootstrap-admin"
EMBEDDED_KEY_ID = "embedded-worker"
KEY_PREFIX = "runs_"
MAX_KEY_LENGTH = 200

# Which roles may call each service; anything else under /runs.v1. is refused.
SERVICE_ROLES: dict[str, frozenset[str]] = {
    "runs.v1.RunService": frozenset({"client", "admin"}),
    "runs.v1.WorkflowService": frozenset({"client", "admin"}),
    "runs.v1.WorkerService": frozenset({"worker"}),
    "runs.v1.OpsService": frozenset({"admin"}),
    "runs.v1.KeyService": frozenset({"admin"}),
}


@dataclass(frozen=True)
class Caller:
    """Who is calling: the key's id, role, tenant and limits (None: no limit)."""

    key_id: str | None
    role: str
    tenant_id: str = DEFAULT_TENANT
    project_id: str | None = None
    workspace_id: str | None = None
    expires_at: datetime | None = None

    @classmethod
    def anonymous(cls) -> Caller:
        """The caller when auth is off: tenant default, every role, no key."""
        return cls(key_id=None, role="anonymous")

    def may_call(self, service: str) -> bool:
        """Whether this caller's role may call `service`."""
        return self.role == "anonymous" or self.role in SERVICE_ROLES.get(service, frozenset())

    def sees(self, row: Any) -> bool:
        """Whether a run row is visible to this caller (its tenant, within the key's limits)."""
        return (
            row.tenant_id == self.tenant_id
            and (self.project_id is None or row.project_id == self.project_id)
            and (self.workspace_id is None or row.workspace_id == self.workspace_id)
        )

    def check_visible(self, row: Any, run_id: str) -> Any:
        """The row, or RunNotFound when it is missing or another tenant's (never say which)."""
        if row is None or not self.sees(row):
            raise RunNotFound(run_id)
        return row

    def worker_id(self, instance: str) -> str:
        """The worker id recorded for a worker process: the key id and the instance name it sent."""
        return f"{self.key_id}/{instance}" if self.key_id else instance

    def scoped(self, field: str, requested: str) -> str:
        """The project or workspace a request may use: the key's limit, which a request may only repeat."""
        limit = getattr(self, field)
        if limit is not None and requested and requested != limit:
            raise PermissionDenied(f"this key is limited to {field} {shorten(limit)!r}")
        return requested or limit or DEFAULT_TENANT


_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("runs_caller", default=None)


@contextlib.contextmanager
def acting_as(caller: Caller) -> Iterator[Caller]:
    """The scope in which `caller` is the current caller (the HTTP gateway's streams enter it in their own task)."""
    token = _CALLER.set(caller)
    try:
        yield caller
    finally:
        # A stream abandoned by its client is closed later by the event loop, in another
        # context; there is nothing to restore then (as in shared.logs.log_context).
        with contextlib.suppress(ValueError):
            _CALLER.reset(token)


def current_caller() -> Caller:
    """The caller of the RPC being served (set by the interceptor)."""
    caller = _CALLER.get()
    if caller is None:
        raise RuntimeError("no caller: the auth interceptor did not run")
    return caller


def hash_secret(secret: str) -> str:
    """What is stored of a key: its sha256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """A fresh key secret (256 bits of randomness)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def is_loopback(addr: str) -> bool:
    """Whether a listen address (host:port) accepts only local connections."""
    host = addr.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_mode(auth: str, addr: str, http_addr: str = "") -> str:
    """The auth mode the server runs with: 'required' or 'off' (unset: off when both the gRPC address and
    the HTTP one, if any, are loopback; else refuse)."""
    if auth:
        return auth
    if is_loopback(addr) and (not http_addr or is_loopback(http_addr)):
        return "off"
    where = addr if not is_loopback(addr) else f"{http_addr} (RUN_API_HTTP_ADDR)"
    raise AuthConfigError(
        f"the API would listen on {where} with auth off: set RUNS_AUTH=required (and create keys), "
        "or RUNS_AUTH=off to accept unauthenticated calls from the network"
    )


class AuthConfigError(ValueError):
    """The server's auth settings are unsafe; it refuses to start."""


# --- key records -------------------------------------------------------------------------------


def _caller_of(row: Any) -> Caller:
    return Caller(
        key_id=row.key_id, role=row.role, tenant_id=row.tenant_id, project_id=row.project_id,
        workspace_id=row.workspace_id, expires_at=row.expires_at,
    )


class KeyCache:
    """Keys by secret hash, each remembered for `ttl` seconds, at most `size` of them. Unknown secrets
    are remembered too, apart: a flood of bad keys costs few queries and never pushes out good ones."""

    def __init__(self, ttl: float = 5.0, size: int = 10_000) -> None:
        self.ttl, self.size = ttl, size
        self._known: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._unknown: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> tuple[bool, Any]:
        """(found, row-or-None)."""
        item = self._known.get(key) or self._unknown.get(key)
        if item is None or item[0] < time.monotonic():
            return False, None
        return True, item[1]

    def put(self, key: str, row: Any) -> None:
        """Remember a lookup's answer."""
        items = self._known if row is not None else self._unknown
        items[key] = (time.monotonic() + self.ttl, row)
        items.move_to_end(key)
        while len(items) > self.size:
            items.popitem(last=False)


class Authenticator:
    """Finds the caller of a call from its metadata."""

    def __init__(
        self, engine: AsyncEngine, mode: str, cache: KeyCache | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine, self.mode, self.clock = engine, mode, clock
        self.cache = cache or KeyCache()
        # The embedded worker's own key: never stored, valid only inside this process's lifetime.
        self.embedded_secret = new_secret()

    @contextlib.asynccontextmanager
    async def calling(self, method: str, metadata: Any) -> AsyncIterator[Caller]:
        """The scope of one call: its caller is found (or refused) and set for the servicer inside."""
        caller = await self.caller(method, metadata, self.clock())
        with acting_as(caller):
            yield caller

    async def caller(self, method: str, metadata: Any, now: datetime) -> Caller:
        """The Caller for a call to `method` (/package.Service/Method), or Unauthenticated/PermissionDenied."""
        service = method.split("/")[1] if method.count("/") >= 2 else ""
        caller = Caller.anonymous() if self.mode == "off" else await self._from_key(_bearer(metadata), now)
        if not caller.may_call(service):
            raise PermissionDenied(f"a {caller.role} key may not call {service}")
        return caller

    async def _from_key(self, secret: str | None, now: datetime) -> Caller:
        if not secret:
            raise Unauthenticated("this API needs a key: send 'authorization: Bearer <key>'")
        if len(secret) > MAX_KEY_LENGTH:
            raise Unauthenticated("the API key is not valid")
        if not secret.isascii() or not secret.isprintable():
            raise Unauthenticated("the API key is not valid")
        if hmac.compare_digest(secret.encode(), self.embedded_secret.encode()):
            return Caller(key_id=EMBEDDED_KEY_ID, role="worker")
        digest = hash_secret(secret)
        found, row = self.cache.get(digest)
        if not found:
            async with UnitOfWork(self.engine) as uow:
                row = (await uow.conn.execute(Q.api_keys_by_hash, {"secret_hash": digest})).first()
            self.cache.put(digest, row)
        if row is None:
            raise Unauthenticated("the API key is not valid")
        if row.revoked_at is not None:
            raise Unauthenticated("the API key was revoked")
        if row.expires_at is not None and row.expires_at <= now:
            raise Unauthenticated("the API key has expired")
        return _caller_of(row)


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


# --- key handlers ------------------------------------------------------------------------------

MAX_KEY_TTL_SECONDS = 10 * 365 * 86400


@dataclass(frozen=True)
class CreateKey:
    """Make a key of `role` for a tenant, optionally limited to a project and a workspace."""

    role: str
    tenant_id: str = ""
    project_id: str = ""
    workspace_id: str = ""
    ttl_seconds: int = 0
    description: str = ""


def _check_manager(caller: Caller) -> None:
    """Key management is for admin keys of a whole tenant: a project- or workspace-limited one could
    otherwise make itself a key without its limits."""
    if caller.project_id is not None or caller.workspace_id is not None:
        raise PermissionDenied("an admin key limited to a project or workspace cannot manage keys")


def _tenant_scope(caller: Caller) -> str | None:
    """The tenant whose keys a caller manages: its own; every tenant for the anonymous caller (auth off)."""
    return caller.tenant_id if caller.key_id is not None else None


async def create_key(uow: UnitOfWork, cmd: CreateKey, caller: Caller, now: datetime) -> tuple[Any, str]:
    """Store a new key; returns (its row, its secret). The secret is not stored and cannot be shown again.

    An admin key makes keys of its own tenant; a first key of another tenant is made on the API host
    (`python -m services.run_api keys create`).
    """
    violations: list[tuple[str, str]] = []
    if cmd.role not in ROLES:
        violations.append(("role", f"role must be one of {', '.join(ROLES)}"))
    if not 0 <= cmd.ttl_seconds <= MAX_KEY_TTL_SECONDS:
        violations.append(("ttl_seconds", f"ttl_seconds must be between 0 (never expires) and {MAX_KEY_TTL_SECONDS}"))
    if violations:
        raise InvalidRequest(violations)
    for name in ("tenant_id", "project_id", "workspace_id"):
        if getattr(cmd, name):
            check_identifier(name, getattr(cmd, name))
    if cmd.tenant_id == BUILTIN_TENANT:
        raise InvalidRequest.field("tenant_id", f"{BUILTIN_TENANT!r} is reserved (the built-in workflows' owner)")
    check_text("description", cmd.description, limit=500)
    scope = _tenant_scope(caller)
    tenant = cmd.tenant_id or caller.tenant_id
    if scope is not None and tenant != scope:
        raise PermissionDenied("an admin key makes keys of its own tenant only")
    _check_manager(caller)
    expires_at = now + timedelta(seconds=cmd.ttl_seconds) if cmd.ttl_seconds else None
    if caller.expires_at is not None and (expires_at is None or expires_at > caller.expires_at):
        raise PermissionDenied("a key cannot outlive the admin key that makes it: set ttl_seconds")
    secret = new_secret()
    row = (
        await uow.conn.execute(
            Q.api_keys_insert,
            {
                "key_id": str(ULID()),
                "secret_hash": hash_secret(secret),
                "role": cmd.role,
                "tenant_id": tenant,
                "project_id": cmd.project_id or None,
                "workspace_id": cmd.workspace_id or None,
                "description": cmd.description,
                "created_by": caller.key_id,
                "expires_at": expires_at,
            },
        )
    ).one()
    await uow.commit()
    log.info("API key created", extra={"key_id": row.key_id, "role": row.role, "tenant_id": row.tenant_id})
    return row, secret


async def list_keys(
    uow: UnitOfWork, caller: Caller, page_size: int, page_token: str, include_revoked: bool
) -> tuple[list[Any], str]:
    """A page of the caller's tenant's keys, newest first, and the next page's token."""
    _check_manager(caller)
    size = page_bounds(page_size)
    if len(page_token) > 64 or not page_token.isprintable():
        raise InvalidRequest.field("page_token", "page_token is not a valid page token")
    rows = (
        await uow.conn.execute(
            Q.api_keys_list,
            {"tenant_id": _tenant_scope(caller), "after_key_id": page_token or None,
             "include_revoked": include_revoked, "limit": size + 1},
        )
    ).all()
    return list(rows[:size]), rows[size - 1].key_id if len(rows) > size else ""


async def revoke_key(uow: UnitOfWork, key_id: str, caller: Caller, now: datetime) -> Any:
    """Revoke a key at once (within the cache time on other replicas)."""
    _check_manager(caller)
    check_identifier("key_id", key_id, required=True)
    params = {"key_id": key_id, "tenant_id": _tenant_scope(caller), "now": now}
    row = (await uow.conn.execute(Q.api_keys_revoke, params)).first()
    if row is None:
        raise KeyNotFound(key_id)
    await uow.commit()
    log.info("API key revoked", extra={"key_id": key_id})
    return row


async def ensure_bootstrap_key(engine: AsyncEngine, secret: str) -> None:
    """Create (or re-key) the bootstrap admin key from RUNS_BOOTSTRAP_ADMIN_KEY."""
    async with UnitOfWork(engine) as uow:
        await uow.conn.execute(
            Q.api_keys_bootstrap,
            {"key_id": BOOTSTRAP_KEY_ID, "secret_hash": hash_secret(secret), "tenant_id": DEFAULT_TENANT},
        )
        await uow.commit()


class KeyNotFound(RunsError):
    """No key has that id."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, key_id: str) -> None:
        super().__init__("key not found")
