"""Uploads: multipart and raw PUT, durability, limits, integrity, hostile names.

Tests marked ``BOTH_BACKENDS`` run on local disk and on S3 (SeaweedFS); residue is
checked with ``stored_objects`` (files, or objects and multipart uploads).
"""

import asyncio
import base64
import hashlib
import json
import re
import uuid

import pytest
from aiohttp import FormData
from cache_helpers import connect
from helpers import (
    BOTH_BACKENDS,
    backend_of,
    config_of,
    form,
    random_bytes,
    raw_multipart,
    sha256,
    stored_files,
    stored_objects,
    upload,
    wal_outcomes,
)

UPLOAD = "/api/v1/files/upload"


async def test_upload_success_returns_the_contract_keys(client, auth, config):
    data = b"report body"
    body = await upload(client, auth(name="ingester-module"), data, "report final.pdf",
                        "application/pdf")
    assert set(body) == {"file_id", "original_filename", "storage_filename", "file_size",
                         "checksum", "message"}
    assert body["original_filename"] == "report final.pdf"
    assert body["file_size"] == len(data) and body["checksum"] == sha256(data)
    assert body["message"] == "File uploaded successfully"
    uuid.UUID(body["file_id"])
    assert re.fullmatch(r"report final_ingester-module_\d{8}T\d{6}_" + body["file_id"] + r"\.pdf",
                        body["storage_filename"])


@BOTH_BACKENDS
async def test_directory_structure_and_attr_document(client, auth, config):
    body = await upload(client, auth(), b"abc", "x.txt", description="d", version="1.0",
                        metadata=json.dumps({"project": "alpha", "n": 3}))
    meta = await (await client.get(f"/api/v1/files/{body['file_id']}", headers=auth())).json()
    assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/\d{2}/", meta["storage_path"])
    relpath = meta["storage_path"] + meta["storage_filename"]
    assert await stored_objects(config) == [relpath, relpath + ".attr.json"]
    async with backend_of(config) as backend:
        reader = await backend.open(relpath)
        assert b"".join([c async for c in reader.iter_range(0, 2, 1024)]) == b"abc"
        await reader.close()
        attr = json.loads(await backend.read_attr(relpath))
    assert list(attr)[:15] == [
        "file_id", "original_filename", "storage_filename", "file_size", "content_type",
        "created_at", "updated_at", "created_by_id", "created_by_username",
        "created_by_fullname", "description", "version", "storage_path", "checksum", "metadata"]
    assert attr["schema_version"] == "2.0"
    assert attr["custom_attributes"] == {"project": "alpha", "n": 3}
    assert attr["checksum"] == sha256(b"abc") and attr["description"] == "d"
    assert attr["created_at"].endswith("+00:00")


@BOTH_BACKENDS
async def test_store_and_retrieve_large_file(client, auth):
    data = random_bytes(10 * 1024 * 1024 + 17)
    body = await upload(client, auth(), data, "big.bin", "application/octet-stream")
    assert body["file_size"] == len(data) and body["checksum"] == sha256(data)
    resp = await client.get(f"/api/v1/files/{body['file_id']}/download", headers=auth())
    got = await resp.read()
    assert resp.status == 200 and hashlib.sha256(got).hexdigest() == body["checksum"]


async def test_custom_attributes_and_given_file_id_are_kept(client, auth, config, pg_dsn):
    fid = str(uuid.uuid4())
    body = await upload(client, auth(), b"x", file_id=fid, description="about",
                        metadata='{"k": "v", "n": [1, 2.5, null]}',
                        uploaded_by_username="ignored", ttl_days="")
    assert body["file_id"] == fid
    meta = await (await client.get(f"/api/v1/files/{fid}", headers=auth())).json()
    assert meta["description"] == "about"
    relpath = meta["storage_path"] + meta["storage_filename"]
    attr = json.loads((config.storage_local_base_path / (relpath + ".attr.json")).read_text())
    assert attr["custom_attributes"] == attr["metadata"] == {"k": "v", "n": [1, 2.5, None]}
    conn = await connect(pg_dsn)
    try:
        row = await conn.fetchval(f"SELECT metadata_json FROM {config.table_prefix}_files "
                                  "WHERE file_id = $1", uuid.UUID(fid))
    finally:
        await conn.close()
    assert row == {"k": "v", "n": [1, 2.5, None]}
    found = await (await client.get("/api/v1/files/search", params={"metadata.k": "v"},
                                    headers=auth())).json()
    assert [f["file_id"] for f in found["files"]] == [fid]


async def test_fields_after_the_file_part_are_applied(client, auth):
    f = form(b"late", "l.txt")
    f.add_field("description", "came after the file")
    resp = await client.post(UPLOAD, data=f, headers=auth())
    assert resp.status == 201
    fid = (await resp.json())["file_id"]
    meta = await (await client.get(f"/api/v1/files/{fid}", headers=auth())).json()
    assert meta["description"] == "came after the file"


async def test_fields_after_the_file_override_those_before_it(client, auth):
    f = FormData()
    f.add_field("description", "before")
    f.add_field("version", "1")
    f.add_field("file", b"x", filename="o.txt")
    f.add_field("description", "after")
    f.add_field("metadata", json.dumps({"came": "late"}))
    resp = await client.post(UPLOAD, data=f, headers=auth())
    assert resp.status == 201
    fid = (await resp.json())["file_id"]
    meta = await (await client.get(f"/api/v1/files/{fid}", headers=auth())).json()
    assert (meta["description"], meta["version"]) == ("after", "1")
    found = await (await client.get("/api/v1/files/search", params={"metadata.came": "late"},
                                    headers=auth())).json()
    assert [f["file_id"] for f in found["files"]] == [fid]


def test_an_upload_spec_cannot_change_under_the_upload():
    """Fields that arrive after the file reach ``store`` as ``trailing``, never by
    mutating the spec it is storing (a frozen dataclass)."""
    import dataclasses

    from storage.domain.uploads import UploadSpec

    spec = UploadSpec("a.txt", description="d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.description = "changed"  # type: ignore[misc]


async def test_expect_100_continue_runs_the_upload_prechecks_once(client, auth, monkeypatch):
    """The ``Expect: 100-continue`` handler checks mode and size before the body comes;
    the upload handler, next on the same request, does not check them again."""
    from storage.domain import modes

    calls = []
    real = modes.require
    monkeypatch.setattr(modes, "require", lambda *a, **k: (calls.append(a), real(*a, **k)))
    f = form(b"expect me", "e.txt")
    resp = await client.post(UPLOAD, data=f, headers={**auth(), "Expect": "100-continue"})
    assert resp.status == 201
    assert [a[0] for a in calls] == ["upload"]
    calls.clear()
    resp = await client.post(UPLOAD, data=form(b"plain", "p.txt"), headers=auth())
    assert resp.status == 201
    assert [a[0] for a in calls] == ["upload"]


@BOTH_BACKENDS
async def test_duplicate_file_id_is_409_and_leaves_the_first(client, auth, config):
    fid = str(uuid.uuid4())
    await upload(client, auth(), b"first", file_id=fid)
    before = await stored_objects(config)
    assert len(before) == 2
    body = await upload(client, auth(), b"second", file_id=fid, status=409)
    assert fid in body["detail"]
    assert await stored_objects(config) == before
    got = await client.get(f"/api/v1/files/{fid}/download", headers=auth())
    assert await got.read() == b"first"


@BOTH_BACKENDS
async def test_zero_byte_file_is_accepted(client, auth):
    body = await upload(client, auth(), b"", "empty.txt")
    assert body["file_size"] == 0 and body["checksum"] == sha256(b"")
    resp = await client.get(f"/api/v1/files/{body['file_id']}/download", headers=auth())
    assert resp.status == 200 and await resp.read() == b""


async def test_missing_file_part_is_422_and_bad_file_id_400(client, auth):
    f = form(b"x")
    fields = FormData(default_to_multipart=True)
    fields.add_field("description", "no file")
    resp = await client.post(UPLOAD, data=fields, headers=auth())
    body = await resp.json()
    assert (resp.status, body["detail"]) == (422, "file: Field required")
    assert body["errors"][0]["loc"] == ["body", "file"]
    resp = await client.post(UPLOAD, data={"description": "no file"}, headers=auth())
    assert resp.status == 400  # not even multipart (a urlencoded form)
    assert "expected a multipart/form-data body" in (await resp.json())["detail"]
    f = form(b"x", file_id="not-a-uuid")
    resp = await client.post(UPLOAD, data=f, headers=auth())
    assert resp.status == 400 and "Invalid file_id format" in (await resp.json())["detail"]


async def test_non_multipart_body_is_400(client, auth):
    resp = await client.post(UPLOAD, data=b"raw", headers={**auth(),
                                                           "Content-Type": "text/plain"})
    assert resp.status == 400 and "multipart" in (await resp.json())["detail"]


@BOTH_BACKENDS
async def test_two_file_parts_are_refused_and_nothing_stays(client, auth, config):
    f = form(b"one", "1.txt")
    f.add_field("file", b"two", filename="2.txt")
    resp = await client.post(UPLOAD, data=f, headers=auth())
    assert resp.status == 400 and "more than one file" in (await resp.json())["detail"]
    assert await stored_objects(config) == []


@pytest.mark.parametrize("name", [
    "../../etc/passwd", "..", ".", " .. ", "/abs/path.txt", "a\\..\\b.txt", "nul\x00byte.txt",
    "ctrl\x01\x1f.txt", "x" * 496 + ".txt", "о" * 200 + ".txt", "🙂" * 120, "%2e%2e%2f.txt",
    "tab\tname.txt", "a" * 200 + ".verylongextension_that_is_not_one",
])
async def test_hostile_names_stay_inside_the_storage_root(client, auth, config, name):
    data, ctype = raw_multipart(name, b"data")
    resp = await client.post(UPLOAD, data=data, headers={**auth(), "Content-Type": ctype})
    body = await resp.json()
    if "\x00" in name or "\x01" in name:  # refused while parsing the part headers
        assert resp.status == 400 and body["detail"]
        assert await stored_objects(config) == []
        return
    if name.strip() in (".", ".."):  # a directory's name, not a file's (guide B.2)
        assert resp.status == 400 and "is not a file name" in body["detail"], body
        assert await stored_objects(config) == []
        resp = await client.put(f"/api/v1/files/{uuid.uuid4()}", params={"filename": name},
                                data=b"data", headers=auth())
        assert resp.status == 400 and "is not a file name" in (await resp.json())["detail"]
        assert await stored_objects(config) == []
        return
    assert resp.status == 201, body
    sf = body["storage_filename"]
    assert "/" not in sf and "\x00" not in sf and len(sf.encode()) <= 245
    root = config.storage_local_base_path.resolve()
    for path in stored_files(root):
        assert path.resolve().is_relative_to(root)
        assert len(path.name.encode()) <= 255


async def test_name_over_500_characters_is_400_before_the_body(client, auth, config):
    data, ctype = raw_multipart("n" * 501, b"data")
    resp = await client.post(UPLOAD, data=data, headers={**auth(), "Content-Type": ctype})
    assert resp.status == 400 and "filename" in (await resp.json())["detail"]
    assert await stored_objects(config) == []


async def test_name_with_nothing_usable_becomes_file(client, auth):
    body = await upload(client, auth(), b"q", "???.txt")
    assert body["storage_filename"].startswith("file_")


async def test_bad_content_type_is_400(client, auth):
    resp = await client.post(UPLOAD, data=form(b"x", content_type="не/тип"), headers=auth())
    assert resp.status == 400 and "media type" in (await resp.json())["detail"]


@BOTH_BACKENDS
async def test_raw_put_upload(client, auth, config):
    fid = str(uuid.uuid4())
    data = random_bytes(300_000)
    resp = await client.put(f"/api/v1/files/{fid}?filename=raw%20name.bin", data=data,
                            headers={**auth(), "Content-Type": "application/x-raw"})
    body = await resp.json()
    assert resp.status == 201 and body["file_id"] == fid and body["checksum"] == sha256(data)
    meta = await (await client.get(f"/api/v1/files/{fid}", headers=auth())).json()
    assert meta["original_filename"] == "raw name.bin"
    assert meta["content_type"] == "application/x-raw"


@BOTH_BACKENDS
async def test_raw_put_filename_from_content_disposition_and_chunked_body(client, auth):
    fid = str(uuid.uuid4())

    async def gen():
        for _ in range(5):
            yield b"z" * 100_000

    resp = await client.put(f"/api/v1/files/{fid}", data=gen(), headers={
        **auth(),
        "Content-Disposition": "attachment; filename*=UTF-8''%D0%BE%D1%82%D1%87%D1%91%D1%82.txt",
    })
    body = await resp.json()
    assert resp.status == 201 and body["file_size"] == 500_000
    assert body["original_filename"] == "отчёт.txt"


@BOTH_BACKENDS
async def test_client_digest_match_and_mismatch(client, auth, config):
    data = b"integrity"
    good = base64.b64encode(hashlib.sha256(data).digest()).decode()
    fid = str(uuid.uuid4())
    resp = await client.put(f"/api/v1/files/{fid}", data=data,
                            headers={**auth(), "Content-Digest": f"sha-256=:{good}:"})
    assert resp.status == 201
    bad = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    fid2 = str(uuid.uuid4())
    resp = await client.put(f"/api/v1/files/{fid2}", data=data,
                            headers={**auth(), "Repr-Digest": f"sha-256=:{bad}:"})
    assert resp.status == 400 and "mismatch" in (await resp.json())["detail"]
    md5 = base64.b64encode(hashlib.md5(b"nope").digest()).decode()
    resp = await client.post(UPLOAD, data=form(data), headers={**auth(), "Content-MD5": md5})
    assert resp.status == 400
    assert (await client.get(f"/api/v1/files/{fid2}", headers=auth())).status == 404
    assert len(await stored_objects(config)) == 2  # only the good one + attr
    resp = await client.put(f"/api/v1/files/{uuid.uuid4()}", data=data,
                            headers={**auth(), "Content-Digest": "sha-256=:!!:"})
    assert resp.status == 400


@BOTH_BACKENDS
async def test_per_file_cap_413_before_and_while_streaming(app_factory, auth):
    client = await app_factory(storage_max_file_size=1000)
    resp = await client.put(f"/api/v1/files/{uuid.uuid4()}", data=b"x" * 1001, headers=auth())
    assert resp.status == 413

    async def gen():
        for _ in range(20):
            yield b"y" * 100

    resp = await client.put(f"/api/v1/files/{uuid.uuid4()}", data=gen(), headers=auth())
    assert resp.status == 413
    resp = await client.post(UPLOAD, data=form(b"z" * 5000), headers=auth())
    assert resp.status == 413
    assert await stored_objects(config_of(client)) == []


async def _status_before_body(client, auth, head: str) -> bytes:
    """The status line the server answers to request headers alone (no body byte sent)."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write((head + f"Host: x\r\nAuthorization: {auth()['Authorization']}\r\n\r\n"
                      ).encode())
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


@BOTH_BACKENDS
async def test_a_file_larger_than_the_element_is_507_without_a_per_file_cap(app_factory, auth):
    """artStore's ingester tries the next element only on 507: with no explicit
    STORAGE_MAX_FILE_SIZE, a file that cannot fit the element is 507, never 413, however
    it is sent, and before the body is read when its length is declared."""
    client = await app_factory(storage_max_size=256 * 1024)
    big = b"x" * (400 * 1024)
    for resp in (await client.post(UPLOAD, data=form(big), headers=auth()),
                 await client.put(f"/api/v1/files/{uuid.uuid4()}", data=big, headers=auth())):
        body = await resp.json()
        assert resp.status == 507, body
        assert resp.content_type == "application/problem+json"
        assert body["detail"].startswith("Not enough capacity")

    async def chunked():
        for _ in range(10):
            yield b"y" * (40 * 1024)

    resp = await client.put(f"/api/v1/files/{uuid.uuid4()}", data=chunked(), headers=auth())
    assert resp.status == 507
    n = len(big) + 70_000  # over the capacity even less the multipart allowance
    for head in (f"PUT /api/v1/files/{uuid.uuid4()} HTTP/1.1\r\nContent-Length: {n}\r\n",
                 f"PUT /api/v1/files/{uuid.uuid4()} HTTP/1.1\r\nContent-Length: {n}\r\n"
                 "Expect: 100-continue\r\n",
                 f"POST {UPLOAD} HTTP/1.1\r\nContent-Length: {n}\r\n"
                 "Content-Type: multipart/form-data; boundary=b\r\n",
                 f"POST {UPLOAD} HTTP/1.1\r\nContent-Length: {n}\r\n"
                 "Content-Type: multipart/form-data; boundary=b\r\nExpect: 100-continue\r\n"):
        assert (await _status_before_body(client, auth, head)).startswith(b"HTTP/1.1 507 ")
    assert await stored_objects(config_of(client)) == []
    # an explicit per-file cap is what 413 is for
    client = await app_factory(storage_max_size=256 * 1024, storage_max_file_size=300 * 1024)
    resp = await client.put(f"/api/v1/files/{uuid.uuid4()}", data=big, headers=auth())
    assert resp.status == 413
    head = f"PUT /api/v1/files/{uuid.uuid4()} HTTP/1.1\r\nContent-Length: {n}\r\n"
    assert (await _status_before_body(client, auth, head)).startswith(b"HTTP/1.1 413 ")


async def test_a_file_field_without_a_filename_is_400_and_nothing_is_stored(client, auth, config,
                                                                           pg_dsn):
    """``curl -F file=report.pdf`` (the @ forgotten) sends the text "report.pdf" in a part
    with no filename: refused with a detail that says how to send a file."""
    sent = FormData(default_to_multipart=True)  # curl -F always sends multipart
    sent.add_field("description", "d")
    sent.add_field("file", "report.pdf")  # exactly what curl sends for -F file=report.pdf
    resp = await client.post(UPLOAD, data=sent, headers=auth())
    body = await resp.json()
    assert resp.status == 400 and resp.content_type == "application/problem+json"
    assert "no filename" in body["detail"] and "-F file=@path" in body["detail"]
    listing = await (await client.get("/api/v1/files", headers=auth())).json()
    assert listing["total"] == 0
    assert await stored_objects(config) == []
    assert await wal_outcomes(pg_dsn, config) == []  # not even a reservation was made
    await upload(client, auth(), b"%PDF", "report.pdf")  # the file part proper still works


@BOTH_BACKENDS
async def test_capacity_full_is_507_and_nothing_is_stored(app_factory, auth):
    client = await app_factory(storage_max_size=10_000, storage_max_file_size=1_000_000)
    await upload(client, auth(), b"a" * 6000)
    before = await stored_objects(config_of(client))
    resp = await client.put(f"/api/v1/files/{uuid.uuid4()}", data=b"b" * 6000, headers=auth())
    body = await resp.json()
    assert resp.status == 507 and "capacity" in body["detail"].lower()
    resp = await client.post(UPLOAD, data=form(b"c" * 6000), headers=auth())
    assert resp.status == 507
    listing = await (await client.get("/api/v1/files", headers=auth())).json()
    assert listing["total"] == 1
    assert await stored_objects(config_of(client)) == before


@pytest.mark.parametrize("round_", range(4))  # a race: one round caught it 1 time in 4
async def test_concurrent_uploads_cannot_overshoot_capacity(app_factory, auth, round_):
    client = await app_factory(storage_max_size=50_000, storage_max_file_size=1_000_000)

    async def one(i):
        resp = await client.put(f"/api/v1/files/{uuid.uuid4()}", data=bytes([i]) * 10_000,
                                headers=auth())
        return resp.status

    statuses = await asyncio.gather(*(one(i) for i in range(12)))
    assert statuses.count(201) == 5 and statuses.count(507) == 7


async def test_expect_100_continue_refused_without_reading_the_body(app_factory, auth):
    # an explicit per-file cap: 413 whatever the capacity (without one it would be 507)
    client = await app_factory(storage_max_file_size=1000)
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    token = auth()["Authorization"]
    writer.write((f"PUT /api/v1/files/{uuid.uuid4()} HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: {token}\r\nContent-Length: {2**40}\r\n"
                  "Expect: 100-continue\r\n\r\n").encode())
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    assert status.startswith(b"HTTP/1.1 413 ")
    writer.close()


async def test_expect_100_continue_accepted_then_stored(client, auth):
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    token = auth()["Authorization"]
    fid = uuid.uuid4()
    writer.write((f"PUT /api/v1/files/{fid} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
                  "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n").encode())
    await writer.drain()
    assert b"100 Continue" in await asyncio.wait_for(reader.readline(), 5)
    await reader.readline()
    writer.write(b"hello")
    await writer.drain()
    assert b" 201 " in await asyncio.wait_for(reader.readline(), 5)
    writer.close()


@BOTH_BACKENDS
async def test_client_disconnect_mid_upload_leaves_nothing(client, auth, config, pg_dsn):
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    token = auth()["Authorization"]
    fid = uuid.uuid4()
    writer.write((f"PUT /api/v1/files/{fid} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
                  "Content-Length: 10000000\r\n\r\n").encode() + b"x" * 3_000_000)
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.transport.abort()
    for _ in range(50):  # the server notices and cleans up
        await asyncio.sleep(0.1)
        if not await stored_objects(config):
            break
    assert await stored_objects(config) == []
    assert (await client.get(f"/api/v1/files/{fid}", headers=auth())).status == 404
    assert await wal_outcomes(pg_dsn, config) == [("rolled_back", 0)]


async def test_fifty_concurrent_uploads_all_verify(client, auth):
    blobs = [random_bytes(20_000 + i) for i in range(50)]

    async def one(data):
        resp = await client.post(UPLOAD, data=form(data, "c.bin"), headers=auth())
        return (await resp.json())["file_id"], data

    results = await asyncio.gather(*(one(b) for b in blobs))
    for fid, data in results:
        got = await (await client.get(f"/api/v1/files/{fid}/download", headers=auth())).read()
        assert got == data
    listing = await (await client.get("/api/v1/files?limit=100", headers=auth())).json()
    assert listing["total"] == 50


@pytest.mark.parametrize("mode,status", [("edit", 201), ("rw", 201), ("ro", 400), ("ar", 400)])
async def test_upload_mode_matrix(app_factory, auth, mode, status):
    client = await app_factory(app_mode=mode)
    body = await upload(client, auth(), b"m", status=status)
    if status == 400:
        assert body["detail"] == f"File upload not allowed in {mode} mode"


async def test_description_too_long_for_attr_is_400_up_front(client, auth, config):
    resp = await client.post(UPLOAD, data=form(b"x", description="d" * 4000), headers=auth())
    body = await resp.json()
    assert resp.status == 400 and "description" in body["detail"]
    assert await stored_objects(config) == []


@pytest.mark.parametrize("metadata", ['[1,2]', '{"a": NaN}', '{"a": 1, "a": 2}',
                                      '{"a": "\\u0000"}', '{"a": "\\ud800"}', '{"a": 1e999}',
                                      "[" * 50 + "]" * 50, "{nope"])
async def test_hostile_metadata_is_400(client, auth, config, metadata):
    resp = await client.post(UPLOAD, data=form(b"x", metadata=metadata), headers=auth())
    assert resp.status == 400, await resp.text()
    assert await stored_objects(config) == []


async def test_expect_100_continue_gets_507_when_it_would_not_fit(app_factory, auth):
    client = await app_factory(storage_max_size=10_000, storage_max_file_size=10_000)
    await upload(client, auth(), b"a" * 6000)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write((f"PUT /api/v1/files/{uuid.uuid4()} HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: {auth()['Authorization']}\r\nContent-Length: 6000\r\n"
                  "Expect: 100-continue\r\n\r\n").encode())
    await writer.drain()
    assert b" 507 " in await asyncio.wait_for(reader.readline(), 5)
    writer.close()


async def test_small_multipart_upload_reserves_once_and_an_exact_fit_still_fits(
        app_factory, auth, monkeypatch):
    """A multipart file is at most its body's length: reserving that covers a small
    upload in one round trip. When the element cannot hold the whole body, the file's
    own bound is tried, so a file that fills the element exactly is accepted."""
    from storage.db import repo

    client = await app_factory(storage_max_size=10_000, storage_max_file_size=1_000_000)
    needs: list[int] = []
    real = repo.commit_batch

    async def spy(db, members, **kwargs):
        needs.extend(m.need for m in members if isinstance(m, repo.Reserve))
        return await real(db, members, **kwargs)

    monkeypatch.setattr(repo, "commit_batch", spy)
    await upload(client, auth(), b"a" * 4000)
    assert len(needs) == 1 and needs[0] >= 4000
    body = await upload(client, auth(), b"b" * 6000)  # the element is then exactly full
    assert body["file_size"] == 6000
    resp = await client.post(UPLOAD, data=form(b"c"), headers=auth())
    assert resp.status == 507


async def test_multipart_file_of_exactly_the_per_file_cap_is_accepted(app_factory, auth):
    client = await app_factory(storage_max_file_size=10_000)
    body = await upload(client, auth(), b"x" * 10_000, description="d" * 1000)
    assert body["file_size"] == 10_000
    resp = await client.post("/api/v1/files/upload", data=form(b"x" * 10_001), headers=auth())
    assert resp.status == 413


@BOTH_BACKENDS
@pytest.mark.parametrize("pattern", [(1,), (7, 70_000, 2, 65_536, 65_537, 1)],
                         ids=["one-byte pieces", "mixed pieces"])
async def test_stored_bytes_are_exact_whatever_the_piece_sizes(client, auth, pattern):
    """The upload pipeline holds small pieces back (a small body's end is written with
    the commit): however the body is cut, every byte arrives once, in order."""
    from storage.domain import uploads
    from storage.domain.element import element_key
    from storage.models import Identity

    data = random_bytes(5_000 if pattern == (1,) else 400_000)

    async def pieces():
        at, i = 0, 0
        while at < len(data):
            n = pattern[i % len(pattern)]
            yield data[at:at + n]
            at, i = at + n, i + 1

    who = Identity(sub="pieces", name="pieces", role="admin", token_type="service_account",
                   is_service_account=True)
    meta = await uploads.store(client.app[element_key], uploads.UploadSpec("p.bin"), who,
                               pieces())
    assert meta.file_size == len(data) and meta.checksum == sha256(data)
    resp = await client.get(f"/api/v1/files/{meta.file_id}/download", headers=auth())
    assert resp.status == 200 and await resp.read() == data


@BOTH_BACKENDS
async def test_two_uploads_of_one_new_id_to_the_same_path_the_second_is_a_409(client, auth,
                                                                               config):
    """Issue 26 (found by the history checker): two raw PUTs of one new id with the same
    name in the same second both pass the reservation and name the same object; the
    second to commit found it taken and answered 503 (retry) instead of 409, for a
    conflict that no retry resolves.  Nothing of the loser stays."""
    first_data, second_data = random_bytes(5000), random_bytes(5000)
    for _attempt in range(3):  # both must be named within one second
        fid = str(uuid.uuid4())
        started = [asyncio.Event(), asyncio.Event()]
        go = [asyncio.Event(), asyncio.Event()]

        def body(n: int, data: bytes, started=started, go=go):
            async def gen():
                yield data[:100]
                started[n].set()
                await go[n].wait()
                yield data[100:]
            return gen()

        put = f"/api/v1/files/{fid}?filename=same.bin"
        first = asyncio.ensure_future(client.put(put, data=body(0, first_data),
                                                 headers=auth()))
        second = asyncio.ensure_future(client.put(put, data=body(1, second_data),
                                                  headers=auth()))
        await asyncio.wait_for(asyncio.gather(started[0].wait(), started[1].wait()), 10)
        go[0].set()
        resp = await first
        assert resp.status == 201, await resp.text()
        go[1].set()
        resp = await second
        meta = await (await client.get(f"/api/v1/files/{fid}", headers=auth())).json()
        if meta["storage_filename"].endswith(f"{fid}.bin") and resp.status == 409:
            break
        assert resp.status == 409, await resp.text()
    assert (await resp.json())["detail"]
    got = await client.get(f"/api/v1/files/{fid}/download", headers=auth())
    assert await got.read() == first_data
    relpath = meta["storage_path"] + meta["storage_filename"]
    assert await stored_objects(config) == [relpath, relpath + ".attr.json"]
