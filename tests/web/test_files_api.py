"""Read, download (Range/ETag), PATCH, DELETE and list against the real app.

Tests marked ``BOTH_BACKENDS`` run on local disk and on S3 (SeaweedFS); every Range
form on S3 is in test_s3_app.py (on a multipart object, in one app).
"""

import asyncio
import json
import uuid

import pytest
from helpers import (
    BOTH_BACKENDS,
    backend_of,
    drop_data_object,
    random_bytes,
    replace_data_object,
    sha256,
    stored_objects,
    upload,
)

DATA = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture
async def stored(client, auth):
    body = await upload(client, auth(), DATA, "отчёт 2025.bin", "application/octet-stream",
                        description="first", version="1.0", metadata='{"a": 1}')
    return body["file_id"]


def url(fid: str, suffix: str = "") -> str:
    return f"/api/v1/files/{fid}{suffix}"


async def test_metadata_has_the_exact_15_keys(client, auth, stored):
    resp = await client.get(url(stored), headers=auth())
    meta = await resp.json()
    assert resp.status == 200
    assert set(meta) == {
        "file_id", "original_filename", "storage_filename", "file_size", "content_type",
        "created_at", "created_by_username", "created_by_fullname", "description", "version",
        "storage_path", "checksum", "cache_updated_at", "cache_ttl_hours", "cache_expired"}
    assert meta["created_at"].endswith("+00:00") and meta["cache_ttl_hours"] == 24
    assert meta["cache_expired"] is False and meta["created_by_username"] == "tester"


async def test_unknown_id_404_and_malformed_id_422(client, auth):
    missing = str(uuid.uuid4())
    resp = await client.get(url(missing), headers=auth())
    assert resp.status == 404 and (await resp.json())["detail"] == f"File {missing} not found"
    resp = await client.get(url(missing, "/download"), headers=auth())
    assert resp.status == 404
    for bad in ("not-a-uuid", "1" * 200, "%00"):
        resp = await client.get(url(bad), headers=auth())
        assert resp.status == 422, bad


@BOTH_BACKENDS
async def test_full_download_headers(client, auth, stored):
    resp = await client.get(url(stored, "/download"), headers=auth())
    body = await resp.read()
    assert resp.status == 200 and body == DATA
    h = resp.headers
    assert h["Content-Length"] == str(len(DATA)) and h["Accept-Ranges"] == "bytes"
    assert h["ETag"] == f'"{sha256(DATA)}"' and "Last-Modified" in h
    assert h["Content-Type"] == "application/octet-stream"
    cd = h["Content-Disposition"]
    assert cd.startswith("attachment;") and "filename*=UTF-8''%D0%BE%D1%82%D1%87%D1%91%D1%82" in cd
    cd.encode("latin-1")


async def test_download_names_only_the_last_path_component(client, auth):
    """A name with directory parts: the plain filename= is its last component (also after
    the ASCII fallback), the whole name stays in filename* and in the metadata (issue 19)."""
    for name, plain, star in (
            ("../../../../tmp/x.txt", "x.txt", "..%2F..%2F..%2F..%2Ftmp%2Fx.txt"),
            ("\uff0e\uff0e\uff0fx", "x", "%EF%BC%8E%EF%BC%8E%EF%BC%8Fx"),  # ．．／x
            ("a\\..\\b.txt", "b.txt", "a%5C..%5Cb.txt")):
        file_id = (await upload(client, auth(), b"data", name))["file_id"]
        resp = await client.get(url(file_id, "/download"), headers=auth())
        assert resp.status == 200 and await resp.read() == b"data"
        assert resp.headers["Content-Disposition"] == (
            f"attachment; filename=\"{plain}\"; filename*=UTF-8''{star}")
        meta = await (await client.get(url(file_id), headers=auth())).json()
        assert meta["original_filename"] == name


async def test_downloads_say_nosniff_and_no_response_names_versions(client, auth, stored):
    resp = await client.get(url(stored, "/download"), headers=auth())
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    head = await client.head(url(stored, "/download"), headers=auth())
    assert head.headers["X-Content-Type-Options"] == "nosniff"
    for answer in (resp, head, await client.get(url(stored), headers=auth()),
                   await client.get(url(stored)),  # 401
                   await client.get("/no/such/route"), await client.get("/health/live"),
                   await client.post("/api/v1/files/upload", headers=auth(),
                                     data=b"x", expect100=True)):  # refused before the body
        assert answer.headers["Server"] == "storage-element", answer


@BOTH_BACKENDS
async def test_head_download_has_headers_and_no_body(client, auth, stored):
    resp = await client.head(url(stored, "/download"), headers=auth())
    assert resp.status == 200 and resp.headers["Content-Length"] == str(len(DATA))
    assert await resp.read() == b""


@pytest.mark.parametrize("header,start,end", [
    ("bytes=0-0", 0, 0), ("bytes=10-19", 10, 19), ("bytes=10200-", 10200, 10239),
    ("bytes=-5", 10235, 10239), ("bytes=10000-999999", 10000, 10239),
])
async def test_single_ranges(client, auth, stored, header, start, end):
    resp = await client.get(url(stored, "/download"), headers={**auth(), "Range": header})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{len(DATA)}"
    assert await resp.read() == DATA[start:end + 1]


async def test_multiple_ranges_are_multipart_byteranges(client, auth, stored):
    resp = await client.get(url(stored, "/download"),
                            headers={**auth(), "Range": "bytes=0-1,100-101,-2"})
    assert resp.status == 206
    assert resp.headers["Content-Type"].startswith("multipart/byteranges; boundary=")
    body = await resp.read()
    assert len(body) == int(resp.headers["Content-Length"])
    boundary = resp.headers["Content-Type"].split("boundary=")[1]
    parts = [p for p in body.split(f"--{boundary}".encode()) if b"Content-Range" in p]
    payloads = [p.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n") for p in parts]
    assert payloads == [DATA[0:2], DATA[100:102], DATA[-2:]]
    assert b"Content-Range: bytes 100-101/10240" in body


async def test_unsatisfiable_range_is_416_json(client, auth, stored):
    resp = await client.get(url(stored, "/download"), headers={**auth(), "Range": "bytes=99999-"})
    assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{len(DATA)}"
    assert "not satisfiable" in (await resp.json())["detail"]


async def test_thousands_of_ranges_do_not_amplify(client, auth, stored):
    header = "bytes=" + ",".join(f"{i}-{i}" for i in range(0, 4000, 2))[:1000]
    resp = await client.get(url(stored, "/download"), headers={**auth(), "Range": header})
    body = await resp.read()
    assert resp.status == 200 and body == DATA  # so many ranges are ignored: the whole file


async def test_if_none_match_304_and_if_range(client, auth, stored):
    etag = f'"{sha256(DATA)}"'
    resp = await client.get(url(stored, "/download"), headers={**auth(), "If-None-Match": etag})
    assert resp.status == 304 and resp.headers["ETag"] == etag and await resp.read() == b""
    resp = await client.get(url(stored, "/download"),
                            headers={**auth(), "Range": "bytes=0-3", "If-Range": etag})
    assert resp.status == 206 and await resp.read() == DATA[:4]
    resp = await client.get(url(stored, "/download"),
                            headers={**auth(), "Range": "bytes=0-3", "If-Range": '"stale"'})
    assert resp.status == 200 and await resp.read() == DATA
    resp = await client.get(url(stored, "/download"), headers={**auth(), "If-Match": '"other"'})
    assert resp.status == 412


def relpath(meta: dict) -> str:
    return meta["storage_path"] + meta["storage_filename"]


@BOTH_BACKENDS
async def test_missing_data_file_is_404_before_headers(client, auth, stored, config):
    meta = await (await client.get(url(stored), headers=auth())).json()
    await drop_data_object(config, relpath(meta))
    resp = await client.get(url(stored, "/download"), headers=auth())
    assert resp.status == 404 and "missing" in (await resp.json())["detail"]
    resp = await client.head(url(stored, "/download"), headers=auth())  # reads no body
    assert resp.status == 404


@BOTH_BACKENDS
async def test_truncated_data_file_is_500_json_never_a_short_200(client, auth, stored, config):
    meta = await (await client.get(url(stored), headers=auth())).json()
    await replace_data_object(config, relpath(meta), DATA[:100])
    resp = await client.get(url(stored, "/download"), headers=auth())
    assert resp.status == 500 and "damaged" in (await resp.json())["detail"]


@BOTH_BACKENDS
async def test_patch_updates_attr_first_and_keeps_unknown_keys(client, auth, stored, config):
    meta = await (await client.get(url(stored), headers=auth())).json()
    async with backend_of(config) as backend:
        doc = json.loads(await backend.read_attr(relpath(meta)))
        doc["x_vendor_note"] = {"keep": True}
        await backend.write_attr(relpath(meta), json.dumps(doc).encode())
    resp = await client.patch(url(stored), json={"description": "second", "metadata": {"b": 2}},
                              headers=auth())
    body = await resp.json()
    assert resp.status == 200 and body["description"] == "second" and body["version"] == "1.0"
    assert body["created_at"] == meta["created_at"]
    async with backend_of(config) as backend:
        doc = json.loads(await backend.read_attr(relpath(meta)))
    assert doc["description"] == "second" and doc["custom_attributes"] == {"b": 2}
    assert doc["x_vendor_note"] == {"keep": True} and doc["version"] == "1.0"
    assert doc["updated_at"] > doc["created_at"]


async def test_patch_null_keeps_values_and_404_wording(client, auth, stored):
    resp = await client.patch(url(stored), json={"description": None, "version": "2.0"},
                              headers=auth())
    body = await resp.json()
    assert body["description"] == "first" and body["version"] == "2.0"
    missing = str(uuid.uuid4())
    resp = await client.patch(url(missing), json={"description": "x"}, headers=auth())
    assert resp.status == 404 and (await resp.json())["detail"] == f"File not found: {missing}"


@pytest.mark.parametrize("body", [b"[]", b'{"version": 5}', b'{"description": "\\u0000"}',
                                  b'{"metadata": [1]}', b'{"version": "' + b"v" * 51 + b'"}',
                                  b'{"description": "' + b"d" * 4000 + b'"}'])
async def test_patch_bad_bodies_are_400(client, auth, stored, body):
    resp = await client.patch(url(stored), data=body,
                              headers={**auth(), "Content-Type": "application/json"})
    assert resp.status == 400, await resp.text()
    meta = await (await client.get(url(stored), headers=auth())).json()
    assert meta["description"] == "first"


@pytest.mark.parametrize("mode,status", [("edit", 200), ("rw", 200), ("ro", 400), ("ar", 400)])
async def test_patch_mode_matrix(app_factory, auth, mode, status):
    client = await app_factory(app_mode=mode)
    resp = await client.patch(url(str(uuid.uuid4())), json={"description": "x"}, headers=auth())
    if status == 400:
        assert resp.status == 400
        assert (await resp.json())["detail"] == f"Metadata update not allowed in {mode} mode"
    else:
        assert resp.status == 404  # allowed, and the file does not exist


@BOTH_BACKENDS
async def test_delete_removes_data_attr_and_row(client, auth, stored, config):
    assert len(await stored_objects(config)) == 2
    resp = await client.delete(url(stored), headers=auth(role="operator"))
    assert resp.status == 204 and await resp.read() == b""
    assert (await client.get(url(stored), headers=auth())).status == 404
    assert await stored_objects(config) == []


async def test_delete_order_of_checks_403_400_404(app_factory, auth):
    rw = await app_factory(app_mode="rw")
    missing = url(str(uuid.uuid4()))
    resp = await rw.delete(missing, headers=auth(role="user"))
    assert resp.status == 403 and (await resp.json())["detail"] == (
        "Operator or admin access required")
    resp = await rw.delete(missing, headers=auth(role="admin"))
    assert resp.status == 400 and (await resp.json())["detail"] == (
        "File deletion not allowed in rw mode. Only EDIT mode allows deletion.")
    edit = await app_factory(app_mode="edit")
    resp = await edit.delete(missing, headers=auth(role="admin"))
    assert resp.status == 404


@BOTH_BACKENDS
async def test_delete_with_missing_data_file_still_deletes(client, auth, stored, config):
    meta = await (await client.get(url(stored), headers=auth())).json()
    await drop_data_object(config, relpath(meta))
    resp = await client.delete(url(stored), headers=auth())
    assert resp.status == 204
    assert (await client.get(url(stored), headers=auth())).status == 404
    assert await stored_objects(config) == []


@BOTH_BACKENDS
async def test_concurrent_patch_delete_download_never_corrupt(client, auth, config):
    fid = (await upload(client, auth(), random_bytes(200_000)))["file_id"]

    async def patcher(i):
        r = await client.patch(url(fid), json={"description": f"d{i}"}, headers=auth())
        return r.status

    async def reader():
        r = await client.get(url(fid, "/download"), headers=auth())
        data = await r.read()
        return r.status, len(data)

    tasks = [patcher(i) for i in range(10)] + [reader() for _ in range(10)]
    tasks.insert(12, client.delete(url(fid), headers=auth()))
    results = await asyncio.gather(*tasks)
    for r in results:
        if isinstance(r, tuple):
            assert r in ((200, 200_000), (404, r[1]))
        elif isinstance(r, int):
            assert r in (200, 404)
    assert await stored_objects(config) == []


async def test_list_newest_first_paging_and_bad_params(client, auth):
    ids = [(await upload(client, auth(), bytes([i])))["file_id"] for i in range(5)]
    resp = await client.get("/api/v1/files/?skip=0&limit=3", headers=auth())
    body = await resp.json()
    assert body["total"] == 5 and [f["file_id"] for f in body["files"]] == ids[::-1][:3]
    body = await (await client.get("/api/v1/files?skip=3", headers=auth())).json()
    assert [f["file_id"] for f in body["files"]] == ids[::-1][3:]
    body = await (await client.get("/api/v1/files?limit=1000", headers=auth())).json()
    assert len(body["files"]) == 5
    for bad in ("skip=-1", "limit=-5", "limit=abc"):
        resp = await client.get(f"/api/v1/files?{bad}", headers=auth())
        assert resp.status == 400, bad


async def test_every_endpoint_needs_a_token(client, stored):
    for method, path in [("GET", url(stored)), ("GET", url(stored, "/download")),
                         ("PATCH", url(stored)), ("DELETE", url(stored)),
                         ("GET", "/api/v1/files"), ("POST", "/api/v1/files/upload")]:
        resp = await client.request(method, path)
        assert resp.status == 401, (method, path)
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        assert (await resp.json())["detail"] == "Not authenticated"


async def test_read_only_role_cannot_upload_or_patch(client, auth, stored):
    resp = await client.patch(url(stored), json={"description": "x"},
                              headers=auth(role="readonly"))
    assert resp.status == 403
    resp = await client.get(url(stored), headers=auth(role="auditor"))
    assert resp.status == 200
