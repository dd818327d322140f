"""Write your own tool: the example package examples/runs-example-tools, pip-installed into a temporary
folder, loaded by a real worker from the `runs.tools` entry point group, used by a registered workflow;
and claims routed by the tools workers declare.

One API (the module's) and two workers of the workspace "default": "plain" with only the stock noop,
started first, and "words" with the example's tools (PYTHONPATH: the install folder), started by the
first test once it has seen the plain worker pass over a run that needs them. The package is
installed offline (pip --no-index --no-build-isolation) while the API starts.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy
from ulid import ULID

from features.harness import ROOT, Api, Client, Worker
from services.run_api import db
from services.run_api.store import queries as Q
from shared.gen.runs.v1 import run_service_pb2
from shared.workflow import load_spec_text, spec_to_dict

pytestmark = pytest.mark.timeout(90)

EXAMPLE = ROOT / "examples" / "runs-example-tools"
WORKER_ENV = {"RUN_WORKER_POLL_MS": "100", "RUN_WORKER_DRAIN_SECONDS": "1"}
TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer"


@dataclass
class Stack:
    """The module's API, its client, its database and workers."""

    api: Api
    client: Client
    database_url: str
    site: str  # where the example package is installed
    workers: dict[str, Worker] = field(default_factory=dict)

    def start_worker(self, name: str, tools: str, **env: str) -> Worker:
        """Start a worker (id `name`) of the workspace "default" with RUN_WORKER_TOOLS=`tools`, once."""
        if name not in self.workers:
            worker = Worker(self.api.addr, RUN_WORKER_ID=name, RUN_WORKER_TOOLS=tools, **WORKER_ENV, **env)
            self.workers[name] = worker
            worker.start()
        return self.workers[name]

    def start_words_worker(self) -> Worker:
        """The worker that has the example's tools (and noop)."""
        return self.start_worker("words", "noop,word_count,top_words", PYTHONPATH=self.site)

    def required_tools(self, run_id: str) -> list[str] | None:
        """runs.required_tools of a run, as stored."""
        with psycopg.connect(db.libpq_url(self.database_url)) as conn:
            row = conn.execute("SELECT required_tools FROM runs WHERE run_id = %s", (run_id,)).fetchone()
        assert row is not None
        return row[0]


@pytest.fixture(scope="module")
def stack(make_database: Callable[[], contextlib.AbstractContextManager[str]]) -> Iterator[Stack]:
    with make_database() as url, tempfile.TemporaryDirectory(prefix="runs-example-tools-") as tmp:
        # Installed from a copy: a build leaves build/ and *.egg-info beside the sources.
        source = shutil.copytree(EXAMPLE, Path(tmp, "src"), ignore=shutil.ignore_patterns("build", "*.egg-info"))
        site = str(Path(tmp, "site"))
        pip = subprocess.Popen(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
             "--no-compile", "--target", site, str(source)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        api = Api(url)
        stack: Stack | None = None
        try:
            api.start()
            out, _ = pip.communicate(timeout=60)
            assert pip.returncode == 0, f"pip install of {EXAMPLE} failed:\n{out}"
            stack = Stack(api, Client(api.addr), url, site)
            stack.start_worker("plain", "noop")
            yield stack
        finally:
            if pip.poll() is None:
                pip.kill()
                pip.wait()
            workers = list(stack.workers.values()) if stack else []
            for worker in workers:  # all at once, then wait for each
                worker.signal(signal.SIGTERM)
            for worker in workers:
                worker.stop()
            if stack is not None:
                stack.client.close()
            api.stop()


def register_words(client: Client) -> None:
    """Register the example's workflow (words.yaml, example.words) through the API."""
    text = (EXAMPLE / "words.yaml").read_text(encoding="utf-8")
    client.register(spec_to_dict(load_spec_text(text, "yaml")))


def attempts(client: Client, run_id: str) -> list[tuple[int, str, str]]:
    """(attempt, worker id, outcome) of each attempt of a run (its run.claimed events)."""
    return [(a.attempt, a.worker_id, a.outcome) for a in client.get(run_id).attempts]


def test_a_run_waits_for_a_worker_with_its_tools_then_runs_the_installed_tools(stack: Stack) -> None:
    client = stack.client
    register_words(client)
    words = client.start("example.words", {"text": TEXT}).run.run_id
    assert stack.required_tools(words) == ["top_words", "word_count"]  # the version's tools, sorted
    # Only the plain worker is connected: it takes a noop run queued after the words run, never that one.
    later = client.start("").run.run_id
    client.wait_status(later, {"SUCCEEDED"}, 30)
    assert attempts(client, later) == [(1, "plain", "completed")]
    assert (client.status(words), attempts(client, words)) == ("QUEUED", [])
    why = client.stub.ExplainRun(run_service_pb2.ExplainRunRequest(run_id=words), timeout=10)
    assert (list(why.queue.tools_needed), why.queue.tools_available) == (["top_words", "word_count"], "no")
    assert "none of them declared the tools it needs (top_words, word_count): it waits" in why.summary

    stack.start_words_worker()
    client.wait_status(words, {"SUCCEEDED"}, 30)
    assert attempts(client, words) == [(1, "words", "completed")]
    steps = client.steps(words)
    assert {key: step.tool for key, step in steps.items()} == {"count": "word_count", "top": "top_words"}
    assert dict(steps["count"].output) == {"words": 18, "lines": 2, "characters": len(TEXT)}
    top = [dict(item) for item in client.get(words).run.output["top"]["top"]]  # the sink step's output
    assert top == [{"word": "to", "count": 3}, {"word": "be", "count": 2}]


def test_runs_needing_the_tools_go_only_to_the_worker_that_has_them(stack: Stack) -> None:
    client = stack.client
    register_words(client)
    stack.start_words_worker()
    words = [client.start("example.words", {"text": f"word {i} " * i}).run.run_id for i in range(1, 7)]
    noops = [client.start("").run.run_id for _ in range(6)]
    for run_id in words + noops:
        client.wait_status(run_id, {"SUCCEEDED"}, 30)
    assert {attempts(client, run_id)[0][1] for run_id in words} == {"words"}
    assert {len(attempts(client, run_id)) for run_id in words + noops} == {1}
    assert [client.steps(run_id)["count"].output["words"] for run_id in words] == [2, 4, 6, 8, 10, 12]


def test_the_tools_check_their_arguments_naming_the_field(stack: Stack) -> None:
    client = stack.client
    register_words(client)
    stack.start_words_worker()
    run_id = client.start("example.words", {"text": 42}, max_attempts=3).run.run_id
    assert client.wait_status(run_id, {"FAILED", "SUCCEEDED"}, 30) == "FAILED"
    assert [(a.attempt, a.outcome) for a in client.get(run_id).attempts] == [(1, "failed")]  # not retried
    count = client.steps(run_id)["count"]
    assert "text must be a string, got " in count.error, count.error


# --- the claim reads only the tool sets a worker has -----------------------------------------------

UNTAKEABLE = 5000


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(node for child in plan.get("Plans", []) for node in _plan_nodes(child))]


def test_a_crowd_of_runs_nobody_can_take_does_not_slow_the_claim(stack: Stack) -> None:
    """5,000 queued runs needing a tool nobody has, ahead of runs that need noop, none or nothing recorded
    (NULL: queued before runs recorded their tools): a claim of a worker with noop takes the latter in
    claim order, reading runs_claim_tools_idx per tool set (a few rows), never the crowd; one that declared
    no tools takes the crowd's first runs. Measured with EXPLAIN ANALYZE, rolled back."""
    now = datetime.now(UTC)
    url = db.libpq_url(stack.database_url)
    columns = ("INSERT INTO runs (run_id, workspace_id, workflow, input, status, max_attempts, retry_backoff_seconds, "
               "retry_backoff_max_seconds, request_hash, created_at, updated_at, next_attempt_at, last_sequence, "
               "required_tools) ")
    takeable = {"T1": ["noop"], "T2": None, "T3": ["noop"], "T4": []}  # queued after the crowd, in this order
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(columns + "SELECT 'A' || lpad(g::text, 25, '0'), 'crowded', 'x', '{}', 'QUEUED', 1, 1, 1, 'h', "
                     "%(t)s, %(t)s, %(t)s + g * interval '1 ms', 1, ARRAY['gpu'] FROM generate_series(1, %(n)s) g",
                     {"t": now - timedelta(hours=2), "n": UNTAKEABLE})
        for i, (run_id, tools) in enumerate(takeable.items()):
            conn.execute(columns + "VALUES (%s, 'crowded', 'x', '{}', 'QUEUED', 1, 1, 1, 'h', %s, %s, %s, 1, %s)",
                         (run_id.ljust(26, "0"), now, now, now - timedelta(hours=1) + timedelta(seconds=i), tools))
        conn.execute("INSERT INTO workers (worker_id, lease_expires_at, last_heartbeat_at, started_at) "
                     "VALUES ('crowd-worker', %s, %s, %s)", (now + timedelta(hours=1), now, now))
        conn.execute("ANALYZE runs")
    engine = sqlalchemy.create_engine(stack.database_url, poolclass=sqlalchemy.pool.NullPool)

    def claim(tools: list[str] | None) -> tuple[list[str], list[dict[str, Any]]]:
        params = {"worker_id": "crowd-worker", "session_token_hash": None, "tenant_id": "default",
                  "workspace_id": "crowded", "project_id": None, "capacity": 3, "batch_limit": 3, "now": now,
                  "lease_expires_at": now + timedelta(seconds=30), "lease_text": "", "channel_events": "runs_events",
                  "event_ids": [str(ULID()) for _ in range(3)], "tools": tools}
        with engine.connect() as conn:
            claimed = [r.run_id[:2] for r in conn.execute(Q.runs_claim, params) if r.run_id]
            conn.rollback()
            explain = sqlalchemy.text("EXPLAIN (ANALYZE, FORMAT JSON) " + Q.runs_claim.text)
            plan = conn.execute(explain, params).scalar_one()[0]["Plan"]
            conn.rollback()
        return claimed, [n for n in _plan_nodes(plan) if n.get("Relation Name") == "runs" and "Index Name" in n]

    try:
        claimed, reads = claim(["echo", "noop"])
        assert claimed == ["T1", "T2", "T3"]  # claim order across the tool sets it has; NULL and {} need nothing
        queue_reads = [n for n in reads if n["Index Name"] in ("runs_claim_idx", "runs_claim_tools_idx")]
        assert queue_reads and {n["Index Name"] for n in queue_reads} == {"runs_claim_tools_idx"}, reads
        rows = sum(n["Actual Rows"] * n["Actual Loops"] for n in queue_reads)
        assert rows < 20, reads  # the crowd's set is passed over in one index descent, not read
        claimed, _ = claim(None)  # declared no tools: takes anything, in claim order
        assert claimed == ["A0", "A0", "A0"]
        assert claim(["shell"])[0] == ["T2", "T4"]
    finally:
        engine.dispose()
