"""Issue 24: what an outside review of the S3 backend found, each reproduced against
SeaweedFS with hooks at the real S3 calls (a live backend swapped to a subclass that
waits or repeats a call) or real stalled clients."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest
import tus_helpers as tus
from botocore.exceptions import ClientError
from helpers import (
    random_bytes,
    s3_client,
    s3_folder,
    s3_uploads,
    sha256,
    stored_objects,
    wal_outcomes,
)

from storage.backends.base import StoreUnavailable
from storage.backends.s3 import S3Backend, S3Writer
from storage.config import ConfigError
from storage.db import repo
from storage.db.sql import queries
from storage.domain import maintenance, recovery, scan, uploads
from storage.domain.element import backend_key, element_key
from storage.models import FileMeta

pytestmark = pytest.mark.parametrize("storage_kind", ["s3"], indirect=True)
MIB = 1024 * 1024
PART = 5 * MIB  # the multipart threshold the fixtures configure


def url(fid: str, suffix: str = "") -> str:
    return f"/api/v1/files/{fid}{suffix}"


@pytest.fixture
def swap_backend(client):
    """``swap_backend(cls)``: the app's live S3 backend behaves as ``cls`` (a subclass
    with the same state) for the rest of the test."""
    backend = client.app[backend_key]
    original = type(backend)

    def swap(cls: type[S3Backend]) -> None:
        backend.__class__ = cls

    yield swap
    backend.__class__ = original


class Gate:
    """Holds every writer at its commit until released."""

    arrived = 0
    both: asyncio.Event
    release: asyncio.Event


class GatedWriter(S3Writer):
    async def commit(self, attr=None):
        Gate.arrived += 1
        if Gate.arrived == 2:
            Gate.both.set()
        await Gate.release.wait()
        await super().commit(attr)


class GatedCommits(S3Backend):
    def create(self, relpath, size_hint=None, *, content_type=None):
        return GatedWriter(self, relpath, size_hint, content_type)


@pytest.mark.parametrize("size", [1000, 6 * MIB], ids=["single-put", "multipart"])
async def test_two_uploads_of_one_id_in_one_second_one_wins_and_keeps_its_data(
        client, auth, config, pg_dsn, swap_backend, monkeypatch, size):
    """Same id, name, user and second: the same key.  Held at the commit until both
    got there (or one was answered), both would race the conditional create.  Before:
    both wrote the key (SeaweedFS applies ``If-None-Match`` non-atomically) and the
    database loser's undo deleted the winner's object after its 201, or the loser got
    503.  Now the second intent of the id is refused (409) before a byte is written."""
    fixed = datetime(2026, 12, 8, 1, 2, 3, tzinfo=UTC)
    monkeypatch.setattr(uploads, "utcnow", lambda: fixed)
    Gate.arrived, Gate.both, Gate.release = 0, asyncio.Event(), asyncio.Event()
    swap_backend(GatedCommits)
    fid = str(uuid.uuid4())
    bodies = [random_bytes(size), random_bytes(size)]
    tasks = [asyncio.create_task(client.put(url(fid) + "?filename=same.bin",
                                            data=io.BytesIO(body), headers=auth()))
             for body in bodies]
    both = asyncio.create_task(Gate.both.wait())
    await asyncio.wait([*tasks, both], return_when=asyncio.FIRST_COMPLETED)
    both.cancel()
    Gate.release.set()
    responses = await asyncio.gather(*tasks)
    statuses = [r.status for r in responses]
    assert sorted(statuses) == [201, 409], [await r.text() for r in responses]
    winner = bodies[statuses.index(201)]
    got = await client.get(url(fid, "/download"), headers=auth())
    assert got.status == 200 and sha256(await got.read()) == sha256(winner)
    meta = await (await client.get(url(fid), headers=auth())).json()
    relpath = meta["storage_path"] + meta["storage_filename"]
    assert await stored_objects(config) == [relpath, relpath + ".attr.json"]
    assert await wal_outcomes(pg_dsn, config) == [("committed", 0)]  # the loser never began


async def test_a_later_upload_to_an_existing_key_is_409_and_removes_nothing(
        client, auth, config, monkeypatch):
    """The store refuses the conditional create (412): the client gets 409, not a 503
    that sends artStore to another element with the id, and the object stays."""
    fixed = datetime(2026, 12, 8, 1, 2, 3, tzinfo=UTC)
    monkeypatch.setattr(uploads, "utcnow", lambda: fixed)
    fid, first = str(uuid.uuid4()), random_bytes(500)
    resp = await client.put(url(fid) + "?filename=k.bin", data=first, headers=auth())
    assert resp.status == 201
    # the row goes behind the element's back (as if another element's database won)
    conn = await asyncpg.connect(config.database_url)
    try:
        await conn.execute(f"DELETE FROM {config.table_prefix}_files")
    finally:
        await conn.close()
    resp = await client.put(url(fid) + "?filename=k.bin", data=random_bytes(700),
                            headers=auth())
    assert resp.status == 409, await resp.text()
    async with s3_client(config) as s3:
        obj = await s3.get_object(Bucket=config.s3_bucket_name,
                                  Key=s3_folder(config) + (await stored_objects(config))[0])
        assert sha256(await obj["Body"].read()) == sha256(first)
    assert len(await stored_objects(config)) == 2


# --- finding 1: slow downloads must not freeze the process's S3 traffic ------------------


async def stalled_reader(client, auth, fid: str, stalled: list) -> None:
    """A download whose client reads the response head and then nothing more (a tiny
    receive buffer, so the element's writes block soon); added to ``stalled``."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (client.server.host,
                                                         client.server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    stalled.append((reader, writer))
    writer.write((f"GET {url(fid, '/download')} HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: {auth()['Authorization']}\r\n\r\n").encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    assert head.startswith(b"HTTP/1.1 200"), head


async def probe(client, auth, small: str) -> None:
    """A small upload, a small download and readiness, each answered."""
    resp = await client.put(url(str(uuid.uuid4())), data=b"k" * 1024, headers=auth())
    assert resp.status == 201, await resp.text()
    got = await client.get(url(small, "/download"), headers=auth())
    assert got.status == 200 and await got.read() == b"small"
    ready = await client.get("/health/ready")
    assert ready.status == 200, await ready.text()


async def test_stalled_downloads_do_not_block_uploads_downloads_or_readiness(client, auth):
    """Twelve downloads whose clients stopped reading (botocore's default pool had ten
    connections, and every one of them was held: the probe hung until they closed)."""
    big = (await upload_raw(client, auth, random_bytes(24 * MIB)))
    small = await upload_raw(client, auth, b"small")
    stalled: list = []
    try:
        for _ in range(12):
            await stalled_reader(client, auth, big, stalled)
        await asyncio.wait_for(probe(client, auth, small), 60)
    finally:
        for _reader, writer in stalled:
            writer.transport.abort()


async def test_a_stalled_download_is_cut_after_the_write_timeout(app_factory, auth):
    """``DOWNLOAD_WRITE_TIMEOUT``: a client that takes no bytes for that long loses the
    connection, so even more stalled readers than connections cannot starve downloads."""
    client = await app_factory(download_write_timeout=1.0, s3_max_connections=3)
    size = 24 * MIB
    big = await upload_raw(client, auth, random_bytes(size))
    stalled: list = []
    try:
        for _ in range(3):
            await stalled_reader(client, auth, big, stalled)
        got = await asyncio.wait_for(client.get(url(big, "/download"), headers=auth()), 60)
        assert got.status == 200 and len(await got.read()) == size
        for reader, _writer in stalled:  # each was cut: what it reads now ends short
            received = 0
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while chunk := await asyncio.wait_for(reader.read(1 << 20), 60):
                    received += len(chunk)
            assert received < size
    finally:
        for _reader, writer in stalled:
            writer.transport.abort()


async def upload_raw(client, auth, data: bytes) -> str:
    fid = str(uuid.uuid4())
    resp = await client.put(url(fid), data=io.BytesIO(data), headers=auth())
    assert resp.status == 201, await resp.text()
    return fid


# --- finding 3: the stray-upload sweep spares live uploads --------------------------------


async def test_the_sweep_never_aborts_an_upload_a_pending_intent_names(
        client, auth, config, monkeypatch):
    """An upload running longer than the sweep's grace (an hour; here 0 s) is alive while
    its intent is pending.  Before: every periodic pass aborted it by age, and the upload
    failed with 503 NoSuchUpload."""
    monkeypatch.setattr(recovery, "TEMP_GRACE_S", 0.0)
    fid = str(uuid.uuid4())
    total = 2 * PART + 1000
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write((f"PUT {url(fid)} HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: {auth()['Authorization']}\r\n"
                  f"Content-Length: {total}\r\n\r\n").encode() + b"x" * (PART + MIB))
    await writer.drain()
    for _ in range(400):  # the first part is on its way: the intent names its upload
        if await named_temps(config):
            break
        await asyncio.sleep(0.05)
    assert len(await named_temps(config)) == 1 and len(await s3_uploads(config)) == 1
    report = await recovery.recover(client.app[element_key], alone=False)
    assert report.temps_removed == 0
    writer.write(b"x" * (total - PART - MIB))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 201"), head
    got = await client.get(url(fid, "/download"), headers=auth())
    assert got.status == 200 and len(await got.read()) == total


async def named_temps(config) -> list[str]:
    """The temp names (multipart upload ids) pending intents name."""
    conn = await asyncpg.connect(config.database_url)
    try:
        return [r[0] for r in await conn.fetch(
            f"SELECT operation_data->>'temp_path' FROM {config.table_prefix}_wal "
            "WHERE status = 'pending' AND operation_data->>'temp_path' <> ''")]
    finally:
        await conn.close()


# --- finding 4: a failed commit leaves nothing behind ------------------------------------


class FailingAttr(S3Backend):
    async def write_attr(self, relpath, data):
        raise StoreUnavailable("S3 error while trying to write the attribute file: injected")


@pytest.mark.parametrize("size", [1000, 6 * MIB], ids=["single-put", "multipart"])
async def test_a_failed_attr_put_removes_the_data_object(client, auth, config, pg_dsn,
                                                         swap_backend, size):
    """Before: the writer counted itself finished once the data object was in, so the
    undo left it: no attr, no row, no pending intent, nothing would ever remove it."""
    swap_backend(FailingAttr)
    resp = await client.put(url(str(uuid.uuid4())), data=io.BytesIO(random_bytes(size)),
                            headers=auth())
    assert resp.status == 503, await resp.text()
    assert await stored_objects(config) == []
    assert await wal_outcomes(pg_dsn, config) == [("rolled_back", 0)]


class Resending:
    """The S3 client, but every conditional commit is sent twice, as botocore retries a
    request whose response was lost: the second meets the first's object."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    async def put_object(self, **kwargs):
        if "IfNoneMatch" not in kwargs:
            return await self._real.put_object(**kwargs)
        await self._real.put_object(**kwargs)
        kwargs["Body"].seek(0)
        return await self._real.put_object(**kwargs)

    async def complete_multipart_upload(self, **kwargs):
        await self._real.complete_multipart_upload(**kwargs)
        return await self._real.complete_multipart_upload(**kwargs)


class LostResponses(S3Backend):
    @property
    def client(self):
        return Resending(super().client)


@pytest.mark.parametrize("size", [1000, 6 * MIB], ids=["single-put", "multipart"])
async def test_a_commit_retried_after_a_lost_response_is_a_success(client, auth, config,
                                                                   pg_dsn, swap_backend, size):
    """Before: the retry's 412 (or NoSuchUpload) was a 503 and the object stayed."""
    swap_backend(LostResponses)
    data, fid = random_bytes(size), str(uuid.uuid4())
    resp = await client.put(url(fid), data=io.BytesIO(data), headers=auth())
    assert resp.status == 201, await resp.text()
    got = await client.get(url(fid, "/download"), headers=auth())
    assert got.status == 200 and sha256(await got.read()) == sha256(data)
    assert len(await stored_objects(config)) == 2
    assert await wal_outcomes(pg_dsn, config) == [("committed", 0)]


async def test_check_counts_and_scrub_removes_data_objects_without_attr(
        client, auth, config, monkeypatch):
    """A data object a failed commit left (no attr, row or intent) past the grace: the
    consistency report counts it, scrub removes it; a file's objects stay."""
    monkeypatch.setattr(scan, "BARE_GRACE_S", 0.0, raising=False)
    kept = await upload_raw(client, auth, b"a real file")
    bare = f"2026/12/08/01/left_tester_20261208T010203_{uuid.uuid4()}.bin"
    async with s3_client(config) as s3:
        await s3.put_object(Bucket=config.s3_bucket_name, Key=s3_folder(config) + bare,
                            Body=b"orphan")
    resp = await client.get("/api/v1/cache/consistency", headers=auth())
    report = (await resp.json())["report"]
    assert resp.status == 200 and report["orphan_data_count"] == 1, report
    assert report["details"]["orphan_data_files"] == [bare] and not report["is_consistent"]
    tally = await maintenance.scrub(client.app[element_key])
    assert tally.counts["bare_data_removed"] == 1 and tally.counts["ok"] == 1
    assert bare not in await stored_objects(config)
    assert len(await stored_objects(config)) == 2
    got = await client.get(url(kept, "/download"), headers=auth())
    assert await got.read() == b"a real file"
    resp = await client.get("/api/v1/cache/consistency", headers=auth())
    assert (await resp.json())["report"]["is_consistent"]


# --- finding 5: one element's folder never nests in another's -----------------------------


def test_a_nested_app_folder_is_refused(make_config):
    """Folders ``se-a`` and ``se-a/nested`` in one bucket: the first element's listings
    (sweep, rebuild, check) would take in the second's objects and uploads."""
    with pytest.raises(ConfigError, match="STORAGE_S3_APP_FOLDER"):
        make_config(s3_app_folder="se-a/nested")
    with pytest.raises(ConfigError, match="STORAGE_S3_APP_FOLDER"):
        make_config(s3_app_folder="/")
    assert make_config(s3_app_folder="/se-a/").s3_app_folder == "/se-a/"  # edges stripped


# --- minor: what a store outage leaves stays named for recovery ----------------------------


class DownForAborts(S3Backend):
    async def abort_upload(self, key, upload_id):
        raise StoreUnavailable("S3 is unreachable while trying to abort the upload: injected")


async def test_an_upload_whose_abort_failed_stays_named_for_recovery(
        client, auth, config, pg_dsn, swap_backend):
    """The store is down when a failed upload aborts its multipart upload.  Before: the
    intent was rolled back anyway and only the hour-late age sweep found the upload.
    Now the intent stays pending, abandoned (its reservation released), and the next
    shared pass rolls it back and aborts exactly that upload."""
    swap_backend(DownForAborts)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write((f"PUT {url(str(uuid.uuid4()))} HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: {auth()['Authorization']}\r\n"
                  f"Content-Length: {64 * MIB}\r\n\r\n").encode() + b"x" * (PART + MIB))
    await writer.drain()
    for _ in range(400):
        if await named_temps(config):
            break
        await asyncio.sleep(0.05)
    writer.transport.abort()  # the client goes: the upload fails, its abort too
    for _ in range(400):
        if await wal_outcomes(pg_dsn, config) == [("pending", 0)]:
            break
        await asyncio.sleep(0.05)
    assert await wal_outcomes(pg_dsn, config) == [("pending", 0)]
    uploads_left = await s3_uploads(config)
    assert len(uploads_left) == 1
    swap_backend(S3Backend)  # the store is back
    conn = await asyncpg.connect(pg_dsn)
    try:  # older than a shared pass's five minutes, far younger than its 24 hours
        await conn.execute(f"UPDATE {config.table_prefix}_wal "
                           "SET started_at = started_at - interval '10 minutes'")
    finally:
        await conn.close()
    report = await recovery.recover(client.app[element_key], alone=False)
    assert (report.rolled_back, report.temps_removed) == (1, 0)
    assert await s3_uploads(config) == []
    assert await wal_outcomes(pg_dsn, config) == [("rolled_back", 0)]


def injected(operation: str) -> ClientError:
    return ClientError({"Error": {"Code": "InternalError", "Message": "injected"},
                        "ResponseMetadata": {"HTTPStatusCode": 500}}, operation)


class FailingAssembly:
    """The S3 client, but a multipart upload can be neither completed nor aborted."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    async def complete_multipart_upload(self, **kwargs):
        raise injected("CompleteMultipartUpload")

    async def abort_multipart_upload(self, **kwargs):
        raise injected("AbortMultipartUpload")


class DownAtAssembly(S3Backend):
    @property
    def client(self):
        return FailingAssembly(super().client)


async def test_a_failed_tus_completion_leaves_its_assembly_named_for_recovery(
        client, auth, config, pg_dsn, swap_backend):
    """The completion of a tus upload over S3 assembles the staged parts in a multipart
    upload.  When it dies (here: the store fails the complete and the abort), that
    upload is named by the tus intent, and recovery aborts it when it completes the
    file.  Before: it was named nowhere and only the age sweep found it."""
    data = random_bytes(1000)
    path = await tus.create(client, auth(), length=len(data))
    swap_backend(DownAtAssembly)
    await tus.patch(client, auth(), path, 0, data, status=503)
    assert len(await s3_uploads(config)) == 1
    assert len(await named_temps(config)) == 1
    swap_backend(S3Backend)
    await tus.sql(pg_dsn, f"UPDATE {config.table_prefix}_wal "  # past a shared pass's 5 min
                  "SET started_at = started_at - interval '10 minutes'")
    report = await recovery.recover(client.app[element_key], alone=False)
    assert report.uploads_completed == 1, report
    assert await s3_uploads(config) == []
    fid = path.rsplit("/", 1)[1]
    got = await client.get(url(fid, "/download"), headers=auth())
    assert got.status == 200 and await got.read() == data


class Overtaken:
    """Run after this upload's commit: another writer's object replaces it at the key
    (a second "winner" of a non-atomic conditional create) and another row of the id
    is in."""

    then = None


class OvertakenWriter(S3Writer):
    async def commit(self, attr=None):
        await super().commit(attr)
        await Overtaken.then(self)


class OvertakenCommits(S3Backend):
    def create(self, relpath, size_hint=None, *, content_type=None):
        return OvertakenWriter(self, relpath, size_hint, content_type)


async def test_an_undo_never_removes_an_object_another_upload_wrote(
        client, auth, config, swap_backend):
    """Before: the upload that lost in the database deleted whatever was at its key."""
    fid, foreign = str(uuid.uuid4()), b"the other winner's bytes"

    async def then(writer):
        swap_backend(S3Backend)
        async with s3_client(config) as s3:
            await s3.put_object(Bucket=config.s3_bucket_name,
                                Key=s3_folder(config) + writer.relpath, Body=foreign,
                                Metadata={"upload": str(uuid.uuid4())})
        # the row of another upload of the id (as if another element's database won: while
        # this upload is pending, no upload of its id can begin on this one)
        now = datetime.now(UTC)
        row = FileMeta(file_id=uuid.UUID(fid), original_filename="other.bin",
                       storage_filename="other.bin", file_size=len(foreign),
                       content_type="application/octet-stream", created_at=now,
                       updated_at=now, created_by_id="u", created_by_username="u",
                       storage_path="2026/", checksum=sha256(foreign), metadata_json=None)
        conn = await asyncpg.connect(config.database_url)
        try:
            await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                                      schema="pg_catalog")
            await repo.insert_file(conn, queries(config.table_prefix), row)
        finally:
            await conn.close()

    Overtaken.then = then
    swap_backend(OvertakenCommits)
    resp = await client.put(url(fid) + "?filename=mine.bin", data=b"mine", headers=auth())
    assert resp.status == 409, await resp.text()
    mine = [p for p in await stored_objects(config) if "mine" in p]
    assert len(mine) == 2 and mine[1].endswith(".attr.json")  # the data object stays
    async with s3_client(config) as s3:
        obj = await s3.get_object(Bucket=config.s3_bucket_name, Key=s3_folder(config) + mine[0])
        assert await obj["Body"].read() == foreign


async def test_bare_data_listing_pairs_keys_that_sort_between_data_and_attr(client, config):
    """``X-b`` and its attr sort between ``X`` and ``X.attr.json``; staged tus bytes and
    the quarantine are not data objects."""
    keys = ["d/X", "d/X-b", "d/X-b.attr.json", "d/X.attr.json", "d/Y", "d/Z", "d/Z.attr.json",
            "_resumable/0/000000.chunk", ".quarantine/d/Q"]
    async with s3_client(config) as s3:
        for key in keys:
            await s3.put_object(Bucket=config.s3_bucket_name, Key=s3_folder(config) + key,
                                Body=b"x")
    backend = client.app[backend_key]
    assert [p async for p in backend.iter_bare_data(0)] == ["d/Y"]
    assert [p async for p in backend.iter_bare_data(3600)] == []  # all too young
