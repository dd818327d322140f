"""Artifacts: the content-addressed store, and the upload/fetch/download RPCs against a real API and PostgreSQL.

The store tests use real fsspec filesystems (a local folder, fsspec's in-memory one). The RPC tests
run a real API process on a fresh database with its store in a temporary folder: runs are started,
claimed and reported, and artifacts uploaded, fetched and downloaded, as a worker and a client would.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from ulid import ULID

from features.harness import Api, wait_until
from services.run_api import auth, db
from services.run_api.artifacts import (
    ArtifactMissing,
    ArtifactStore,
    ArtifactTooLarge,
    check_artifact_name,
    tenant_segment,
)
from services.run_api.errors import InvalidRequest, RunsError
from services.run_api.store.uow import UnitOfWork
from shared.gen.runs.v1 import (
    run_service_pb2,
    run_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)
from shared.settings import ApiSettings
from tests.test_security import violations

pytestmark = pytest.mark.timeout(60)

W = worker_service_pb2
R = run_service_pb2
Code = grpc.StatusCode
CHUNK = 256 * 1024


async def chunks_of(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


def leftovers(root: Path) -> list[Path]:
    """Temporary objects under a local store's root (none once every upload has ended)."""
    return [p for p in root.rglob("*") if p.is_file() and p.parent.name == "tmp"]


# --- the store ---------------------------------------------------------------------------------


async def test_put_exists_read_round_trip(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    data = os.urandom(700_000)
    sha256, size, uri = await store.put("default", chunks_of(data, 65_536), max_bytes=1_000_000)
    assert (sha256, size) == (hashlib.sha256(data).hexdigest(), len(data))
    where = tmp_path / "default" / "sha256" / sha256[:2] / sha256
    assert where.read_bytes() == data
    assert uri == f"file://{where}"
    assert await store.exists("default", sha256)
    parts = [c async for c in store.read("default", sha256, CHUNK)]
    assert [len(p) for p in parts] == [CHUNK, CHUNK, len(data) - 2 * CHUNK]
    assert b"".join(parts) == data
    assert leftovers(tmp_path) == []


async def test_an_empty_artifact_is_stored_too(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    sha256, size, _ = await store.put("default", chunks_of(b""), max_bytes=10)
    assert (sha256, size) == (hashlib.sha256(b"").hexdigest(), 0)
    assert await collect(store.read("default", sha256, CHUNK)) == b""


async def test_put_refuses_over_max_bytes_and_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    exact = b"x" * 4096
    sha256, size, _ = await store.put("default", chunks_of(exact), max_bytes=4096)  # the limit itself is fine
    assert size == 4096
    with pytest.raises(ArtifactTooLarge) as caught:
        await store.put("default", chunks_of(exact + b"y"), max_bytes=4096)
    assert caught.value.code is Code.RESOURCE_EXHAUSTED
    assert [field for field, _ in caught.value.violations] == ["chunk"]
    assert "4096" in caught.value.message
    assert not await store.exists("default", hashlib.sha256(exact + b"y").hexdigest())
    assert leftovers(tmp_path) == []
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [sha256]


async def test_put_is_idempotent(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    data = b"same bytes"
    first = await store.put("default", chunks_of(data, 3), max_bytes=100)
    second = await store.put("default", chunks_of(data, 7), max_bytes=100)
    both = await asyncio.gather(*(store.put("default", chunks_of(data), max_bytes=100) for _ in range(5)))
    assert {first, second, *both} == {first}
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [first[0]]


async def test_tenants_are_separate_and_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ArtifactStore(str(root))
    data = b"shared content"
    a = await store.put("a", chunks_of(data), max_bytes=100)
    b = await store.put("b", chunks_of(data), max_bytes=100)
    assert a[0] == b[0] and a[2] != b[2]
    assert await store.exists("a", a[0]) and await store.exists("b", a[0])
    assert not await store.exists("c", a[0])
    with pytest.raises(ArtifactMissing):
        await collect(store.read("c", a[0], CHUNK))
    # Tenant ids are free text: none reaches outside its own folder, and distinct ones never meet.
    hostile = ["..", ".", "../a", "a/b", "a/../../x", "a%2Fb", "é", "a b"]
    segments = {tenant_segment(t) for t in [*hostile, "a", "b"]}
    assert len(segments) == len(hostile) + 2
    assert all("/" not in s and s not in (".", "..") and not s.startswith(".") for s in segments)
    for tenant in hostile:
        sha256, _, _ = await store.put(tenant, chunks_of(data), max_bytes=100)
        path = Path(store.path(tenant, sha256)).resolve()
        assert path.is_relative_to(root.resolve()) and path.parent.parent.parent.parent == root.resolve()
    assert not (tmp_path / "x").exists()


async def test_a_failing_or_cancelled_upload_leaves_no_temporary_object(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))

    async def broken() -> AsyncIterator[bytes]:
        yield b"part one"
        raise ConnectionResetError("the client went away")

    with pytest.raises(ConnectionResetError):
        await store.put("default", broken(), max_bytes=100)
    assert leftovers(tmp_path) == []

    started, never = asyncio.Event(), asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"part one"
        started.set()
        await never.wait()
        yield b"never sent"

    task = asyncio.create_task(store.put("default", stalled(), max_bytes=100))
    await asyncio.wait_for(started.wait(), 10)
    assert len(leftovers(tmp_path)) == 1  # the upload in flight
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(tmp_path) == []
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


async def test_reading_a_missing_object_is_not_found(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(ArtifactMissing) as caught:
        await collect(store.read("default", "0" * 64, CHUNK))
    assert caught.value.code is Code.NOT_FOUND
    with pytest.raises(InvalidRequest):
        store.path("default", "not-a-digest")


async def test_any_fsspec_url_is_a_store() -> None:
    root = f"memory:///runs-test-{ULID()}"
    store = ArtifactStore(root)
    data = b"in memory"
    sha256, _, uri = await store.put("t1", chunks_of(data, 2), max_bytes=100)
    assert uri == f"{root}/t1/sha256/{sha256[:2]}/{sha256}"
    assert await store.exists("t1", sha256) and not await store.exists("t2", sha256)
    assert await collect(store.read("t1", sha256, 4)) == data
    assert not [p for p in store.fs.find(root) if "/tmp/" in p]
    store.fs.rm(root, recursive=True)


def test_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    default = ArtifactStore.from_settings(ApiSettings(data_dir=".runs"))
    assert default.root == str(tmp_path / ".runs" / "artifacts")  # absolute, though the data dir is relative
    assert default.uri("default", "a" * 64).startswith(f"file://{tmp_path}/.runs/artifacts/default/sha256/aa/")
    named = ArtifactStore.from_settings(ApiSettings.from_env({"RUNS_ARTIFACTS_URL": f"file://{tmp_path}/elsewhere"}))
    assert named.root == str(tmp_path / "elsewhere")


@pytest.mark.parametrize("name", ["a", "report.txt", "site/index.html", "a-b_c.d/e.f/g", "x" * 255, ".hidden", "..a"])
def test_artifact_names_accepted(name: str) -> None:
    check_artifact_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "/abs", "a/", "a//b", "./a", "a/./b", "..", "a/../b", "a b", "a\\b", "é", "a\x00", "x" * 256, "a:b", "~"],
)
def test_artifact_names_refused_naming_the_field(name: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_artifact_name(name, "header.name")
    assert [field for field, _ in caught.value.violations] == ["header.name"]


# --- the RPCs, against a real API process and PostgreSQL ---------------------------------------

MAX_BYTES = 1_000_000
ADMIN_KEY = f"test-admin-{secrets.token_urlsafe(24)}"


@dataclass
class Held:
    """A run a worker claimed: what its artifact calls must carry."""

    run_id: str
    attempt: int
    worker_id: str
    token: str


class Stack:
    """A real API process, its artifact store's folder, and keys made on its database (auth required)."""

    def __init__(self, api: Api, root: Path, engine: Any, auth_mode: str) -> None:
        self.api, self.root, self.engine, self.auth_mode = api, root, engine, auth_mode
        self.channel = grpc.aio.insecure_channel(api.addr)
        self.keys: dict[tuple[str, str], str] = {}
        self.sessions: dict[tuple[str, str], str] = {}  # (worker instance, tenant) -> its session token

    async def close(self) -> None:
        await self.channel.close()

    async def key(self, role: str, tenant: str = "default") -> tuple[tuple[str, str], ...]:
        """Call metadata with a key of `role` in `tenant` (none when auth is off)."""
        if self.auth_mode == "off":
            return ()
        if (role, tenant) not in self.keys:
            async with UnitOfWork(self.engine) as uow:  # as `python -m services.run_api keys create` does
                _, secret = await auth.create_key(
                    uow, auth.CreateKey(role=role, tenant_id=tenant), auth.Caller.anonymous(), datetime.now(UTC)
                )
            self.keys[(role, tenant)] = secret
        return (("authorization", f"Bearer {self.keys[(role, tenant)]}"),)

    def worker(self) -> worker_service_pb2_grpc.WorkerServiceStub:
        return worker_service_pb2_grpc.WorkerServiceStub(self.channel)

    def artifacts(self) -> worker_service_pb2_grpc.WorkerServiceStub:
        return worker_service_pb2_grpc.WorkerServiceStub(self.channel)

    def downloads(self) -> run_service_pb2_grpc.RunServiceStub:
        return run_service_pb2_grpc.RunServiceStub(self.channel)

    async def held_run(self, worker: str = "w1", tenant: str = "default") -> Held:
        """Start a runtime.noop run in a fresh workspace and claim it as `worker` (its session opens)."""
        workspace = f"ws-{str(ULID()).lower()}"
        client = run_service_pb2_grpc.RunServiceStub(self.channel)
        started = await client.StartRun(
            R.StartRunRequest(workflow="runtime.noop", workspace_id=workspace),
            metadata=await self.key("client", tenant), timeout=10,
        )
        claim = W.ClaimQueuedRunsRequest(worker_id=worker, workspace_id=workspace, capacity=10, once=True,
                                         session_token=self.sessions.get((worker, tenant), ""))
        messages = [m async for m in self.worker().ClaimQueuedRuns(
            claim, metadata=await self.key("worker", tenant), timeout=10
        )]
        (run,) = [r for m in messages for r in m.runs]
        assert run.run_id == started.run.run_id
        self.sessions[(worker, tenant)] = messages[0].session_token
        return Held(run.run_id, run.attempt, messages[0].worker_id, messages[0].session_token)

    async def report(
        self, held: Held, instance: str, *events: tuple[str, dict[str, Any]], tenant: str = "default"
    ) -> Any:
        request = W.ReportRunEventsRequest(worker_id=instance, session_token=held.token)
        for type_, payload in events:
            event = request.events.add(run_id=held.run_id, attempt=held.attempt, event_id=str(ULID()), type=type_)
            event.payload.update(payload)
        response = await self.worker().ReportRunEvents(request, metadata=await self.key("worker", tenant), timeout=10)
        assert [r.outcome for r in response.results] == [W.REPORT_OUTCOME_RECORDED] * len(events), response
        return response

    async def upload(
        self, held: Held, instance: str, name: str, data: bytes, media_type: str = "", step_key: str = "runtime",
        tenant: str = "default", role: str = "worker", **header: Any,
    ) -> Any:
        fields = dict(worker_id=instance, session_token=held.token, run_id=held.run_id, attempt=held.attempt,
                      step_key=step_key, name=name, media_type=media_type)
        fields.update(header)

        def requests() -> Iterator[W.UploadArtifactRequest]:
            yield W.UploadArtifactRequest(header=W.ArtifactHeader(**fields))
            for i in range(0, len(data), CHUNK):
                yield W.UploadArtifactRequest(chunk=data[i : i + CHUNK])

        response = await self.artifacts().UploadArtifact(requests(), metadata=await self.key(role, tenant), timeout=20)
        return response.artifact

    async def fetch(self, held: Held, instance: str, sha256: str, tenant: str = "default") -> bytes:
        request = W.FetchArtifactRequest(worker_id=instance, session_token=held.token, run_id=held.run_id,
                                         attempt=held.attempt, sha256=sha256)
        call = self.artifacts().FetchArtifact(request, metadata=await self.key("worker", tenant), timeout=20)
        return b"".join([m.chunk async for m in call])

    async def download(self, run_id: str, step_key: str, name: str, tenant: str = "default",
                       role: str = "client") -> tuple[Any, list[bytes]]:
        request = R.DownloadArtifactRequest(run_id=run_id, step_key=step_key, name=name)
        call = self.downloads().DownloadArtifact(request, metadata=await self.key(role, tenant), timeout=20)
        messages = [m async for m in call]
        assert messages and messages[0].HasField("artifact") and not messages[0].chunk
        assert all(not m.HasField("artifact") for m in messages[1:])
        return messages[0].artifact, [m.chunk for m in messages[1:]]

    async def succeed(self, held: Held, instance: str, *artifacts: Any, tenant: str = "default") -> None:
        """Report the run's one step succeeded with `artifacts` (the projection records them), and the run done."""
        recorded = [{"name": a.name, "uri": a.uri, "sha256": a.sha256, "size": a.size, "media_type": a.media_type}
                    for a in artifacts]
        await self.report(
            held, instance,
            ("run.started", {}),
            ("step.created", {"step_key": "runtime", "tool": "noop", "depends_on": []}),
            ("step.started", {"step_key": "runtime", "try": 1}),
            ("step.succeeded", {"step_key": "runtime", "output": {}, "artifacts": recorded, "try": 1}),
            tenant=tenant,
        )


def _stop(api: Api) -> None:
    """Stop the API; its log's tail is printed (pytest shows it when the test failed)."""
    api.stop()
    print(f"--- api ---\n{api.output()[-6000:]}")
    api.log_path.unlink(missing_ok=True)


async def _stack(database_url: str, tmp_path: Path, auth_mode: str) -> AsyncIterator[Stack]:
    root = tmp_path / "artifacts"
    env = {"RUNS_ARTIFACTS_URL": str(root), "RUNS_ARTIFACT_MAX_BYTES": str(MAX_BYTES)}
    if auth_mode == "required":
        env.update(RUNS_AUTH="required", RUNS_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY, RUNS_AUTH_CACHE_SECONDS="0.2")
    api = Api(database_url, **env)
    await asyncio.to_thread(api.start)
    engine = db.make_engine(database_url, pool_size=2)
    stack = Stack(api, root, engine, auth_mode)
    try:
        yield stack
    finally:
        await stack.close()
        await engine.dispose()
        await asyncio.to_thread(_stop, api)


@pytest.fixture
async def stack(database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async for s in _stack(database_url, tmp_path, "off"):
        yield s


@pytest.fixture
async def auth_stack(database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async for s in _stack(database_url, tmp_path, "required"):
        yield s


async def refused(code: grpc.StatusCode, call: Any) -> grpc.aio.AioRpcError:
    """Await `call()` (a coroutine factory), which must fail with `code`; returns the error."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call()
    err = caught.value
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    return err


async def test_upload_record_fetch_and_download(stack: Stack) -> None:
    held = await stack.held_run("w1")
    page = b"<html>" + os.urandom(600_000) + b"</html>"
    stored = await stack.upload(held, "w1", "site/index.html", page)
    sha256 = hashlib.sha256(page).hexdigest()
    assert (stored.run_id, stored.step_key, stored.name) == (held.run_id, "runtime", "site/index.html")
    assert (stored.sha256, stored.size, stored.media_type) == (sha256, len(page), "text/html")
    where = stack.root / "default" / "sha256" / sha256[:2] / sha256
    assert stored.uri == f"file://{where}" and where.read_bytes() == page
    blob = await stack.upload(held, "w1", "data", b"\x00\x01", media_type="application/x-thing")
    plain = await stack.upload(held, "w1", "notes", b"no extension")
    assert (blob.media_type, plain.media_type) == ("application/x-thing", "application/octet-stream")

    # Until step.succeeded records them, they are no artifacts of the run.
    await refused(Code.NOT_FOUND, lambda: stack.fetch(held, "w1", sha256))
    await refused(Code.NOT_FOUND, lambda: stack.download(held.run_id, "runtime", "site/index.html"))
    await stack.succeed(held, "w1", stored, blob, plain)

    assert await stack.fetch(held, "w1", sha256) == page
    artifact, chunks = await stack.download(held.run_id, "runtime", "site/index.html")
    assert b"".join(chunks) == page and max(map(len, chunks)) == CHUNK
    assert (artifact.sha256, artifact.size, artifact.uri, artifact.media_type) == (
        sha256, len(page), stored.uri, "text/html"
    )
    assert artifact.HasField("created_at")
    _, chunks = await stack.download(held.run_id, "runtime", "data")
    assert chunks == [b"\x00\x01"]

    # Not found: another name, another step, another run, a digest the run never recorded.
    err = await refused(Code.NOT_FOUND, lambda: stack.download(held.run_id, "runtime", "site/other.html"))
    assert "site/other.html" in (err.details() or "")
    await refused(Code.NOT_FOUND, lambda: stack.download(held.run_id, "other", "data"))
    await refused(Code.NOT_FOUND, lambda: stack.download(str(ULID()), "runtime", "data"))
    other = await stack.held_run("w1")
    await refused(Code.NOT_FOUND, lambda: stack.fetch(other, "w1", sha256))  # bytes of another run
    await refused(Code.NOT_FOUND, lambda: stack.fetch(held, "w1", hashlib.sha256(b"never").hexdigest()))
    assert leftovers(stack.root) == []


async def test_upload_refusals_name_their_field(stack: Stack) -> None:
    held = await stack.held_run("w1")
    upload = stack.artifacts().UploadArtifact
    header = W.ArtifactHeader(worker_id="w1", session_token=held.token, run_id=held.run_id, attempt=held.attempt,
                              step_key="runtime", name="a.txt")

    async def send(*messages: W.UploadArtifactRequest) -> Any:
        return await upload(iter(messages), timeout=10)

    for messages in ([], [W.UploadArtifactRequest(chunk=b"data first")],
                     [W.UploadArtifactRequest(header=header), W.UploadArtifactRequest(header=header)]):
        err = await refused(Code.INVALID_ARGUMENT, lambda m=messages: send(*m))
        assert violations(err) == ["header"], messages
    for name in ("../escape", "/etc/passwd", "a//b", "a/./b", ""):
        err = await refused(Code.INVALID_ARGUMENT, lambda n=name: stack.upload(held, "w1", n, b"x"))
        assert violations(err) == ["header.name"], name
    cases = {
        "header.run_id": {"run_id": ""},
        "header.attempt": {"attempt": 0},
        "header.step_key": {"step_key": ""},
        "header.worker_id": {"worker_id": ""},
        "header.media_type": {"media_type": "not a type"},
    }
    for field, change in cases.items():
        err = await refused(Code.INVALID_ARGUMENT, lambda c=change: stack.upload(held, "w1", "a", b"x", **c))
        assert violations(err) == [field], field
    err = await refused(Code.RESOURCE_EXHAUSTED, lambda: stack.upload(held, "w1", "big.bin", b"z" * (MAX_BYTES + 1)))
    assert violations(err) == ["chunk"]
    assert str(MAX_BYTES) in (err.details() or "")
    assert (await stack.upload(held, "w1", "exact.bin", b"z" * MAX_BYTES)).size == MAX_BYTES
    assert leftovers(stack.root) == []
    assert not (stack.root / "default" / "sha256" / hashlib.sha256(b"z" * (MAX_BYTES + 1)).hexdigest()[:2]).exists()


async def test_only_the_holder_of_the_attempt_moves_artifacts(stack: Stack) -> None:
    held = await stack.held_run("w1")
    stored = await stack.upload(held, "w1", "out.txt", b"mine")
    await stack.succeed(held, "w1", stored)
    # Another worker (its own live session) never held the run: PERMISSION_DENIED, for a missing run too.
    intruder = await stack.held_run("w2")
    as_w2 = Held(held.run_id, held.attempt, intruder.worker_id, intruder.token)
    await refused(Code.PERMISSION_DENIED, lambda: stack.upload(as_w2, "w2", "x.txt", b"forged"))
    await refused(Code.PERMISSION_DENIED, lambda: stack.fetch(as_w2, "w2", stored.sha256))
    await refused(Code.PERMISSION_DENIED, lambda: stack.fetch(Held(str(ULID()), 1, "", intruder.token), "w2",
                                                             stored.sha256))
    # The holder with a wrong session token, or an attempt it never claimed.
    await refused(Code.PERMISSION_DENIED, lambda: stack.upload(Held(held.run_id, held.attempt, "", "wrong"), "w1",
                                                              "x.txt", b"x"))
    await refused(Code.PERMISSION_DENIED, lambda: stack.upload(Held(held.run_id, 7, "", held.token), "w1", "x", b"x"))
    # The holder's attempt once the run has ended: stale, FAILED_PRECONDITION.
    assert await stack.fetch(held, "w1", stored.sha256) == b"mine"
    await stack.report(held, "w1", ("run.completed", {"output": {}}))
    err = await refused(Code.FAILED_PRECONDITION, lambda: stack.upload(held, "w1", "late.txt", b"late"))
    assert "stale" in (err.details() or "")
    await refused(Code.FAILED_PRECONDITION, lambda: stack.fetch(held, "w1", stored.sha256))
    # The client still downloads it.
    _, chunks = await stack.download(held.run_id, "runtime", "out.txt")
    assert chunks == [b"mine"]


async def test_garbage_inside_an_upload_is_invalid_argument(stack: Stack) -> None:
    held = await stack.held_run("w1")
    header = W.UploadArtifactRequest(header=W.ArtifactHeader(
        worker_id="w1", session_token=held.token, run_id=held.run_id, attempt=held.attempt, step_key="runtime",
        name="a.txt",
    )).SerializeToString()
    upload = stack.channel.stream_unary("/runs.v1.WorkerService/UploadArtifact", None, None)
    for garbage in (b"\xff\xff\xff", b"\x12\x05ab"):  # no such wire type; a chunk cut short
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await upload(iter([header, garbage]), timeout=10)
        assert caught.value.code() == Code.INVALID_ARGUMENT
        assert "not a valid UploadArtifactRequest message" in (caught.value.details() or "")
        assert violations(caught.value) == ["request"]
    # The status is sent as the call aborts; the handler removes its temporary object right after.
    await asyncio.to_thread(wait_until, lambda: leftovers(stack.root) == [], 10, "the temporary objects removed")


async def test_an_abandoned_upload_leaves_nothing_behind(stack: Stack) -> None:
    held = await stack.held_run("w1")
    sent = asyncio.Event()
    never = asyncio.Event()

    async def requests() -> AsyncIterator[W.UploadArtifactRequest]:
        yield W.UploadArtifactRequest(header=W.ArtifactHeader(
            worker_id="w1", session_token=held.token, run_id=held.run_id, attempt=held.attempt,
            step_key="runtime", name="partial.bin",
        ))
        yield W.UploadArtifactRequest(chunk=b"first part")
        sent.set()
        await never.wait()

    call = stack.artifacts().UploadArtifact(requests(), timeout=30)
    await asyncio.wait_for(sent.wait(), 10)
    await asyncio.to_thread(wait_until, lambda: len(leftovers(stack.root)) == 1, 10, "the upload in flight")
    call.cancel()
    await asyncio.to_thread(wait_until, lambda: leftovers(stack.root) == [], 10, "the temporary object removed")


async def test_roles_and_tenants(auth_stack: Stack) -> None:
    s = auth_stack
    held = await s.held_run("w1")
    stored = await s.upload(held, "w1", "a.txt", b"tenant default")
    await s.succeed(held, "w1", stored)
    # Roles: a client key cannot upload (refused before any message is read); a worker key cannot download.
    await refused(Code.PERMISSION_DENIED, lambda: s.upload(held, "w1", "b.txt", b"x", role="client"))
    await refused(Code.PERMISSION_DENIED, lambda: s.download(held.run_id, "runtime", "a.txt", role="worker"))
    await refused(Code.UNAUTHENTICATED, lambda: s.artifacts().UploadArtifact(iter([]), timeout=10))
    _, chunks = await s.download(held.run_id, "runtime", "a.txt", role="admin")
    assert chunks == [b"tenant default"]
    # Tenants: tenant b's client does not see tenant default's run; its own artifacts live under its prefix.
    await refused(Code.NOT_FOUND, lambda: s.download(held.run_id, "runtime", "a.txt", tenant="b"))
    theirs = await s.held_run("w1", tenant="b")
    stored_b = await s.upload(theirs, "w1", "a.txt", b"tenant default", tenant="b")
    assert stored_b.sha256 == stored.sha256 and stored_b.uri != stored.uri
    assert stored_b.uri == f"file://{s.root}/b/sha256/{stored.sha256[:2]}/{stored.sha256}"
    # Tenant b's worker ("w1" under its own key) cannot fetch tenant default's run.
    as_b = Held(held.run_id, held.attempt, theirs.worker_id, theirs.token)
    await refused(Code.PERMISSION_DENIED, lambda: s.fetch(as_b, "w1", stored.sha256, tenant="b"))
    await s.succeed(theirs, "w1", stored_b, tenant="b")
    assert await s.fetch(theirs, "w1", stored.sha256, tenant="b") == b"tenant default"
    _, chunks = await s.download(theirs.run_id, "runtime", "a.txt", tenant="b")
    assert chunks == [b"tenant default"]


def test_domain_errors_of_the_store_are_runs_errors() -> None:
    assert issubclass(ArtifactTooLarge, RunsError) and issubclass(ArtifactMissing, RunsError)
