"""Resumable uploads (tus 1.0.0) against the in-process app: the real aiotus client,
raw protocol requests for the error cases, real PostgreSQL and SeaweedFS.

The process-level cases (tuspy, SIGKILL, two processes, memory) are in test_tus_process.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import uuid

import aiotus
import pytest
from helpers import BOTH_BACKENDS, config_of, sha256, stored_objects, wal_outcomes
from tus_helpers import (
    OCTETS,
    ROOT,
    TUS,
    create,
    metadata,
    offset_of,
    patch,
    sql,
    staged_file,
    upload_row,
)
from yarl import URL

from storage.domain import recovery
from storage.domain.element import element_key
from storage.web.views.tus import hashes_key

KIB, MIB = 1024, 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _file(client, headers, path: str) -> dict:
    resp = await client.get(f"/api/v1/files/{path.rsplit('/', 1)[1]}", headers=headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def _download(client, headers, path: str) -> bytes:
    resp = await client.get(f"/api/v1/files/{path.rsplit('/', 1)[1]}/download", headers=headers)
    assert resp.status == 200
    return await resp.read()


async def test_options_advertises_the_protocol(client):
    resp = await client.options(ROOT)
    assert resp.status == 204
    assert resp.headers["Tus-Resumable"] == "1.0.0"
    assert resp.headers["Tus-Version"] == "1.0.0"
    assert resp.headers["Tus-Extension"] == ("creation,creation-with-upload,"
                                             "creation-defer-length,termination,checksum,"
                                             "expiration")
    assert resp.headers["Tus-Checksum-Algorithm"] == "sha1,sha256,md5"
    assert resp.headers["Tus-Max-Size"] == str(config_of(client).storage_max_size)


@BOTH_BACKENDS
async def test_aiotus_uploads_in_chunks_far_below_5_mib(storage_kind, client, auth, pg_dsn):
    """aiotus sends 256 KiB PATCHes; on S3 the 5 MiB parts are cut from them server-side."""
    config, admin = config_of(client), auth()
    data = os.urandom(11 * MIB + 12345)  # two full 5 MiB parts and a tail on S3
    location = await aiotus.upload(
        str(client.make_url(ROOT)), io.BytesIO(data),
        {"filename": b"report.pdf", "filetype": b"application/pdf",
         "description": b"Quarterly report", "version": b"v2",
         "metadata": json.dumps({"team": "ops", "n": 3}).encode(), "origin": b"laptop"},
        client_session=client.session, headers=admin, chunksize=256 * KIB,
        config=aiotus.RetryConfiguration(retry_attempts=1))
    assert location is not None and location.path.startswith(ROOT + "/")
    meta = await _file(client, admin, location.path)
    assert meta["file_id"] == location.path.rsplit("/", 1)[1]
    assert (meta["file_size"], meta["checksum"]) == (len(data), sha256(data))
    assert (meta["original_filename"], meta["content_type"]) == ("report.pdf", "application/pdf")
    assert (meta["description"], meta["version"]) == ("Quarterly report", "v2")
    assert await _download(client, admin, location.path) == data
    found = await client.get("/api/v1/files/search?q=quarterly", headers=admin)
    assert [f["file_id"] for f in (await found.json())["files"]] == [meta["file_id"]]
    # an ordinary file: data and attr document, nothing staged, reservation released
    relpath = meta["storage_path"] + meta["storage_filename"]
    assert await stored_objects(config) == [relpath, relpath + ".attr.json"]
    assert await wal_outcomes(pg_dsn, config) == [("committed", 0)]
    attr = json.loads(await _attr(config, relpath))
    assert attr["custom_attributes"] == {"team": "ops", "n": 3}
    # the finished upload still answers HEAD, with everything it was given
    head = await client.head(location.path, headers={**admin, **TUS})
    assert head.status == 200
    assert head.headers["Upload-Offset"] == head.headers["Upload-Length"] == str(len(data))
    assert await aiotus.metadata(str(client.make_url(location.path)),
                                 client_session=client.session, headers=admin) == {
        "filename": b"report.pdf", "filetype": b"application/pdf",
        "description": b"Quarterly report", "version": b"v2",
        "metadata": b'{"team": "ops", "n": 3}', "origin": b"laptop"}


async def _attr(config, relpath: str) -> bytes:
    from helpers import backend_of

    async with backend_of(config) as backend:
        return await backend.read_attr(relpath)


@BOTH_BACKENDS
async def test_checksums_verify_each_chunk_and_a_mismatch_is_discarded(
        storage_kind, client, auth, pg_dsn):
    admin = auth()
    first, second, third = os.urandom(300 * KIB), os.urandom(200 * KIB), os.urandom(100 * KIB)
    path = await create(client, admin, length=600 * KIB)
    await patch(client, admin, path, 0, first,
                **{"Upload-Checksum": "sha1 " + _b64(hashlib.sha1(first).digest())})
    wrong = "sha256 " + _b64(hashlib.sha256(b"something else").digest())
    refused = await patch(client, admin, path, len(first), second, status=460,
                          **{"Upload-Checksum": wrong})
    assert refused.reason == "Checksum Mismatch"
    assert (await refused.json())["status"] == 460
    assert await offset_of(client, admin, path) == len(first)  # the offset did not move
    if storage_kind == "local":  # and the staged bytes were cut back
        assert staged_file(config_of(client), path).stat().st_size == len(first)
    await patch(client, admin, path, len(first), second,
                **{"Upload-Checksum": "sha256 " + _b64(hashlib.sha256(second).digest())})
    await patch(client, admin, path, len(first) + len(second), third,
                **{"Upload-Checksum": "md5 " + _b64(hashlib.md5(third).digest())})
    meta = await _file(client, admin, path)
    assert meta["checksum"] == sha256(first + second + third)
    assert await _download(client, admin, path) == first + second + third


async def test_unsupported_or_malformed_checksum_is_400_and_nothing_moves(client, auth):
    admin = auth()
    path = await create(client, admin, length=10)
    for value in ("crc32 AAAAAA==", "sha1", "sha1 not-base64!", "md5 " + _b64(b"short")):
        resp = await patch(client, admin, path, 0, b"0123456789", status=400,
                           **{"Upload-Checksum": value})
        assert "Upload-Checksum" in (await resp.json())["detail"]
    assert await offset_of(client, admin, path) == 0


@BOTH_BACKENDS
async def test_pause_and_resume_with_aiotus(storage_kind, client, auth):
    """Half the file, a pause (the client goes away), then aiotus resumes from HEAD."""
    admin, data = auth(), os.urandom(6 * MIB + 7)
    url = client.make_url(ROOT)
    location = await aiotus.creation.create(client.session, url, io.BytesIO(data),
                                            {"filename": b"big.bin"}, headers=admin)
    location = client.make_url(location.path)
    await aiotus.core.upload_buffer(client.session, location, io.BytesIO(data[:2 * MIB + 5]),
                                    chunksize=700 * KIB, headers=admin)
    assert await offset_of(client, admin, location.path) == 2 * MIB + 5
    client.app[hashes_key].drop(uuid.UUID(location.path.rsplit("/", 1)[1]))  # another process
    await aiotus.core.upload_buffer(client.session, location, io.BytesIO(data),
                                    chunksize=1 * MIB, headers=admin)
    meta = await _file(client, admin, location.path)
    assert (meta["file_size"], meta["checksum"]) == (len(data), sha256(data))


@BOTH_BACKENDS
async def test_two_apps_of_one_element_take_alternate_patches(storage_kind, app_factory, auth,
                                                            make_config, prefix):
    """Each app has its own running hashes: every PATCH after a switch rebuilds the sha256
    from the staged bytes (on S3 from the chunk and tail objects)."""
    shared = make_config(table_prefix=prefix)
    same = {"table_prefix": prefix, "storage_local_base_path": shared.storage_local_base_path,
            "s3_app_folder": shared.s3_app_folder}
    one, two = await app_factory(**same), await app_factory(**same)
    admin, data = auth(), os.urandom(5 * MIB + 300 * KIB)
    path = await create(one, admin, length=len(data))
    step = 700 * KIB
    for n, start in enumerate(range(0, len(data), step)):
        await patch((one, two)[n % 2], admin, path, start, data[start:start + step])
    meta = await _file(two, admin, path)
    assert (meta["file_size"], meta["checksum"]) == (len(data), sha256(data))
    assert await _download(one, admin, path) == data
    assert await stored_objects(shared) == [meta["storage_path"] + meta["storage_filename"] + s
                                            for s in ("", ".attr.json")]


@BOTH_BACKENDS
async def test_termination_leaves_no_residue(storage_kind, client, auth, pg_dsn):
    config, admin = config_of(client), auth()
    path = await create(client, admin, length=8 * MIB)
    await patch(client, admin, path, 0, os.urandom(6 * MIB))  # a chunk object and a tail on S3
    assert await stored_objects(config)  # something is staged
    resp = await client.delete(path, headers={**admin, **TUS})
    assert resp.status == 204 and resp.headers["Tus-Resumable"] == "1.0.0"
    assert await stored_objects(config) == []
    assert await upload_row(pg_dsn, config, path) is None
    assert await wal_outcomes(pg_dsn, config) == [("rolled_back", 0)]
    gone = await client.head(path, headers={**admin, **TUS})
    assert gone.status == 404 and "Upload-Offset" not in gone.headers
    assert (await client.delete(path, headers={**admin, **TUS})).status == 404


async def test_wrong_offset_is_409_and_changes_nothing(client, auth):
    admin = auth()
    path = await create(client, admin, length=20)
    await patch(client, admin, path, 0, b"0123456789")
    for offset in (0, 5, 11):
        await patch(client, admin, path, offset, b"x", status=409)
    assert await offset_of(client, admin, path) == 10


async def test_wrong_content_type_is_415(client, auth):
    admin = auth()
    path = await create(client, admin, length=5)
    for ctype in ("application/octet-stream", "text/plain"):
        resp = await client.patch(path, data=b"hello", headers={
            **admin, **TUS, "Upload-Offset": "0", "Content-Type": ctype})
        assert resp.status == 415
        assert resp.headers["Tus-Resumable"] == "1.0.0"
    assert await offset_of(client, admin, path) == 0


async def test_missing_or_other_tus_version_is_412_with_tus_version(client, auth):
    admin = auth()
    path = await create(client, admin, length=5)
    for version in (None, "0.2.2", "1.0"):
        headers = {**admin, **OCTETS, "Upload-Offset": "0"}
        if version:
            headers["Tus-Resumable"] = version
        for method, target in (("PATCH", path), ("HEAD", path), ("DELETE", path),
                               ("POST", ROOT)):
            resp = await client.request(method, target, data=b"hello", headers={
                **headers, "Upload-Length": "5"})
            assert resp.status == 412, (method, version)
            assert resp.headers["Tus-Version"] == "1.0.0"
            assert resp.headers["Tus-Resumable"] == "1.0.0"
    assert await offset_of(client, admin, path) == 0


async def test_bytes_past_upload_length_are_refused_and_nothing_counted(client, auth, config):
    admin = auth()
    path = await create(client, admin, length=10)
    await patch(client, admin, path, 0, b"01234")
    await patch(client, admin, path, 5, b"5678901", status=413)  # Content-Length says so

    async def chunked():
        yield b"567"
        await asyncio.sleep(0.05)
        yield b"8901"

    await patch(client, admin, path, 5, chunked(), status=413)  # found while streaming
    assert await offset_of(client, admin, path) == 5
    assert staged_file(config, path).stat().st_size == 5
    await patch(client, admin, path, 5, b"56789")
    assert await _download(client, admin, path) == b"0123456789"


async def test_a_second_concurrent_patch_is_423(client, auth, pg_dsn, config):
    admin = auth()
    path = await create(client, admin, length=2 * MIB)
    release = asyncio.Event()

    async def slow():
        yield os.urandom(256 * KIB)
        await release.wait()
        yield os.urandom(256 * KIB)

    first = asyncio.create_task(client.patch(path, data=slow(), headers={
        **admin, **TUS, **OCTETS, "Upload-Offset": "0"}))
    for _ in range(200):  # until the first PATCH holds the upload's lease
        if (await upload_row(pg_dsn, config, path))["lease_owner"]:
            break
        await asyncio.sleep(0.02)
    busy = await patch(client, admin, path, 0, b"x", status=423)
    assert busy.headers["Retry-After"] == "1"
    terminate = await client.delete(path, headers={**admin, **TUS})
    assert terminate.status == 423
    release.set()
    done = await first
    assert done.status == 204 and done.headers["Upload-Offset"] == str(512 * KIB)
    assert (await upload_row(pg_dsn, config, path))["lease_owner"] is None


async def test_only_the_creator_or_an_admin_may_touch_an_upload(client, auth):
    alice = auth(role="user", token_type="admin_user", name="alice")
    bob = auth(role="user", token_type="admin_user", name="bob")
    admin = auth(role="admin", token_type="admin_user", name="root")
    path = await create(client, alice, length=10)
    for method, extra in (("HEAD", {}), ("PATCH", {**OCTETS, "Upload-Offset": "0"}),
                          ("DELETE", {})):
        resp = await client.request(method, path, data=b"01234",
                                    headers={**bob, **TUS, **extra})
        assert resp.status == 404, method  # as for an unknown id: nothing tells it exists
    await patch(client, alice, path, 0, b"01234")
    await patch(client, admin, path, 5, b"56789")
    meta = await _file(client, alice, path)
    assert meta["created_by_username"] == "alice"
    readonly = auth(role="readonly", token_type="admin_user", name="ro")
    assert (await client.post(ROOT, headers={**readonly, **TUS, "Upload-Length": "1"})
            ).status == 403
    assert (await client.post(ROOT, headers={**TUS, "Upload-Length": "1"})).status == 401


async def test_unknown_and_malformed_ids_are_404(client, auth):
    admin = auth()
    for target in (f"{ROOT}/{uuid.uuid4()}", f"{ROOT}/not-a-uuid", f"{ROOT}/{'9' * 80}"):
        assert (await client.head(target, headers={**admin, **TUS})).status == 404
        resp = await client.patch(target, data=b"x", headers={
            **admin, **TUS, **OCTETS, "Upload-Offset": "0"})
        assert resp.status == 404 and resp.headers["Tus-Resumable"] == "1.0.0"
        assert (await client.delete(target, headers={**admin, **TUS})).status == 404


@pytest.mark.parametrize(("header", "value", "says"), [
    ("Upload-Metadata", "filename bm90IGJhc2U2NA=!", "not base64"),
    ("Upload-Metadata", "filename YQ==,filename Yg==", "more than once"),
    ("Upload-Metadata", "metadata " + _b64(b"[1, 2]"), "metadata must be a JSON object"),
    ("Upload-Metadata", "metadata " + _b64(b"{not json"), "metadata is not valid JSON"),
    ("Upload-Metadata", "metadata " + _b64(b'{"a": 1, "a": 2}'), "duplicate key"),
    ("Upload-Metadata", "file_id " + _b64(b"nope"), "not a UUID"),
    ("Upload-Metadata", "filename " + _b64(b"\xff\xfe"), "not UTF-8"),
    ("Upload-Metadata", "filename " + _b64(b".."), "not a file name"),
    ("Upload-Metadata", "filetype " + _b64(b"no type"), "not a valid media type"),
    ("Upload-Metadata", "a b c", "malformed pair"),
    ("Upload-Metadata", "ke\u00ff " + _b64(b"x"), "malformed pair"),
    ("Upload-Metadata", "filename YQ==,,", "malformed pair"),
    ("Upload-Length", "-1", "non-negative integer"),
    ("Upload-Length", "1.5", "non-negative integer"),
    ("Upload-Length", "ten", "non-negative integer"),
    ("Upload-Length", "99999999999999999999", "non-negative integer"),
    ("Upload-Defer-Length", "2", "must be 1"),
])
async def test_bad_creation_headers_are_400_and_leave_nothing(client, auth, pg_dsn, header,
                                                              value, says):
    config = config_of(client)
    headers = {**auth(), **TUS, header: value}
    if header != "Upload-Length":
        headers.setdefault("Upload-Length", "10")
    if header == "Upload-Defer-Length":
        del headers["Upload-Length"]
    resp = await client.post(ROOT, headers=headers)
    body = await resp.json()
    assert resp.status == 400, body
    assert says in body["detail"]
    assert resp.headers["Tus-Resumable"] == "1.0.0"
    assert await wal_outcomes(pg_dsn, config) == []
    assert await sql(pg_dsn, f"SELECT 1 FROM {config.table_prefix}_uploads") == []


async def test_creation_needs_exactly_one_length(client, auth):
    admin = auth()
    detail = await create(client, admin, status=400)
    assert "Upload-Length (or Upload-Defer-Length: 1) is required" in detail
    detail = await create(client, admin, length=5, status=400, **{"Upload-Defer-Length": "1"})
    assert "not both" in detail


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", "", " 0x10"])
async def test_bad_offsets_are_400(client, auth, value):
    admin = auth()
    path = await create(client, admin, length=5)
    resp = await client.patch(path, data=b"hello", headers={
        **admin, **TUS, **OCTETS, "Upload-Offset": value})
    assert resp.status == 400
    assert "Upload-Offset" in (await resp.json())["detail"]


async def test_taken_file_id_is_409_for_files_and_uploads(client, auth, pg_dsn):
    admin, taken = auth(), str(uuid.uuid4())
    put = await client.put(f"/api/v1/files/{taken}", data=b"already here", headers=admin)
    assert put.status == 201
    detail = await create(client, admin, length=3, status=409,
                          **{"Upload-Metadata": metadata(file_id=taken)})
    assert taken in detail
    mine = str(uuid.uuid4())
    path = await create(client, admin, length=3, **{"Upload-Metadata": metadata(file_id=mine)})
    assert path == f"{ROOT}/{mine}"
    await create(client, admin, length=3, status=409, **{"Upload-Metadata": metadata(file_id=mine)})
    config = config_of(client)
    statuses = sorted(s for s, _ in await wal_outcomes(pg_dsn, config))
    # both refusals come before any WAL row (the second: the pending upload holds its id)
    assert statuses == ["committed", "pending"]


async def test_completion_refused_when_the_id_was_taken_meanwhile(client, auth, pg_dsn):
    """The upload's id was taken before its last byte: 409, and the upload is gone (its
    staged bytes, record and reservation) while the other file stays.  An upload cannot
    take it any more (the pending upload holds it: test_tus_review.py); the defence is
    for a file row from elsewhere, as here with the rule switched off for one PUT."""
    config, admin, fid = config_of(client), auth(), str(uuid.uuid4())
    path = await create(client, admin, length=6, **{"Upload-Metadata": metadata(file_id=fid)})
    await patch(client, admin, path, 0, b"abc")
    assert (await client.put(f"/api/v1/files/{fid}", data=b"other", headers=admin)).status == 409
    rule = f"{config.table_prefix}_wal DISABLE TRIGGER {config.table_prefix}_wal_upload_id"
    await sql(pg_dsn, f"ALTER TABLE {rule}")
    try:
        put = await client.put(f"/api/v1/files/{fid}", data=b"other", headers=admin)
    finally:
        await sql(pg_dsn, f"ALTER TABLE {rule.replace('DISABLE', 'ENABLE')}")
    assert put.status == 201
    await patch(client, admin, path, 3, b"def", status=409)
    assert (await client.head(path, headers={**admin, **TUS})).status == 404
    assert await _download(client, admin, path) == b"other"
    assert len(await stored_objects(config)) == 2  # the other file and its attr
    assert ("pending", 6) not in await wal_outcomes(pg_dsn, config)


@BOTH_BACKENDS
async def test_creation_with_upload_and_an_empty_file(storage_kind, client, auth):
    admin = auth()
    resp = await client.post(ROOT, data=b"hello", headers={
        **admin, **TUS, **OCTETS, "Upload-Length": "11",
        "Upload-Metadata": metadata(filename="greeting.txt", filetype="text/plain")})
    assert resp.status == 201 and resp.headers["Upload-Offset"] == "5"
    path = URL(resp.headers["Location"]).path
    await patch(client, admin, path, 5, b" world")
    meta = await _file(client, admin, path)
    assert (meta["original_filename"], meta["content_type"]) == ("greeting.txt", "text/plain")
    assert await _download(client, admin, path) == b"hello world"
    whole = await client.post(ROOT, data=b"all at once", headers={
        **admin, **TUS, **OCTETS, "Upload-Length": "11"})
    assert whole.status == 201 and whole.headers["Upload-Offset"] == "11"
    assert await _download(client, admin, URL(whole.headers["Location"]).path) == b"all at once"
    empty = await create(client, admin, length=0)
    meta = await _file(client, admin, empty)
    assert (meta["file_size"], meta["checksum"]) == (0, sha256(b""))
    assert meta["original_filename"] == empty.rsplit("/", 1)[1]  # no filename: the id


async def test_creation_with_a_bad_first_chunk_leaves_nothing(client, auth, pg_dsn):
    config, admin = config_of(client), auth()
    resp = await client.post(ROOT, data=b"hello", headers={
        **admin, **TUS, **OCTETS, "Upload-Length": "5",
        "Upload-Checksum": "sha1 " + _b64(hashlib.sha1(b"other").digest())})
    assert resp.status == 460
    assert await stored_objects(config) == []
    assert await wal_outcomes(pg_dsn, config) == [("rolled_back", 0)]
    assert await sql(pg_dsn, f"SELECT 1 FROM {config.table_prefix}_uploads") == []


async def test_deferred_length_grows_its_reservation(app_factory, auth, pg_dsn):
    client = await app_factory(storage_max_size=8 * MIB)
    config, admin = config_of(client), auth()
    path = await create(client, admin, **{"Upload-Defer-Length": "1",
                                          "Upload-Metadata": metadata(filename="s.log")})
    head = await client.head(path, headers={**admin, **TUS})
    assert head.headers["Upload-Defer-Length"] == "1" and "Upload-Length" not in head.headers
    assert await wal_outcomes(pg_dsn, config) == [("pending", 0)]
    first = os.urandom(1536 * KIB)
    await patch(client, admin, path, 0, first)
    [(status, reserved)] = await wal_outcomes(pg_dsn, config)
    assert status == "pending" and reserved >= len(first)
    tail = os.urandom(100)
    await patch(client, admin, path, len(first), tail,
                **{"Upload-Length": str(len(first) + 100)})
    assert await wal_outcomes(pg_dsn, config) == [("committed", 0)]
    meta = await _file(client, admin, path)
    assert (meta["file_size"], meta["checksum"]) == (len(first) + 100, sha256(first + tail))
    other = await create(client, admin, **{"Upload-Defer-Length": "1"})
    await patch(client, admin, other, 0, b"", **{"Upload-Length": "3"})
    changed = await patch(client, admin, other, 0, b"", status=400, **{"Upload-Length": "4"})
    assert "cannot change" in await changed.text()


@BOTH_BACKENDS
async def test_capacity_is_reserved_at_creation_and_released(storage_kind, app_factory, auth,
                                                             pg_dsn):
    client = await app_factory(storage_max_size=10 * MIB)
    config, admin = config_of(client), auth()
    too_big = await create(client, admin, length=10 * MIB + 1, status=507)
    assert "Not enough capacity" in too_big
    path = await create(client, admin, length=6 * MIB)
    capacity = await (await client.get("/api/v1/capacity")).json()
    assert capacity["capacity"]["used"] == 6 * MIB  # reserved before any byte arrives
    await create(client, admin, length=5 * MIB, status=507)  # 4 MiB are left
    await patch(client, admin, path, 0, os.urandom(MIB))
    assert (await client.delete(path, headers={**admin, **TUS})).status == 204
    capacity = await (await client.get("/api/v1/capacity")).json()
    assert capacity["capacity"]["used"] == 0
    second = await create(client, admin, length=5 * MIB)
    assert await offset_of(client, admin, second) == 0
    assert sorted(await wal_outcomes(pg_dsn, config)) == [("pending", 5 * MIB),
                                                           ("rolled_back", 0)]


async def test_413_only_for_an_explicit_per_file_cap(app_factory, auth):
    capped = await app_factory(storage_max_file_size=MIB)
    admin = auth()
    assert (await capped.options(ROOT)).headers["Tus-Max-Size"] == str(MIB)
    detail = await create(capped, admin, length=MIB + 1, status=413)
    assert "maximum file size" in detail
    deferred = await create(capped, admin, **{"Upload-Defer-Length": "1"})
    await patch(capped, admin, deferred, 0, os.urandom(MIB + 1), status=413)
    assert await offset_of(capped, admin, deferred) == 0


async def test_expired_uploads_are_404_then_removed_by_recovery(app_factory, auth, pg_dsn):
    client = await app_factory(upload_expiry_hours=0.0003)  # about a second
    config, admin = config_of(client), auth()
    path = await create(client, admin, length=MIB)
    await patch(client, admin, path, 0, os.urandom(300 * KIB))
    expires = (await client.head(path, headers={**admin, **TUS})).headers["Upload-Expires"]
    assert expires.endswith(" GMT")
    done = await create(client, admin, length=3)
    await patch(client, admin, done, 0, b"abc")
    await asyncio.sleep(1.3)
    for method in ("HEAD", "PATCH", "DELETE"):
        resp = await client.request(method, path, data=b"x", headers={
            **admin, **TUS, **OCTETS, "Upload-Offset": "307200"})
        assert resp.status == 404, method
    assert staged_file(config, path).exists()  # until recovery runs
    report = await recovery.recover(client.app[element_key], alone=False)
    assert report.uploads_expired == 0  # a young WAL row: the shared pass waits 5 minutes
    assert report.uploads_swept == 1  # but the finished upload's record goes
    report = await recovery.recover(client.app[element_key], alone=True)
    assert (report.uploads_expired, report.errors) == (1, 0)
    assert not staged_file(config, path).exists()
    assert sorted(await wal_outcomes(pg_dsn, config)) == [("committed", 0), ("rolled_back", 0)]
    assert await sql(pg_dsn, f"SELECT 1 FROM {config.table_prefix}_uploads") == []
    assert await _download(client, admin, done) == b"abc"  # the file itself stays


async def test_recovery_leaves_live_uploads_alone_and_rolls_back_orphan_intents(
        client, auth, pg_dsn):
    from storage.domain import resumable
    from storage.models import utcnow

    admin = auth()
    el = client.app[element_key]
    path = await create(client, admin, length=10)
    await patch(client, admin, path, 0, b"01234")
    txid = uuid.uuid4()  # an intent whose process died before writing the upload record
    reserved = await el.commits.reserve(txid, 7, intent={
        "op": resumable.OP, "file_id": uuid.uuid4(), "user_id": "x", "started_at": utcnow(),
        "data": {}})
    assert reserved.status == "ok"
    report = await recovery.recover(el, alone=True)
    assert (report.rolled_back, report.completed, report.errors, report.skipped) == (1, 0, 0, 0)
    assert len(report.actions) == 1  # the live upload is not reported
    assert await offset_of(client, admin, path) == 5
    await patch(client, admin, path, 5, b"56789")
    assert await _download(client, admin, path) == b"0123456789"


async def test_upload_mode_rules_and_method_override(app_factory, auth):
    client = await app_factory(app_mode="ro")
    admin = auth()
    resp = await client.post(ROOT, headers={**admin, **TUS, "Upload-Length": "3"})
    assert resp.status == 400 and "not allowed in ro mode" in (await resp.json())["detail"]
    rw = await app_factory()
    path = await create(rw, admin, length=6)
    resp = await rw.post(path, data=b"abc", headers={
        **admin, **TUS, **OCTETS, "Upload-Offset": "0", "X-HTTP-Method-Override": "PATCH"})
    assert resp.status == 204 and resp.headers["Upload-Offset"] == "3"
    head = await rw.post(path, headers={**admin, **TUS, "X-HTTP-Method-Override": "HEAD"})
    assert head.status == 200 and head.headers["Upload-Offset"] == "3"
    bogus = await rw.post(path, headers={**admin, **TUS, "X-HTTP-Method-Override": "PUT"})
    assert bogus.status == 405 and bogus.headers["Tus-Resumable"] == "1.0.0"
    gone = await rw.post(path, headers={**admin, **TUS, "X-HTTP-Method-Override": "DELETE"})
    assert gone.status == 204


async def test_expect_100_continue_refuses_before_the_body(client, auth):
    admin = auth()
    path = await create(client, admin, length=5)
    refused = await client.patch(path, data=b"hello", headers={
        **admin, **TUS, "Content-Type": "text/plain", "Upload-Offset": "0",
        "Expect": "100-continue"})
    assert refused.status == 415 and refused.headers["Tus-Resumable"] == "1.0.0"
    refused = await client.post(ROOT, headers={**admin, "Upload-Length": "5",
                                               "Expect": "100-continue"})
    assert refused.status == 412 and refused.headers["Tus-Version"] == "1.0.0"
    ok = await client.patch(path, data=b"hello", headers={
        **admin, **TUS, **OCTETS, "Upload-Offset": "0", "Expect": "100-continue"})
    assert ok.status == 204


async def test_browser_clients_pass_cors(app_factory, auth):
    client = await app_factory(cors_allow_origins=("https://app.example",))
    origin = {"Origin": "https://app.example"}
    pre = await client.options(f"{ROOT}/{uuid.uuid4()}", headers={
        **origin, "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "tus-resumable, upload-offset, upload-checksum, "
                                          "content-type, authorization"})
    assert pre.status == 204
    assert "PATCH" in pre.headers["Access-Control-Allow-Methods"]
    head_pre = await client.options(ROOT, headers={**origin,
                                                   "Access-Control-Request-Method": "HEAD"})
    assert head_pre.status == 204
    resp = await client.post(ROOT, headers={**auth(), **TUS, **origin, "Upload-Length": "4"})
    assert resp.status == 201
    exposed = {h.strip() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"Location", "Upload-Offset", "Upload-Length", "Upload-Expires", "Tus-Resumable",
            "Upload-Metadata"} <= exposed


async def test_metrics_count_started_completed_terminated_and_bytes(client, auth):
    admin = auth()
    done = await create(client, admin, length=4)
    await patch(client, admin, done, 0, b"abcd")
    dropped = await create(client, admin, length=4)
    await patch(client, admin, dropped, 0, b"ab")
    await client.delete(dropped, headers={**admin, **TUS})
    text = await (await client.get("/metrics")).text()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("storage_tus_")}
    assert values["storage_tus_uploads_started_total"] == 2
    assert values["storage_tus_uploads_completed_total"] == 1
    assert values["storage_tus_uploads_terminated_total"] == 1
    assert values["storage_tus_bytes_received_total"] == 6


async def test_a_repeated_last_patch_is_acknowledged_again(client, auth):
    admin = auth()
    path = await create(client, admin, length=3)
    await patch(client, admin, path, 0, b"abc")
    again = await patch(client, admin, path, 3, b"")
    assert again.headers["Upload-Offset"] == "3"
    await patch(client, admin, path, 1, b"bc", status=409)


async def _full_but_not_a_file(client, admin, pg_dsn, config, data: bytes) -> str:
    """An upload whose last PATCH was recorded but whose completion died after linking the
    file into place (as after a SIGKILL at that step)."""
    path = await create(client, admin, length=len(data))
    await patch(client, admin, path, 0, data[:5])
    with staged_file(config, path).open("ab") as staged:
        staged.write(data[5:])
    await sql(pg_dsn, f"UPDATE {config.table_prefix}_uploads SET upload_offset = $2 "
                      "WHERE file_id = $1", uuid.UUID(path.rsplit("/", 1)[1]), len(data))
    row = await upload_row(pg_dsn, config, path)
    final = config.storage_local_base_path / row["storage_path"] / row["storage_filename"]
    final.parent.mkdir(parents=True, exist_ok=True)
    os.link(staged_file(config, path), final)  # the earlier attempt's link, no attr yet
    return path


async def test_a_completion_that_died_is_finished_by_head_or_by_recovery(client, auth, pg_dsn):
    config, admin = config_of(client), auth()
    first = await _full_but_not_a_file(client, admin, pg_dsn, config, b"0123456789")
    second = await _full_but_not_a_file(client, admin, pg_dsn, config, b"abcdefghij")
    head = await client.head(first, headers={**admin, **TUS})
    assert head.status == 200 and head.headers["Upload-Offset"] == "10"
    assert (await _file(client, admin, first))["checksum"] == sha256(b"0123456789")
    report = await recovery.recover(client.app[element_key], alone=True)
    assert (report.uploads_completed, report.completed, report.errors) == (1, 1, 0)
    assert await _download(client, admin, second) == b"abcdefghij"
    assert (await _file(client, admin, second))["checksum"] == sha256(b"abcdefghij")
    assert [s for s, _ in await wal_outcomes(pg_dsn, config)] == ["committed", "committed"]
    assert not any(".resumable/" in p and not p.endswith("/") for p in
                   await stored_objects(config))


@BOTH_BACKENDS
async def test_orphaned_staged_bytes_are_swept(storage_kind, client, auth):
    """Bytes of an upload whose record is gone (a removal that died half-way)."""
    from helpers import s3_client, s3_folder

    config, orphan = config_of(client), uuid.uuid4()
    if storage_kind == "s3":
        async with s3_client(config) as s3:
            await s3.put_object(Bucket=config.s3_bucket_name, Body=b"x",
                                Key=f"{s3_folder(config)}_resumable/{orphan}/000000.chunk")
    else:
        (config.storage_local_base_path / ".resumable").mkdir(parents=True)
        (config.storage_local_base_path / ".resumable" / str(orphan)).write_bytes(b"x")
    live = await create(client, auth(), length=MIB)
    await patch(client, auth(), live, 0, os.urandom(600 * KIB))
    before = await stored_objects(config)
    report = await recovery.recover(client.app[element_key], alone=False)
    assert report.uploads_swept == 1
    assert [p for p in before if str(orphan) not in p] == await stored_objects(config)
    assert await offset_of(client, auth(), live) == 600 * KIB


async def test_real_tus_responses_match_the_openapi_document(client, auth):
    from test_openapi import check

    admin, item = auth(), "/api/v1/uploads/{file_id}"
    await check(await client.options(ROOT), "OPTIONS", ROOT)
    resp = await client.post(ROOT, headers={**admin, **TUS, "Upload-Length": "4"})
    path = URL(resp.headers["Location"]).path
    await check(resp, "POST", ROOT)
    for status_case in ({"Upload-Length": "-4"}, {}):
        await check(await client.post(ROOT, headers={**admin, **status_case}), "POST", ROOT)
    await check(await client.head(path, headers={**admin, **TUS}), "HEAD", item)
    for offset, body in (("0", b"ab"), ("0", b"ab"), ("2", b"abc")):
        await check(await client.patch(path, data=body, headers={
            **admin, **TUS, **OCTETS, "Upload-Offset": offset}), "PATCH", item)
    await check(await client.delete(path, headers={**admin, **TUS}), "DELETE", item)
    await check(await client.delete(path, headers={**admin, **TUS}), "DELETE", item)
