"""Group commit (issue 16): batched reservations and finishes, shared directory fsyncs,
two-round-trip PATCH and DELETE, and the mode checked where a change commits (issue 19).

The batch tests drive ``GroupCommit`` of a real app on the real database: members
submitted in one loop iteration go out as one batch, so what happens to one member of a
batch is observable without timing luck.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from cache_helpers import check_store, connect
from helpers import config_of, stored_objects, upload, wal_outcomes

from storage.backends.fsutil import DirSync
from storage.db import repo
from storage.domain import faults, uploads
from storage.domain.element import element_key
from storage.domain.groupcommit import Batcher
from storage.models import Identity, utcnow

WHO = Identity(sub="u-1", name="tester", role="admin", token_type="service_account",
               is_service_account=True)


# --- the batcher itself ------------------------------------------------------------------


async def test_members_submitted_together_form_one_batch_and_a_lone_one_goes_at_once():
    seen: list[list[int]] = []

    async def run(items):
        seen.append(items)
        await asyncio.sleep(0.01)
        return [i * 10 for i in items]

    b = Batcher(run, name="t")
    assert await b.submit(1) == 10  # idle: runs at once, alone
    results = await asyncio.gather(*(b.submit(i) for i in range(2, 7)))
    assert results == [20, 30, 40, 50, 60]
    assert seen == [[1], [2, 3, 4, 5, 6]]
    # while a batch is in flight, arrivals queue and go together next
    first = asyncio.ensure_future(b.submit(7))
    await asyncio.sleep(0.002)  # batch [7] is in flight
    later = await asyncio.gather(*(b.submit(i) for i in (8, 9)), first)
    assert later == [80, 90, 70] and seen[-2:] == [[7], [8, 9]]
    assert (b.batches, b.members) == (4, 9)


async def test_one_members_error_stays_with_that_member():
    async def run(items):
        return [ValueError(f"bad {i}") if i == 2 else i for i in items]

    b = Batcher(run, name="t")
    results = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
    assert results[:2] == [0, 1] and results[3] == 3
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad 2"


async def test_a_failed_batch_fails_each_member_and_the_next_batch_runs():
    calls = 0

    async def run(items):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database went away")
        return items

    b = Batcher(run, name="t")
    results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert await b.submit(5) == 5


async def test_a_cancelled_member_still_runs_and_its_result_is_undone():
    release = asyncio.Event()
    undone: list[int] = []

    async def run(items):
        await release.wait()
        return items

    b = Batcher(run, name="t")
    waiter = asyncio.ensure_future(b.submit(42, abandoned=undone.append))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await b.close()
    assert undone == [42]


# --- shared directory fsyncs ---------------------------------------------------------------


def test_a_change_made_while_a_directory_fsync_runs_waits_for_the_next_one(tmp_path):
    """The first caller's fsync may have started before the others' renames: they must
    wait for a second fsync, which covers all of them at once."""
    log: list[tuple[str, float]] = []
    first_started, go_on = threading.Event(), threading.Event()

    def fsync(fd: int) -> None:
        log.append(("start", time.monotonic()))
        if not first_started.is_set():
            first_started.set()
            go_on.wait(5)
        os.fsync(fd)
        log.append(("end", time.monotonic()))

    sync = DirSync(fsync=fsync)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    returned: dict[str, float] = {}
    called: dict[str, float] = {}

    def worker(name: str) -> None:
        called[name] = time.monotonic()
        sync.sync(str(tmp_path), fd)
        returned[name] = time.monotonic()

    try:
        leader = threading.Thread(target=worker, args=("leader",))
        leader.start()
        assert first_started.wait(5)
        others = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
        for t in others:
            t.start()
        time.sleep(0.1)
        assert set(returned) == set()  # nobody is acknowledged by the running fsync
        go_on.set()
        for t in [leader, *others]:
            t.join(5)
    finally:
        os.close(fd)
    assert [kind for kind, _ in log] == ["start", "end", "start", "end"]  # two in all
    second_start = log[2][1]
    for name in (f"w{i}" for i in range(4)):
        assert called[name] < second_start <= log[3][1] <= returned[name]
    assert sync.idle()


# --- batches on the real database ------------------------------------------------------------


def _meta(el, name: str = "a.txt", file_id: uuid.UUID | None = None):
    spec = uploads.UploadSpec(original_filename=name, file_id=file_id)
    meta = uploads.build_meta(spec, WHO, file_id or uuid.uuid4(), utcnow())
    meta.file_size, meta.checksum = 1, "0" * 64
    return meta


async def _intents(el, metas) -> list[uuid.UUID]:
    """A committed WAL intent (and a 1-byte reservation) for each of ``metas``."""
    txids = [uuid.uuid4() for _ in metas]
    got = await asyncio.gather(*(el.commits.reserve(
        t, 1, intent={"op": "file_create", "file_id": m.file_id, "user_id": WHO.sub,
                      "started_at": utcnow(), "data": {"relative_path": m.relative_path}})
        for t, m in zip(txids, metas, strict=True)))
    assert [r.status for r in got] == ["ok"] * len(metas)
    return txids


async def test_a_duplicate_id_or_a_resolved_intent_fails_only_that_member(client, pg_dsn,
                                                                          config):
    el = client.app[element_key]
    twin = uuid.uuid4()
    metas = [_meta(el, "one.txt"), _meta(el, "twin-a.txt", twin), _meta(el, "two.txt"),
             _meta(el, "twin-b.txt", twin), _meta(el, "gone.txt")]
    # two pending intents of one id are refused at reservation (migrations/0012), so the
    # twin's intent is taken under another id: its finish meets the id taken in the batch
    txids = await _intents(el, [*metas[:3], _meta(el, "twin-b.txt"), metas[4]])
    # recovery (of another process) resolved the last intent meanwhile
    await repo.rollback_wal(el.db.pool, el.db.q, txids[4], "recovery: test", utcnow())
    batches = el.commits.batcher.batches
    done = await asyncio.gather(*(el.commits.finish(m, t, {}) for m, t in zip(metas, txids,
                                                                               strict=True)))
    assert el.commits.batcher.batches == batches + 1  # all five in one statement
    assert [d.status for d in done] == ["ok", "ok", "ok", "exists", "gone"]
    ids = {r["original_filename"] for r in await el.db.pool.fetch(
        f"SELECT original_filename FROM {el.prefix}_files")}
    assert ids == {"one.txt", "twin-a.txt", "two.txt"}
    assert sorted(await wal_outcomes(pg_dsn, config)) == sorted(
        [("committed", 0)] * 3 + [("pending", 1), ("rolled_back", 0)])


async def test_bad_data_in_one_member_is_retried_alone(client):
    el = client.app[element_key]
    metas = [_meta(el, "fine-1.txt"), _meta(el, "fine-2.txt"), _meta(el, "fine-3.txt")]
    txids = await _intents(el, metas)
    metas[1].version = "v" * 51  # varchar(50): the server refuses the whole statement
    done = await asyncio.gather(*(el.commits.finish(m, t, {}) for m, t in zip(metas, txids,
                                                                               strict=True)),
                                return_exceptions=True)
    assert [getattr(d, "status", None) for d in (done[0], done[2])] == ["ok", "ok"]
    assert isinstance(done[1], asyncpg.StringDataRightTruncationError)


async def test_a_large_refusal_does_not_block_the_small_reservations_behind_it(app_factory):
    client = await app_factory(storage_max_size=10_000)
    el = client.app[element_key]
    intent = {"op": "file_create", "user_id": "u", "started_at": utcnow(), "data": {}}
    got = await asyncio.gather(*(el.commits.reserve(uuid.uuid4(), need, intent=intent)
                                 for need in (6_000, 9_000, 3_000, 2_000)))
    assert [r.status for r in got] == ["ok", "capacity", "ok", "capacity"]
    assert got[3].reserved == 9_000  # what the refusal saw: the two accepted before it


async def test_finishes_are_refused_when_the_element_became_read_only(rw_client, pg_dsn,
                                                                      auth):
    client, config = rw_client
    el = client.app[element_key]
    metas = [_meta(el, "late.txt")]
    txids = await _intents(el, metas)
    resp = await client.post("/api/v1/mode", json={"target_mode": "ro"}, headers=auth())
    assert resp.status == 200
    done = await el.commits.finish(metas[0], txids[0], {})
    assert (done.status, done.mode) == ("mode", "ro")
    assert await el.db.pool.fetchval(f"SELECT count(*) FROM {el.prefix}_files") == 0
    assert await wal_outcomes(pg_dsn, config) == [("pending", 1)]


# --- over HTTP ---------------------------------------------------------------------------------


async def test_concurrent_uploads_share_commits(client, auth, pg_dsn, config):
    el = client.app[element_key]
    conn = await connect(pg_dsn)
    try:
        bodies = [os.urandom(4096) for _ in range(32)]
        results = await asyncio.gather(*(upload(client, auth(), b, f"f{i}.bin")
                                         for i, b in enumerate(bodies)))
        assert [r["checksum"] for r in results] == [hashlib.sha256(b).hexdigest()
                                                    for b in bodies]
        assert el.commits.batcher.members == 64  # a reservation and a finish each
        assert el.commits.batcher.batches < 64
        await check_store(conn, el.prefix, config.storage_local_base_path)
    finally:
        await conn.close()


async def test_failing_members_among_concurrent_uploads_leave_the_others_intact(
        client, auth, pg_dsn, config):
    """Concurrent uploads share their commits; one whose digest does not match and one
    whose client goes away mid-body fail alone: the others are stored, and the two
    leave no file, no row, no reservation."""
    import base64

    el = client.app[element_key]
    good = {str(uuid.uuid4()): os.urandom(20_000 + i) for i in range(6)}
    wrong = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()

    async def put(fid, data, **headers):
        resp = await client.put(f"/api/v1/files/{fid}", data=data,
                                headers={**auth(), **headers})
        return resp.status

    async def cut_short():
        host, port = client.server.host, client.server.port
        reader, writer = await asyncio.open_connection(host, port)
        writer.write((f"PUT /api/v1/files/{uuid.uuid4()} HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: {auth()['Authorization']}\r\n"
                      "Content-Length: 100000\r\n\r\n").encode() + b"x" * 30_000)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()

    statuses = await asyncio.gather(
        *(put(fid, data) for fid, data in good.items()),
        put(uuid.uuid4(), b"y" * 20_000, **{"Repr-Digest": f"sha-256=:{wrong}:"}),
        cut_short())
    assert statuses[:6] == [201] * 6 and statuses[6] == 400
    await asyncio.sleep(0.3)  # the cut upload's handler finishes its cleanup
    assert el.commits.batcher.batches < el.commits.batcher.members
    conn = await connect(pg_dsn)
    try:
        rows = await check_store(conn, el.prefix, config.storage_local_base_path)
    finally:
        await conn.close()
    assert set(rows) == set(good)
    for fid, data in good.items():
        assert rows[fid]["checksum"] == hashlib.sha256(data).hexdigest()
    assert {s for s, _ in await wal_outcomes(pg_dsn, config)} == {"committed", "rolled_back"}


async def test_an_upload_that_outlives_a_change_to_read_only_leaves_nothing(rw_client, auth,
                                                                           pg_dsn):
    """The mode is checked again where the upload commits (issue 19): a body that was
    streaming when the element became read-only gets the answer an upload starting now
    would get, and nothing stays behind."""
    client, config = rw_client
    gate = asyncio.Event()

    async def body():
        yield b"x" * 70_000
        await gate.wait()
        yield b"y" * 1000

    fid = uuid.uuid4()
    put = asyncio.ensure_future(client.put(f"/api/v1/files/{fid}", data=body(),
                                           headers=auth()))
    await asyncio.sleep(0.3)  # the intent is in, the body is streaming
    resp = await client.post("/api/v1/mode", json={"target_mode": "ro"}, headers=auth())
    assert resp.status == 200
    gate.set()
    resp = await put
    assert resp.status == 400
    assert (await resp.json())["detail"] == "File upload not allowed in ro mode"
    assert list(config.storage_local_base_path.rglob("*.*")) == []
    assert [s for s, _ in await wal_outcomes(pg_dsn, config)] == ["rolled_back"]


async def test_a_mode_change_waits_for_a_patch_in_flight(rw_client, auth):
    """PATCH holds the element's writes lock between its two round trips: a change to
    read-only waits for it, and the next PATCH is refused."""
    client, _config = rw_client
    stored = (await upload(client, auth(), b"stored bytes", "s.txt"))["file_id"]
    el = client.app[element_key]
    txid, fid = uuid.uuid4(), uuid.UUID(stored)
    async with el.db.pool.acquire() as conn:
        began = await repo.begin_change(conn, el.db.q, txid=txid, op="file_update",
                                        file_id=fid, data={}, user_id="u",
                                        started_at=utcnow(), modes=("edit", "rw"),
                                        app_mode="rw")
        assert began.status == "ok"
        change = asyncio.ensure_future(client.post("/api/v1/mode", json={"target_mode": "ro"},
                                                   headers=auth()))
        await asyncio.sleep(0.5)
        assert not change.done()  # waits for the PATCH in flight
        await repo.end_update(conn, el.db.q, txid, fid, description="in time", version=None,
                              metadata=None, replace_metadata=False, updated_at=utcnow(),
                              ttl_hours=24, result={}, at=utcnow())
        assert (await change).status == 200
    resp = await client.patch(f"/api/v1/files/{stored}", json={"description": "late"},
                              headers=auth())
    assert resp.status == 400
    assert (await resp.json())["detail"] == "Metadata update not allowed in ro mode"


async def test_patch_and_delete_take_two_round_trips_each(client, auth, stored, monkeypatch):
    """Counted at the connection: every statement a PATCH and a DELETE send (the mode
    poll running in the background aside)."""
    sent: list[str] = []
    poll = client.app[element_key].db.q.get_mode
    real_fetchrow, real_fetchval = asyncpg.Connection.fetchrow, asyncpg.Connection.fetchval
    real_execute = asyncpg.Connection.execute

    def spy(real):
        async def call(self, query, *args, **kwargs):
            if query != poll:
                sent.append(query)
            return await real(self, query, *args, **kwargs)
        return call

    monkeypatch.setattr(asyncpg.Connection, "fetchrow", spy(real_fetchrow))
    monkeypatch.setattr(asyncpg.Connection, "fetchval", spy(real_fetchval))
    monkeypatch.setattr(asyncpg.Connection, "execute", spy(real_execute))
    resp = await client.patch(f"/api/v1/files/{stored}", json={"description": "two"},
                              headers=auth())
    assert resp.status == 200 and (await resp.json())["description"] == "two"
    patch_sent, sent[:] = list(sent), []
    resp = await client.delete(f"/api/v1/files/{stored}", headers=auth())
    assert resp.status == 204
    assert len(patch_sent) == 2 and "begin_change" in patch_sent[0], patch_sent
    assert len(sent) == 2 and "end_delete" in sent[1], sent


@pytest.fixture
async def rw_client(aiohttp_client, make_config):
    """(client, config) of an element in rw mode (edit can never become read-only)."""
    from storage.web.app import make_app

    config = make_config(app_mode="rw")
    return await aiohttp_client(make_app(config)), config


@pytest.fixture
async def stored(client, auth) -> str:
    return (await upload(client, auth(), b"stored bytes", "s.txt"))["file_id"]


# --- a process killed with a batch half done ---------------------------------------------------


SEQUENTIAL = 3  # uploads acknowledged one after the other first: two commits each


@pytest.mark.parametrize("fault", [f"commit.before_batch@{2 * SEQUENTIAL + 1}",
                                   f"commit.after_batch@{2 * SEQUENTIAL + 2}"])
async def test_kill_with_a_batch_half_done(server_env, server_factory, pg_dsn, token, fault):
    """Three uploads are acknowledged one by one (a reservation and a finish each: six
    group commits); then eight race, and the process dies at the burst's first group
    commit before it is sent, or at its second after it committed but before its members
    were told.  After a restart: every acknowledged file is there byte for byte, each of
    the burst is there whole or not at all, and nothing partial, pending or stray is
    left.  Killed before the burst's first commit, none of the burst can be there."""
    server = server_factory({**server_env, "STORAGE_FAULT_POINT": fault})
    bodies = {str(uuid.uuid4()): os.urandom(50_000 + i) for i in range(SEQUENTIAL + 8)}
    first, burst = list(bodies)[:SEQUENTIAL], list(bodies)[SEQUENTIAL:]
    acked = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token()}"}) as s:
        async def put(fid):
            with contextlib.suppress(aiohttp.ClientError):
                async with s.put(f"{server.url}/api/v1/files/{fid}", data=bodies[fid]) as r:
                    if r.status == 201:
                        acked.append(fid)

        for fid in first:
            await put(fid)
        assert acked == first
        await asyncio.gather(*(put(fid) for fid in burst))
    server.proc.wait(10)
    assert acked == first  # no upload of the burst can have had its answer
    restarted = server_factory({**server_env, "STORAGE_FAULT_POINT": ""})
    conn = await connect(pg_dsn)
    try:
        rows = await check_store(conn, server_env["DB_TABLE_PREFIX"],
                                 Path(server_env["STORAGE_LOCAL_BASE_PATH"]))
    finally:
        await conn.close()
    assert set(first) <= set(rows)
    for fid in rows:
        assert rows[fid]["checksum"] == hashlib.sha256(bodies[fid]).hexdigest()
    if fault.startswith("commit.before_batch"):
        assert set(rows) == set(first)
    assert restarted.stop() == 0


@pytest.mark.parametrize("seen", ["complete", "incomplete"])
async def test_recovery_elsewhere_resolving_an_intent_before_its_finish(pair_of_apps, auth,
                                                                       pg_dsn, seen):
    """The race of issue 19: recovery in another process resolves an upload's intent
    between the upload's file commit and its finish.  Seen complete, recovery inserts the
    row itself: the upload has succeeded (201, one row).  Seen incomplete (it looked
    before the files were in place), recovery removes the files and rolls the intent
    back: the finish must not insert a row for files that are gone (503, nothing left)."""
    from storage.db import repo_cache
    from storage.domain import recovery

    client, other = pair_of_apps
    el, el2 = client.app[element_key], other.app[element_key]
    real_finish = el.commits.finish

    async def finish_after_recovery(meta, txid, result):
        if seen == "incomplete":  # what recovery saw when it read the directory
            attr = config_of(client).storage_local_base_path / (meta.relative_path
                                                                + ".attr.json")
            attr.unlink()
        pending = await repo_cache.pending_page(
            el2.db.pool, el2.db.q, before=utcnow().replace(year=2100),
            after=(utcnow().replace(year=2000), uuid.UUID(int=0)), limit=10)
        (wal,) = [w for w in pending if w.transaction_id == txid]
        report = recovery.Report("shared")
        await recovery.resolve(el2, wal, report)  # the other process's recovery, for real
        assert (report.completed, report.rolled_back) == (
            (1, 0) if seen == "complete" else (0, 1)), report.actions
        return await real_finish(meta, txid, result)

    el.commits.finish = finish_after_recovery
    fid = uuid.uuid4()
    resp = await client.put(f"/api/v1/files/{fid}", data=b"z" * 5000, headers=auth())
    el.commits.finish = real_finish
    if seen == "complete":
        assert resp.status == 201
        got = await client.get(f"/api/v1/files/{fid}/download", headers=auth())
        assert got.status == 200 and await got.read() == b"z" * 5000
        assert await wal_outcomes(pg_dsn, config_of(client)) == [("committed", 0)]
    else:
        assert resp.status == 503
        assert (await resp.json())["type"].endswith(":upload_abandoned")
        assert (await client.get(f"/api/v1/files/{fid}", headers=auth())).status == 404
        assert await stored_objects(config_of(client)) == []
        assert await wal_outcomes(pg_dsn, config_of(client)) == [("rolled_back", 0)]


@pytest.fixture
async def pair_of_apps(aiohttp_client, make_config):
    """Two apps (processes) of one element: one prefix, one store."""
    from storage.web.app import make_app

    first = make_config()
    return (await aiohttp_client(make_app(first)),
            await aiohttp_client(make_app(first.with_())))


async def test_a_connection_lost_during_the_retry_keeps_what_committed_alone(client):
    """The one-by-one retry of a refused batch loses its connection at the third member:
    the first committed alone and is told so; only the members not yet settled get the
    error (before: every member did, and a committed finish answered 5xx)."""
    el = client.app[element_key]
    metas = [_meta(el, "fine-1.txt"), _meta(el, "bad.txt"), _meta(el, "unsent.txt")]
    txids = await _intents(el, metas)
    metas[1].version = "v" * 51  # the whole statement is refused: retried one by one
    calls = 0

    async def connection_lost():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle")

    faults.HOOKS["commit.retry_member"] = connection_lost
    try:
        done = await asyncio.gather(*(el.commits.finish(m, t, {})
                                      for m, t in zip(metas, txids, strict=True)),
                                    return_exceptions=True)
    finally:
        del faults.HOOKS["commit.retry_member"]
    assert getattr(done[0], "status", None) == "ok"
    assert isinstance(done[1], asyncpg.StringDataRightTruncationError)
    assert isinstance(done[2], asyncpg.ConnectionDoesNotExistError)
    assert await repo.get_file(el.db, metas[0].file_id) is not None
