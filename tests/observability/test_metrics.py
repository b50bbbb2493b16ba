"""/metrics (one registry per app) and OpenTelemetry spans (in-memory exporter)."""

import asyncio
import uuid

import aiohttp
import asyncpg
import pytest
from helpers import upload
from prometheus_client.parser import text_string_to_metric_families

from storage.db import repo
from storage.domain import naming
from storage.domain.element import element_key
from storage.models import utcnow
from storage.observability.metrics import metrics_key
from storage.web.app import make_app

UPSTREAM = ("storage_capacity_total_bytes", "storage_capacity_used_bytes",
            "storage_capacity_free_bytes", "storage_capacity_percent_used",
            "storage_capacity_status", "storage_health_status", "storage_threshold_warning_percent",
            "storage_threshold_critical_percent", "storage_threshold_full_percent",
            "storage_files_total", "storage_element_info")


async def scrape(client, path="/metrics") -> dict[tuple[str, tuple], float]:
    resp = await client.get(path)
    assert resp.status == 200 and resp.content_type == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_both_paths_serve_every_family(client):
    a = await scrape(client, "/metrics")
    b = await scrape(client, "/metrics/")
    names = {name for name, _ in a}
    for name in UPSTREAM:
        assert name in names, name
    assert value(a, "storage_threshold_critical_percent") == 90.0
    assert value(a, "storage_mode", mode="edit") == 1 and value(a, "storage_mode", mode="rw") == 0
    assert {name for name, _ in b} >= names
    assert "process_resident_memory_bytes" in names


async def test_values_move_after_upload_download_and_delete(client, auth):
    before = await scrape(client)
    body = await upload(client, auth(), b"p" * 1234)
    fid = body["file_id"]
    got = await client.get(f"/api/v1/files/{fid}/download", headers=auth())
    assert await got.read() == b"p" * 1234
    part = await client.get(f"/api/v1/files/{fid}/download",
                            headers={**auth(), "Range": "bytes=0-99"})
    assert part.status == 206 and len(await part.read()) == 100
    missing = await client.get(f"/api/v1/files/{uuid.uuid4()}", headers=auth())
    assert missing.status == 404
    after = await scrape(client)
    assert value(after, "storage_file_uploads_total", status="success") == \
        value(before, "storage_file_uploads_total", status="success") + 1
    assert value(after, "storage_file_upload_bytes_total") == 1234
    assert value(after, "storage_file_upload_duration_seconds_count") == 1
    assert value(after, "storage_file_downloads_total", status="success") == 2
    assert value(after, "storage_file_download_bytes_total") == 1334
    assert value(after, "storage_file_download_duration_seconds_count") == 2
    assert value(after, "storage_files_total") == 1 and value(after, "storage_stored_bytes") == 1234
    assert value(after, "storage_capacity_used_bytes") == 1234
    assert value(after, "storage_http_requests_total", method="GET",
                 route="/api/v1/files/{file_id}", status="404") == 1
    assert value(after, "storage_http_request_duration_seconds_count", method="POST",
                 route="/api/v1/files/upload") == 1
    resp = await client.delete(f"/api/v1/files/{fid}", headers=auth())
    assert resp.status == 204
    final = await scrape(client)
    assert value(final, "storage_file_deletes_total", status="success") == 1
    assert value(final, "storage_files_total") == 0 and value(final, "storage_stored_bytes") == 0


async def test_failed_uploads_count_as_errors_and_paths_never_become_labels(app_factory, auth):
    client = await app_factory(storage_max_size=100)
    await upload(client, auth(), b"x" * 500, status=507)
    resp = await client.get("/no/such/path/with/a/unique/" + uuid.uuid4().hex)
    assert resp.status == 404
    after = await scrape(client)
    assert value(after, "storage_file_uploads_total", status="error") == 1
    assert value(after, "storage_file_upload_bytes_total") == 0
    routes = {dict(labels).get("route") for name, labels in after
              if name == "storage_http_requests_total"}
    assert "unmatched" in routes and not any("unique" in (r or "") for r in routes)


async def test_capacity_gauges_match_the_capacity_endpoint(client, auth):
    await upload(client, auth(), b"c" * 4096)
    cap = await (await client.get("/api/v1/capacity")).json()
    m = await scrape(client)
    assert value(m, "storage_capacity_used_bytes") == cap["capacity"]["used"]
    assert value(m, "storage_capacity_total_bytes") == cap["capacity"]["total"] == 1 << 30
    assert value(m, "storage_capacity_free_bytes") == cap["capacity"]["available"]
    assert value(m, "storage_capacity_percent_used") == cap["capacity"]["percent_used"]
    assert value(m, "storage_health_status") == 0 and value(m, "storage_capacity_status") == 0


async def test_in_flight_upload_reservation_and_wal_are_visible(client, auth):
    release = asyncio.Event()

    async def body():
        yield b"a" * 1000
        await release.wait()
        yield b"b" * 1000

    fid = uuid.uuid4()
    task = asyncio.create_task(client.put(
        f"/api/v1/files/{fid}", data=body(), headers={**auth(), "Content-Length": "2000"}))
    m = {}
    for _ in range(200):
        m = await scrape(client)
        if value(m, "storage_uploads_in_flight") == 1 and value(m, "storage_reserved_bytes"):
            break
        await asyncio.sleep(0.02)
    assert value(m, "storage_uploads_in_flight") == 1
    assert value(m, "storage_wal_pending_operations") == 1
    assert value(m, "storage_reserved_bytes") == 2000
    release.set()
    resp = await task
    assert resp.status == 201
    m = await scrape(client)
    assert value(m, "storage_uploads_in_flight") == 0
    assert value(m, "storage_wal_pending_operations") == 0
    assert value(m, "storage_reserved_bytes") == 0 and value(m, "storage_stored_bytes") == 2000


async def test_two_apps_in_one_process_keep_separate_registries(app_factory, auth):
    a = await app_factory()
    b = await app_factory()
    await upload(a, auth(), b"only in a")
    assert value(await scrape(a), "storage_file_uploads_total", status="success") == 1
    assert value(await scrape(b), "storage_file_uploads_total", status="success") == 0
    assert a.app[metrics_key].registry is not b.app[metrics_key].registry


async def test_recovery_counters_for_the_recovery_module(client):
    m = client.app[metrics_key]
    before = await scrape(client)
    m.record_recovery({"mode": "exclusive", "completed": 1, "rolled_back": 3, "errors": 0},
                      0.25)
    got = await scrape(client)
    assert value(got, "storage_recovery_actions_total", action="rolled_back") == \
        value(before, "storage_recovery_actions_total", action="rolled_back") + 3
    assert value(got, "storage_recovery_actions_total", action="completed") == \
        value(before, "storage_recovery_actions_total", action="completed") + 1
    assert value(got, "storage_recovery_runs_total", status="success") == \
        value(before, "storage_recovery_runs_total", status="success") + 1
    assert value(got, "storage_recovery_duration_seconds_count") == \
        value(before, "storage_recovery_duration_seconds_count") + 1
    assert value(got, "storage_recovery_actions_total", action="errors") == \
        value(before, "storage_recovery_actions_total", action="errors")


async def test_startup_recovery_counts_the_pending_rows_it_resolves(app_factory, config):
    """What the "recovery found pending rows" alert (deploy/observability) watches: every
    known action is exported from the start at 0, and a restart that rolls back a pending
    upload intent counts it."""
    first = await app_factory(table_prefix=config.table_prefix,
                              storage_local_base_path=config.storage_local_base_path)
    fresh = await scrape(first)
    assert ("storage_recovery_actions_total", (("action", "rolled_back"),)) in fresh
    assert value(fresh, "storage_recovery_actions_total", action="rolled_back") == 0
    assert value(fresh, "storage_recovery_runs_total", status="success") == 1
    el = first.server.app[element_key]
    now = utcnow()
    file_id = uuid.uuid4()
    name = naming.storage_filename("lost.txt", "tester", now, file_id)
    await repo.insert_wal(el.db.pool, el.db.q, txid=uuid.uuid4(), op="file_create",
                          file_id=file_id, data={
                              "original_filename": "lost.txt", "storage_filename": name,
                              "storage_path": naming.storage_path(now),
                              "relative_path": naming.storage_path(now) + name,
                              "content_type": "text/plain"},
                          user_id="sub", started_at=now)
    await first.close()  # a crash after the intent: nothing on disk
    second = await app_factory(table_prefix=config.table_prefix,
                               storage_local_base_path=config.storage_local_base_path)
    got = await scrape(second)
    assert value(got, "storage_recovery_actions_total", action="rolled_back") == 1
    assert value(got, "storage_recovery_runs_total", status="success") == 1


async def test_consistency_reports_are_counted_by_result(client, auth, config, pg_dsn):
    """What the "consistency report failing" alert watches."""
    body = await upload(client, auth(), b"consistent")
    resp = await client.get("/api/v1/cache/consistency", headers=auth())
    assert (await resp.json())["report"]["is_consistent"] is True
    conn = await asyncpg.connect(pg_dsn)  # the cache loses the row: an orphan attr file
    try:
        await conn.execute(f"DELETE FROM {config.table_prefix}_files WHERE file_id = $1",
                           uuid.UUID(body["file_id"]))
    finally:
        await conn.close()
    resp = await client.get("/api/v1/cache/consistency", headers=auth())
    assert (await resp.json())["report"]["is_consistent"] is False
    got = await scrape(client)
    assert value(got, "storage_cache_consistency_reports_total", result="consistent") == 1
    assert value(got, "storage_cache_consistency_reports_total", result="inconsistent") == 1


async def test_cache_api_calls_are_counted_with_their_statistics(client, auth, config,
                                                                 pg_dsn):
    gone = await upload(client, auth(), b"one")
    await upload(client, auth(), b"two")
    conn = await asyncpg.connect(pg_dsn)  # the cache loses a row; the rebuild restores it
    try:
        await conn.execute(f"DELETE FROM {config.table_prefix}_files WHERE file_id = $1",
                           uuid.UUID(gone["file_id"]))
    finally:
        await conn.close()
    before = await scrape(client)
    resp = await client.post("/api/v1/cache/rebuild", headers=auth())
    assert resp.status == 200, await resp.text()
    stats = (await resp.json())["result"]["statistics"]
    resp = await client.get("/api/v1/cache/consistency", headers=auth())
    assert resp.status == 200
    resp = await client.post("/api/v1/cache/rebuild", headers=auth(token_type="admin_user"))
    assert resp.status == 403
    got = await scrape(client)
    assert value(got, "storage_cache_rebuilds_total", operation="full", status="success") == 1
    assert value(got, "storage_cache_rebuilds_total", operation="full", status="error") == 1
    assert value(got, "storage_cache_rebuilds_total", operation="consistency",
                 status="success") == 1
    assert value(got, "storage_cache_rebuild_duration_seconds_count", operation="full") == 1
    for action in ("created", "updated", "deleted"):
        assert value(got, "storage_cache_entries_total", action=action) == \
            value(before, "storage_cache_entries_total", action=action) + \
            stats[f"entries_{action}"]
    assert stats["attr_files_scanned"] == 2 and stats["entries_created"] == 1


async def test_gc_deletes_are_counted_by_outcome(client, auth):
    body = await upload(client, auth(), b"gc me")
    for fid in (body["file_id"], str(uuid.uuid4())):
        resp = await client.delete(f"/api/v1/gc/{fid}", headers=auth())
        assert resp.status == 200
    resp = await client.delete(f"/api/v1/gc/{uuid.uuid4()}", headers=auth(
        token_type="admin_user"))
    assert resp.status == 403
    got = await scrape(client)
    assert value(got, "storage_gc_deletes_total", status="deleted") == 1
    assert value(got, "storage_gc_deletes_total", status="already_deleted") == 1
    assert value(got, "storage_gc_deletes_total", status="error") == 1


async def test_mode_gauge_follows_transitions(app_factory, auth):
    client = await app_factory(app_mode="rw")
    resp = await client.post("/api/v1/mode", json={"target_mode": "ro"}, headers=auth())
    assert resp.status == 200
    m = await scrape(client)
    assert value(m, "storage_mode", mode="ro") == 1 and value(m, "storage_mode", mode="rw") == 0


async def test_metrics_can_be_turned_off_or_moved(app_factory):
    off = await app_factory(metrics_enabled=False)
    assert (await off.get("/metrics")).status == 404
    moved = await app_factory(metrics_path="/internal/prom/")
    assert (await moved.get("/internal/prom")).status == 200
    assert (await moved.get("/internal/prom/")).status == 200


# --- tracing ---------------------------------------------------------------------------------


async def finished(exporter, name: str) -> list:
    """Finished spans once ``name`` ended (a handler's span ends after the body was sent)."""
    for _ in range(100):
        spans = exporter.get_finished_spans()
        if any(s.name == name for s in spans):
            return list(spans)
        await asyncio.sleep(0.01)
    raise AssertionError(f"no finished span {name!r}: {[s.name for s in spans]}")


async def test_spans_for_request_streams_and_sql_carry_the_request_id(aiohttp_client,
                                                                      make_config, auth):
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from storage.observability.tracing import exporter_key, tracing_key

    exporter = InMemorySpanExporter()
    app = make_app(make_config(otel_exporter_otlp_endpoint="http://127.0.0.1:9"))
    app[exporter_key] = exporter
    client = await aiohttp_client(app)
    assert app[tracing_key] is not None
    headers = {**auth(), "X-Request-ID": "trace-up"}
    body = await upload(client, headers, b"t" * 300)
    exporter.clear()
    got = await client.get(f"/api/v1/files/{body['file_id']}/download",
                           headers={**auth(), "X-Request-ID": "trace-down",
                                    "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
    assert await got.read() == b"t" * 300
    spans = await finished(exporter, "GET /api/v1/files/{file_id}/download")
    server = next(s for s in spans if s.name == "GET /api/v1/files/{file_id}/download")
    assert server.attributes["request_id"] == "trace-down"
    assert server.attributes["http.response.status_code"] == 200
    assert format(server.context.trace_id, "032x") == "ab" * 16  # W3C parent honoured
    read = next(s for s in spans if s.name == "storage.read")
    every_sql = [s for s in spans if s.name.startswith("db.query")]
    assert not any("pg_advisory_unlock_all" in s.attributes["db.statement"] for s in every_sql)
    # this request's statements; the mode refresher's (every 0.25 s, no request) are
    # traces of their own and may finish meanwhile on a busy machine
    sql = [s for s in every_sql if s.context.trace_id == server.context.trace_id]
    assert "db.query SELECT" in {s.name for s in sql}
    assert sql and all(s.attributes["request_id"] == "trace-down" for s in sql)
    for child in [read, *sql]:
        assert child.context.trace_id == server.context.trace_id
        assert child.parent.span_id == server.context.span_id
    assert all("db.statement" in s.attributes for s in sql)
    exporter.clear()
    await upload(client, {**auth(), "X-Request-ID": "trace-up2"}, b"u" * 10)
    spans = await finished(exporter, "POST /api/v1/files/upload")
    write = next(s for s in spans if s.name == "storage.write")
    assert write.attributes["storage.bytes"] == 10
    assert write.attributes["request_id"] == "trace-up2"


async def test_tracing_off_wraps_nothing(client):
    from storage.domain.element import backend_key
    from storage.observability.tracing import TracedBackend, tracing_key

    assert client.app.get(tracing_key) is None
    assert not isinstance(client.app[backend_key], TracedBackend)


async def test_spans_reach_an_otlp_collector_over_http(aiohttp_server, make_config, auth):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http",
                        reason="the otel extra is not installed")
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    received: list[ExportTraceServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        received.append(msg)
        return web.Response(body=b"", content_type="application/x-protobuf")

    collector = web.Application()
    collector.router.add_post("/v1/traces", collect)
    server = await aiohttp_server(collector)
    app = make_app(make_config(otel_exporter_otlp_endpoint=str(server.make_url("/"))))
    runner = web.AppRunner(app)
    await runner.setup()  # start-up and shutdown as in production (the flush is on close)
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/api/v1/info", headers={"X-Request-ID": "otlp-1"}) as r:
            assert r.status == 200
    finally:
        await runner.cleanup()
    spans = [span for msg in received for rs in msg.resource_spans for ss in rs.scope_spans
             for span in ss.spans]
    names = {s.name for s in spans}
    assert "GET /api/v1/info" in names and any(n.startswith("db.query") for n in names)
    server_span = next(s for s in spans if s.name == "GET /api/v1/info")
    attrs = {a.key: a.value.string_value for a in server_span.attributes}
    assert attrs["request_id"] == "otlp-1"
    service = {a.key: a.value.string_value for a in received[0].resource_spans[0].resource
               .attributes}
    assert service["service.name"] == "storage-element"
