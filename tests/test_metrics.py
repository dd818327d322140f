"""Prometheus metrics (issue 10, item 4) through a real API process and a real worker process.

The API serves /metrics on its HTTP port, the worker on RUN_WORKER_METRICS_ADDR; both are scraped
before and after a few runs and the counters must have moved. Also: the deploy manifests parse and
carry what item 5 asks (HTTP port, scrape annotations, HTTP readiness probe, worker metrics port).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from features.harness import ROOT, Api, Client, Worker, free_port, wait_until
from services.run_api.errors import RunNotFound, Unauthenticated
from services.run_api.interceptors import ErrorInterceptor
from shared.gen.runs.v1 import run_service_pb2

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample at `url` (a /metrics endpoint), by (name, sorted labels)."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over every label set that includes `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@pytest.fixture
def api(database_url: str) -> Iterator[Api]:
    """A real API process with short leases and a fast reaper."""
    api = Api(database_url, processes=1, RUN_REAPER_INTERVAL_SECONDS="0.2", RUN_WORKER_POLL_MS="200")
    api.start()
    try:
        yield api
    finally:
        api.stop()


def test_api_and_worker_metrics_move(api: Api) -> None:
    """Runs started, queued, claimed and finished through real processes move the metrics of both."""
    metrics = f"{api.http_url}/metrics"
    before = scrape(metrics)
    assert value(before, "runs_runs_started_total", workflow="runtime.noop") == 0
    assert value(before, "runs_workers_connected") == 0
    client = Client(api.addr)
    worker: Worker | None = None
    try:
        noop = [client.start("runtime.noop").run.run_id for _ in range(3)]
        failing = client.start_tool("fail", {"message": "metrics test"}, max_attempts=1).run_id
        # No worker yet: the queue gauge counts them (read from the database, cached for a second).
        wait_until(lambda: value(scrape(metrics), "runs_queued", workflow="runtime.noop") == 3, 20,
                   "runs_queued for runtime.noop to reach 3")
        with pytest.raises(grpc.RpcError) as missing:
            client.get("01JUNKNOWNRUNID000000000000")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        worker_port = free_port()
        worker_metrics = f"http://127.0.0.1:{worker_port}/metrics"
        worker = Worker(api.addr, RUN_WORKER_METRICS_ADDR=f"127.0.0.1:{worker_port}", RUN_WORKER_POLL_MS="200")
        worker.start()
        for run_id in noop:
            assert client.wait_status(run_id, {"SUCCEEDED", "FAILED", "CANCELED"}, 60) == "SUCCEEDED"
        assert client.wait_status(failing, {"SUCCEEDED", "FAILED", "CANCELED"}, 60) == "FAILED"
        # A cacheable step twice: a miss (no entry yet), then a hit from the cold layer (no Redis here).
        client.register({"name": "metrics.cached", "steps": [{"key": "say", "tool": "echo",
                                                              "cache": {"scope": "global"}}]})
        for _ in range(2):
            cached = client.start("metrics.cached").run.run_id
            assert client.wait_status(cached, {"SUCCEEDED", "FAILED", "CANCELED"}, 60) == "SUCCEEDED"

        def api_moved() -> Samples:
            s = scrape(metrics)
            done = (
                value(s, "runs_runs_finished_total", workflow="runtime.noop", status="SUCCEEDED") == 3
                and value(s, "runs_runs_finished_total", workflow="runtime.tool", status="FAILED") == 1
                and value(s, "runs_runs_finished_total", workflow="metrics.cached", status="SUCCEEDED") == 2
                and s.get(("runs_queued", (("workflow", "runtime.noop"),))) == 0  # drained: 0, not gone
                and value(s, "runs_workers_connected") >= 1
            )
            return s if done else {}

        after = wait_until(api_moved, 30, "the API's run counters and gauges to move")
        assert value(after, "runs_runs_started_total", workflow="runtime.noop") == 3
        assert value(after, "runs_runs_started_total", workflow="runtime.tool") == 1
        assert value(after, "runs_grpc_requests_total", method="StartRun", code="OK") == 6
        assert value(after, "runs_grpc_requests_total", method="GetRun", code="NOT_FOUND") == 1
        assert value(after, "runs_grpc_requests_total", method="ReportRunEvents", code="OK") >= 1
        assert value(after, "runs_pickup_latency_seconds_count", workflow="runtime.noop") == 3
        assert value(after, "runs_pickup_latency_seconds_count", workflow="runtime.tool") == 1
        assert value(after, "runs_run_duration_seconds_count", workflow="runtime.noop", status="SUCCEEDED") == 3
        assert value(after, "runs_step_duration_seconds_count", workflow="runtime.noop", step="runtime",
                     status="SUCCEEDED") == 3
        assert value(after, "runs_step_duration_seconds_count", workflow="runtime.tool", step="runtime",
                     status="FAILED") == 1
        assert value(after, "runs_reaper_cycles_total", result="ok") > value(before, "runs_reaper_cycles_total",
                                                                             result="ok")
        assert value(after, "runs_metrics_dropped_total") == 0
        assert value(after, "runs_cache_misses_total", reason="no_entry") == 1
        assert value(after, "runs_cache_hits_total", layer="cold") == 1
        assert value(after, "runs_runs_finished_total", workflow="metrics.cached", status="SUCCEEDED") == 2

        def worker_moved() -> Samples:
            s = scrape(worker_metrics)
            done = (value(s, "runs_worker_runs_finished_total", status="succeeded") == 5
                    and value(s, "runs_worker_runs_finished_total", status="failed") == 1)
            return s if done else {}

        w = wait_until(worker_moved, 30, "the worker's counters to move")
        assert value(w, "runs_worker_runs_claimed_total") == 6
        assert value(w, "runs_worker_runs_held") == 0
        assert value(w, "runs_worker_tool_duration_seconds_count", tool="noop", result="ok") == 3
        assert value(w, "runs_worker_tool_duration_seconds_count", tool="fail", result="error") == 1
        assert value(w, "runs_worker_tool_duration_seconds_count", tool="echo", result="ok") == 1  # then a hit
        assert total(w, "runs_worker_report_latency_seconds_count", code="OK") >= 1
        assert value(w, "runs_worker_reported_events_total") > 0
    finally:
        client.close()
        if worker is not None:
            assert worker.stop() == 0, worker.output()


def test_lease_expiry_is_counted(database_url: str) -> None:
    """A worker killed while it holds a run: the reaper's expiry, its cycles and the run it fails are counted."""
    leases = dict(RUN_LEASE_SECONDS="1", RUN_HEARTBEAT_SECONDS="0.3", RUN_WORKER_POLL_MS="200")
    api = Api(database_url, processes=1, RUN_REAPER_INTERVAL_SECONDS="0.2", **leases)
    api.start()
    client = Client(api.addr)
    worker = Worker(api.addr, **leases)
    try:
        run_id = client.start_tool("sleep", {"seconds": 60}, max_attempts=1).run_id
        worker.start()
        wait_until(lambda: client.step_status(run_id, "runtime") == "RUNNING", 30, "the sleep step to run")
        worker.kill()
        assert client.wait_status(run_id, {"FAILED", "SUCCEEDED", "CANCELED"}, 30) == "FAILED"

        def counted() -> Samples:
            s = scrape(f"{api.http_url}/metrics")
            return s if value(s, "runs_runs_finished_total", workflow="runtime.tool", status="FAILED") == 1 else {}

        after = wait_until(counted, 20, "the reaped run to be counted")
        assert value(after, "runs_lease_expiries_total", outcome="failed") == 1
        assert value(after, "runs_lease_expiries_total", outcome="requeued") == 0
        assert value(after, "runs_run_duration_seconds_count", workflow="runtime.tool", status="FAILED") == 1
        assert value(after, "runs_reaper_cycles_total", result="ok") >= 1
    finally:
        client.close()
        worker.kill()
        api.stop()


def test_metrics_help_and_types(api: Api) -> None:
    """Every family is prefixed runs_ and documented; the API's and a worker's registries are their own."""
    text = httpx.get(f"{api.http_url}/metrics", timeout=10).text
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    assert {"runs_queued", "runs_queue_oldest_age_seconds", "runs_workers_connected", "runs_runs_started",
            "runs_runs_finished", "runs_pickup_latency_seconds", "runs_run_duration_seconds",
            "runs_step_duration_seconds", "runs_cache_hits", "runs_cache_misses", "runs_lease_expiries",
            "runs_reaper_cycles", "runs_grpc_requests"} <= names
    for family in families:
        assert family.name.startswith("runs_"), family.name  # nothing from the default registry (process_*, ...)
        assert family.documentation, f"{family.name} has no help text"


# --- the interceptor counts every call's final code in one place ---------------------------------


class Recorder:
    """A CallObserver that keeps what it is told (and fails on demand, which must not reach the call)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, grpc.StatusCode]] = []
        self.unary: list[tuple[str, Any, Any]] = []
        self.streamed: list[tuple[str, Any, Any]] = []
        self.explode = False

    def observe_call(self, method: str, code: grpc.StatusCode) -> None:
        self.calls.append((method, code))

    def observe_unary(self, method: str, request: Any, response: Any) -> None:
        self.unary.append((method, request, response))
        if self.explode:
            raise RuntimeError("observer bug")

    def observe_streamed(self, method: str, request: Any, item: Any) -> None:
        self.streamed.append((method, request, item))


async def test_interceptor_reports_each_final_code(caplog: pytest.LogCaptureFixture) -> None:
    """OK, NOT_FOUND, INTERNAL, UNAUTHENTICATED (from the caller scope), INVALID_ARGUMENT (undecodable), a
    stream's messages and a stream the client cancels: each call is reported once with its final code."""
    get = run_service_pb2.GetRunRequest
    release = asyncio.Event()

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.run_id == "missing":
            raise RunNotFound(request.run_id)
        if request.run_id == "bug":
            raise RuntimeError("a bug")
        return request

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        yield request
        yield request
        if request.run_id == "hang":
            await release.wait()

    @contextlib.asynccontextmanager
    async def scope(method: str, metadata: Any) -> Any:
        if ("key", "k") not in tuple(metadata or ()):
            raise Unauthenticated("no key")
        yield None

    recorder = Recorder()
    server = grpc.aio.server(interceptors=[ErrorInterceptor(scope, recorder)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("runs.v1.RunService", {
        "GetRun": grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=get.FromString, response_serializer=get.SerializeToString),
        "WatchRun": grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=get.FromString, response_serializer=get.SerializeToString),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    key = (("key", "k"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/runs.v1.RunService/GetRun", get.SerializeToString, get.FromString)
            watch = channel.unary_stream("/runs.v1.RunService/WatchRun", get.SerializeToString, get.FromString)
            raw = channel.unary_unary("/runs.v1.RunService/GetRun", None, None)
            assert (await call(get(run_id="r1"), metadata=key, timeout=10)).run_id == "r1"
            for run_id, metadata, code in (("missing", key, grpc.StatusCode.NOT_FOUND),
                                           ("bug", key, grpc.StatusCode.INTERNAL),
                                           ("r1", (), grpc.StatusCode.UNAUTHENTICATED)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(get(run_id=run_id), metadata=metadata, timeout=10)
                assert caught.value.code() == code
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await raw(b"\xff\xff\xff", metadata=key, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len([m async for m in watch(get(run_id="s1"), metadata=key, timeout=10)]) == 2
            hanging = watch(get(run_id="hang"), metadata=key, timeout=10)
            assert (await hanging.read()).run_id == "hang"
            hanging.cancel()
            recorder.explode = True  # an observer that raises is logged once; the call still answers
            assert (await call(get(run_id="r2"), metadata=key, timeout=10)).run_id == "r2"
            deadline = asyncio.get_running_loop().time() + 10
            while len(recorder.calls) < 8:  # the cancelled stream is reported as its handler unwinds
                assert asyncio.get_running_loop().time() < deadline, recorder.calls
                await asyncio.sleep(0.01)
    finally:
        release.set()
        await server.stop(None)
    get_run, watch_run = "/runs.v1.RunService/GetRun", "/runs.v1.RunService/WatchRun"
    c = grpc.StatusCode
    assert recorder.calls[:6] == [
        (get_run, c.OK), (get_run, c.NOT_FOUND), (get_run, c.INTERNAL), (get_run, c.UNAUTHENTICATED),
        (get_run, c.INVALID_ARGUMENT), (watch_run, c.OK),
    ]
    assert sorted(recorder.calls[6:]) == sorted([(watch_run, c.CANCELLED), (get_run, c.OK)])
    assert [u[2].run_id for u in recorder.unary] == ["r1", "r2"]
    assert [s[2].run_id for s in recorder.streamed] == ["s1", "s1", "hang", "hang"]
    assert any("call observer failed" in r.getMessage() for r in caplog.records)


# --- deploy (issue 10, item 5) -----------------------------------------------------------------

DEPLOY = ROOT / "deploy"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_template(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(doc["spec"]["template"])


def test_deploy_manifests_parse_and_expose_metrics() -> None:
    """The manifests parse; API and worker pods carry scrape annotations; the API has an HTTP readiness probe."""
    manifests = sorted((DEPLOY / "k8s").glob("*.yaml"))
    assert manifests
    docs = {p.name: _docs(p) for p in manifests}
    api = next(d for d in docs["api-deployment.yaml"] if d["kind"] == "Deployment")
    worker = next(d for d in docs["worker-deployment.yaml"] if d["kind"] == "Deployment")
    for deployment, port in ((api, "9090"), (worker, "9100")):
        annotations = _pod_template(deployment)["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == port
        assert annotations["prometheus.io/path"] == "/metrics"
    container = _pod_template(api)["spec"]["containers"][0]
    assert {"containerPort": 8080, "name": "http"}.items() <= next(
        p for p in container["ports"] if p["containerPort"] == 8080).items()
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    configmap = next(d for d in docs["configmap.yaml"] if d["kind"] == "ConfigMap")
    assert (env.get("RUN_API_HTTP_ADDR") or configmap["data"].get("RUN_API_HTTP_ADDR")) == "0.0.0.0:8080"
    assert env.get("RUN_API_METRICS_ADDR") == "0.0.0.0:9090"  # metrics off the dashboard's port
    assert any(p["containerPort"] == 9090 for p in container["ports"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert "grpc" in container["startupProbe"] or "grpc" in container["livenessProbe"]
    service = next(d for d in docs["api-service.yaml"] if d["kind"] == "Service")
    assert any(p["port"] == 8080 for p in service["spec"]["ports"])
    assert not any(p["port"] == 9090 for p in service["spec"]["ports"])
    worker_container = _pod_template(worker)["spec"]["containers"][0]
    worker_env = {e["name"]: e.get("value") for e in worker_container.get("env", [])}
    assert worker_env["RUN_WORKER_METRICS_ADDR"] == "0.0.0.0:9100"
    assert any(p["containerPort"] == 9100 for p in worker_container["ports"])


def test_compose_exposes_http_and_worker_metrics() -> None:
    """docker-compose.yml parses, publishes the API's HTTP port and sets the worker's metrics address."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    api = services["api"]
    assert api["environment"]["RUN_API_HTTP_ADDR"] == "0.0.0.0:8080"
    assert api["environment"]["RUN_API_METRICS_ADDR"] == "0.0.0.0:9090"
    assert api["labels"]["prometheus.io/port"] == "9090"
    assert any(str(p).endswith(":8080") for p in api["ports"])
    worker = services["worker"]
    assert worker["environment"]["RUN_WORKER_METRICS_ADDR"] == "0.0.0.0:9100"


def test_compose_healthcheck_passes_against_a_real_api(api: Api) -> None:
    """The Compose healthcheck one-liner (gRPC health, then GET /healthz) exits 0 against a serving API."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    test = compose["services"]["api"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3].replace("127.0.0.1:50051", api.addr).replace("http://127.0.0.1:8080", api.http_url)
    assert api.addr in code and api.http_url in code
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stderr


def test_calls_through_the_http_gateway_are_counted(api: Api) -> None:
    """The gateway tells the same observer as the gRPC interceptor: requests by method and code, runs started."""
    assert f"dashboard on {api.http_url}/" in api.output()  # what make up prints
    metrics = f"{api.http_url}/metrics"
    before = scrape(metrics)
    started = httpx.post(f"{api.http_url}/v1/runs", json={"workflow": "runtime.noop"}, timeout=10,
                         headers={"X-Runs-Csrf": "1"})
    assert started.status_code == 200, started.text
    assert httpx.get(f"{api.http_url}/v1/runs/no-such-run", timeout=10).status_code == 404
    after = scrape(metrics)
    requests = "runs_grpc_requests_total"
    assert value(after, requests, method="StartRun", code="OK") == \
        value(before, requests, method="StartRun", code="OK") + 1
    assert value(after, requests, method="GetRun", code="NOT_FOUND") == \
        value(before, requests, method="GetRun", code="NOT_FOUND") + 1
    assert total(after, "runs_runs_started_total", workflow="runtime.noop") == \
        total(before, "runs_runs_started_total", workflow="runtime.noop") + 1


def test_tenant_chosen_label_values_are_capped() -> None:
    """Review of issue 10: workflow and step names are chosen by tenants; past the cap a new value is "other",
    so no tenant grows the series without bound (a cache layer a worker names must be a known one)."""
    from services.run_api.metrics import CACHE_LAYERS, OTHER, LabelCap

    cap = LabelCap(2)
    assert [cap("a"), cap("b"), cap("c"), cap("a")] == ["a", "b", OTHER, "a"]
    pairs = LabelCap(1)
    assert pairs(("wf", "step")) == ("wf", "step")
    assert pairs(("wf", "other-step")) == (OTHER, OTHER)
    assert {"hot", "cold"} == CACHE_LAYERS


def test_metrics_on_an_address_of_their_own(database_url: str) -> None:
    """RUN_API_METRICS_ADDR moves /metrics off the dashboard's port (an internal address for the scraper),
    with /healthz beside it; the HTTP side then has no /metrics."""
    metrics_addr = f"127.0.0.1:{free_port()}"
    api = Api(database_url, processes=1, RUN_API_METRICS_ADDR=metrics_addr)
    api.start()
    try:
        wait_until(lambda: f"metrics on http://{metrics_addr}/metrics" in api.output(), 10, "the metrics line")
        samples = scrape(f"http://{metrics_addr}/metrics")
        assert any(name == "runs_workers_connected" for name, _ in samples)
        assert httpx.get(f"http://{metrics_addr}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{api.http_url}/metrics", timeout=10).status_code == 404
        assert httpx.get(f"http://{metrics_addr}/v1/runs", timeout=10).status_code == 404  # nothing else there
    finally:
        api.stop()
