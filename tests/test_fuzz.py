"""Property-based fuzzing of every RPC against a real API process with a real worker (hypothesis).

Every RPC of runs.v1 (RunService, WorkerService, OpsService, KeyService, WorkflowService) is driven with generated
messages that mix plausible values (real run ids in every state, known workflows, tools and event
types, small attempts) with hostile ones (huge and negative numbers, out-of-range timestamps, NUL,
non-BMP and 10 KB strings, Structs nested 20 to 60 levels, NaN and infinities, big lists), and
with raw bytes (random, truncated, invalid UTF-8 in any string field, nesting past the decoder's
limit, corrupt wire format). Every answer must carry a documented status code (never INTERNAL or
UNKNOWN), status details of at most 2 KB (the google.rpc.Status beside them at most 3000 bytes)
without internals, and a body a standard client decodes.
Afterwards the API still serves, logged no traceback, and every run it accepted reaches a
terminal state while the worker keeps running.

WorkflowService gets specs that are mostly valid (random step counts and keys, DAGs, chains, rings
and dense graphs, depends_on with cycles and unknown keys, selectors valid, nonsense, nested
thousands deep, 100 KB long or in any script, args with odd JSON values, retry/timeout/cache edges,
change_requests): each answer is OK or INVALID_ARGUMENT whose violations all name `spec…`, and an
accepted spec registered again, as sent or as the registry returned it, gets the same version
and hash.

FUZZ_EXAMPLES sets the examples per RPC group: 40 inside `make test`, 2000 with `make fuzz`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import json_format, message_factory, struct_pb2, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from psycopg import sql as pgsql
from ulid import ULID

from features.harness import Api, Client, Worker, wait_until
from services.run_api import db
from shared.gen.runs.v1 import (
    key_service_pb2,
    ops_service_pb2,
    run_service_pb2,
    worker_service_pb2,
    workflow_service_pb2,
)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],  # no slow "explain"
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)

C = grpc.StatusCode
# What the API documents (README "The contract", the error conventions and the auth issue).
DOCUMENTED = frozenset(
    {
        C.OK,
        C.INVALID_ARGUMENT,
        C.NOT_FOUND,
        C.FAILED_PRECONDITION,
        C.ALREADY_EXISTS,
        C.RESOURCE_EXHAUSTED,
        C.PERMISSION_DENIED,
        C.UNAUTHENTICATED,
        C.OUT_OF_RANGE,
    }
)
STREAMING = DOCUMENTED | {C.DEADLINE_EXCEEDED}  # only where the suite sets a short deadline on purpose
# The registry's documented outcomes (README "Workflows"): a spec is stored or refused field by field.
REGISTRY = {
    "RegisterWorkflow": frozenset({C.OK, C.INVALID_ARGUMENT}),
    "ListWorkflows": frozenset({C.OK, C.INVALID_ARGUMENT}),
    "GetWorkflow": frozenset({C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND}),
}
MAX_DETAILS = 2048
# The serialized google.rpc.Status in grpc-status-details-bin: the error interceptor budgets it at
# 3000 bytes (services/run_api/interceptors.py MAX_DETAILS_BYTES), field violations past it left out.
MAX_RICH_DETAILS = 3000
LEAKS = ("Traceback", 'File "', "DecodeError", "sqlalchemy", "psycopg", "asyncpg", "Exception", "SELECT ", "INSERT ")

LEASE_SECONDS = 2
DEFAULT_MAX_ATTEMPTS = 3
BACKOFF, BACKOFF_MAX = 0.05, 0.2
REAL_WORKER = "fuzz-real-worker"
PARKED = "fuzz-parked"  # a workspace no worker claims from: its runs stay queued
API_ENV = {
    "RUNS_AUTH": "off",
    "RUN_LEASE_SECONDS": str(LEASE_SECONDS),
    "RUN_HEARTBEAT_SECONDS": "0.5",
    "RUN_REAPER_INTERVAL_SECONDS": "0.2",
    "RUN_WORKER_POLL_MS": "200",
    "RUN_DEFAULT_MAX_ATTEMPTS": str(DEFAULT_MAX_ATTEMPTS),
    "RUN_RETRY_BACKOFF_SECONDS": str(BACKOFF),
    "RUN_RETRY_BACKOFF_MAX_SECONDS": str(BACKOFF_MAX),
    "RUN_API_SHUTDOWN_GRACE_SECONDS": "2",
}
WORKER_ENV = {
    "RUN_LEASE_SECONDS": str(LEASE_SECONDS),
    "RUN_HEARTBEAT_SECONDS": "0.5",
    "RUN_WORKER_ID": REAL_WORKER,
    "RUN_WORKER_TOOLS": "noop,sleep,fail",  # never shell: hostile inputs must not run commands
    "RUN_WORKER_CONCURRENCY": "32",
    "RUN_WORKER_POLL_MS": "200",
    "RUN_WORKER_DRAIN_SECONDS": "1",
    **dict.fromkeys(("RUNS_API_KEY", "RUNS_TLS_CA", "RUNS_TLS_CERT", "RUNS_TLS_KEY"), ""),  # plaintext, no key
}
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED"})


# --- the RPCs ------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Rpc:
    """One method: its path, message classes, and the codes it may answer."""

    path: str
    request: type[Message]
    response: type[Message]
    stream: bool
    allowed: frozenset[grpc.StatusCode]

    def __repr__(self) -> str:
        return f"Rpc({self.path})"


def _rpcs() -> dict[str, Rpc]:
    out: dict[str, Rpc] = {}
    for module, service in (
        (run_service_pb2, "RunService"),
        (worker_service_pb2, "WorkerService"),
        (ops_service_pb2, "OpsService"),
        (key_service_pb2, "KeyService"),
        (workflow_service_pb2, "WorkflowService"),
    ):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        for method in descriptor.methods:
            stream = method.server_streaming
            allowed = STREAMING if stream else DOCUMENTED  # KeyService too: auth off means every role
            allowed = REGISTRY.get(method.name, allowed)
            out[method.name] = Rpc(
                path=f"/{descriptor.full_name}/{method.name}",
                request=message_factory.GetMessageClass(method.input_type),
                response=message_factory.GetMessageClass(method.output_type),
                stream=stream,
                allowed=allowed,
            )
    return out


RPCS = _rpcs()
BOGUS = ("/runs.v1.RunService/NoSuchMethod", "/runs.v1.NoSuchService/StartRun")


# --- the processes -------------------------------------------------------------------------------


@dataclass
class Answer:
    """What one call came back with."""

    code: grpc.StatusCode
    details: str
    trailing: dict[str, Any]
    bodies: list[bytes]


class Stack:
    """The API, the worker, a raw channel, and what the suite learned while fuzzing."""

    def __init__(
        self, api: Api, worker: Worker, database_url: str, channel: grpc.Channel, client: Client, seeds: dict[str, str]
    ) -> None:
        self.api, self.worker, self.database_url = api, worker, database_url
        self.channel, self.client, self.seeds = channel, client, seeds
        self.accepted: dict[str, bool] = {}  # run id -> whether it finishes without a cancel
        self.tokens: dict[str, str] = {}  # worker id -> session token
        self.workflows: dict[tuple[str, int], str] = {}  # (name, version) -> spec hash, as registered

    def __repr__(self) -> str:
        return f"Stack(api={self.api.addr}, accepted runs={len(self.accepted)})"

    def invoke(self, path: str, payload: bytes, stream: bool, timeout: float) -> Answer:
        """Send `payload` as is and collect the raw answer."""
        bodies: list[bytes] = []
        try:
            if stream:
                call = self.channel.unary_stream(path, request_serializer=None, response_deserializer=None)(
                    payload, timeout=timeout
                )
                for body in call:
                    bodies.append(body)
                return Answer(call.code(), call.details() or "", dict(call.trailing_metadata() or ()), bodies)
            body, call = self.channel.unary_unary(
                path, request_serializer=None, response_deserializer=None
            ).with_call(payload, timeout=timeout)
            return Answer(call.code(), call.details() or "", dict(call.trailing_metadata() or ()), [body])
        except grpc.RpcError as err:
            return Answer(err.code(), err.details() or "", dict(err.trailing_metadata() or ()), bodies)

    def statuses(self, run_ids: list[str]) -> dict[str, str]:
        """Run statuses straight from the database (a run a client cannot decode still counts)."""
        with psycopg.connect(db.libpq_url(self.database_url), autocommit=True) as conn:
            rows = conn.execute("SELECT run_id, status FROM runs WHERE run_id = ANY(%s)", (run_ids,)).fetchall()
        return {run_id: status for run_id, status in rows}

    def live_run(self) -> str:
        """A fresh sleep run the real worker is executing now."""
        run_id = self.client.start_tool("sleep", {"seconds": 1.0}).run_id
        self.accepted[run_id] = True
        wait_until(
            lambda: self.statuses([run_id]).get(run_id) != "QUEUED", 10, f"the worker to claim fresh run {run_id}"
        )
        return run_id

    def parked_run(self) -> str:
        """A fresh run that stays queued (no worker claims its workspace)."""
        run_id = self.client.start("runtime.noop", workspace_id=PARKED).run.run_id
        self.accepted[run_id] = False
        return run_id

    def own_run(self, owner: str) -> str:
        """A fresh run that `owner` claims (heartbeat, then claim; its session token is kept)."""
        workspace = f"fuzz-own-{str(ULID()).lower()}"
        run_id = self.client.start("runtime.noop", workspace_id=workspace).run.run_id
        self.accepted[run_id] = False  # nobody runs it: canceled at the end
        for _ in range(2):
            token = self.tokens.get(owner, "")
            beat = worker_service_pb2.HeartbeatRequest(worker_id=owner, session_token=token)
            self.invoke(RPCS["Heartbeat"].path, beat.SerializeToString(), False, 5)
            claim = worker_service_pb2.ClaimQueuedRunsRequest(
                worker_id=owner, workspace_id=workspace, capacity=1000, batch_limit=1, once=True, session_token=token
            )
            answer = self.invoke(RPCS["ClaimQueuedRuns"].path, claim.SerializeToString(), True, 5)
            claimed = False
            for body in answer.bodies:
                with contextlib.suppress(DecodeError):
                    response = worker_service_pb2.ClaimQueuedRunsResponse.FromString(body)
                    if response.session_token:
                        self.tokens[owner] = response.session_token
                    claimed = claimed or any(r.run_id == run_id for r in response.runs)
            if claimed:
                break
        return run_id

    def ref(self, ref: str, owner: str) -> str:
        """The run id a reference in a generated message stands for."""
        if ref == "@run:own":
            return self.own_run(owner)
        if ref == "@run:live":
            return self.live_run()
        if ref == "@run:queued":
            return self.parked_run()
        if ref == "@run:unknown":
            return str(ULID())
        return self.seeds[ref]


@pytest.fixture(scope="module")
def stack(pg_server: str, template_db: str, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A fresh database, the API (auth off, 2 s leases) and one long-running worker, for the module."""
    name = f"runs_fuzz_{str(ULID()).lower()}"
    with psycopg.connect(db.admin_url(pg_server), autocommit=True) as conn:
        conn.execute(
            pgsql.SQL("CREATE DATABASE {} TEMPLATE {}").format(pgsql.Identifier(name), pgsql.Identifier(template_db))
        )
    url = db.with_database(pg_server, name)
    failed_before = request.session.testsfailed
    api = Api(url, **API_ENV)
    worker = Worker(api.addr, **WORKER_ENV)
    channel = client = None
    try:
        api.start()
        worker.start()
        client = Client(api.addr)
        channel = grpc.insecure_channel(
            api.addr,
            options=[
                # See what the server really sends, not what a default client would cut off.
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.max_metadata_size", 4 * 1024 * 1024),
                ("grpc.absolute_max_metadata_size", 4 * 1024 * 1024),
            ],
        )
        seeds = _seed_runs(client)
        s = Stack(api, worker, url, channel, client, seeds)
        s.accepted.update(dict.fromkeys(seeds.values(), True))
        yield s
    finally:
        if channel is not None:
            channel.close()
        if client is not None:
            client.close()
        worker.stop()
        api.stop()
        if request.session.testsfailed == failed_before:
            api.log_path.unlink(missing_ok=True)
            worker.log_path.unlink(missing_ok=True)
        else:
            print(f"\nfuzz logs: API {api.log_path}, worker {worker.log_path}")
        with contextlib.suppress(psycopg.Error), psycopg.connect(db.admin_url(pg_server), autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))


def _seed_runs(client: Client) -> dict[str, str]:
    """Runs in each finished state, for the generated messages to point at."""
    ok = client.start("runtime.noop").run.run_id
    failed = client.start_tool("fail", {"retryable": False}).run_id
    canceled = client.start("runtime.noop", workspace_id=PARKED).run.run_id
    client.cancel(canceled)
    client.wait_status(ok, {"SUCCEEDED"}, 30)
    client.wait_status(failed, {"FAILED"}, 30)
    client.wait_status(canceled, {"CANCELED"}, 30)
    return {"@run:ok": ok, "@run:failed": failed, "@run:canceled": canceled}


# --- calling and checking ------------------------------------------------------------------------


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


_CHAR_RUNS = re.compile(r"(.)\1{15,}", re.S)
_TOKEN_RUNS = re.compile(r"((?:[^ ]+ ){1,16}?)\1{3,}")


def fold(text: str) -> str:
    """Text with its repetitions folded: «a»x2000, «value { list_value { values »x49."""
    text = _CHAR_RUNS.sub(lambda m: f"«{m.group(1)}»x{len(m.group(0))}", text)
    return _TOKEN_RUNS.sub(lambda m: f"«{m.group(1)}»x{len(m.group(0)) // len(m.group(1))} ", text)


class Req:
    """A generated request that prints on one short line in hypothesis' reports."""

    def __init__(self, message: Message) -> None:
        self.message = message

    def __repr__(self) -> str:
        text = fold(text_format.MessageToString(self.message, as_one_line=True, as_utf8=True))
        return f"{type(self.message).__name__}({_short(text, 1500)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' reports use this
        printer.text(repr(self))


def resolve(stack: Stack, message: Message, memo: dict[str, str] | None = None, owner: str = "") -> Message:
    """Replace references (@run:…, @session) in a generated message by real values, in place.

    Fields resolve in field-number order, so a worker's @run:own (claimed under its worker_id) comes
    before its @session (the token that claim handed out).
    """
    memo = {} if memo is None else memo
    owner = getattr(message, "worker_id", owner)
    for fd, value in message.ListFields():
        if fd.type == FieldDescriptor.TYPE_STRING and not fd.is_repeated:
            if value == "@session":
                setattr(message, fd.name, stack.tokens.get(owner, ""))
            elif value.startswith("@run:"):
                if value not in memo:
                    memo[value] = stack.ref(value, owner)
                setattr(message, fd.name, memo[value])
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and not fd.message_type.full_name.startswith("google.protobuf."):
            if fd.message_type.GetOptions().map_entry:
                continue
            for sub in value if fd.is_repeated else [value]:
                resolve(stack, sub, memo, owner)
    return message


def check(
    stack: Stack, rpc: Rpc | None, path: str, answer: Answer, allowed: frozenset[grpc.StatusCode], sent: bytes = b""
) -> None:
    """The answer is documented, short, leaks nothing (beyond what `sent` held), and decodes."""
    where = f"{path} answered {answer.code.name}: {_short(fold(answer.details))!r}"
    if answer.code in (C.UNAVAILABLE, C.CANCELLED) or not stack.api.running:
        assert stack.api.running, f"the API process died: {where}\n{stack.api.output()[-4000:]}"
    assert answer.code is not C.UNKNOWN, f"UNKNOWN is never a valid answer: {where}"
    assert answer.code is not C.INTERNAL, f"INTERNAL is never a valid answer: {where}"
    assert answer.code in allowed, f"undocumented status code: {where}"
    size = len(answer.details.encode())
    assert size <= MAX_DETAILS, f"status details are {size} bytes (at most {MAX_DETAILS}): {where}"
    rich = answer.trailing.get("grpc-status-details-bin", b"")
    assert len(rich) <= MAX_RICH_DETAILS, f"grpc-status-details-bin is {len(rich)} bytes: {where}"
    if rich:
        status = status_pb2.Status.FromString(rich)
        assert status.code == answer.code.value[0], f"rich status code {status.code} differs: {where}"
    # A marker the request itself carried (a run id "sqlalchemy", say) is the client's own value echoed.
    leaked = [marker for marker in LEAKS if marker in answer.details and marker.encode() not in sent]
    assert not leaked, f"status details show internals {leaked}: {where}"
    if rpc is not None:
        undecodable = []
        for body in answer.bodies:
            try:
                rpc.response.FromString(body)
            except DecodeError as err:
                undecodable.append(str(err))
        assert not undecodable, f"a standard client cannot decode the response ({undecodable[0]}): {where}"


def finishes_alone(request: run_service_pb2.StartRunRequest) -> bool:
    """Whether an accepted StartRun must end by itself within seconds (else the suite cancels it)."""
    if request.workspace_id not in ("", "default"):
        return False
    attempts = request.max_attempts or DEFAULT_MAX_ATTEMPTS
    base = request.retry_backoff_seconds or BACKOFF
    cap = request.retry_backoff_max_seconds or BACKOFF_MAX
    waits = sum(min(cap, base * 2.0 ** min(k, 60)) for k in range(attempts - 1))
    if attempts > 10 or not waits <= 3:
        return False
    try:
        run_input = json_format.MessageToDict(request.input)
        if (request.workflow == "runtime.tool") and run_input.get("tool") == "sleep":
            seconds = run_input.get("args", {}).get("seconds", 1.0)
            return isinstance(seconds, int | float) and seconds <= 2
    except Exception:
        return False
    return True


def call(stack: Stack, name: str, request: Message, timeout: float = 10.0) -> Answer:
    """Resolve, send and check one generated request; remember accepted runs and session tokens."""
    rpc = RPCS[name]
    resolve(stack, request)
    sent = request.SerializeToString()
    answer = stack.invoke(rpc.path, sent, rpc.stream, timeout)
    learn(stack, name, request, answer)
    check(stack, rpc, rpc.path, answer, rpc.allowed, sent)
    return answer


def learn(stack: Stack, name: str, request: Message, answer: Answer) -> None:
    """Side effects the final checks need: the runs StartRun accepted, the session tokens handed out."""
    if name == "StartRun" and answer.code is C.OK:
        with contextlib.suppress(DecodeError):
            run_id = run_service_pb2.StartRunResponse.FromString(answer.bodies[0]).run.run_id
            assert isinstance(request, run_service_pb2.StartRunRequest)
            stack.accepted.setdefault(run_id, finishes_alone(request))
    if name == "ClaimQueuedRuns" and answer.bodies:
        with contextlib.suppress(DecodeError):
            first = worker_service_pb2.ClaimQueuedRunsResponse.FromString(answer.bodies[0])
            if first.session_token:
                stack.tokens[getattr(request, "worker_id", "")] = first.session_token


# --- strategies: scalars -------------------------------------------------------------------------

NASTY = ["\x00", "\U0001f600", "\U0010ffff", "\u202e", "\ufeff", "\ud7ff", "'", '"', "\\", "%s", "${x}", "\n", "é"]
hostile_texts = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(NASTY) | st.characters(codec="utf-8"), min_size=1, max_size=20).map("".join),
    st.builds(lambda a, b: f"{a}\x00{b}", st.text(max_size=8), st.text(max_size=8)),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\U0001f600", "€", "\x00"]), st.integers(256, 10_000)),
)


def mostly(plausible: st.SearchStrategy[Any], *hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Plausible values about half the time (and first, so examples shrink towards them), else hostile ones."""
    return st.one_of(plausible, plausible.map(lambda value: value), *hostile)


def texts(*plausible: str) -> st.SearchStrategy[str]:
    """One of `plausible`, or a hostile string."""
    return mostly(st.sampled_from(plausible), hostile_texts) if plausible else hostile_texts


def int32s(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Small plausible ints, edges, or anything an int32 holds."""
    return mostly(
        st.integers(lo, hi), st.sampled_from([-1, 2**31 - 1, -(2**31), 1000]), st.integers(-(2**31), 2**31 - 1)
    )


def int64s(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Small plausible ints, edges, or anything an int64 holds."""
    return mostly(
        st.integers(lo, hi),
        st.sampled_from([-1, 2**62, -(2**62), 2**63 - 1, -(2**63), 2**31, 2**53 + 1]),
        st.integers(-(2**63), 2**63 - 1),
    )


def doubles(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Plausible small numbers, edges (NaN, infinities, -0, huge, tiny), or any double."""
    return st.one_of(
        st.just(0.0),
        st.floats(lo, hi),
        st.sampled_from([math.nan, math.inf, -math.inf, -0.0, -1.0, 1e308, 5e-324, 86400.0, 86400.5, 2.0**63]),
        st.floats(allow_nan=True, allow_infinity=True),
    )


NOW = 1_750_000_000
timestamps = st.one_of(
    st.none(),
    st.tuples(st.integers(NOW - 86400, NOW + 86400), st.integers(0, 999_999_999)),
    st.tuples(
        st.one_of(
            st.sampled_from(
                [0, -62135596800, 253402300799, -62135596801, 253402300800, 2**62, -(2**62), 2**63 - 1, -(2**63)]
            ),
            st.integers(-(2**63), 2**63 - 1),
        ),
        st.one_of(st.integers(0, 999_999_999), st.sampled_from([-1, 10**9, -(2**31), 2**31 - 1])),
    ),
)


# --- strategies: JSON-like values for Structs ----------------------------------------------------

keys = texts("a", "tool", "args", "seconds", "step_key", "")
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53).map(float),
    st.floats(allow_nan=True, allow_infinity=True),
    texts("x", ""),
)
clean_scalars = st.one_of(st.none(), st.booleans(), st.floats(-1e6, 1e6), st.text(max_size=10))
json_values = st.recursive(
    json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=4), max_leaves=12
)
clean_objects = st.dictionaries(
    st.text(max_size=8),
    st.recursive(clean_scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                                                          max_size=3), max_leaves=6),
    max_size=4,
)


def nest(depth: int, kind: str, leaf: Any) -> Any:
    """`leaf` inside `depth` levels of objects, lists or both."""
    value = leaf
    for level in range(depth):
        value = [value] if kind == "list" or (kind == "mixed" and level % 2) else {"k": value}
    return value


# Around the depths where protobuf's decoder (100 levels) starts refusing: 32/33 objects, 47/48 lists.
deep_values = st.one_of(
    st.builds(nest, st.integers(30, 34), st.just("dict"), clean_scalars),
    st.builds(nest, st.integers(45, 50), st.just("list"), clean_scalars),
    st.builds(nest, st.integers(20, 60), st.sampled_from(["dict", "list", "mixed"]), clean_scalars),
)
big_values = st.one_of(
    st.builds(lambda n, x: [x] * n, st.integers(1000, 20_000), st.sampled_from([0.0, "x" * 10, True, None])),
    st.builds(lambda n: "y" * n, st.integers(100_000, 300_000)),
    st.builds(lambda n: {f"k{i}": float(i) for i in range(n)}, st.integers(1000, 10_000)),
)
json_objects = st.one_of(
    st.dictionaries(keys, json_values, max_size=5),
    st.builds(lambda d: {"deep": d}, deep_values),
    st.builds(lambda b: {"big": b}, big_values),
)


def fill_value(out: struct_pb2.Value, value: Any) -> None:
    """Set a Value from a JSON-like Python value, NaN and all (no Struct.update checks)."""
    if value is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int | float):
        out.number_value = float(value)
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, list):
        out.list_value.SetInParent()
        for item in value:
            fill_value(out.list_value.values.add(), item)
    else:
        fill_struct(out.struct_value, value)


def fill_struct(out: struct_pb2.Struct, value: dict[str, Any]) -> None:
    """Set a Struct from a dict."""
    out.SetInParent()
    for key, item in value.items():
        fill_value(out.fields[key], item)


def with_ts(message: Message, name: str, value: tuple[int, int] | None) -> None:
    if value is not None:
        getattr(message, name).seconds, getattr(message, name).nanos = value


# --- strategies: messages ------------------------------------------------------------------------
#
# Each field has a plausible strategy and a hostile one. A message is drawn all plausible, with
# exactly one hostile field, or with any mix (shrinking goes towards all plausible), so that most
# requests get past the first check and the deeper paths are reached too.

Field = tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]
EVENT_TYPES = [
    "run.started", "step.created", "step.started", "step.succeeded", "step.failed", "step.skipped", "tool.invoked",
    "tool.succeeded", "tool.failed", "run.completed", "run.failed", "run.canceled", "run.queued", "run.claimed",
    "run.requeued", "run.lease_expired", "run.cancel_requested",
]


@st.composite
def fields(draw: st.DrawFn, spec: dict[str, Field], plausible: bool = False) -> dict[str, Any]:
    """Values for a message's fields: all plausible (always when `plausible`), exactly one hostile, or any mix."""
    mode = "plausible" if plausible else draw(st.sampled_from(["plausible", "one hostile", "mixed"]))
    bad = draw(st.sampled_from(sorted(spec))) if mode == "one hostile" else None
    out: dict[str, Any] = {}
    for name, (good, evil) in spec.items():
        if mode == "plausible" or (mode == "one hostile" and name != bad):
            out[name] = draw(good)
        elif mode == "one hostile":
            out[name] = draw(evil)
        else:
            out[name] = draw(st.one_of(good, evil))
    return out


def text_field(*plausible: str) -> Field:
    """One of `plausible`, or a hostile string."""
    return st.sampled_from(plausible), hostile_texts


def int_field(lo: int, hi: int, bits: int = 32) -> Field:
    """A small plausible int, or an edge or any value of the type."""
    return st.integers(lo, hi), int32s(lo, hi) if bits == 32 else int64s(lo, hi)


# Resolved when the message is sent: finished runs, a run the real worker is executing, a queued one,
# a run the message's own worker_id has just claimed, an id no run has.
RUN_REFS = ["@run:ok", "@run:failed", "@run:canceled", "@run:live", "@run:queued", "@run:own", "@run:unknown"]
run_id_field: Field = (st.sampled_from(RUN_REFS), st.from_regex(r"\A[0-9A-Z]{26}\Z") | hostile_texts)
# What a worker reports or heartbeats about: mostly the run it has just claimed itself.
held_run_id_field: Field = (st.sampled_from(["@run:own"] * 4 + RUN_REFS), run_id_field[1])
worker_id_field = text_field("fuzz-w1", "fuzz-w2", REAL_WORKER)
session_field = text_field("@session", "")
workspace_field = text_field("", "default", PARKED)

tool_inputs = st.one_of(
    st.builds(lambda a: {"tool": "noop", "args": a}, st.fixed_dictionaries({}, optional={"x": clean_scalars})),
    st.builds(lambda s: {"tool": "sleep", "args": {"seconds": s}}, st.floats(0, 0.3)),
    st.builds(
        lambda m, t, r: {"tool": "fail", "args": {"message": m, "times": t, "retryable": r}},
        st.sampled_from(["boom", "é"]),
        st.integers(0, 3),
        st.booleans(),
    ),
)
hostile_inputs = st.one_of(
    json_objects,
    st.builds(lambda t, a: {"tool": t, "args": a}, texts("noop", "sleep", "fail", "shell", ""), json_values),
    st.builds(
        lambda t, k, v: {"tool": t, "args": {k: v}},
        st.sampled_from(["sleep", "fail"]),
        st.sampled_from(["seconds", "times", "retryable", "message"]),
        st.sampled_from([-1, -1e-9, "1", None, True, [], {}, math.nan, math.inf]),
    ),
)


@st.composite
def start_run(draw: st.DrawFn) -> run_service_pb2.StartRunRequest:
    f = draw(
        fields(
            {
                "workflow": text_field("runtime.noop", "runtime.tool", ""),
                "input": (tool_inputs, hostile_inputs),
                "idempotency_key": (st.sampled_from(["", "fuzz-key-1"]) | st.uuids().map(str), hostile_texts),
                "max_attempts": int_field(0, 5),
                "workspace_id": workspace_field,
                "retry_backoff_seconds": (st.just(0.0) | st.floats(0, 0.1), doubles(0, 0.1)),
                "retry_backoff_max_seconds": (st.just(0.0) | st.floats(0, 0.5), doubles(0, 0.5)),
                "project_id": text_field("", "default", "fuzz-project"),
            }
        )
    )
    run_input = f.pop("input")
    request = run_service_pb2.StartRunRequest(**f)
    fill_struct(request.input, run_input)
    return request


cancel_run = fields({"run_id": run_id_field, "reason": text_field("", "fuzz")}).map(
    lambda f: run_service_pb2.CancelRunRequest(**f)
)
get_run = fields({"run_id": run_id_field}).map(lambda f: run_service_pb2.GetRunRequest(**f))
list_runs = fields(
    {
        "page_size": int_field(0, 5),
        "page_token": (st.sampled_from(["", "@run:ok"]), st.from_regex(r"\A[0-9A-Za-z]{26}\Z") | hostile_texts),
        "status": int_field(0, 5),
        "workflow": text_field("", "runtime.noop", "runtime.tool"),
        "query": text_field("", "01", "order-", "runtime"),
    }
).map(lambda f: run_service_pb2.ListRunsRequest(**f))
watch_run = fields({"run_id": run_id_field, "after_sequence": int_field(0, 12, bits=64)}).map(
    lambda f: run_service_pb2.WatchRunRequest(**f)
)
claim = fields(
    {
        "worker_id": worker_id_field,
        "workspace_id": workspace_field,
        "capacity": int_field(0, 3),
        "batch_limit": int_field(0, 3),
        "once": (st.just(True), st.booleans()),
        "poll_interval_ms": int_field(0, 1000),
        "session_token": session_field,
        "tools": (st.sampled_from([[], ["noop", "echo"]]),
                  st.lists(hostile_texts, max_size=3) | st.just(["t"] * 101)),
    }
).map(lambda f: worker_service_pb2.ClaimQueuedRunsRequest(**f))

# What the real worker reports, per event type (the shape a worker's events have).
STEP, CALL = {"step_key": "runtime"}, {"tool_call_id": "tc-1"}
PLAUSIBLE_PAYLOADS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "run.started": st.just({}),
    "run.completed": st.just({}),
    "run.failed": st.fixed_dictionaries(
        {"error": st.just("boom")}, optional={"retryable": st.booleans(), "released": st.booleans()}
    ),
    "run.canceled": st.fixed_dictionaries({}, optional={"reason": st.just("stop")}),
    "step.created": st.just({**STEP, "tool": "noop"}),
    "step.started": st.just(STEP),
    "step.succeeded": st.builds(lambda o: {**STEP, "output": o}, clean_objects),
    "step.failed": st.just({**STEP, "error": "boom"}),
    "step.skipped": st.just({**STEP, "reason": "skip"}),
    "tool.invoked": st.builds(lambda i: {**CALL, **STEP, "tool": "noop", "input": i}, clean_objects),
    "tool.succeeded": st.builds(lambda o: {**CALL, "output": o}, clean_objects),
    "tool.failed": st.just({**CALL, "error": "boom"}),
}
LIFECYCLE = ["run.started", "step.created", "step.started", "tool.invoked", "tool.succeeded", "step.succeeded",
             "run.completed"]
hostile_payloads = st.one_of(
    json_objects,
    st.builds(lambda k, v: {**STEP, **CALL, k: v}, keys, json_values),  # an unknown field, or a wrong type
    st.builds(lambda n: {**STEP, **CALL, "error": "e" * n}, st.integers(8000, 300_000)),
)
plausible_kind = st.sampled_from(sorted(PLAUSIBLE_PAYLOADS)).flatmap(
    lambda t: PLAUSIBLE_PAYLOADS[t].map(lambda p: (t, p))
)
hostile_kind = st.tuples(st.sampled_from(EVENT_TYPES) | hostile_texts, st.none() | hostile_payloads)
NEAR_NOW = st.tuples(st.integers(NOW - 86400, NOW + 86400), st.integers(0, 999_999_999))


def event_message(f: dict[str, Any]) -> worker_service_pb2.ReportedEvent:
    """A ReportedEvent from drawn fields (kind = (type, payload or None))."""
    event_type, payload = f.pop("kind")
    event = worker_service_pb2.ReportedEvent(type=event_type, **{k: v for k, v in f.items() if k != "occurred_at"})
    with_ts(event, "occurred_at", f["occurred_at"])
    if payload is not None:
        fill_struct(event.payload, payload)
    return event


reported_event = fields(
    {
        "run_id": held_run_id_field,
        "attempt": int_field(1, 2),
        "event_id": (st.uuids().map(str) | st.sampled_from(["e-1", "e-2"]), hostile_texts),
        "kind": (plausible_kind, hostile_kind),
        "occurred_at": (st.none() | NEAR_NOW, timestamps),
    }
).map(event_message)


@st.composite
def lifecycle(draw: st.DrawFn) -> list[worker_service_pb2.ReportedEvent]:
    """A whole noop attempt, in order, as the real worker reports it (all of it or a prefix)."""
    run_id, attempt = draw(held_run_id_field[0]), draw(st.integers(1, 2))
    kinds = LIFECYCLE[: draw(st.integers(1, len(LIFECYCLE)))]
    return [
        event_message(
            {"run_id": run_id, "attempt": attempt, "event_id": str(draw(st.uuids())), "occurred_at": None,
             "kind": (kind, draw(PLAUSIBLE_PAYLOADS[kind]))}
        )
        for kind in kinds
    ]


@st.composite
def report_events(draw: st.DrawFn) -> worker_service_pb2.ReportRunEventsRequest:
    f = draw(
        fields(
            {
                "worker_id": worker_id_field,
                "session_token": session_field,
                "events": (
                    lifecycle() | st.lists(reported_event, min_size=1, max_size=4),
                    st.lists(reported_event, max_size=4)
                    | st.builds(lambda e, n: [e] * n, reported_event, st.integers(100, 2000)),
                ),
            }
        )
    )
    events = f.pop("events")
    request = worker_service_pb2.ReportRunEventsRequest(**f)
    for event in events:
        request.events.add().CopyFrom(event)  # not events=[...]: that re-parses, with the client's depth limit
    return request


held_run = fields({"run_id": held_run_id_field, "attempt": int_field(1, 2)}).map(
    lambda f: worker_service_pb2.HeldRun(**f)
)
heartbeat = fields(
    {
        "worker_id": worker_id_field,
        "runs": (
            st.lists(held_run, max_size=4),
            st.builds(lambda h, n: [h] * n, held_run, st.integers(100, 5000)),
        ),
        "session_token": session_field,
    }
).map(lambda f: worker_service_pb2.HeartbeatRequest(**f))
create_key = fields(
    {
        "role": int_field(1, 3),
        "tenant_id": text_field("", "default"),
        "project_id": text_field("", "default", "fuzz-project"),
        "workspace_id": text_field("", "default"),
        "ttl_seconds": int_field(0, 3600, bits=64),
        "description": text_field("", "fuzz"),
    }
).map(lambda f: key_service_pb2.CreateKeyRequest(**f))
list_keys = fields(
    {"page_size": int_field(0, 5), "page_token": text_field(""), "include_revoked": (st.booleans(), st.booleans())}
).map(lambda f: key_service_pb2.ListKeysRequest(**f))
revoke_key = fields({"key_id": text_field("k_unknown", "")}).map(lambda f: key_service_pb2.RevokeKeyRequest(**f))
list_run_steps = fields({"run_id": run_id_field, "status": int_field(0, 6)}).map(
    lambda f: run_service_pb2.ListRunStepsRequest(**f)
)
list_run_artifacts = fields({"run_id": run_id_field}).map(lambda f: run_service_pb2.ListRunArtifactsRequest(**f))
artifact_name_field = text_field("a.txt", "site/index.html", "../escape", "/abs", "")
download_artifact = fields(
    {"run_id": run_id_field, "step_key": text_field("runtime", ""), "name": artifact_name_field}
).map(lambda f: run_service_pb2.DownloadArtifactRequest(**f))
artifact_header = fields(
    {
        "worker_id": worker_id_field,
        "session_token": session_field,
        "run_id": held_run_id_field,
        "attempt": int_field(1, 2),
        "step_key": text_field("runtime", ""),
        "name": artifact_name_field,
        "media_type": text_field("", "text/plain", "nonsense"),
    }
).map(lambda f: worker_service_pb2.ArtifactHeader(**f))
# Sent as a one-message client stream: a header (an empty artifact) or a chunk without a header.
upload_artifact = st.one_of(
    artifact_header.map(lambda h: worker_service_pb2.UploadArtifactRequest(header=h)),
    st.binary(max_size=64).map(lambda b: worker_service_pb2.UploadArtifactRequest(chunk=b)),
)
fetch_artifact = fields(
    {
        "worker_id": worker_id_field,
        "session_token": session_field,
        "run_id": held_run_id_field,
        "attempt": int_field(1, 2),
        "sha256": (st.sampled_from(["0" * 64, ""]), st.from_regex(r"\A[0-9a-f]{64}\Z") | hostile_texts),
    }
).map(lambda f: worker_service_pb2.FetchArtifactRequest(**f))
artifact_calls = st.one_of(
    st.tuples(st.just("ListRunSteps"), list_run_steps.map(Req)),
    st.tuples(st.just("ListRunArtifacts"), list_run_artifacts.map(Req)),
    st.tuples(st.just("DownloadArtifact"), download_artifact.map(Req)),
    st.tuples(st.just("UploadArtifact"), upload_artifact.map(Req)),
    st.tuples(st.just("FetchArtifact"), fetch_artifact.map(Req)),
)
key_calls = st.one_of(
    st.tuples(st.just("CreateKey"), create_key.map(Req)),
    st.tuples(st.just("ListKeys"), list_keys.map(Req)),
    st.tuples(st.just("RevokeKey"), revoke_key.map(Req)),
)

# --- strategies: workflow specs (WorkflowService) ------------------------------------------------
#
# A spec is built as the proto a client sends. Plausible specs are DAGs listed in order: each step
# depends on some earlier ones and its selectors read the run input or an upstream step. Hostile
# parts: keys that are not names or repeat, dependencies on later, unknown or own keys (cycles),
# selectors that do not parse, nest thousands deep, run 100 KB long or read a step not upstream,
# args no canonical JSON holds, retry/timeout/cache values at and past their edges. Large shapes
# (long chains, rings, dense DAGs, thousands of unknown dependencies) check that validation stays
# fast on what fits in one request.

WF_NAMES = ("fuzz.wf", "fuzz.wf-2", "fuzz_wf.3")
STEP_KEYS = ("a", "b", "c", "d", "e", "f", "x.y", "a-b", "g_1", "Z9")
step_key_plain = st.sampled_from(STEP_KEYS) | st.from_regex(r"\A[A-Za-z0-9._-]{1,12}\Z")
step_key_evil = hostile_texts | st.sampled_from(["", " a", "a b", "é", "k" * 129, "*", "steps", "a\x00"])
wf_name_field: Field = (
    st.sampled_from(WF_NAMES) | st.from_regex(r"\Afuzz\.[A-Za-z0-9._-]{1,20}\Z"),
    hostile_texts | st.sampled_from(["", "runtime.noop", "campaign.build", "n" * 129, "a b", "fuzz/wf"]),
)
tool_field = text_field("noop", "echo", "sleep", "fail", "shell")


def selector_of(template: str, key: str, bare: bool) -> str:
    """`template` with {k} as the key: bare (steps.a) when it is a JMESPath identifier, else quoted."""
    return template.format(k=key if bare and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else json.dumps(key))


INPUT_SELECTORS = [
    "input", "input.x", "input.items[0]", "input.x || `1`", "length(input.items)", "input.items[?v > `1`].v",
    "{x: input.x}", "[input.x, input.y]", "input.x | [0]", "input.\"é\"", "sort_by(input.items, &v)[0]",
]
STEP_SELECTORS = [
    "steps.{k}.output", "steps.{k}.output.x", "steps.{k}.artifacts[0].sha256", "steps.{k}.artifacts[*].name",
    "{{a: input.x, b: steps.{k}.output}}", "input.x || steps.{k}.output", "length(steps.{k}.artifacts)",
    "steps.{k}.output | keys(@)", "[steps.{k}.output, input]",
]
NONSENSE_SELECTORS = [
    "", " ", "steps", "steps.*", "steps.*.output", "@", "*", "input.[", "foo", "foo.bar", "`{`", "&input.x",
    "input.x |", "steps.a.nope", "steps.zz.output", "steps.a", "input.x[?", "'\x00'", '`"\\u0000"`',
    'input."\\u0000"', 'input."\\ud800"', "input.\x00", "`1e999`", "`-0`", "`123456789012345678901234567890`",
    "input.x[-9223372036854775809]", "input.x[99999999999999999999]", "input.x[::0]", "to_number('1e400')",
    'input."steps"', '"steps".a.output', "@.steps.a.output", "$", "steps.a.output[?@ == steps.b.output]",
    "input.x.`1`", "\u202einput.x", "input.\U0001f600", "`" + "[" * 40 + "]" * 40 + "`", "steps.\"\".output",
]


def deep_selector(kind: str, n: int) -> str:
    """A selector nested or repeated `n` times (parsers recurse on most of these)."""
    return {
        "parens": "(" * n + "input.x" + ")" * n,
        "lists": "[" * n + "input.x" + "]" * n,
        "nots": "!" * n + "input.x",
        "calls": "not_null(" * n + "input.x" + ")" * n,
        "hashes": "{a: " * n + "input.x" + "}" * n,
        "literal": "`" + "[" * n + "]" * n + "`",
        "dots": "input" + ".a" * n,
        "indexes": "input.x" + "[0]" * n,
        "ors": " || ".join(["input.x"] * n),
        "pipes": " | ".join(["input.x"] * n),
        "long": "input." + "a" * n,
    }[kind]


DEEP_KINDS = ["parens", "lists", "nots", "calls", "hashes", "literal", "dots", "indexes", "ors", "pipes", "long"]
deep_selectors = st.builds(
    deep_selector, st.sampled_from(DEEP_KINDS), st.sampled_from([30, 100, 300, 1000, 3000, 20_000, 100_000])
)
evil_selectors = st.one_of(st.sampled_from(NONSENSE_SELECTORS), deep_selectors, hostile_texts)


def selectors(upstream: list[str], everyone: list[str]) -> Field:
    """Selectors reading the input or an upstream step; hostile ones also read any key, or nonsense."""
    good: st.SearchStrategy[str] = st.sampled_from(INPUT_SELECTORS)
    if upstream:
        good = good | st.builds(selector_of, st.sampled_from(STEP_SELECTORS), st.sampled_from(upstream), st.booleans())
    evil = evil_selectors
    if everyone:
        evil = evil | st.builds(selector_of, st.sampled_from(STEP_SELECTORS), st.sampled_from(everyone), st.booleans())
    return good, evil


ODD_NUMBERS = [math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324, 2.0**53, 2.0**53 + 2, -(2.0**63), 1e-7,
               0.1 + 0.2, 1e21, 123456789.125]
odd_values = st.one_of(
    st.sampled_from(ODD_NUMBERS),
    st.sampled_from(["", "\x00", "a\x00b", "\U0010ffff", "\u202e", "\ufeff", {}, [], [[]], {"": None}, {"\x00": 1.0}]),
    deep_values,
    st.builds(nest, st.integers(18, 22), st.sampled_from(["dict", "list", "mixed"]), st.just(1.0)),
)
arg_names = texts("x", "seconds", "message", "times", "retryable", "")
args_field: Field = (
    st.dictionaries(st.sampled_from(["x", "seconds", "v"]), clean_scalars, max_size=3),
    st.dictionaries(arg_names, json_values | odd_values, max_size=4) | json_objects,
)


retry_field: Field = (
    st.none() | st.builds(
        lambda m, b, c: workflow_service_pb2.StepRetry(max_attempts=m, backoff_seconds=b, backoff_max_seconds=c),
        st.integers(0, 5), st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([0.0, 1.0, 60.0]),
    ),
    fields(
        {
            "max_attempts": (st.sampled_from([1, 100]), int32s(0, 101)),
            "backoff_seconds": (st.sampled_from([0.0, 86400.0]), doubles(0, 86400)),
            "backoff_max_seconds": (st.sampled_from([0.0, 86400.0]), doubles(0, 86400)),
        }
    ).map(lambda f: workflow_service_pb2.StepRetry(**f)),
)
cache_field: Field = (
    st.none() | st.builds(
        lambda s, t: workflow_service_pb2.StepCache(scope=s, ttl_seconds=t),
        st.sampled_from(["", "none", "global", "run_only"]), st.sampled_from([0, 60, 3600]),
    ),
    st.builds(
        lambda s, t: workflow_service_pb2.StepCache(scope=s, ttl_seconds=t),
        texts("", "none", "global", "run_only", "GLOBAL"),
        st.one_of(int64s(0, 3600), st.sampled_from([2**53 - 1, 2**53, 2**53 + 1, 10**17, 10**18 - 1, 10**18])),
    ),
)


@st.composite
def workflow_step(draw: st.DrawFn, i: int, keys: list[str], hostile: bool) -> workflow_service_pb2.WorkflowStep:
    """Step `i` of a spec whose keys are `keys`: plausibly depending on earlier steps only."""
    earlier, key = keys[:i], keys[i]
    deps_good = st.lists(st.sampled_from(earlier), unique=True, max_size=3) if earlier else st.just([])
    deps_evil = st.lists(st.sampled_from(keys) | step_key_plain | step_key_evil, max_size=5)
    f = draw(
        fields(
            {
                "tool": tool_field,
                "depends_on": (deps_good, deps_evil),
                "input": (st.just(0), st.just(1)),  # which selectors: drawn below, once the deps are known
                "args": args_field,
                "retry": retry_field,
                "timeout_seconds": (st.sampled_from([0.0, 0.5, 30.0, 86400.0]), doubles(0, 86400)),
                "cache": cache_field,
            },
            plausible=not hostile,
        )
    )
    upstream = [k for k in earlier if k in f["depends_on"]]  # direct dependencies are surely upstream
    good, evil = selectors(upstream, keys)
    names = st.sampled_from(["x", "seconds", "message", "v"])
    inputs = draw(st.dictionaries(names, good, max_size=3) if not f.pop("input") else st.dictionaries(
        names | arg_names, good | evil, max_size=4))
    step = workflow_service_pb2.WorkflowStep(key=key, tool=f["tool"], depends_on=f["depends_on"],
                                             timeout_seconds=f["timeout_seconds"])
    for name, expression in inputs.items():
        step.input[name] = expression
    if f["args"]:
        fill_struct(step.args, f["args"])
    for part in ("retry", "cache"):
        if f[part] is not None:
            getattr(step, part).CopyFrom(f[part])
    return step


def big_spec(shape: str, n: int) -> workflow_service_pb2.WorkflowSpec:
    """A spec with many steps: a chain, a ring (one long cycle), a dense DAG, or unknown dependencies."""
    spec = workflow_service_pb2.WorkflowSpec(name=f"fuzz.{shape}")
    for i in range(n):
        step = spec.steps.add(key=f"s{i}", tool="noop")
        if shape == "chain" and i:
            step.depends_on.append(f"s{i - 1}")
            step.input["x"] = f"steps.s{i - 1}.output"
        elif shape == "ring":
            step.depends_on.append(f"s{(i + 1) % n}")
        elif shape == "dense":
            step.depends_on.extend(f"s{j}" for j in range(i))
            step.input["x"] = "steps.zz.output" if i % 2 else "input.x"
        elif shape == "unknown":
            step.depends_on.extend([f"u{i}", f"u{i}"])
            step.input["x"] = f"steps.u{i}.output"
        elif shape == "fan":
            step.depends_on.extend(f"u{j}" for j in range(n) if i == 0)
    return spec


big_specs = st.one_of(
    st.builds(big_spec, st.sampled_from(["chain", "ring", "unknown", "fan"]), st.integers(100, 20_000)),
    st.builds(big_spec, st.just("dense"), st.integers(50, 1000)),  # 1000: 3.5 MB, under the 4 MiB limit
)


@st.composite
def workflow_spec(draw: st.DrawFn) -> workflow_service_pb2.WorkflowSpec:
    """A spec: a valid DAG half the time, else with one hostile step or hostile parts anywhere (see above)."""
    mode = draw(st.sampled_from(["valid", "valid", "one hostile step", "hostile"]))
    n = draw(st.integers(1, 5) | st.integers(0 if mode == "hostile" else 1, 12) | st.sampled_from([30, 256, 257]))
    keys = draw(st.lists(step_key_plain, min_size=min(n, 8), max_size=min(n, 8), unique=True))
    keys += [f"k{i}" for i in range(len(keys), n)]
    if n and mode == "hostile" and draw(st.booleans()):  # keys hostile, repeated, or a later one made earlier
        for _ in range(draw(st.integers(1, 2))):
            keys[draw(st.integers(0, n - 1))] = draw(st.sampled_from(keys) | step_key_evil)
    f = draw(fields({"name": wf_name_field, "description": text_field("", "a fuzzed workflow")}, mode != "hostile"))
    spec = workflow_service_pb2.WorkflowSpec(**f)
    odd = draw(st.integers(0, n - 1)) if n and mode == "one hostile step" else -1
    for i in range(n):
        spec.steps.add().CopyFrom(draw(workflow_step(i, keys, hostile=mode == "hostile" or i == odd)))
    if mode == "hostile" and draw(st.booleans()) and n > 1:  # a back edge: the first step depends on a later one
        spec.steps[0].depends_on.append(keys[draw(st.integers(1, n - 1))])
    names = st.sampled_from(["redo_a", "copy_update", "x"])
    targets = st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True) if keys else st.nothing()
    if mode == "hostile":
        names, targets = names | hostile_texts, targets | st.lists(step_key_plain | step_key_evil, max_size=3)
    requests = draw(st.dictionaries(names, targets, max_size=3))
    for name, targets in requests.items():
        spec.change_requests[name].step_keys.extend(targets)
    return spec




def register_request(spec: workflow_service_pb2.WorkflowSpec) -> workflow_service_pb2.RegisterWorkflowRequest:
    request = workflow_service_pb2.RegisterWorkflowRequest()
    request.spec.CopyFrom(spec)  # not spec=...: that re-parses, with the client's depth limit
    return request


register_workflow = st.one_of(
    workflow_spec().map(register_request),
    workflow_spec().map(register_request),
    big_specs.map(register_request),
    st.just(workflow_service_pb2.RegisterWorkflowRequest()),
)
WF_LOOKUP = (*WF_NAMES, "runtime.noop", "runtime.tool", "campaign.build", "")
list_workers = fields(
    {"page_size": int_field(0, 5), "page_token": text_field("", "worker-1")}
).map(lambda f: ops_service_pb2.ListWorkersRequest(**f))
get_throughput = fields({"minutes": int_field(0, 1440)}).map(lambda f: ops_service_pb2.GetThroughputRequest(**f))
list_workflows = fields(
    {"page_size": int_field(0, 5), "page_token": text_field("", *WF_LOOKUP)}
).map(lambda f: workflow_service_pb2.ListWorkflowsRequest(**f))
get_workflow = fields({"name": text_field(*WF_LOOKUP), "version": int_field(0, 3)}).map(
    lambda f: workflow_service_pb2.GetWorkflowRequest(**f)
)


@st.composite
def workflow_call(draw: st.DrawFn) -> tuple[str, Req, tuple[Any, ...]]:
    """(method, request, how to send it): mostly as is, sometimes as raw garbage made from it."""
    name = draw(st.sampled_from(["RegisterWorkflow"] * 6 + ["ListWorkflows", "GetWorkflow"]))
    request = Req(draw(MESSAGES[name]))
    if draw(st.integers(0, 5)):
        return name, request, ("as_is",)
    how = draw(
        st.builds(lambda f: ("truncate", f), st.floats(0, 1, exclude_max=True))
        | st.builds(lambda r, b: ("append", r, b), bad_utf8_record(RPCS[name].request.DESCRIPTOR), st.booleans())
        | st.builds(lambda b: ("bytes", b), st.binary(max_size=256))
    )
    return name, request, how


@st.composite
def start_runs(draw: st.DrawFn) -> run_service_pb2.StartRunsRequest:
    """A few StartRun requests in one call (hostile ones among them, sometimes)."""
    out = run_service_pb2.StartRunsRequest()
    for one in draw(st.lists(start_run(), max_size=4)):
        try:
            out.requests.add().CopyFrom(one)
        except DecodeError:  # nested past what protobuf itself builds one level deeper: the raw group sends those
            del out.requests[-1]
    return out


# --- strategies: issue 8 (the step cache and rebuilds) -------------------------------------------

step_key_field = text_field("runtime", "brief", "copy", "")
workflow_name_field = text_field("runtime.noop", "campaign.build", "no.such.flow", "")


@st.composite
def rebuild_run(draw: st.DrawFn) -> run_service_pb2.RebuildRunRequest:
    f = draw(fields({"base_run_id": run_id_field,
                     "change_request_type": text_field("copy_update", "brief_update", "nope", "")}))
    request = run_service_pb2.RebuildRunRequest(**f, dry_run=draw(st.booleans()))
    request.steps.extend(draw(st.lists(st.sampled_from(["runtime", "copy", "x"]) | hostile_texts, max_size=4)))
    if draw(st.booleans()):
        fill_struct(request.input_patch, draw(json_objects))
    return request


explain_step = fields({"run_id": run_id_field, "step_key": step_key_field}).map(
    lambda f: run_service_pb2.ExplainStepRequest(**f)
)
explain_run = fields({"run_id": run_id_field}).map(lambda f: run_service_pb2.ExplainRunRequest(**f))
list_cache_entries = fields(
    {"workflow": workflow_name_field, "step_key": step_key_field, "page_size": int_field(0, 50),
     "page_token": text_field("", "not-a-token")}
).map(lambda f: run_service_pb2.ListCacheEntriesRequest(**f))
invalidate_cache = fields(
    {"workflow": workflow_name_field, "step_key": step_key_field,
     "cache_key": (st.sampled_from(["", "0" * 64]), st.from_regex(r"\A[0-9a-f]{64}\Z") | hostile_texts)}
).map(lambda f: run_service_pb2.InvalidateCacheRequest(**f))


@st.composite
def lookup_step_cache(draw: st.DrawFn) -> worker_service_pb2.LookupStepCacheRequest:
    f = draw(fields({"worker_id": worker_id_field, "session_token": session_field, "run_id": held_run_id_field,
                     "attempt": int_field(1, 2), "step_key": step_key_field,
                     "scope": text_field("global", "run_only", "none", "")}))
    request = worker_service_pb2.LookupStepCacheRequest(**f)
    components = draw(st.one_of(
        st.fixed_dictionaries({"workflow": st.sampled_from(["runtime.noop", "campaign.build"]),
                               "step": st.sampled_from(["runtime", "brief"]), "tool": st.just("noop"),
                               "tool_version": st.just("1"), "input": json_objects,
                               "input_artifacts": st.lists(st.from_regex(r"\A[0-9a-f]{64}\Z"), max_size=2)}),
        json_objects,
    ))
    fill_struct(request.components, components)
    return request


cache_calls = st.one_of(
    st.tuples(st.just("StartRuns"), start_runs().map(Req)),
    st.tuples(st.just("RebuildRun"), rebuild_run().map(Req)),
    st.tuples(st.just("ExplainStep"), explain_step.map(Req)),
    st.tuples(st.just("ListCacheEntries"), list_cache_entries.map(Req)),
    st.tuples(st.just("InvalidateCache"), invalidate_cache.map(Req)),
    st.tuples(st.just("LookupStepCache"), lookup_step_cache().map(Req)),
)


MESSAGES: dict[str, st.SearchStrategy[Any]] = {
    "StartRun": start_run(),
    "StartRuns": start_runs(),
    "CancelRun": cancel_run,
    "GetRun": get_run,
    "ListRuns": list_runs,
    "WatchRun": watch_run,
    "ClaimQueuedRuns": claim,
    "ReportRunEvents": report_events(),
    "Heartbeat": heartbeat,
    "GetStats": st.just(ops_service_pb2.GetStatsRequest()),
    "ListWorkers": list_workers,
    "GetThroughput": get_throughput,
    "CreateKey": create_key,
    "ListKeys": list_keys,
    "RevokeKey": revoke_key,
    "ListRunSteps": list_run_steps,
    "ListRunArtifacts": list_run_artifacts,
    "DownloadArtifact": download_artifact,
    "UploadArtifact": upload_artifact,
    "FetchArtifact": fetch_artifact,
    "RegisterWorkflow": register_workflow,
    "ListWorkflows": list_workflows,
    "GetWorkflow": get_workflow,
    "RebuildRun": rebuild_run(),
    "ExplainStep": explain_step,
    "ExplainRun": explain_run,
    "ListCacheEntries": list_cache_entries,
    "InvalidateCache": invalidate_cache,
    "LookupStepCache": lookup_step_cache(),
}


# --- strategies: raw bytes -----------------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def record(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xe2\x82", b"\x80abc", b"\xfe\xfe\xff"]


@st.composite
def bad_utf8_record(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> bytes:
    """A field of `descriptor` (or of a message inside it) whose string holds invalid UTF-8."""
    strings = [f for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING]
    messages = [f for f in descriptor.fields if f.type == FieldDescriptor.TYPE_MESSAGE] if depth < 4 else []
    if not strings and not messages:
        return record(15, draw(st.sampled_from(BAD_UTF8)))  # an unknown field: must be ignored
    chosen = draw(st.sampled_from(strings + messages))
    if chosen.type == FieldDescriptor.TYPE_STRING:
        return record(chosen.number, draw(st.sampled_from(BAD_UTF8)))
    return record(chosen.number, draw(bad_utf8_record(chosen.message_type, depth + 1)))


def deep_value(depth: int) -> bytes:
    """A google.protobuf.Value nested `depth` Structs deep, encoded by hand (no client-side limit)."""
    value = record(3, b"x")
    for _ in range(depth):
        value = record(5, record(1, record(1, b"k") + record(2, value)))
    return value


def deep_record(name: str, depth: int) -> bytes:
    """A field of the method's request that carries a Struct nested `depth` deep (empty if none)."""
    struct = record(1, record(1, b"deep") + record(2, deep_value(depth)))
    if name == "StartRun":
        return record(2, struct)
    if name == "ReportRunEvents":
        return record(2, record(1, b"x") + record(6, struct))
    if name == "RegisterWorkflow":  # spec.steps[0].args
        return record(1, record(1, b"fuzz.deep") + record(3, record(1, b"a") + record(2, b"noop") + record(5, struct)))
    return record(15, struct)  # unknown field: not decoded, must be ignored


CORRUPT = [
    b"\x08" + b"\xff" * 10 + b"\x01",  # varint longer than 10 bytes
    varint(1 << 3 | 2) + varint(2**31) + b"abc",  # length past the end
    varint(1 << 3 | 2) + varint(2**64 - 1),  # absurd length
    bytes([1 << 3 | 6]),  # wire type 6
    bytes([1 << 3 | 7]),  # wire type 7
    bytes([1 << 3 | 4]),  # end group without a start
    bytes([1 << 3 | 3]) * 200,  # groups never closed
    b"\x00",  # field number 0
    varint(1 << 3 | 5) + b"\x01",  # fixed32 cut short
]


@st.composite
def raw_call(draw: st.DrawFn) -> tuple[str, Req | None, tuple[Any, ...]]:
    """(method, a generated request or None, how to turn it into bytes)."""
    name = draw(st.sampled_from(sorted(RPCS)) | st.sampled_from(BOGUS))
    if name in BOGUS:
        return name, None, ("bytes", draw(st.binary(max_size=64)))
    rpc = RPCS[name]
    kind = draw(st.sampled_from(["random", "corrupt", "truncate", "bad_utf8", "deep", "as_is"]))
    if kind == "random":
        return name, None, ("bytes", draw(st.binary(max_size=512)))
    if kind == "corrupt":
        return name, None, ("bytes", draw(st.sampled_from(CORRUPT)))
    request = Req(draw(MESSAGES[name]))
    if kind == "truncate":
        return name, request, ("truncate", draw(st.floats(0, 1, exclude_max=True)))
    if kind == "bad_utf8":
        return name, request, ("append", draw(bad_utf8_record(rpc.request.DESCRIPTOR)), draw(st.booleans()))
    if kind == "deep":
        depth = draw(st.one_of(st.sampled_from([32, 33, 34]), st.integers(20, 200)))
        return name, request, ("append", deep_record(name, depth), draw(st.booleans()))
    return name, request, ("as_is",)


def encode(data: bytes, how: tuple[Any, ...]) -> bytes:
    """Apply a raw_call mutation to a serialized request."""
    if how[0] == "bytes":
        return bytes(how[1])
    if how[0] == "truncate":
        return data[: int(len(data) * how[1])]
    if how[0] == "append":
        return data + how[1] if how[2] else how[1] + data
    return data


# --- the fuzz tests, one per RPC group -----------------------------------------------------------


def test_every_rpc_has_a_generator() -> None:
    """New methods in the contract must be fuzzed too."""
    assert set(MESSAGES) == set(RPCS)


@FUZZ
@given(request=start_run().map(Req))
def test_start_run(stack: Stack, request: Req) -> None:
    answer = call(stack, "StartRun", request.message)
    if answer.code is C.OK:  # what StartRun accepts, a standard client can read back
        run_id = run_service_pb2.StartRunResponse.FromString(answer.bodies[0]).run.run_id
        call(stack, "GetRun", run_service_pb2.GetRunRequest(run_id=run_id))
        call(stack, "WatchRun", run_service_pb2.WatchRunRequest(run_id=run_id), timeout=0.3)


@FUZZ
@given(request=cancel_run.map(Req))
def test_cancel_run(stack: Stack, request: Req) -> None:
    call(stack, "CancelRun", request.message)


@FUZZ
@given(request=get_run.map(Req))
def test_get_run(stack: Stack, request: Req) -> None:
    call(stack, "GetRun", request.message)


@FUZZ
@given(request=explain_run.map(Req))
def test_explain_run(stack: Stack, request: Req) -> None:
    call(stack, "ExplainRun", request.message)


@FUZZ
@given(request=list_runs.map(Req))
def test_list_runs(stack: Stack, request: Req) -> None:
    call(stack, "ListRuns", request.message)


@FUZZ
@given(request=watch_run.map(Req))
def test_watch_run(stack: Stack, request: Req) -> None:
    call(stack, "WatchRun", request.message, timeout=0.5)


@FUZZ
@given(request=heartbeat.map(Req))
def test_heartbeat(stack: Stack, request: Req) -> None:
    call(stack, "Heartbeat", request.message)


@FUZZ
@given(request=claim.map(Req))
def test_claim_queued_runs(stack: Stack, request: Req) -> None:
    call(stack, "ClaimQueuedRuns", request.message, timeout=3.0 if request.message.once else 0.5)


@FUZZ
@given(request=report_events().map(Req))
def test_report_run_events(stack: Stack, request: Req) -> None:
    call(stack, "ReportRunEvents", request.message)


def test_get_stats(stack: Stack) -> None:
    call(stack, "GetStats", ops_service_pb2.GetStatsRequest())


@FUZZ
@given(ops_call=st.one_of(
    st.tuples(st.just("ListWorkers"), list_workers.map(Req)),
    st.tuples(st.just("GetThroughput"), get_throughput.map(Req)),
))
def test_ops_service(stack: Stack, ops_call: tuple[str, Req]) -> None:
    call(stack, ops_call[0], ops_call[1].message)


@FUZZ
@given(key_call=key_calls)
def test_key_service(stack: Stack, key_call: tuple[str, Req]) -> None:
    call(stack, key_call[0], key_call[1].message)


@FUZZ
@given(artifact_call=artifact_calls)
def test_steps_and_artifacts(stack: Stack, artifact_call: tuple[str, Req]) -> None:
    name = artifact_call[0]
    call(stack, name, artifact_call[1].message, timeout=3.0 if RPCS[name].stream else 10.0)


@FUZZ
@given(cache_call=cache_calls)
def test_cache_and_rebuild(stack: Stack, cache_call: tuple[str, Req]) -> None:
    call(stack, cache_call[0], cache_call[1].message)


# Internals a refused spec must not show: the libraries it passes through and PostgreSQL's text.
REGISTRY_LEAKS = ("jmespath.", "rfc8785", "graphlib", "IntegerDomainError", "CycleError", "jsonb", "DETAIL:",
                  "unsupported Unicode", "invalid input syntax", "Error parsing")


def field_violations(answer: Answer) -> list[tuple[str, str]]:
    """The google.rpc.BadRequest field violations an answer carries."""
    status = status_pb2.Status.FromString(answer.trailing.get("grpc-status-details-bin", b""))
    out: list[tuple[str, str]] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out += [(v.field, v.description) for v in bad.field_violations]
    return out


def registered(stack: Stack, request: Message, answer: Answer) -> None:
    """An accepted spec is accepted again, as sent and as returned, with the same version and hash."""
    assert isinstance(request, workflow_service_pb2.RegisterWorkflowRequest)
    first = workflow_service_pb2.RegisterWorkflowResponse.FromString(answer.bodies[0]).workflow
    where = f"{first.name!r} v{first.version} {first.spec_hash}"
    assert first.name == request.spec.name and first.version >= 1 and re.fullmatch(r"[0-9a-f]{64}", first.spec_hash)
    known = stack.workflows.setdefault((first.name, first.version), first.spec_hash)
    assert known == first.spec_hash, f"version {first.version} of {first.name!r} changed hash: {known} -> {where}"
    for label, again in (
        ("the same request", request),
        ("the spec the registry returned", register_request(first.spec)),
    ):
        answer = call(stack, "RegisterWorkflow", again)
        assert answer.code is C.OK, f"{label} was refused after {where} was accepted: {answer.code} {answer.details}"
        second = workflow_service_pb2.RegisterWorkflowResponse.FromString(answer.bodies[0])
        assert not second.created, f"{label} created a new version: {second.workflow.version} after {where}"
        assert (second.workflow.version, second.workflow.spec_hash) == (first.version, first.spec_hash), label
    answer = call(stack, "GetWorkflow", workflow_service_pb2.GetWorkflowRequest(name=first.name, version=first.version))
    assert answer.code is C.OK, f"GetWorkflow of {where}: {answer.code} {answer.details}"
    got = workflow_service_pb2.GetWorkflowResponse.FromString(answer.bodies[0]).workflow
    assert got.spec_hash == first.spec_hash and got.spec == first.spec, f"GetWorkflow differs from {where}"


@FUZZ
@given(workflow=workflow_call())
def test_workflow_service(stack: Stack, workflow: tuple[str, Req, tuple[Any, ...]]) -> None:
    name, request, how = workflow
    rpc = RPCS[name]
    if how[0] != "as_is":
        payload = encode(resolve(stack, request.message).SerializeToString(), how)
        answer = stack.invoke(rpc.path, payload, False, 10.0)
        check(stack, rpc, rpc.path, answer, rpc.allowed, payload)
    else:
        answer = call(stack, name, request.message)
        payload = request.message.SerializeToString()
    event(f"{name} {how[0]}: {answer.code.name}")  # pytest --hypothesis-show-statistics shows the mix
    leaked = [marker for marker in REGISTRY_LEAKS if marker in answer.details and marker.encode() not in payload]
    assert not leaked, f"{name} details show internals {leaked}: {_short(fold(answer.details))!r}"
    if name != "RegisterWorkflow" or how[0] != "as_is":
        return
    if answer.code is C.INVALID_ARGUMENT:
        found = field_violations(answer)
        assert found, f"INVALID_ARGUMENT without field violations: {_short(fold(answer.details))!r}"
        # A spec nested past protobuf's decoder limit is an undecodable request, named as such.
        undecodable = found == [("request", found[0][1])] and "is not a valid" in found[0][1]
        strays = [f for f, _ in found if not re.fullmatch(r"spec(\..*)?", f, re.S)]
        assert undecodable or not strays, f"violations must name spec…, not {strays}: {_short(fold(answer.details))!r}"
    else:
        registered(stack, request.message, answer)


@FUZZ
@given(raw=raw_call())
def test_raw_bytes(stack: Stack, raw: tuple[str, Req | None, tuple[Any, ...]]) -> None:
    name, generated, how = raw
    rpc = RPCS.get(name)
    path = rpc.path if rpc is not None else name
    data = b"" if generated is None else resolve(stack, generated.message).SerializeToString()
    payload = encode(data, how)
    answer = stack.invoke(path, payload, rpc is not None and rpc.stream, 1.0 if rpc is None or rpc.stream else 10.0)
    if rpc is not None and answer.code is C.OK:
        with contextlib.suppress(DecodeError):
            learn(stack, name, rpc.request.FromString(payload), answer)
    check(stack, rpc, path, answer, frozenset({C.UNIMPLEMENTED}) if rpc is None else rpc.allowed, payload)


# --- known edges, checked every time (the generated tests may or may not reach them) --------------


def _start(workflow: str = "runtime.noop", run_input: dict[str, Any] | None = None) -> Message:
    request = run_service_pb2.StartRunRequest(workflow=workflow)
    if run_input is not None:
        fill_struct(request.input, run_input)
    return request


def _report(seconds: int = NOW, nanos: int = 0, event_type: str = "run.started") -> Message:
    """A report by a worker about the run it has just claimed, with its session token."""
    request = worker_service_pb2.ReportRunEventsRequest(worker_id="fuzz-edge", session_token="@session")
    event = request.events.add(run_id="@run:own", attempt=1, event_id=str(ULID()), type=event_type)
    event.occurred_at.seconds, event.occurred_at.nanos = seconds, nanos
    return request


EDGES: dict[str, tuple[str, Any]] = {
    # The documented limit (20 levels) must be accepted, run and read back everywhere; past it, refused.
    "start: input objects nested 20 deep": ("StartRun", lambda: _start(run_input={"d": nest(19, "dict", 1.0)})),
    "start: input lists nested 20 deep": ("StartRun", lambda: _start(run_input={"d": nest(19, "list", 1.0)})),
    "start: input objects nested 21 deep": ("StartRun", lambda: _start(run_input={"d": nest(20, "dict", 1.0)})),
    "start: input objects nested 32 deep": ("StartRun", lambda: _start(run_input={"d": nest(32, "dict", 1.0)})),
    "start: input objects nested 33 deep": ("StartRun", lambda: _start(run_input={"d": nest(33, "dict", 1.0)})),
    "start: input lists nested 47 deep": ("StartRun", lambda: _start(run_input={"d": nest(47, "list", 1.0)})),
    "start: input lists nested 60 deep": ("StartRun", lambda: _start(run_input={"d": nest(60, "list", 1.0)})),
    "start: NaN in input": ("StartRun", lambda: _start(run_input={"x": math.nan})),
    "start: input over 256 KiB": ("StartRun", lambda: _start(run_input={"x": "y" * 300_000})),
    "start: 1100-character workflow": ("StartRun", lambda: _start(workflow="é" * 1100)),
    "report: occurred_at in year 10000": ("ReportRunEvents", lambda: _report(seconds=253402300800)),
    "report: occurred_at 2**62": ("ReportRunEvents", lambda: _report(seconds=2**62)),
    "report: occurred_at with negative nanos": ("ReportRunEvents", lambda: _report(nanos=-1)),
    "report: 2100-byte event type": ("ReportRunEvents", lambda: _report(event_type="€" * 700)),
    "get: 10 KB run id": ("GetRun", lambda: run_service_pb2.GetRunRequest(run_id="a" * 10_000)),
    "cancel: 10 KB run id": ("CancelRun", lambda: run_service_pb2.CancelRunRequest(run_id="a" * 10_000)),
    "watch: after_sequence 2**63-1": (
        "WatchRun", lambda: run_service_pb2.WatchRunRequest(run_id="@run:ok", after_sequence=2**63 - 1)
    ),
    "list: non-ASCII page token": ("ListRuns", lambda: run_service_pb2.ListRunsRequest(page_token="é" * 26)),
    "heartbeat: 10 KB worker id": ("Heartbeat", lambda: worker_service_pb2.HeartbeatRequest(worker_id="w" * 10_000)),
    "claim: 10 KB worker id": (
        "ClaimQueuedRuns", lambda: worker_service_pb2.ClaimQueuedRunsRequest(worker_id="w" * 10_000, once=True)
    ),
}
RAW_EDGES: dict[str, tuple[str, bytes]] = {
    "GetRun: one byte 0xff": ("GetRun", b"\xff"),
    "GetRun: run_id of invalid UTF-8": ("GetRun", record(1, b"\xc0\x80")),
    "StartRun: corrupt wire format": ("StartRun", b"\x08" + b"\xff" * 10 + b"\x01"),
    "StartRun: input nested 200 deep": ("StartRun", deep_record("StartRun", 200)),
    "GetStats: truncated field": ("GetStats", varint(1 << 3 | 2) + varint(5) + b"ab"),
    "ClaimQueuedRuns: worker_id of invalid UTF-8": ("ClaimQueuedRuns", record(1, b"\xff") + b"\x28\x01"),
}


@pytest.mark.parametrize("edge", list(EDGES))
def test_edge(stack: Stack, edge: str) -> None:
    name, build = EDGES[edge]
    answer = call(stack, name, build(), timeout=3.0 if name in ("WatchRun", "ClaimQueuedRuns") else 10.0)
    if name == "StartRun" and answer.code is C.OK:
        run_id = run_service_pb2.StartRunResponse.FromString(answer.bodies[0]).run.run_id
        call(stack, "GetRun", run_service_pb2.GetRunRequest(run_id=run_id))
        call(stack, "WatchRun", run_service_pb2.WatchRunRequest(run_id=run_id), timeout=3.0)


@pytest.mark.parametrize("edge", list(RAW_EDGES))
def test_raw_edge(stack: Stack, edge: str) -> None:
    name, payload = RAW_EDGES[edge]
    rpc = RPCS[name]
    check(stack, rpc, rpc.path, stack.invoke(rpc.path, payload, rpc.stream, 3.0), rpc.allowed, payload)


def _spec(*steps: dict[str, Any], name: str = "fuzz.edge", **extra: Any) -> Message:
    """A RegisterWorkflowRequest of steps given as plain dicts (args as JSON values, NaN and all)."""
    spec = workflow_service_pb2.WorkflowSpec(name=name, **extra)
    for plain in steps or ({"key": "a"},):
        plain = {"tool": "noop", **plain}
        args = plain.pop("args", None)
        step = spec.steps.add(**{k: v for k, v in plain.items() if k not in ("retry", "cache", "input")})
        step.input.update(plain.get("input", {}))
        if "retry" in plain:
            step.retry.CopyFrom(workflow_service_pb2.StepRetry(**plain["retry"]))
        if "cache" in plain:
            step.cache.CopyFrom(workflow_service_pb2.StepCache(**plain["cache"]))
        if args is not None:
            fill_struct(step.args, args)
    return register_request(spec)


def _chain(n: int) -> Message:
    return _spec(*({"key": f"s{i}", "depends_on": [f"s{i - 1}"] if i else []} for i in range(n)))


REGISTRY_EDGES: dict[str, Any] = {
    "NaN in args": lambda: _spec({"key": "a", "args": {"x": math.nan}}),
    "-Infinity deep in args": lambda: _spec({"key": "a", "args": {"x": [{"y": -math.inf}]}}),
    "-0 and 1e308 and 5e-324 in args": lambda: _spec({"key": "a", "args": {"x": [-0.0, 1e308, 5e-324, 2.0**53 + 2]}}),
    "args nested 20 deep": lambda: _spec({"key": "a", "args": {"d": nest(19, "dict", 1.0)}}),
    "args nested 30 deep": lambda: _spec({"key": "a", "args": {"d": nest(29, "dict", 1.0)}}),
    "args lists nested 45 deep": lambda: _spec({"key": "a", "args": {"d": nest(44, "list", 1.0)}}),
    "U+0000 in description": lambda: _spec(description="a\x00b"),
    "U+0000 in an args key": lambda: _spec({"key": "a", "args": {"k\x00": 1.0}}),
    "U+0000 in a selector": lambda: _spec({"key": "a", "input": {"x": "input.x || '\x00'"}}),
    "cache ttl 2**53": lambda: _spec({"key": "a", "cache": {"ttl_seconds": 2**53}}),
    "cache ttl 2**53 - 1": lambda: _spec({"key": "a", "cache": {"ttl_seconds": 2**53 - 1}}),
    "cache ttl 2**63 - 1": lambda: _spec({"key": "a", "cache": {"ttl_seconds": 2**63 - 1}}),
    "retry at its edges": lambda: _spec(
        {"key": "a", "retry": {"max_attempts": 100, "backoff_seconds": 86400, "backoff_max_seconds": 86400}}
    ),
    "timeout 5e-324": lambda: _spec({"key": "a", "timeout_seconds": 5e-324}),
    "256 steps": lambda: _chain(256),
    "257 steps": lambda: _chain(257),
    "a 1024-character selector": lambda: _spec({"key": "a", "input": {"x": "input" + ".a" * 509 + "b"}}),
    "a 100 KB selector": lambda: _spec({"key": "a", "input": {"x": "input" + ".a" * 50_000}}),
    "a selector nested 5000 deep": lambda: _spec({"key": "a", "input": {"x": deep_selector("parens", 5000)}}),
    "a spec of 1 MiB + 1": lambda: _spec(description="d" * (1024 * 1024 - 16)),
    "a 3 MB description": lambda: _spec(description="d" * 3_000_000),
    "a cycle of 200": lambda: _spec(*({"key": f"s{i}", "depends_on": [f"s{(i + 1) % 200}"]} for i in range(200))),
}


@pytest.mark.parametrize("edge", list(REGISTRY_EDGES))
def test_registry_edge(stack: Stack, edge: str) -> None:
    request = REGISTRY_EDGES[edge]()
    answer = call(stack, "RegisterWorkflow", request)
    if answer.code is C.OK:
        registered(stack, request, answer)
    else:
        assert [f for f, _ in field_violations(answer) if not f.startswith("spec")] == [], answer.details


# --- after the fuzzing: the service is still whole -----------------------------------------------


def test_api_still_serving(stack: Stack) -> None:
    assert stack.api.running, f"the API process exited:\n{stack.api.output()[-4000:]}"
    health = health_pb2_grpc.HealthStub(stack.channel)
    for service in ("", "runs.v1.RunService", "runs.v1.WorkerService", "runs.v1.OpsService", "runs.v1.WorkflowService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, f"health of {service!r}: {answer}"


def test_accepted_runs_reach_a_terminal_state(stack: Stack) -> None:
    assert stack.worker.running, f"the worker exited:\n{stack.worker.output()[-4000:]}"
    probe = stack.client.start("runtime.noop").run.run_id
    alone = [run_id for run_id, quick in stack.accepted.items() if quick] + [probe]
    slow = [run_id for run_id, quick in stack.accepted.items() if not quick]

    def unfinished(run_ids: list[str]) -> dict[str, str]:
        statuses = stack.statuses(run_ids)
        return {r: statuses.get(r, "MISSING") for r in run_ids if statuses.get(r) not in TERMINAL}

    def wait_ended(run_ids: list[str], timeout: float) -> dict[str, str]:
        left: dict[str, str] = {}

        def ended() -> bool:
            left.clear()
            left.update(unfinished(run_ids))
            return not left

        with contextlib.suppress(AssertionError):
            wait_until(ended, timeout, "accepted runs to end", interval=0.2)
        return left

    left = wait_ended(alone, 20)
    assert not left, f"{len(left)} of {len(alone)} accepted runs never ended by themselves: {_short(str(left), 2000)}"
    assert stack.statuses([probe]) == {probe: "SUCCEEDED"}, "a plain noop run started after the fuzzing must succeed"
    for run_id in unfinished(slow):
        answer = stack.invoke(
            RPCS["CancelRun"].path, run_service_pb2.CancelRunRequest(run_id=run_id).SerializeToString(), False, 10
        )
        assert answer.code in (C.OK, C.FAILED_PRECONDITION), f"CancelRun {run_id}: {answer.code} {answer.details}"
    left = wait_ended(slow, 15)
    assert not left, f"{len(left)} canceled runs never ended: {_short(str(left), 2000)}"
    assert stack.worker.running, f"the worker exited:\n{stack.worker.output()[-4000:]}"


def test_touched_runs_still_readable(stack: Stack) -> None:
    """Every run the fuzzing started or reported on reads back: its run, steps, calls and whole log."""
    statuses = stack.statuses(list(stack.accepted))
    for run_id in stack.accepted:
        call(stack, "GetRun", run_service_pb2.GetRunRequest(run_id=run_id))
        if statuses.get(run_id) in TERMINAL:  # a finished run's log streams to its end at once
            call(stack, "WatchRun", run_service_pb2.WatchRunRequest(run_id=run_id), timeout=5.0)
    call(stack, "ListRuns", run_service_pb2.ListRunsRequest(page_size=500))


def test_registered_workflows_still_readable(stack: Stack) -> None:
    """Every version the fuzzing registered reads back with its hash, and the listing pages through all."""
    for (name, version), spec_hash in stack.workflows.items():
        answer = call(stack, "GetWorkflow", workflow_service_pb2.GetWorkflowRequest(name=name, version=version))
        assert answer.code is C.OK, f"GetWorkflow {name!r} v{version}: {answer.code} {answer.details}"
        assert workflow_service_pb2.GetWorkflowResponse.FromString(answer.bodies[0]).workflow.spec_hash == spec_hash
    listed, token = set(), ""
    for _ in range(10_000):
        answer = call(stack, "ListWorkflows", workflow_service_pb2.ListWorkflowsRequest(page_size=7, page_token=token))
        assert answer.code is C.OK, f"ListWorkflows: {answer.code} {answer.details}"
        page = workflow_service_pb2.ListWorkflowsResponse.FromString(answer.bodies[0])
        listed |= {w.name for w in page.workflows}
        token = page.next_page_token
        if not token:
            break
    assert {name for name, _ in stack.workflows} <= listed, "a registered workflow is missing from ListWorkflows"


def test_no_traceback_in_the_logs(stack: Stack) -> None:
    for process in (stack.api, stack.worker):
        output = process.output()
        at = output.find("Traceback")
        assert at < 0, f"the {process.name} logged a traceback:\n{output[max(0, at - 600) : at + 2400]}"
