"""A fake OpenTelemetry collector: OTLP/HTTP with protobuf bodies, as the OTLP specification has it.

``POST /v1/traces`` takes an ``ExportTraceServiceRequest`` (``application/x-protobuf``,
optionally gzip-compressed), checks what a collector would reject (wrong content
type, undecodable body, malformed trace or span ids, a span ending before it
starts, a missing required header) and answers with an ``ExportTraceServiceResponse``.
Received spans are flattened into :class:`SpanView` objects for assertions.
"""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests.support.servers import FakeServer, ThreadedApp

PROTOBUF = "application/x-protobuf"


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def attributes(items: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in items if isinstance(kv, KeyValue)}


@dataclass
class SpanView:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, int, dict[str, Any]]]
    status: str
    status_message: str
    resource: dict[str, Any]
    scope: str


@dataclass
class Export:
    headers: dict[str, str]
    body: bytes
    spans: list[SpanView] = field(default_factory=list)


class FakeCollector(FakeServer):
    def __init__(self, required_headers: dict[str, str] | None = None) -> None:
        self.required_headers = required_headers or {}
        self.exports: list[Export] = []
        self.rejected: list[str] = []
        self._lock = threading.Lock()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        self.server = ThreadedApp(app)

    @property
    def endpoint(self) -> str:
        return self.server.base_url

    @property
    def spans(self) -> list[SpanView]:
        with self._lock:
            return [s for e in self.exports for s in e.spans]

    def wait_for_spans(self, count: int, timeout: float = 15) -> list[SpanView]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.spans
            if len(spans) >= count:
                return spans
            time.sleep(0.05)
        raise AssertionError(f"expected {count} spans, got {len(self.spans)}; rejected: {self.rejected}")

    def _reject(self, status: int, why: str) -> web.Response:
        self.rejected.append(why)
        return web.Response(status=status, text=why)

    async def _traces(self, request: web.Request) -> web.Response:
        for name, value in self.required_headers.items():
            if request.headers.get(name) != value:
                return self._reject(401, f"missing or wrong {name} header")
        if request.content_type != PROTOBUF:
            return self._reject(415, f"unsupported content type {request.content_type!r}")
        raw = await request.read()
        if request.headers.get("Content-Encoding", "").lower() == "gzip":
            raw = gzip.decompress(raw)
        try:
            message = ExportTraceServiceRequest.FromString(raw)
        except DecodeError:
            return self._reject(400, "body is not an ExportTraceServiceRequest")
        spans: list[SpanView] = []
        for resource_spans in message.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    problem = self._check(span)
                    if problem:
                        return self._reject(400, problem)
                    spans.append(self._view(span, resource, scope_spans.scope.name))
        with self._lock:
            self.exports.append(Export(dict(request.headers), raw, spans))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type=PROTOBUF)

    @staticmethod
    def _check(span: Span) -> str | None:
        if len(span.trace_id) != 16 or not any(span.trace_id):
            return "invalid trace_id"
        if len(span.span_id) != 8 or not any(span.span_id):
            return "invalid span_id"
        if span.parent_span_id and len(span.parent_span_id) != 8:
            return "invalid parent_span_id"
        if not span.name:
            return "span without a name"
        if span.end_time_unix_nano < span.start_time_unix_nano or not span.start_time_unix_nano:
            return f"span {span.name!r} has bad timestamps"
        return None

    @staticmethod
    def _view(span: Span, resource: dict[str, Any], scope: str) -> SpanView:
        return SpanView(
            name=span.name,
            kind=Span.SpanKind.Name(span.kind),
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_span_id=span.parent_span_id.hex(),
            start_ns=span.start_time_unix_nano,
            end_ns=span.end_time_unix_nano,
            attributes=attributes(span.attributes),
            events=[(e.name, e.time_unix_nano, attributes(e.attributes)) for e in span.events],
            status=Status.StatusCode.Name(span.status.code),
            status_message=span.status.message,
            resource=resource,
            scope=scope,
        )
