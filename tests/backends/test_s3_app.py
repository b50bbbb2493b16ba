"""The element on S3 (SeaweedFS) through its HTTP API: what only S3 has, or only shows there.

The generic file-operation tests run on both backends in test_upload.py and
test_files_api.py (``BOTH_BACKENDS``); this module adds object keys and headers,
multipart thresholds, every Range form on a multipart object, an upload cut off
mid-multipart, capacity from the database, and objects vanishing during a download.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid

import aiohttp
import asyncpg
import pytest
from helpers import (
    config_of,
    drop_data_object,
    form,
    process_env,
    random_bytes,
    s3_client,
    s3_folder,
    s3_uploads,
    sha256,
    stored_objects,
    upload,
    wal_outcomes,
)

from storage import attrs
from storage.backends.s3 import S3Backend, S3Reader
from storage.domain import attrmeta, recovery
from storage.domain.element import backend_key, element_key

pytestmark = pytest.mark.parametrize("storage_kind", ["s3"], indirect=True)
MIB = 1024 * 1024
PART = 5 * MIB  # the multipart threshold the fixtures configure


def url(fid: str, suffix: str = "") -> str:
    return f"/api/v1/files/{fid}{suffix}"


async def head(config, relpath: str) -> dict:
    async with s3_client(config) as s3:
        return await s3.head_object(Bucket=config.s3_bucket_name,
                                    Key=s3_folder(config) + relpath)


async def meta_of(client, auth, fid: str) -> dict:
    resp = await client.get(url(fid), headers=auth())
    assert resp.status == 200
    return await resp.json()


async def test_keys_content_type_checksum_and_a_side_effect_free_probe(client, auth, config):
    resp = await client.get("/health/ready")
    body = await resp.json()
    assert resp.status == 200 and body["checks"]["s3_bucket"] == "accessible"
    assert await stored_objects(config) == []  # readiness wrote nothing (upstream: .keep)

    data = b"%PDF-1.7 report"
    fid = (await upload(client, auth(), data, "../../etc/report.pdf", "application/pdf"))["file_id"]
    meta = await meta_of(client, auth, fid)
    relpath = meta["storage_path"] + meta["storage_filename"]
    assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/\d{2}/[^/]+", relpath) and ".." not in relpath
    assert await stored_objects(config) == [relpath, relpath + ".attr.json"]
    obj = await head(config, relpath)
    assert obj["ContentType"] == "application/pdf"
    upload_tag = obj["Metadata"].pop("upload")  # the upload's WAL txid (issue 24)
    assert obj["Metadata"] == {"checksum": sha256(data), "original_size": str(len(data))}
    uuid.UUID(upload_tag)
    attr_head = await head(config, relpath + ".attr.json")
    assert attr_head["ContentType"] == "application/json"
    async with s3_client(config) as s3:
        got = await s3.get_object(Bucket=config.s3_bucket_name,
                                  Key=s3_folder(config) + relpath + ".attr.json")
        attr = json.loads(await got["Body"].read())
    assert attr["file_id"] == fid and attr["checksum"] == sha256(data)
    assert attr["content_type"] == "application/pdf"

    fid = str(uuid.uuid4())
    resp = await client.put(url(fid), data=b"raw", headers={**auth(),
                                                            "Content-Type": "image/png"})
    assert resp.status == 201
    meta = await meta_of(client, auth, fid)
    assert (await head(config, meta["storage_path"] + meta["storage_filename"])
            )["ContentType"] == "image/png"


async def test_bodies_over_the_threshold_stream_as_multipart(client, auth, config):
    """Raw PUT with a length, multipart form, and chunked PUT (no length) over 5 MiB."""
    raw, formed, chunked = random_bytes(2 * PART + 1), random_bytes(PART + 7), random_bytes(PART)
    fid_raw = str(uuid.uuid4())
    resp = await client.put(url(fid_raw), data=io.BytesIO(raw), headers=auth())
    assert resp.status == 201 and (await resp.json())["checksum"] == sha256(raw)
    fid_form = (await upload(client, auth(), formed, "f.bin"))["file_id"]

    async def gen():
        for i in range(0, len(chunked), 300_000):
            yield chunked[i:i + 300_000]

    fid_chunked = str(uuid.uuid4())
    resp = await client.put(url(fid_chunked), data=gen(), headers=auth())
    assert resp.status == 201 and (await resp.json())["file_size"] == len(chunked)

    for fid, data, parts in ((fid_raw, raw, 3), (fid_form, formed, 2), (fid_chunked, chunked, 1)):
        meta = await meta_of(client, auth, fid)
        obj = await head(config, meta["storage_path"] + meta["storage_filename"])
        assert obj["ETag"].strip('"').endswith(f"-{parts}"), (fid, obj["ETag"])  # multipart
        assert obj["ContentLength"] == len(data)
        got = await client.get(url(fid, "/download"), headers=auth())
        assert got.status == 200 and sha256(await got.read()) == sha256(data)
    assert await s3_uploads(config) == []


async def test_every_range_form_on_a_multipart_object(client, auth):
    data = random_bytes(PART + 1000)  # two parts: ranges may cross the part boundary
    size = len(data)
    fid = (await upload(client, auth(), data, "r.bin", "application/octet-stream"))["file_id"]
    etag = f'"{sha256(data)}"'
    download = url(fid, "/download")
    for header, start, end in [("bytes=0-0", 0, 0), ("bytes=10-19", 10, 19),
                               (f"bytes={PART - 10}-{PART + 9}", PART - 10, PART + 9),
                               (f"bytes={size - 40}-", size - 40, size - 1),
                               ("bytes=-5", size - 5, size - 1),
                               (f"bytes={size - 3}-999999999", size - 3, size - 1)]:
        resp = await client.get(download, headers={**auth(), "Range": header})
        assert resp.status == 206, header
        assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{size}"
        assert await resp.read() == data[start:end + 1], header

    ranges = f"bytes=0-1,{PART - 1}-{PART},-2"
    resp = await client.get(download, headers={**auth(), "Range": ranges})
    assert resp.status == 206
    boundary = resp.headers["Content-Type"].split("boundary=")[1]
    body = await resp.read()
    assert len(body) == int(resp.headers["Content-Length"])
    parts = [p for p in body.split(f"--{boundary}".encode()) if b"Content-Range" in p]
    assert [p.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n") for p in parts] == [
        data[:2], data[PART - 1:PART + 1], data[-2:]]

    resp = await client.get(download, headers={**auth(), "Range": f"bytes={size}-"})
    assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{size}"
    assert "not satisfiable" in (await resp.json())["detail"]
    resp = await client.get(download, headers={**auth(), "If-None-Match": etag})
    assert resp.status == 304 and resp.headers["ETag"] == etag and await resp.read() == b""
    resp = await client.get(download, headers={**auth(), "Range": "bytes=0-3", "If-Range": etag})
    assert resp.status == 206 and await resp.read() == data[:4]
    resp = await client.get(download, headers={**auth(), "Range": "bytes=0-3",
                                               "If-Range": '"stale"'})
    assert resp.status == 200 and sha256(await resp.read()) == sha256(data)
    resp = await client.get(download, headers={**auth(), "If-Match": '"other"'})
    assert resp.status == 412
    resp = await client.head(download, headers=auth())
    assert resp.status == 200 and resp.headers["Content-Length"] == str(size)


async def test_disconnect_mid_multipart_leaves_no_parts(client, auth, config, pg_dsn):
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    fid = uuid.uuid4()
    writer.write((f"PUT {url(str(fid))} HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: {auth()['Authorization']}\r\n"
                  f"Content-Length: {64 * MIB}\r\n\r\n").encode())
    chunk = b"x" * MIB
    for _ in range(3 * PART // MIB):
        writer.write(chunk)
        await writer.drain()
    for _ in range(100):  # mid-way: a multipart upload with parts is in progress
        if await s3_uploads(config):
            break
        await asyncio.sleep(0.05)
    assert len(await s3_uploads(config)) == 1
    writer.transport.abort()
    for _ in range(100):
        if not await stored_objects(config):
            break
        await asyncio.sleep(0.05)
    assert await stored_objects(config) == []  # no object, no attr, no multipart upload
    assert (await client.get(url(str(fid)), headers=auth())).status == 404
    assert await wal_outcomes(pg_dsn, config) == [("rolled_back", 0)]


async def test_recovery_aborts_the_multipart_upload_its_intent_names(
        client, auth, config, pg_dsn, server_factory):
    """A process killed mid-upload leaves a multipart upload.  Its WAL intent names it
    from before the first part was sent, so a shared recovery pass (another server is
    alive, young stray uploads are spared for an hour) aborts exactly that one when it
    rolls the intent back, not a later sweep (issue 19)."""
    # the in-process app holds the serve lock: the process and every pass here are shared
    doomed = server_factory(process_env(config))
    reader, writer = await asyncio.open_connection("127.0.0.1", doomed.port)
    writer.write((f"PUT {url(str(uuid.uuid4()))}?filename=big.bin HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: {auth()['Authorization']}\r\n"
                  f"Content-Length: {64 * MIB}\r\n\r\n").encode() + b"x" * (PART + MIB))
    await writer.drain()
    conn = await asyncpg.connect(pg_dsn)
    try:
        named = ""
        for _ in range(200):  # the first part is on its way: the intent names its upload
            named = await conn.fetchval(
                f"SELECT operation_data->>'temp_path' FROM {config.table_prefix}_wal "
                "WHERE status = 'pending'")
            if named:
                break
            await asyncio.sleep(0.05)
        uploads = await s3_uploads(config)
        assert named and len(uploads) == 1, (named, uploads)
        doomed.kill()  # SIGKILL: the upload stays behind in the bucket
        writer.transport.abort()
        assert await s3_uploads(config) == uploads
        await conn.execute(f"UPDATE {config.table_prefix}_wal "
                           "SET started_at = started_at - interval '25 hours'")
    finally:
        await conn.close()
    report = await recovery.recover(client.app[element_key], alone=False)
    assert (report.mode, report.rolled_back, report.temps_removed) == ("shared", 1, 0)
    assert await stored_objects(config) == []  # the upload is aborted, nothing else was
    assert await wal_outcomes(pg_dsn, config) == [("rolled_back", 0)]


async def test_capacity_comes_from_the_database_not_the_bucket(app_factory, auth):
    client = await app_factory(storage_max_size=8 * MIB)
    config = config_of(client)
    backend = client.app[backend_key]
    assert isinstance(backend, S3Backend) and await backend.free_bytes() is None
    first = random_bytes(PART + 1)
    fid = (await upload(client, auth(), first, "big.bin"))["file_id"]
    resp = await client.put(url(str(uuid.uuid4())), data=io.BytesIO(random_bytes(3 * MIB)),
                            headers=auth())
    assert resp.status == 507 and "capacity" in (await resp.json())["detail"].lower()
    resp = await client.post("/api/v1/files/upload", data=form(b"y" * (3 * MIB)), headers=auth())
    assert resp.status == 507
    meta = await meta_of(client, auth, fid)
    relpath = meta["storage_path"] + meta["storage_filename"]
    assert await stored_objects(config) == [relpath, relpath + ".attr.json"]

    # Behind the element's back the object goes: the database still counts it, so a
    # bucket listing is not what capacity comes from.
    await drop_data_object(config, relpath)
    cap = await (await client.get("/api/v1/capacity", headers=auth())).json()
    assert cap["backend"] == "s3" and cap["capacity"]["used"] == len(first)
    assert cap["capacity"]["total"] <= 8 * MIB
    resp = await client.put(url(str(uuid.uuid4())), data=io.BytesIO(random_bytes(3 * MIB)),
                            headers=auth())
    assert resp.status == 507
    assert await stored_objects(config) == [relpath + ".attr.json"]


class VanishingBackend(S3Backend):
    """A real S3 backend where another node deletes the object right after ``open``."""

    async def open(self, relpath: str, **kwargs):
        reader = await super().open(relpath, **kwargs)
        await self.delete(relpath)
        return reader


class CountingHeads(S3Backend):
    heads = 0

    async def _head(self, key: str):
        type(self).heads += 1
        return await super()._head(key)


class VanishingAfterFirstRange(S3Backend):
    """A real S3 backend where the object is deleted once the first range was streamed."""

    async def open(self, relpath: str, **kwargs):
        reader = await super().open(relpath, **kwargs)
        backend = self

        class Reader(S3Reader):
            async def iter_range(self, start, end, chunk_size):
                async for data in super().iter_range(start, end, chunk_size):
                    yield data
                await backend.delete(relpath)

        return Reader(self, self.key(relpath), reader.info)


@pytest.fixture
def swap_backend(client):
    """``swap_backend(cls)``: make the app's live S3 backend behave as ``cls`` (a subclass
    of S3Backend with the same state) for the rest of the test."""
    backend = client.app[backend_key]
    original = type(backend)

    def swap(cls: type[S3Backend]) -> None:
        backend.__class__ = cls

    yield swap
    backend.__class__ = original


async def test_object_deleted_after_open_is_a_clean_404(client, auth, config, swap_backend):
    data = random_bytes(100_000)
    fid = (await upload(client, auth(), data))["file_id"]
    swap_backend(VanishingBackend)
    resp = await client.get(url(fid, "/download"), headers=auth())
    assert resp.status == 404, await resp.text()
    body = await resp.json()
    assert "missing" in body["detail"] and "Content-Range" not in resp.headers


async def test_a_download_is_one_get_without_a_head(client, auth, swap_backend):
    data = random_bytes(100_000)
    fid = (await upload(client, auth(), data))["file_id"]
    swap_backend(CountingHeads)
    CountingHeads.heads = 0
    resp = await client.get(url(fid, "/download"), headers=auth())
    assert resp.status == 200 and await resp.read() == data
    resp = await client.get(url(fid, "/download"), headers={**auth(), "Range": "bytes=10-19,-5"})
    assert resp.status == 206 and data[10:20] in await resp.read()
    assert CountingHeads.heads == 0  # the first ranged GET checked existence and size
    resp = await client.head(url(fid, "/download"), headers=auth())
    assert resp.status == 200 and CountingHeads.heads == 1  # no body read: a lookup


async def test_failure_after_the_headers_cuts_the_connection(client, auth, config,
                                                             swap_backend):
    data = random_bytes(100_000)
    fid = (await upload(client, auth(), data))["file_id"]
    swap_backend(VanishingAfterFirstRange)
    resp = await client.get(url(fid, "/download"),
                            headers={**auth(), "Range": "bytes=0-9,50000-50009"})
    assert resp.status == 206  # the status line was already out when the object went
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()  # a short body, never an error document glued to the 206


# --- GC and rebuild (the cache API) on S3 -------------------------------------------------


async def gc(client, auth, fid: str) -> dict:
    resp = await client.delete(f"/api/v1/gc/{fid}", headers=auth())
    body = await resp.json()
    assert resp.status == 200, body
    return body


async def test_gc_removes_objects_also_when_the_data_object_is_gone(client, auth, config):
    fid = (await upload(client, auth(), b"collect me"))["file_id"]
    assert len(await stored_objects(config)) == 2
    assert (await gc(client, auth, fid))["status"] == "deleted"
    assert await stored_objects(config) == []
    assert (await gc(client, auth, fid))["status"] == "already_deleted"

    fid = (await upload(client, auth(), b"half gone"))["file_id"]
    meta = await meta_of(client, auth, fid)
    await drop_data_object(config, meta["storage_path"] + meta["storage_filename"])
    assert (await gc(client, auth, fid))["status"] == "deleted"
    assert await stored_objects(config) == []  # the attr object went too
    resp = await client.get(f"/api/v1/gc/{fid}/exists", headers=auth())
    assert (await resp.json())["exists"] is False


async def plant(config, count: int, seed: int) -> None:
    """Data objects and their attr documents written straight to the bucket by another
    writer (a rebuild reads the documents and makes sure each has its data object)."""
    from bench.rebuild_bench import make_meta

    gate = asyncio.Semaphore(32)
    async with s3_client(config) as s3:
        async def one(i: int) -> None:
            meta, data = make_meta(seed, i)
            key = s3_folder(config) + meta.relative_path
            async with gate:
                await s3.put_object(Bucket=config.s3_bucket_name, Key=key, Body=data)
                await s3.put_object(Bucket=config.s3_bucket_name, Key=key + ".attr.json",
                                    Body=attrs.dumps(attrmeta.to_doc(meta)))

        await asyncio.gather(*(one(i) for i in range(count)))


@pytest.mark.parametrize("planted", [  # 1100: more than one list_objects_v2 page (1000)
    40, pytest.param(1100, marks=pytest.mark.heavy, id="paginated")])
async def test_rebuild_from_s3_attr_objects_is_lossless_and_per_folder(
        client, auth, config, app_factory, pg_dsn, planted):
    from bench.rebuild_bench import index_of, make_meta

    ours = [(await upload(client, auth(), f"f{i}".encode(), f"f{i}.txt", "text/plain",
                          description=f"d{i}", metadata='{"k": 1}'))["file_id"]
            for i in range(2)]
    resp = await client.patch(url(ours[0]), json={"version": "2"}, headers=auth())
    assert resp.status == 200
    neighbour = await app_factory(table_prefix=config.table_prefix + "n")  # same bucket
    assert config_of(neighbour).s3_bucket_name == config.s3_bucket_name
    theirs = (await upload(neighbour, auth(), b"not ours"))["file_id"]
    await plant(config, planted, seed=11)

    table = f"{config.table_prefix}_files"
    conn = await asyncpg.connect(pg_dsn)
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads,
                                  schema="pg_catalog")
    try:
        before = {str(r["file_id"]): dict(r) for r in await conn.fetch(f"SELECT * FROM {table}")}
        await conn.execute(f"TRUNCATE {table}")
        resp = await client.post("/api/v1/cache/rebuild", headers=auth())
        body = await resp.json()
        assert resp.status == 200 and body["result"]["errors"] == [], body
        stats = body["result"]["statistics"]
        assert stats["attr_files_scanned"] == stats["entries_created"] == planted + 2
        after = {str(r["file_id"]): dict(r) for r in await conn.fetch(f"SELECT * FROM {table}")}
        totals = await conn.fetchrow(
            f"SELECT total_files, total_size_bytes FROM {config.table_prefix}_config")
    finally:
        await conn.close()
    assert theirs not in after and len(after) == planted + 2
    for fid in ours:  # uploaded and patched through the API: back exactly as they were
        for column in LOSSLESS:
            assert after[fid][column] == before[fid][column], (fid, column)
    for fid, row in after.items():
        if fid not in ours:
            original, _data = make_meta(11, index_of(uuid.UUID(fid)))
            for column in LOSSLESS:
                assert row[column] == getattr(original, column), (fid, column)
    assert (totals["total_files"], totals["total_size_bytes"]) == (
        len(after), sum(r["file_size"] for r in after.values()))
    got = await client.get(url(ours[0], "/download"), headers=auth())
    assert await got.read() == b"f0"


LOSSLESS = ("file_id", "original_filename", "storage_filename", "file_size", "content_type",
            "created_at", "updated_at", "created_by_id", "created_by_username",
            "created_by_fullname", "description", "version", "storage_path", "checksum",
            "metadata_json")
