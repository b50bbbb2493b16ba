import asyncpg

from storage.errors import PROBLEM_JSON

PNG = b"\x89PNG fake"


async def _upload(client, auth, data=b"hello", name="a.txt"):
    from aiohttp import FormData

    form = FormData()
    form.add_field("file", data, filename=name, content_type="text/plain")
    resp = await client.post("/api/v1/files/upload", data=form, headers=auth())
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def test_two_apps_two_prefixes_one_database_never_see_each_other(app_factory, auth,
                                                                        pg_dsn):
    a = await app_factory(table_prefix="side_a")
    b = await app_factory(table_prefix="side_b")
    fa = await _upload(a, auth, b"from a")
    fb = await _upload(b, auth, b"from b")
    assert (await a.get(f"/api/v1/files/{fb['file_id']}", headers=auth())).status == 404
    assert (await b.get(f"/api/v1/files/{fa['file_id']}", headers=auth())).status == 404
    la = await (await a.get("/api/v1/files", headers=auth())).json()
    lb = await (await b.get("/api/v1/files", headers=auth())).json()
    assert [f["file_id"] for f in la["files"]] == [fa["file_id"]] and la["total"] == 1
    assert [f["file_id"] for f in lb["files"]] == [fb["file_id"]] and lb["total"] == 1
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM side_a_files") == 1
        assert await conn.fetchval("SELECT count(*) FROM side_b_files") == 1
    finally:
        await conn.close()


async def test_router_errors_are_problem_json(client, auth):
    resp = await client.get("/nope")
    body = await resp.json(content_type=None)
    assert resp.status == 404 and resp.content_type == PROBLEM_JSON
    assert set(body) >= {"type", "title", "status", "detail"} and isinstance(body["detail"], str)
    resp = await client.post("/health/live")
    assert resp.status == 405 and resp.content_type == PROBLEM_JSON
    assert "Allow" in resp.headers


async def test_bad_json_and_bad_uuid_are_clear_4xx(client, auth):
    resp = await client.patch("/api/v1/files/00000000-0000-0000-0000-000000000001",
                              data=b"{not json", headers=auth())
    body = await resp.json(content_type=None)
    assert resp.status == 400 and "JSON" in body["detail"]
    resp = await client.get("/api/v1/files/not-a-uuid", headers=auth())
    body = await resp.json(content_type=None)
    assert resp.status == 422 and body["errors"][0]["loc"] == ["path", "file_id"]


async def test_root_live_ready(client):
    root = await (await client.get("/")).json()
    assert root == {"service": "ArtStore Storage Element", "version": "1.0.0", "mode": "edit",
                    "storage_type": "local", "status": "operational"}
    live = await client.get("/health/live")
    assert live.status == 200 and (await live.json())["checks"] == {"process": "running"}
    ready = await client.get("/health/ready")
    body = await ready.json()
    assert ready.status == 200 and body["status"] == "ready"
    assert body["checks"]["storage_directory"] == "accessible"
    assert body["checks"]["database"] == "connected"


async def test_ready_is_503_with_reason_when_storage_is_gone(client, config):
    import shutil

    shutil.rmtree(config.storage_local_base_path)
    resp = await client.get("/health/ready")
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "not_ready"
    assert body["checks"]["storage_directory"] == "not_accessible"
    assert "storage_error" in body["checks"]
