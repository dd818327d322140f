"""runs_client (Client and AsyncClient) against a real API process and a real worker.

No test sleeps to wait: waits are the client's own (WatchRun) or conditions polled against a deadline.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from features.harness import ROOT, Api, Worker, running, wait_until
from runs_client import (
    AlreadyExists,
    AsyncClient,
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Retry,
    RunStatus,
    RunTimeout,
    StartRun,
    StepStatus,
    Unauthenticated,
    Unavailable,
)
from shared.settings import ClientTls
from tests.test_tls import Pki, TlsApi, pki  # pki: the module-scoped certificates fixture

pytestmark = pytest.mark.timeout(90)

WORKER_ENV = dict(RUN_WORKER_POLL_MS="100", RUN_WORKER_TOOLS="noop,echo,sleep,fail")

def readme_example() -> str:
    """The first ```python block of the README's "## Python client" section."""
    text = (Path(ROOT) / "README.md").read_text().split("\n## Python client\n", 1)[1]
    return text.split("```python\n", 1)[1].split("```", 1)[0]


PIPELINE = {
    "name": "client.pipeline",
    "description": "two echo steps for the client tests",
    "steps": [
        {"key": "first", "tool": "echo", "input": {"n": "input.n"}},
        {"key": "second", "tool": "echo", "depends_on": ["first"], "input": {"from_first": "steps.first.output"}},
    ],
    "change_requests": {"redo_second": ["second"]},
}


def own_ports() -> dict[str, int]:
    """gRPC and HTTP ports from the kernel's ephemeral range for an Api.

    features.harness.free_port hands each xdist worker a fixed block, which a second pytest session on
    the same machine walks in the same order: its API could take our port while ours restarts in place
    (then our client talks to its API). An ephemeral port is not handed out again while free soon after.
    """
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
    return {"port": ports[0], "http_port": ports[1]}


@pytest.fixture(scope="module")
def stack(make_database: Callable[[], contextlib.AbstractContextManager[str]]) -> Iterator[Api]:
    """One API and one worker for the module's read-mostly tests."""
    with make_database() as url:
        api = Api(url, **own_ports())
        with running(api, Worker(api.addr, **WORKER_ENV)):
            yield api


@pytest.fixture
def client(stack: Api) -> Iterator[Client]:
    with Client(stack.addr, key="", tls_ca=None) as c:
        yield c


def test_start_get_wait_and_typed_results(client: Client) -> None:
    run = client.start_run("runtime.tool", {"tool": "echo", "args": {"n": 3, "word": "hi"}})
    assert run.status is RunStatus.QUEUED and run.run_id and run.workflow == "runtime.tool"
    assert run.input == {"tool": "echo", "args": {"n": 3, "word": "hi"}}  # whole numbers stay ints
    assert run.proto.run_id == run.run_id and run.created_at is not None and run.created_at.tzinfo is not None
    done = client.wait(run.run_id, timeout=30)
    assert done.status == "SUCCEEDED" and done.done and done.finished_at is not None
    assert done.output == {"runtime": {"n": 3, "word": "hi"}}
    step = done.step("runtime")
    assert step.status is StepStatus.SUCCEEDED and step.output == {"n": 3, "word": "hi"}
    assert [a.outcome for a in done.attempts] == ["completed"]
    assert client.get_run(run.run_id) == done  # equal as data; .proto is left out of equality
    # an idempotency key makes start_run retryable and returns the same run again
    key = f"client-{secrets.token_hex(4)}"
    first = client.start_run("runtime.noop", idempotency_key=key, max_attempts=2)
    again = client.start_run("runtime.noop", idempotency_key=key, max_attempts=2)
    assert again.run_id == first.run_id and again.deduplicated and not first.deduplicated
    assert first.max_attempts == 2
    with pytest.raises(TypeError, match="no_such_option"):
        client.start_run("runtime.noop", no_such_option=1)


def test_start_runs_and_list_runs_page_through_everything(client: Client) -> None:
    tag = secrets.token_hex(4)
    started = client.start_runs(
        [{"workflow": "runtime.noop", "input": {"i": i, "tag": tag}} for i in range(4)]
        + [StartRun(workflow="runtime.noop", input={"i": 4, "tag": tag}, idempotency_key=f"list-{tag}")]
    )
    assert len(started) == 5 and all(r.status is RunStatus.QUEUED for r in started)
    for run in started:
        assert client.wait(run.run_id, timeout=30).status is RunStatus.SUCCEEDED
    ids = {r.run_id for r in started}
    listed = [r for r in client.list_runs(workflow="runtime.noop", page_size=2) if r.input.get("tag") == tag]
    assert {r.run_id for r in listed} == ids and len(listed) == 5
    by_status = {r.run_id for r in client.list_runs(status="SUCCEEDED", page_size=3)}
    assert ids <= by_status
    assert not ids & {r.run_id for r in client.list_runs(status=RunStatus.FAILED, page_size=3)}


def test_cancel_a_sleeping_run_and_wait_times_out(client: Client) -> None:
    run = client.start_run("runtime.tool", {"tool": "sleep", "args": {"seconds": 30}})
    for event in client.watch(run.run_id, timeout=30):
        if event.type == "tool.invoked":
            break
    with pytest.raises(RunTimeout) as timed_out:
        client.wait(run.run_id, timeout=0.3)
    assert timed_out.value.run_id == run.run_id and timed_out.value.status_code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.cancel(run.run_id, reason="client test").run_id == run.run_id
    ended = client.wait(run.run_id, timeout=30)
    assert ended.status is RunStatus.CANCELED and ended.cancel_reason == "client test"
    assert client.cancel(run.run_id).status is RunStatus.CANCELED  # cancel is idempotent: safe to retry


def test_watch_yields_every_event_in_order(client: Client) -> None:
    run = client.start_run("runtime.noop")
    events = list(client.watch(run.run_id, timeout=30))
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "run.queued" and events[-1].type == "run.completed" and events[-1].terminal
    later = list(client.watch(run.run_id, after_sequence=2, timeout=30))
    assert [e.sequence for e in later] == [e.sequence for e in events[2:]]


def test_errors_map_to_exceptions_with_field_violations(client: Client) -> None:
    with pytest.raises(InvalidArgument) as bad:
        client.start_run("no.such.workflow")
    assert bad.value.status_code is grpc.StatusCode.INVALID_ARGUMENT and "workflow" in bad.value.fields
    with pytest.raises(InvalidArgument) as many:
        client.start_runs([{"workflow": "runtime.noop"}, {"workflow": "no.such.workflow"}])
    assert "requests[1].workflow" in many.value.fields
    with pytest.raises(NotFound):
        client.get_run("01J00000000000000000000000")
    finished = client.wait(client.start_run("runtime.noop").run_id, timeout=30)
    with pytest.raises(FailedPrecondition):
        client.cancel(finished.run_id)
    key = f"conflict-{secrets.token_hex(4)}"
    client.start_run("runtime.noop", idempotency_key=key)
    with pytest.raises(AlreadyExists):
        client.start_run("runtime.noop", {"different": True}, idempotency_key=key)
    with pytest.raises(InvalidArgument) as spec:  # validated locally, every violation listed
        client.register_workflow({"name": "broken", "steps": [{"key": "a"}]})
    assert any(field.startswith("steps[0]") for field in spec.value.fields)
    with pytest.raises(InvalidArgument) as status:
        next(client.list_runs(status="SLEEPING"))
    assert status.value.fields == ["status"]
    with pytest.raises(InvalidArgument) as not_json:  # refused before anything is sent
        client.start_run("runtime.noop", {"when": object()})
    assert not_json.value.fields == ["input"]


def test_register_rebuild_and_explain(client: Client, tmp_path: Path) -> None:
    workflow = client.register_workflow(PIPELINE)
    assert workflow.name == "client.pipeline" and workflow.version >= 1
    assert workflow.spec["change_requests"] == {"redo_second": ["second"]}
    spec_file = tmp_path / "pipeline.yaml"
    spec_file.write_text(
        "name: client.pipeline\ndescription: two echo steps for the client tests\nsteps:\n"
        "  - key: first\n    tool: echo\n    input:\n      n: input.n\n"
        "  - key: second\n    tool: echo\n    depends_on: [first]\n    input:\n      from_first: steps.first.output\n"
        "change_requests:\n  redo_second: [second]\n"
    )
    same = client.register_workflow(spec_file)
    assert same.version == workflow.version and not same.created
    base = client.wait(client.start_run("client.pipeline", {"n": 7}).run_id, timeout=30)
    assert base.status is RunStatus.SUCCEEDED and base.step("second").output == {"from_first": {"n": 7}}
    plan = client.rebuild(base.run_id, change="redo_second", dry_run=True)
    assert plan.run is None and {(p.step_key, p.action) for p in plan.plan} == {("first", "reuse"), ("second", "rerun")}
    rebuilt = client.rebuild(base.run_id, steps=["second"])
    assert rebuilt.run is not None and rebuilt.run.base_run_id == base.run_id
    assert client.wait(rebuilt.run.run_id, timeout=30).status is RunStatus.SUCCEEDED
    explained = {e.step_key: e for e in client.explain(rebuilt.run.run_id)}
    assert explained["first"].decision == "reused_from_base" and explained["second"].decision == "executed"
    assert [e.step_key for e in client.explain(base.run_id, "first")] == ["first"]


def test_the_readme_example_runs(stack: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    example = readme_example()
    assert len(example.strip().splitlines()) <= 10  # the issue asks for a ten-line example
    monkeypatch.setenv("RUN_API_ADDR", stack.addr)
    monkeypatch.delenv("RUNS_API_KEY", raising=False)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example, "README example", "exec"), {})
    text = printed.getvalue()
    assert "QUEUED" in text and "run.completed" in text and "SUCCEEDED {'runtime': {'greeting': 'hello'}}" in text
    assert text.splitlines()[-1].startswith("succeeded at ")  # explain_run's one-line summary of the ending


async def test_async_client_basic_flow(stack: Api) -> None:
    async with AsyncClient(stack.addr, key="") as client:
        run = await client.start_run("runtime.tool", {"tool": "echo", "args": {"n": 1}})
        events = [e async for e in client.watch(run.run_id, timeout=30)]
        assert events[-1].type == "run.completed"
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        done = await client.wait(run.run_id, timeout=30)
        assert done.status is RunStatus.SUCCEEDED and done.output == {"runtime": {"n": 1}}
        assert run.run_id in {r.run_id async for r in client.list_runs(workflow="runtime.tool", page_size=1)}
        runs = await client.start_runs([{"workflow": "runtime.noop"}, StartRun("runtime.noop")])
        assert len(runs) == 2
        with pytest.raises(InvalidArgument) as bad:
            await client.start_run("no.such.workflow")
        assert "workflow" in bad.value.fields
        with pytest.raises(NotFound):
            await client.get_run("01J00000000000000000000000")
        sleeper = await client.start_run("runtime.tool", {"tool": "sleep", "args": {"seconds": 30}})
        with pytest.raises(RunTimeout):
            await client.wait(sleeper.run_id, timeout=0.3)
        await client.cancel(sleeper.run_id)
        assert (await client.wait(sleeper.run_id, timeout=30)).status is RunStatus.CANCELED
        workflow = await client.register_workflow(PIPELINE)
        assert workflow.name == "client.pipeline"


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_watch_resumes_when_the_api_restarts_mid_watch(database_url: str, how: str) -> None:
    api = Api(database_url, **own_ports())
    api.start()
    worker: Worker | None = None
    try:
        with Client(api.addr, key="", retry=Retry(attempts=30, backoff_seconds=0.1, backoff_max_seconds=1.0)) as c:
            run = c.start_run("runtime.tool", {"tool": "echo", "args": {}})  # no worker yet: it stays queued
            stream = c.watch(run.run_id, timeout=60)
            first = next(stream)
            assert first.sequence == 1 and first.type == "run.queued"
            if how == "sigterm":
                assert api.stop() == 0  # a graceful stop ends the watch with UNAVAILABLE (shutting down)
            else:
                api.kill()  # the connection just drops
            # a unary call made while the API is down succeeds once it is back (retried on UNAVAILABLE)
            calling = threading.Event()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                def get_while_down() -> RunStatus:
                    calling.set()
                    return c.get_run(run.run_id).status

                got = pool.submit(get_while_down)
                calling.wait(10)
                api = Api(database_url, port=api.port, http_port=api.http_port)  # the same address, a new process
                api.start()
                assert got.result(timeout=30) is RunStatus.QUEUED
            worker = Worker(api.addr, **WORKER_ENV)
            worker.start()
            rest = list(stream)
            assert stream.reconnects >= 1
            assert [e.sequence for e in [first, *rest]] == list(range(1, len(rest) + 2))  # no gap, no repeat
            assert rest[-1].type == "run.completed"
            assert c.wait(run.run_id, timeout=30).status is RunStatus.SUCCEEDED
    finally:
        if worker is not None:
            worker.stop()
        api.stop()


def test_unary_calls_retry_unavailable_then_give_up() -> None:
    addr = f"127.0.0.1:{own_ports()['port']}"  # nothing listens there
    with Client(addr, key="", retry=Retry(attempts=3, backoff_seconds=0.01, backoff_max_seconds=0.02)) as c:
        with pytest.raises(Unavailable) as down:
            c.get_run("01J00000000000000000000000")
        assert down.value.status_code is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(Unavailable):
            list(c.watch("01J00000000000000000000000"))
    # start_run without an idempotency key is never retried (a retry could start a second run)
    with Client(addr, key="", retry=Retry(attempts=3, backoff_seconds=5, backoff_max_seconds=5)) as c:
        began = time.monotonic()
        with pytest.raises(Unavailable):
            c.start_run("runtime.noop")
        assert time.monotonic() - began < 2.5  # a retry would first wait 2.5-5 s


async def test_keys_and_tls(database_url: str, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    admin = f"test-admin-{secrets.token_urlsafe(24)}"
    api = TlsApi(
        database_url, pki, ClientTls(ca=pki.ca), RUNS_AUTH="required", RUNS_BOOTSTRAP_ADMIN_KEY=admin,
        **own_ports(),  # type: ignore[arg-type]  # TlsApi hands its keywords on to Api
    )
    api.start()
    try:
        with Client(api.addr, key="", tls_ca=pki.ca) as anonymous, pytest.raises(Unauthenticated):
            anonymous.start_run("runtime.noop")
        with Client(api.addr, key=admin, tls_ca=pki.ca) as keyed:
            run = keyed.start_run("runtime.noop")
            assert keyed.get_run(run.run_id).status is RunStatus.QUEUED
        async with AsyncClient(api.addr, key="", tls_ca=pki.ca) as anonymous_async:
            with pytest.raises(Unauthenticated):
                await anonymous_async.get_run(run.run_id)
        async with AsyncClient(api.addr, key=admin, tls_ca=pki.ca) as keyed_async:
            assert (await keyed_async.get_run(run.run_id)).run_id == run.run_id
        with Client(api.addr, key=admin, retry=Retry(attempts=1)) as plaintext, pytest.raises(Unavailable):
            plaintext.get_run(run.run_id)  # the API serves TLS only
        # everything from the environment, as the CLI reads it
        monkeypatch.setenv("RUN_API_ADDR", api.addr)
        monkeypatch.setenv("RUNS_API_KEY", admin)
        monkeypatch.setenv("RUNS_TLS_CA", pki.ca)
        with Client() as from_env:
            assert from_env.get_run(run.run_id).run_id == run.run_id
    finally:
        api.stop()


def test_explain_run_says_why_a_run_waits_and_how_it_ended(client: Client) -> None:
    """explain_run (ExplainRun): a run for a workspace no worker serves is queued with no live worker there;
    a finished run says how it ended, with its attempts."""
    waiting = client.start_run("runtime.noop", workspace_id="nobody-serves-this")
    why = client.explain_run(waiting.run_id)
    assert (why.state, why.run.run_id) == ("queued", waiting.run_id)
    assert why.queue is not None and why.holder is None and why.ending is None
    assert (why.queue.workspace_id, why.queue.live_workers) == ("nobody-serves-this", 0)
    # the module's worker serves "default" (once its claim stream has opened)
    why = wait_until(lambda: (w := client.explain_run(waiting.run_id)).queue.live_workers_elsewhere >= 1 and w,
                     30, "the module's worker to be live")
    assert why.summary
    client.cancel(waiting.run_id)

    done = client.wait(client.start_run("runtime.noop").run_id, timeout=30)
    ended = client.explain_run(done.run_id)
    assert (ended.state, ended.run.status) == ("finished", RunStatus.SUCCEEDED)
    assert ended.ending is not None and ended.ending.stop_reason == "completed"
    assert [a.attempt for a in ended.attempts] == [1]
    with pytest.raises(NotFound):
        client.explain_run("01ARZ3NDEKTSV4RRFFQ69G5FAV")
