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
from pathlib import Path

import psycopg
import pytest

from features.harness import ROOT, Api, Client, Worker
from services.run_api import db
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
