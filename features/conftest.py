"""Fixtures and steps shared by every feature: a real API process on a fresh database, workers, a client."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import psycopg
import pytest
from pytest_bdd import given, parsers, then, when

from features.harness import Api, Client, Worker, auth_mode, create_key, worker_once
from shared.channels import channel as open_channel


@dataclass
class Context:
    """What one scenario carries between its steps."""

    runs: dict[str, Any] = field(default_factory=dict)
    last_run_id: str = ""
    counters: list[dict[str, int]] = field(default_factory=list)
    error: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class Stack:
    """The processes of one scenario, all stopped at its end."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.env: dict[str, str] = {}  # given to the API and every worker
        # With RUNS_TEST_AUTH=required: the API requires keys; the suite bootstraps an admin key and
        # makes a client key (the scenarios' client) and a worker key (every worker process).
        self.auth = auth_mode()
        self.admin_key = f"test-admin-{secrets.token_urlsafe(24)}"
        self.keys: dict[str, str] = {}
        self.key_ids: dict[str, str] = {}
        self.api_env: dict[str, str] = (
            {"RUNS_AUTH": "required", "RUNS_BOOTSTRAP_ADMIN_KEY": self.admin_key} if self.auth == "required" else {}
        )
        # The scenario's own artifact store (every API of the scenario shares it), removed at the end.
        self.artifacts_dir = tempfile.mkdtemp(prefix="runs-artifacts-")
        self.api_env["RUNS_ARTIFACTS_URL"] = self.artifacts_dir
        self.api: Api | None = None
        self.previous_apis: list[Api] = []
        self.workers: list[Worker] = []
        self._client: Client | None = None

    def start_api(self, **env: str) -> Api:
        """Start the API process (stopping a previous one)."""
        if self.api is not None:
            self.api.stop()
            self.previous_apis.append(self.api)
        self.env.update(env)
        self.api = Api(self.database_url, **self.api_env, **self.env)
        self.api.start()
        self._make_keys()
        return self.api

    def _make_keys(self) -> None:
        if self.auth == "required" and not self.keys:
            assert self.api is not None
            for role in ("client", "worker"):
                self.key_ids[role], self.keys[role] = create_key(self.api.addr, self.admin_key, role)

    def recorded_worker_id(self, instance: str) -> str:
        """The worker id the API records for a worker process started with RUN_WORKER_ID=instance."""
        return f"{self.key_ids['worker']}/{instance}" if self.auth == "required" else instance

    @property
    def worker_env(self) -> dict[str, str]:
        """What a worker process needs to reach the API (its key when auth is required)."""
        return {"RUNS_API_KEY": self.keys["worker"]} if self.auth == "required" else {}

    def admin_channel(self) -> grpc.Channel:
        """A channel for OpsService and KeyService (the admin key when auth is required)."""
        assert self.api is not None
        return open_channel(self.api.addr, api_key=self.admin_key if self.auth == "required" else None)

    def restart_api(self) -> Api:
        """Stop the API with SIGTERM and start a new one on the same address."""
        assert self.api is not None
        old = self.api
        self.previous_apis.append(old)
        assert old.stop() == 0, f"API did not exit cleanly:\n{old.output()}"
        self.api = Api(self.database_url, port=old.port, **self.api_env, **self.env)
        self.api.start()
        return self.api

    @property
    def client(self) -> Client:
        """A client of the current API."""
        assert self.api is not None, "no API started"
        if self._client is None:
            self._client = Client(self.api.addr, self.keys.get("client"))
        return self._client

    def start_worker(self, *flags: str, **env: str) -> Worker:
        """Start a long-running worker process."""
        assert self.api is not None
        worker = Worker(self.api.addr, *flags, **{**self.env, **self.worker_env, **env})
        worker.start()
        self.workers.append(worker)
        return worker

    def once(self, *flags: str, **env: str) -> dict[str, int]:
        """One worker cycle in a fresh process."""
        assert self.api is not None
        return worker_once(self.api.addr, *flags, **{**self.env, **self.worker_env, **env})

    def close(self) -> None:
        """Stop everything."""
        if self._client is not None:
            self._client.close()
        for worker in self.workers:
            worker.stop()
        if self.api is not None:
            self.api.stop()
        shutil.rmtree(self.artifacts_dir, ignore_errors=True)

    def remove_logs(self) -> None:
        """Delete the processes' log files."""
        for process in [*self.previous_apis, *([self.api] if self.api else []), *self.workers]:
            process.log_path.unlink(missing_ok=True)

    def logs(self) -> str:
        """Every process's output, for failure reports."""
        parts = [f"--- api ---\n{self.api.output()[-8000:]}"] if self.api else []
        parts += [f"--- worker {i} ---\n{w.output()[-3000:]}" for i, w in enumerate(self.workers)]
        return "\n".join(parts)


@pytest.fixture
def ctx() -> Context:
    """Scenario state."""
    return Context()


@pytest.fixture
def stack(database_url: str, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The scenario's processes; their logs are printed when the scenario fails."""
    s = Stack(database_url)
    yield s
    s.close()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(s.logs()[-20000:])
    s.remove_logs()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember each phase's report on the item, so fixtures can tell a failure."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def count_runs(sql: psycopg.Connection) -> int:
    """How many runs the database holds."""
    row = sql.execute("SELECT count(*) FROM runs").fetchone()
    assert row is not None
    return int(row[0])


def event_types(sql: psycopg.Connection, run_id: str) -> list[str]:
    """A run's event types in sequence order."""
    return [r[0] for r in sql.execute("SELECT type FROM run_events WHERE run_id = %s ORDER BY sequence", (run_id,))]


# --- Given -------------------------------------------------------------------------------------


@given("a running API on a fresh database")
def running_api(stack: Stack) -> None:
    """Start the API process on the scenario's own database."""
    stack.start_api()


@given("a running API with the embedded worker on")
def running_api_embedded(stack: Stack) -> None:
    """Start the API with RUN_WORKER_EMBEDDED=true."""
    stack.start_api(RUN_WORKER_EMBEDDED="true", RUN_WORKER_POLL_MS="200")


@given(parsers.parse("{count:d} queued runs"))
def queued_runs(stack: Stack, ctx: Context, count: int) -> None:
    """Start `count` noop runs."""
    for i in range(count):
        run = stack.client.start().run
        ctx.runs[f"run{i}"] = run
    ctx.extra["run_ids"] = [r.run_id for r in ctx.runs.values()]


# --- When --------------------------------------------------------------------------------------


@when(parsers.parse('I start a run of "{workflow}"'))
@given(parsers.parse('I started a run of "{workflow}"'))
def start_run(stack: Stack, ctx: Context, workflow: str) -> None:
    """StartRun with the workflow."""
    run = stack.client.start(workflow).run
    ctx.runs[run.run_id] = run
    ctx.last_run_id = run.run_id


@when("a worker runs one cycle")
@given("a worker ran one cycle")
def worker_cycle(stack: Stack, ctx: Context) -> None:
    """`python -m services.run_worker --once`."""
    ctx.counters.append(stack.once())


# --- Then --------------------------------------------------------------------------------------


@then(parsers.parse("the cycle claimed {claimed:d} and succeeded {succeeded:d}"))
def cycle_counts(ctx: Context, claimed: int, succeeded: int) -> None:
    """The last worker cycle's counters."""
    last = ctx.counters[-1]
    assert (last["claimed"], last["succeeded"]) == (claimed, succeeded), last


@then(parsers.parse("the run ends {status}"))
def run_ends(stack: Stack, ctx: Context, status: str) -> None:
    """The last run reaches `status` (and stays there)."""
    got = stack.client.wait_status(ctx.last_run_id, {"SUCCEEDED", "FAILED", "CANCELED"}, 30)
    assert got == status, (got, stack.client.get(ctx.last_run_id))


@then(parsers.parse("the run's events are, in order: {types}"))
def events_in_order(sql: psycopg.Connection, ctx: Context, types: str) -> None:
    """The run's event log is exactly this chain, with sequences 1..n."""
    expected = [t.strip() for t in types.split(",")]
    rows = sql.execute(
        "SELECT sequence, type FROM run_events WHERE run_id = %s ORDER BY sequence", (ctx.last_run_id,)
    ).fetchall()
    assert [r[1] for r in rows] == expected
    assert [r[0] for r in rows] == list(range(1, len(expected) + 1))


@when(parsers.parse("I start a run of tool \"{tool}\" with args {args}"))
@given(parsers.parse("I started a run of tool \"{tool}\" with args {args}"))
def start_tool_run(stack: Stack, ctx: Context, tool: str, args: str) -> None:
    """StartRun of workflow runtime.tool with the tool and its JSON args."""
    import json

    run = stack.client.start_tool(tool, json.loads(args))
    ctx.runs[run.run_id] = run
    ctx.last_run_id = run.run_id


@then(parsers.parse("the run's events end with: {types}"))
def events_end_with(sql: psycopg.Connection, ctx: Context, types: str) -> None:
    """The tail of the run's log."""
    expected = [t.strip() for t in types.split(",")]
    assert event_types(sql, ctx.last_run_id)[-len(expected) :] == expected
