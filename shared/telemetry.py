"""OpenTelemetry setup from the standard OTEL_* variables, and trace-context helpers.

Nothing is exported unless OTEL_TRACES_EXPORTER asks for it (`console`, or `otlp` when
opentelemetry-exporter-otlp is installed). A tracer provider is always installed so trace ids flow
from StartRun to the worker even when nothing is exported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

log = logging.getLogger(__name__)


def configure_tracing(service_name: str, env: Mapping[str, str] = os.environ) -> TracerProvider:
    """Install a tracer provider named after OTEL_SERVICE_NAME (or `service_name`)."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    if env.get("OTEL_SDK_DISABLED", "").lower() != "true":
        for name in [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]:
            exporter = _exporter(name)
            if exporter is not None:
                provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def _exporter(name: str) -> SpanExporter | None:
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError:
            log.warning("OTEL_TRACES_EXPORTER=otlp needs the opentelemetry-exporter-otlp package; not exporting")
            return None
        exporter: SpanExporter = OTLPSpanExporter()
        return exporter
    log.warning("unknown OTEL_TRACES_EXPORTER %r; not exporting", name)
    return None


def current_trace_carrier() -> dict[str, str]:
    """The W3C trace context of the current span, to store with a run."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_from_carrier(carrier: Mapping[str, str]) -> Context:
    """The trace context stored with a run, to continue its trace."""
    return propagate.extract(dict(carrier))
