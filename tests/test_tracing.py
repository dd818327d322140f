"""One trace shows StartRun, the claim and the tool call (in-memory exporter, real server and worker)."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.run_api.server import ApiServer
from services.run_worker.worker import Worker
from shared.gen.runs.v1 import run_service_pb2, run_service_pb2_grpc
from shared.settings import ApiSettings, WorkerSettings


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """Install (once per process) a tracer provider that keeps finished spans in memory."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {[s.name for s in spans]}"
    return found[0]


@pytest.mark.timeout(60)
async def test_start_claim_and_tool_share_one_trace(database_url: str, exporter: InMemorySpanExporter) -> None:
    settings = dataclasses.replace(ApiSettings(), addr="127.0.0.1:0", database_url=database_url)
    server = ApiServer(settings, database_url)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=aio_client_interceptors()) as ch:
            response = await run_service_pb2_grpc.RunServiceStub(ch).StartRun(run_service_pb2.StartRunRequest())
        worker = Worker(WorkerSettings(api_addr=f"127.0.0.1:{port}", worker_id="w-trace"))
        try:
            counters = await worker.run_cycle()
        finally:
            await worker.close()
        assert counters["succeeded"] == 1
    finally:
        await server.stop()

    spans = list(exporter.get_finished_spans())
    start = [s for s in spans if s.name == "/runs.v1.RunService/StartRun"]
    server_span = next(s for s in start if s.kind == trace.SpanKind.SERVER)
    client_span = next(s for s in start if s.kind == trace.SpanKind.CLIENT)
    assert server_span.parent is not None and server_span.parent.span_id == client_span.context.span_id
    claim = [s for s in spans if s.name == "run.claim" and s.attributes and
             s.attributes.get("run.id") == response.run.run_id]
    execute = _one(spans, "run.execute")
    tool = _one(spans, "tool.noop")
    assert len(claim) == 1
    trace_id = server_span.context.trace_id
    assert {claim[0].context.trace_id, execute.context.trace_id, tool.context.trace_id} == {trace_id}
    assert claim[0].parent is not None and claim[0].parent.span_id == server_span.context.span_id
    assert execute.parent is not None and execute.parent.span_id == server_span.context.span_id
    assert tool.parent is not None and tool.parent.span_id == execute.context.span_id
