"""Issue 24: what an outside review of the S3 backend found, each reproduced against
SeaweedFS with hooks at the real S3 calls (a live backend swapped to a subclass that
waits or repeats a call) or real stalled clients."""

from __future__ import annotations

import asyncio
import io
import uuid
from datetime import UTC, datetime

import pytest
from helpers import random_bytes, s3_client, s3_folder, sha256, stored_objects, wal_outcomes

from storage.backends.s3 import S3Backend, S3Writer
from storage.domain import uploads
from storage.domain.element import backend_key

pytestmark = pytest.mark.parametrize("storage_kind", ["s3"], indirect=True)
MIB = 1024 * 1024


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
    got there (or one was answered), both race the conditional create.  Before: both
    wrote the key (SeaweedFS applies ``If-None-Match`` non-atomically) and the database
    loser's undo deleted the winner's object after its 201, or the loser got 503."""
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
    assert sorted(await wal_outcomes(pg_dsn, config)) == [("committed", 0), ("rolled_back", 0)]


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
    import asyncpg
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
