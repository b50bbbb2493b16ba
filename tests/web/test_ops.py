"""/api/v1/info, /api/v1/capacity, readiness, request ids, access log and CORS."""

import io
import json
import logging
import re
import shutil
import uuid

import asyncpg
import pytest
from helpers import form, upload

from storage.config import Config
from storage.domain import capacity
from storage.domain.element import element_key, runtime_key
from storage.observability.logs import JsonFormatter, RequestContextFilter, redact

INFO_KEYS = {"name": str, "display_name": str, "version": str, "mode": str, "storage_type": str,
             "base_path": str, "capacity_bytes": int, "used_bytes": int, "file_count": int,
             "status": str, "priority": int, "element_id": str}


async def _json(client, path, status=200, **kw):
    resp = await client.get(path, **kw)
    body = await resp.json(content_type=None)
    assert resp.status == status, body
    return body


async def test_info_has_every_key_admin_module_reads_with_counts_from_the_db(app_factory, auth):
    client = await app_factory(storage_max_size=10_000, storage_priority=7,
                               storage_element_id="se-7", app_name="se-name",
                               app_display_name="SE Seven")
    info = await _json(client, "/api/v1/info")
    for key, typ in INFO_KEYS.items():
        assert type(info[key]) is typ, (key, info[key])
    assert set(info) == set(INFO_KEYS) | {"timestamp"}
    assert info["mode"] in ("edit", "rw", "ro", "ar") and info["storage_type"] == "local"
    el = client.app[element_key]
    assert info["base_path"] == str(el.config.storage_local_base_path.resolve())
    assert (info["name"], info["display_name"], info["priority"], info["element_id"]) == (
        "se-name", "SE Seven", 7, "se-7")
    assert (info["capacity_bytes"], info["used_bytes"], info["file_count"]) == (10_000, 0, 0)
    assert info["status"] == "operational" and info["timestamp"].endswith("+00:00")
    first = await upload(client, auth(), b"x" * 100)
    await upload(client, auth(), b"y" * 23)
    info = await _json(client, "/api/v1/info")
    assert (info["used_bytes"], info["file_count"]) == (123, 2)
    resp = await client.delete(f"/api/v1/files/{first['file_id']}", headers=auth())
    assert resp.status == 204
    info = await _json(client, "/api/v1/info")
    assert (info["used_bytes"], info["file_count"]) == (23, 1)


async def test_info_status_maintenance_in_ar_and_degraded_without_database(app_factory):
    client = await app_factory(app_mode="ar")
    info = await _json(client, "/api/v1/info")
    assert (info["mode"], info["status"]) == ("ar", "maintenance")
    await client.app[element_key].db.pool.close()
    info = await _json(client, "/api/v1/info")
    assert (info["status"], info["used_bytes"], info["file_count"]) == ("degraded", 0, 0)
    cap = await _json(client, "/api/v1/capacity")
    assert cap["health"] == "unhealthy" and cap["capacity"]["available"] == 0


async def test_capacity_has_the_ingester_keys_and_types(client):
    cap = await _json(client, "/api/v1/capacity")
    assert set(cap) == {"storage_id", "mode", "capacity", "health", "last_update", "backend",
                        "location"}
    assert set(cap["capacity"]) == {"total", "used", "available", "percent_used"}
    for key in ("total", "used", "available"):
        assert type(cap["capacity"][key]) is int
    assert isinstance(cap["capacity"]["percent_used"], float)
    assert cap["health"] in ("healthy", "degraded", "unhealthy")
    assert (cap["storage_id"], cap["mode"], cap["backend"], cap["location"]) == (
        "se-local-01", "edit", "local", "dc1")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", cap["last_update"])
    total = cap["capacity"]
    assert total["total"] == 1 << 30  # STORAGE_MAX_SIZE, the allowance comes off available
    assert total["total"] - total["used"] - total["available"] == capacity.UPLOAD_OVERHEAD


@pytest.mark.parametrize("percent, expected", [
    (0.0, ("ok", "healthy")), (79.99, ("ok", "healthy")), (80.0, ("warning", "healthy")),
    (89.99, ("warning", "healthy")), (90.0, ("critical", "degraded")),
    (97.99, ("critical", "degraded")), (98.0, ("full", "unhealthy")),
    (100.0, ("full", "unhealthy")),
])
def test_thresholds_map_to_levels_and_health(percent, expected):
    config = Config()
    level = capacity.level_for(percent, config)
    assert (level, capacity.health_for(level, True)) == expected
    assert capacity.health_for(level, False) == "unhealthy"


def test_available_is_the_smaller_of_capacity_left_and_disk_left_minus_framing():
    """``total`` is STORAGE_MAX_SIZE (or what the disk offers when less); the multipart
    allowance comes off ``available`` only."""
    o = capacity.UPLOAD_OVERHEAD
    config = Config(storage_max_size=1_000_000, storage_disk_reserve=100)
    use = capacity.Usage(stored=300_000, files=3, reserved=200_000, pending_wal=1)
    assert capacity.compute(config, use, None) == (1_000_000, 500_000, 500_000 - o, 50.0)
    # the disk is tighter: free - reserve - reserved = 150_000 (+ the allowance) of room
    assert capacity.compute(config, use, 350_100 + o) == (650_000 + o, 500_000, 150_000, 69.88)
    assert capacity.compute(config, use, 10) == (500_000, 500_000, 0, 100.0)
    over = capacity.Usage(stored=1_200_000, files=9, reserved=0, pending_wal=0)  # cap lowered
    assert capacity.compute(config, over, None) == (1_200_000, 1_200_000, 0, 100.0)
    empty = capacity.Usage(0, 0, 0, 0)
    assert capacity.compute(config, empty, 0) == (0, 0, 0, 100.0)


async def _put(client, headers, size: int, status: int = 201) -> dict:
    resp = await client.put(f"/api/v1/files/{uuid.uuid4()}", data=b"x" * size, headers=headers)
    body = await resp.json(content_type=None)
    assert resp.status == status, body
    return body


async def test_full_element_says_so_and_refuses_uploads_with_507(app_factory, auth):
    o = capacity.UPLOAD_OVERHEAD
    client = await app_factory(storage_max_size=1_000_000)
    cap = await _json(client, "/api/v1/capacity")
    assert cap["capacity"] == {"total": 1_000_000, "used": 0, "available": 1_000_000 - o,
                               "percent_used": 0.0}
    await _put(client, auth(), 850_000)
    cap = await _json(client, "/api/v1/capacity")
    assert cap["capacity"] == {"total": 1_000_000, "used": 850_000, "available": 150_000 - o,
                               "percent_used": 85.0}
    assert cap["health"] == "healthy"  # warning level only
    await _put(client, auth(), 60_000)
    cap = await _json(client, "/api/v1/capacity")
    assert (cap["capacity"]["percent_used"], cap["health"]) == (91.0, "degraded")
    await _put(client, auth(), 80_000 - o)
    cap = await _json(client, "/api/v1/capacity")
    assert cap["capacity"]["available"] == 10_000 and cap["health"] == "degraded"
    # what capacity advertises fits even as multipart (framing + fields included)
    await upload(client, auth(), b"m" * 10_000, description="d" * 2000, metadata='{"k": 1}')
    cap = await _json(client, "/api/v1/capacity")
    assert cap["capacity"] == {"total": 1_000_000, "used": 1_000_000 - o, "available": 0,
                               "percent_used": 93.45}
    assert cap["health"] == "unhealthy"  # nothing more fits: full, whatever the percentage
    info = await _json(client, "/api/v1/info")
    assert info["capacity_bytes"] == cap["capacity"]["total"]
    body = await _put(client, auth(), o + 1, status=507)
    assert "capacity" in body["detail"].lower()


async def test_available_never_exceeds_free_disk_minus_reserve(app_factory, auth, tmp_path):
    free = shutil.disk_usage(tmp_path).free
    client = await app_factory(storage_disk_reserve=free + 10**9)
    cap = await _json(client, "/api/v1/capacity")
    assert cap["capacity"]["available"] == 0 and cap["health"] == "unhealthy"
    await upload(client, auth(), b"x", status=507)


async def test_capacity_is_unhealthy_json_when_storage_is_unreachable(client, config):
    shutil.rmtree(config.storage_local_base_path)
    resp = await client.get("/api/v1/capacity")
    body = await resp.json()
    assert resp.status == 200 and resp.content_type == "application/json"
    assert body["health"] == "unhealthy" and body["capacity"]["available"] == 0


async def test_ready_reports_pending_migrations_and_shutdown(client, config, pg_dsn):
    assert (await client.get("/health/ready")).status == 200
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f"DELETE FROM {config.table_prefix}_yoyo_migration "
                           "WHERE migration_id = '0003.mode_history'")
    finally:
        await conn.close()
    body = await _json(client, "/health/ready", status=503)
    assert body["checks"]["migrations"] == "pending: 0003.mode_history"
    await client.app.shutdown()  # what SIGTERM triggers once listening has stopped
    assert client.app[runtime_key].stopping
    body = await _json(client, "/health/ready", status=503)
    assert body["checks"]["lifecycle"] == "stopping"
    assert (await client.get("/health/live")).status == 200
    # requests arriving on kept-alive connections are turned away cleanly
    for path in ("/api/v1/info", "/api/v1/files"):
        resp = await client.get(path)
        body = await resp.json(content_type=None)
        assert resp.status == 503 and "shutting down" in body["detail"]
        assert resp.headers["Retry-After"] == "1" and resp.headers["Connection"] == "close"


# --- request id, access log ------------------------------------------------------------


async def test_request_id_round_trip_and_generated_when_missing_or_bad(client, auth):
    resp = await client.get("/api/v1/info", headers={"X-Request-ID": "abc-123.x"})
    assert resp.headers["X-Request-ID"] == "abc-123.x"
    generated = set()
    for bad in (None, "x" * 129, "tab\there", "", "   ", "caf\u00e9"):
        headers = {} if bad is None else {"X-Request-ID": bad}
        resp = await client.get("/api/v1/info", headers=headers)
        rid = resp.headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid), (bad, rid)
        generated.add(rid)
    assert len(generated) == 6
    # errors carry it too, including those rendered before any handler ran
    for path, headers in (("/nope", {}), ("/api/v1/files", {}),
                          ("/api/v1/files/not-a-uuid", auth())):
        resp = await client.get(path, headers={**headers, "X-Request-ID": "err-1"})
        assert resp.status >= 400 and resp.headers["X-Request-ID"] == "err-1"
    refused = await client.post("/api/v1/files/upload", data=b"x" * 10,
                                headers={"Expect": "100-continue", "X-Request-ID": "exp-1"})
    assert refused.status == 401 and refused.headers["X-Request-ID"] == "exp-1"


@pytest.fixture
def json_log():
    """Capture the root logger as the service's JSON lines (formatter + filter)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def test_access_log_is_one_json_object_per_request_without_secrets(
        app_factory, token, json_log):
    client = await app_factory(app_mode="rw")
    jwt = token(name="auditor", sub="user-42")
    headers = {"Authorization": f"Bearer {jwt}", "X-Request-ID": "req-log-1"}
    resp = await client.post("/api/v1/files/upload", data=form(b"z" * 64), headers=headers)
    assert resp.status == 201
    sent = len(await resp.read())
    resp = await client.post("/api/v1/mode", json={"target_mode": "ro"},
                             headers={**headers, "X-Request-ID": "req-log-2"})
    assert resp.status == 200
    lines = json_log()
    access = [e for e in lines if e["logger"] == "storage.access"]
    up = next(e for e in access if e["request_id"] == "req-log-1")
    assert up["route"] == "/api/v1/files/upload" and up["status"] == 201
    assert up["method"] == "POST" and up["user_sub"] == "user-42"
    assert up["bytes"] == sent and up["bytes_in"] > 64
    assert isinstance(up["duration_s"], float) and up["duration_s"] > 0
    # a log line written by the handler itself carries the request's id
    change = next(e for e in lines if e["msg"].startswith("mode changed"))
    assert change["request_id"] == "req-log-2"
    text = "\n".join(json.dumps(e) for e in lines)
    assert jwt not in text and jwt.split(".")[1] not in text


def test_redaction_removes_tokens_from_any_message():
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    assert jwt not in redact(f"got {jwt} from client")
    assert "secret-token-value" not in redact("Authorization: Bearer secret-token-value")
    record = logging.LogRecord("x", logging.INFO, "", 0, "token %s", (jwt,), None)
    RequestContextFilter().filter(record)
    assert jwt not in record.getMessage()


# --- CORS ----------------------------------------------------------------------------------


async def test_cors_preflight_and_simple_requests(app_factory):
    client = await app_factory(cors_allow_origins=("https://ui.example",),
                               cors_expose_headers=("X-Request-ID",))
    pre = await client.options("/api/v1/files", headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "Authorization, X-Request-ID"})
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "https://ui.example"
    assert "GET" in pre.headers["Access-Control-Allow-Methods"]
    assert pre.headers["Access-Control-Allow-Headers"] == "Authorization, X-Request-ID"
    assert pre.headers["Access-Control-Max-Age"] == "600"
    assert pre.headers["Access-Control-Allow-Credentials"] == "true"
    bad = await client.options("/api/v1/files", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert bad.status == 403 and "Access-Control-Allow-Origin" not in bad.headers
    odd_header = await client.options("/api/v1/files", headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "X-Unknown"})
    assert odd_header.status == 403
    simple = await client.get("/api/v1/info", headers={"Origin": "https://ui.example"})
    assert simple.headers["Access-Control-Allow-Origin"] == "https://ui.example"
    assert simple.headers["Access-Control-Expose-Headers"] == "X-Request-ID"
    assert "Origin" in simple.headers.getall("Vary")
    denied = await client.get("/api/v1/files", headers={"Origin": "https://ui.example"})
    assert denied.status == 401  # CORS headers on errors too, so browsers can read them
    assert denied.headers["Access-Control-Allow-Origin"] == "https://ui.example"
    plain = await client.get("/api/v1/info")
    assert "Access-Control-Allow-Origin" not in plain.headers


async def test_cors_off_means_no_headers_and_no_preflight(app_factory):
    client = await app_factory(cors_enabled=False)
    pre = await client.options("/api/v1/files", headers={
        "Origin": "http://localhost:4200", "Access-Control-Request-Method": "GET"})
    assert pre.status == 405
    resp = await client.get("/api/v1/info", headers={"Origin": "http://localhost:4200"})
    assert "Access-Control-Allow-Origin" not in resp.headers


def test_no_credentials_with_wildcard_origin():
    from storage.config import ConfigError

    with pytest.raises(ConfigError):
        Config(cors_allow_origins=("*",), cors_allow_credentials=True).check()
