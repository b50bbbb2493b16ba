"""Optional OpenTelemetry tracing: on with the ``otel`` extra and ``OTEL_EXPORTER_OTLP_ENDPOINT``.

Spans: one SERVER span per request (W3C ``traceparent`` honoured), one per upload
stream (``storage.write``, from ``backend.create`` to commit/abort) and download
stream (``storage.read``, from ``backend.open`` to close), and one per SQL
statement (``db.query``, from asyncpg's query logger, with the statement text and
never its values).  Every span carries the request id.

Off (no endpoint, or the SDK is not installed), nothing is wrapped and no span
object is created: the request middleware checks one app key per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from ..config import Config
from ..domain.element import backend_key, config_key, db_key
from .logs import request_id_var

log = logging.getLogger(__name__)
tracing_key = web.AppKey("tracing", Any)
exporter_key = web.AppKey("tracing_exporter", Any)  # tests: an in-memory SpanExporter
_POOL_RESET = "SELECT pg_advisory_unlock_all()"
EXPORT_TIMEOUT = 2.0  # seconds per OTLP export attempt


def _sdk_available() -> bool:
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


class Tracing:
    """A TracerProvider of this app (never the global one) and the spans it makes."""

    def __init__(self, config: Config, exporter: Any | None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        resource = Resource.create({
            "service.name": config.otel_service_name or config.app_name,
            "service.version": config.app_version,
            "service.instance.id": config.storage_element_id,
        })
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        if exporter is not None:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = config.otel_exporter_otlp_endpoint.rstrip("/")
            if not endpoint.endswith("/v1/traces"):
                endpoint += "/v1/traces"
            # a short export timeout: a collector that is down must not hold up shutdown
            exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT)
            self.provider.add_span_processor(BatchSpanProcessor(
                exporter, export_timeout_millis=int(EXPORT_TIMEOUT * 1000)))
        self.tracer = self.provider.get_tracer("storage-element", config.app_version)

    def _attrs(self, **extra: Any) -> dict[str, Any]:
        rid = request_id_var.get()
        return {**extra, "request_id": rid} if rid else extra

    def start_request(self, request: web.Request, route: str, rid: str) -> tuple[Any, Any]:
        from opentelemetry import context, propagate, trace

        span = self.tracer.start_span(
            f"{request.method} {route}", context=propagate.extract(request.headers),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": route,
                        "url.path": request.path[:512], "request_id": rid})
        return span, context.attach(trace.set_span_in_context(span))

    def end_request(self, handle: tuple[Any, Any], status: int) -> None:
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        span, token = handle
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()
        context.detach(token)

    def start(self, name: str, **attrs: Any) -> Any:
        return self.tracer.start_span(name, attributes=self._attrs(**attrs))

    def on_query(self, record: Any) -> None:
        """asyncpg query logger (runs in the caller's context, so spans nest)."""
        from opentelemetry.trace import Status, StatusCode

        statement = record.query.strip()
        if statement.startswith(_POOL_RESET):
            return  # asyncpg's own housekeeping when a connection goes back to the pool
        end = time.time_ns()
        code = [ln for ln in statement.splitlines() if ln.strip() and not ln.startswith("--")]
        verb = code[0].split(None, 1)[0].upper() if code else "SQL"
        span = self.tracer.start_span(
            f"db.query {verb}",
            start_time=end - int(record.elapsed * 1e9),
            attributes=self._attrs(**{"db.system": "postgresql",
                                      "db.statement": statement[:2000]}))
        if record.exception is not None:
            span.set_status(Status(StatusCode.ERROR, type(record.exception).__name__))
        span.end(end_time=end)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self.provider.shutdown), timeout=5)
        except TimeoutError:
            log.warning("tracing: exporter did not flush within 5 s; spans may be lost")


def _end(span: Any, ok: bool, **attrs: Any) -> None:
    from opentelemetry.trace import Status, StatusCode

    for key, value in attrs.items():
        span.set_attribute(key, value)
    if not ok:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


class TracedWriter:
    """A backend Writer whose lifetime is a ``storage.write`` span."""

    def __init__(self, inner: Any, span: Any) -> None:
        self._inner, self._span, self._open = inner, span, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _finish(self, ok: bool) -> None:
        if self._open:
            self._open = False
            _end(self._span, ok, **{"storage.bytes": self._inner.size})

    async def write(self, chunk: bytes) -> None:
        await self._inner.write(chunk)

    async def commit(self, attr: bytes | None = None) -> None:
        try:
            await self._inner.commit(attr)
        except BaseException:
            self._finish(False)
            raise
        self._finish(True)

    async def abort(self) -> None:
        try:
            await self._inner.abort()
        finally:
            self._finish(False)

    async def __aenter__(self) -> TracedWriter:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.abort()


class TracedReader:
    """A backend Reader whose lifetime (open to close) is a ``storage.read`` span."""

    def __init__(self, inner: Any, span: Any) -> None:
        self._inner, self._span = inner, span

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def iter_range(self, start: int, end: int, chunk_size: int) -> AsyncIterator[bytes]:
        return self._inner.iter_range(start, end, chunk_size)

    async def close(self) -> None:
        try:
            await self._inner.close()
        finally:
            if self._span is not None:
                _end(self._span, True, **{"storage.object_size": self._inner.info.size})
                self._span = None


class TracedBackend:
    """Wraps the app's backend so upload and download streams get spans."""

    def __init__(self, inner: Any, tracing: Tracing) -> None:
        self._inner, self._tracing = inner, tracing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create(self, relpath: str, *args: Any, **kwargs: Any) -> TracedWriter:
        span = self._tracing.start("storage.write", **{"storage.backend": self._inner.name})
        return TracedWriter(self._inner.create(relpath, *args, **kwargs), span)

    async def open(self, relpath: str, *args: Any, **kwargs: Any) -> TracedReader:
        span = self._tracing.start("storage.read", **{"storage.backend": self._inner.name})
        try:
            reader = await self._inner.open(relpath, *args, **kwargs)
        except BaseException:
            _end(span, False)
            raise
        return TracedReader(reader, span)


async def _hook_pool(pool: Any, callback: Any) -> None:
    """Add ``callback`` as query logger to every connection of ``pool``.

    asyncpg has no public per-pool hook after creation, so the pool's ``init``
    callable (private ``_init``) is wrapped and the existing connections are
    expired so they reconnect through it.
    """
    original = getattr(pool, "_init", None)

    async def init(conn: Any) -> None:
        if original is not None:
            await original(conn)
        conn.add_query_logger(callback)

    pool._init = init
    await pool.expire_connections()


async def tracing_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context (after database and storage, before the element is built)."""
    config = app[config_key]
    exporter = app.get(exporter_key)
    if not config.otel_exporter_otlp_endpoint and exporter is None:
        yield
        return
    if not _sdk_available():
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed "
                    "(pip install 'storage-element[otel]'); tracing stays off")
        yield
        return
    tracing = Tracing(config, exporter)
    app[tracing_key] = tracing
    app[backend_key] = TracedBackend(app[backend_key], tracing)
    await _hook_pool(app[db_key].pool, tracing.on_query)
    log.info("tracing on: exporting spans to %s",
             config.otel_exporter_otlp_endpoint or type(exporter).__name__)
    try:
        yield
    finally:
        await tracing.close()
