"""Downloads served from the in-memory facts cache (storage/domain/served.py, issue 16): a file
is never served after any process acknowledged its DELETE.

Two apps on one prefix and one store stand for two processes of one element: each has
its own cache, and they share nothing but the database and the storage.
"""

from __future__ import annotations

import os
import uuid

import pytest
from helpers import BOTH_BACKENDS, sha256, upload

from storage.domain.element import element_key
from storage.web.app import make_app


@pytest.fixture
async def pair(aiohttp_client, make_config):
    """Two apps (processes) of one element."""
    first = make_config()
    second = first.with_()
    return (await aiohttp_client(make_app(first)), await aiohttp_client(make_app(second)))


def url(fid: str, tail: str = "/download") -> str:
    return f"/api/v1/files/{fid}{tail}"


@BOTH_BACKENDS
async def test_a_delete_in_another_process_is_never_served(pair, auth):
    a, b = pair
    data = os.urandom(10_000)
    fid = (await upload(a, auth(), data, "x.bin"))["file_id"]
    for _ in range(2):
        resp = await a.get(url(fid), headers=auth())
        assert resp.status == 200 and await resp.read() == data
    assert a.app[element_key].served.hits >= 1  # the second one came from memory
    etag = resp.headers["ETag"]
    assert (await b.delete(url(fid, ""), headers=auth())).status == 204
    # the cache of process A still has the file: GET, HEAD, a conditional GET and a range
    # all find the data gone and answer from the database
    for method, extra in (("GET", {}), ("HEAD", {}), ("GET", {"If-None-Match": etag}),
                          ("GET", {"Range": "bytes=0-9"})):
        resp = await a.request(method, url(fid), headers={**auth(), **extra})
        assert resp.status == 404, (method, extra, resp.status)
    assert (await a.get(url(fid, ""), headers=auth())).status == 404


async def test_an_id_deleted_and_uploaded_again_elsewhere_serves_the_new_bytes(pair, auth):
    a, b = pair
    fid = str(uuid.uuid4())
    old, new = b"old bytes" * 100, b"new bytes, longer" * 100
    assert (await a.put(f"/api/v1/files/{fid}", data=old, headers=auth())).status == 201
    assert await (await a.get(url(fid), headers=auth())).read() == old
    assert (await b.delete(url(fid, ""), headers=auth())).status == 204
    assert (await b.put(f"/api/v1/files/{fid}?filename=second.bin", data=new,
                        headers=auth())).status == 201
    resp = await a.get(url(fid), headers=auth())
    assert resp.status == 200 and await resp.read() == new
    assert resp.headers["ETag"] == f'"{sha256(new)}"'
    assert "second.bin" in resp.headers["Content-Disposition"]


async def test_a_conditional_get_from_memory_is_304_while_the_file_exists(client, auth):
    fid = (await upload(client, auth(), b"abc", "c.txt"))["file_id"]
    etag = (await client.get(url(fid), headers=auth())).headers["ETag"]
    resp = await client.get(url(fid), headers={**auth(), "If-None-Match": etag})
    assert resp.status == 304
    assert client.app[element_key].served.hits == 1


async def test_the_deleting_process_forgets_at_once(client, auth):
    fid = (await upload(client, auth(), b"abc", "c.txt"))["file_id"]
    await client.get(url(fid), headers=auth())
    el = client.app[element_key]
    assert len(el.served) == 1
    assert (await client.delete(url(fid, ""), headers=auth())).status == 204
    assert len(el.served) == 0


async def _relpath(client, fid: str) -> str:
    el = client.app[element_key]
    async with el.db.pool.acquire() as conn:
        return await conn.fetchval(
            f"SELECT storage_path || storage_filename FROM {el.config.table_prefix}_files "
            "WHERE file_id = $1", uuid.UUID(fid))


@BOTH_BACKENDS
async def test_an_id_uploaded_anew_at_the_same_path_is_served_with_its_own_headers(pair,
                                                                                  auth):
    """Issue 26 (found by the history checker): deleted in one process and uploaded again
    with the same name and size within the same second, the id's new object lies at the
    very path of the old one.  The other process's cached entry must not serve the new
    bytes under the old ETag/digest, nor answer 304 to the old ETag."""
    a, b = pair
    for _attempt in range(5):  # the storage filename has a one-second timestamp
        fid = str(uuid.uuid4())
        old, new = os.urandom(4096), os.urandom(4096)
        put = f"/api/v1/files/{fid}?filename=same.bin"
        assert (await a.put(put, data=old, headers=auth())).status == 201
        first = await a.get(url(fid), headers=auth())
        assert await first.read() == old
        path = await _relpath(a, fid)
        assert (await b.delete(url(fid, ""), headers=auth())).status == 204
        assert (await b.put(put, data=new, headers=auth())).status == 201
        if await _relpath(b, fid) == path:
            break
    else:
        pytest.fail("could not upload anew within the same second")
    old_etag, new_etag = first.headers["ETag"], f'"{sha256(new)}"'
    resp = await a.get(url(fid), headers={**auth(), "If-None-Match": old_etag})
    assert resp.status == 200 and await resp.read() == new
    assert resp.headers["ETag"] == new_etag
    resp = await a.head(url(fid), headers=auth())
    assert resp.headers["ETag"] == new_etag
    resp = await a.get(url(fid), headers={**auth(), "Range": "bytes=0-9"})
    assert resp.status == 206 and await resp.read() == new[:10]
    assert resp.headers["ETag"] == new_etag
    resp = await a.get(url(fid), headers=auth())
    assert await resp.read() == new and resp.headers["ETag"] == new_etag


@BOTH_BACKENDS
async def test_a_range_or_if_match_judged_from_memory_is_checked_against_the_store(pair,
                                                                                   auth):
    """Issue 26 (found by the history checker): the cached size and ETag of a file deleted
    in another process gave a 416 (range past its old end) or a 412 instead of the 404,
    and, once uploaded anew and larger, a 416 for a range inside the new file."""
    a, b = pair
    fid = str(uuid.uuid4())
    old = os.urandom(100)
    assert (await a.put(f"/api/v1/files/{fid}", data=old, headers=auth())).status == 201
    etag = (await a.get(url(fid), headers=auth())).headers["ETag"]
    assert (await b.delete(url(fid, ""), headers=auth())).status == 204
    for extra in ({"Range": "bytes=5000-6000"}, {"If-Match": '"' + "0" * 64 + '"'}):
        resp = await a.get(url(fid), headers={**auth(), **extra})
        assert resp.status == 404, (extra, resp.status)
    await a.get(url(fid), headers=auth())  # nothing cached now; cache it again:
    assert (await a.put(f"/api/v1/files/{fid}", data=old, headers=auth())).status == 201
    assert (await a.get(url(fid), headers=auth())).headers["ETag"] == etag
    assert (await b.delete(url(fid, ""), headers=auth())).status == 204
    new = os.urandom(10_000)
    assert (await b.put(f"/api/v1/files/{fid}", data=new, headers=auth())).status == 201
    resp = await a.get(url(fid), headers={**auth(), "Range": "bytes=5000-5009"})
    assert resp.status == 206 and await resp.read() == new[5000:5010]
    resp = await a.get(url(fid), headers={**auth(), "If-Match": f'"{sha256(new)}"'})
    assert resp.status == 200 and await resp.read() == new
