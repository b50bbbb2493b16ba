"""Fencing (issue 22), in-process: recovery claims an intent before it touches anything,
a live owner's intents are left alone, the commit thread decides an upload's outcome,
and recovery publishes nothing in a mode without uploads.  (A live process that loses
its database sessions: tests/reliability/test_rel_fence.py, with real processes.)"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import threading
import uuid
from datetime import timedelta

import pytest
from cache_helpers import check_store, connect, element, plant
from helpers import form, temp_files, upload
from test_recovery import _intent, _meta, _restart, _wal

from storage import attrs
from storage.backends.fsutil import DirSync
from storage.db import locks, repo
from storage.domain import faults, liveness, maintenance, recovery, uploads
from storage.models import Identity, utcnow


@contextlib.contextmanager
def hooks(**points):
    """Pause at fault points (``faults.HOOKS``): ``name__with__dots`` → coroutine fn."""
    named = {k.replace("__", "."): v for k, v in points.items()}
    faults.HOOKS.update(named)
    try:
        yield
    finally:
        for k in named:
            faults.HOOKS.pop(k, None)


async def test_recovery_claims_before_it_removes_a_live_upload(client, auth, config, pg_dsn):
    """Finding 2, forced at the real await points: recovery (``recover --force``) reads
    "no attr" for a live upload; the upload then links its data and attr; recovery
    removes them; the upload's finish comes before recovery's rollback.  Without a claim
    the finish found its intent pending and answered 201 for a file with no data."""
    el, root = element(client), config.storage_local_base_path
    at_body, checked, linked = asyncio.Event(), asyncio.Event(), asyncio.Event()
    upload_task: asyncio.Task | None = None

    async def upload_after_body():  # the body is in the temp file; recovery looks now
        at_body.set()
        await checked.wait()

    async def recovery_checked():  # recovery saw no attr: let the upload link its files
        checked.set()
        await linked.wait()

    async def upload_after_files():
        linked.set()

    async def recovery_removed():  # the files are gone: the finish goes first
        await asyncio.wait([upload_task], timeout=3)

    with hooks(upload__after_body=upload_after_body, recovery__checked=recovery_checked,
               upload__after_files=upload_after_files, recovery__removed=recovery_removed):
        upload_task = asyncio.create_task(client.post(
            "/api/v1/files/upload", data=form(b"live bytes" * 1000, "live.txt"),
            headers=auth()))
        await asyncio.wait_for(at_body.wait(), 10)
        report = await recovery.recover(el, alone=True, force=True)
        resp = await upload_task
    body = await resp.json(content_type=None)
    assert resp.status == 503, body
    assert body["detail"].startswith("The upload was abandoned by crash recovery")
    assert report.rolled_back == 1
    conn = await connect(pg_dsn)
    try:
        assert await check_store(conn, config.table_prefix, root) == {}  # no row, no file
        assert await conn.fetchval(f"SELECT count(*) FROM {config.table_prefix}_wal "
                                   "WHERE status = 'pending'") == 0
    finally:
        await conn.close()


async def test_a_live_owners_intents_are_left_alone_whatever_their_age(client, config, pg_dsn):
    """The 24-hour rule no longer applies to an intent that names its owner's lease: a
    live owner keeps it (a multi-GB upload at the rate floor); an expired one loses it."""
    el, root = element(client), config.storage_local_base_path
    lease = el.runtime.lease
    meta = _meta("slow.bin")
    txid = await _intent(el, "file_create", meta, age=timedelta(hours=30),
                         data={"relative_path": meta.relative_path, "lease": str(lease.id)})
    plant(root, meta, b"still arriving")
    report = await recovery.recover(el, alone=False, claimer=uuid.uuid4())
    assert (report.completed, report.rolled_back) == (0, 0)
    # nor does the owner's own periodic pass (which claims with the owner's lease)
    report = await recovery.recover(el, alone=False)
    assert report.claimer == lease.id and (report.completed, report.rolled_back) == (0, 0)
    conn = await connect(pg_dsn)
    try:
        assert (await _wal(conn, config.table_prefix, txid))[0] == "pending"
        # the owner's lease is gone (it expired and was removed): a pass resolves it
        await conn.execute(f"DELETE FROM {config.table_prefix}_leases WHERE lease_id = $1",
                           lease.id)
        report = await recovery.recover(el, alone=False, claimer=uuid.uuid4())
        assert report.completed == 1
        assert (await _wal(conn, config.table_prefix, txid))[0] == "committed"
    finally:
        await conn.close()


async def test_a_claimed_intent_is_never_finished_by_the_group_commit(client, auth, config,
                                                                      pg_dsn):
    """commit_batch publishes only an unclaimed intent: a finish of a claimed one is
    'gone', and a reservation cannot grow it."""
    el = element(client)
    meta = _meta("claimed.txt")
    txid = await _intent(el, "file_create", meta)
    claimer = uuid.uuid4()
    assert await repo.claim_wal(el.db.pool, el.db.q, txid, claimer, ttl_s=20) is not None
    done = await el.commits.finish(meta, txid, {"file_id": str(meta.file_id)})
    assert done.status == "gone"
    grown = await el.commits.reserve(txid, 10)
    assert grown.status == "gone"
    assert await repo.get_file(el.db, meta.file_id) is None
    # only the claimer settles it
    assert not await repo.rollback_wal(el.db.pool, el.db.q, txid, "not mine", utcnow())
    assert await repo.rollback_wal(el.db.pool, el.db.q, txid, "mine", utcnow(), claimer=claimer)


def _blocking_dirsync(started: threading.Event, release: threading.Event,
                      fail: bool) -> DirSync:
    def fsync(fd: int) -> None:
        first = not started.is_set()
        started.set()
        release.wait(30)
        if fail and first:  # the commit's fsync fails, the removal's succeeds
            raise OSError(errno.EIO, "directory fsync failed")
        os.fsync(fd)

    return DirSync(fsync=fsync)


async def _chunks(data: bytes):
    yield data


@pytest.mark.parametrize("how", ["cancelled", "fsync_fails"])
async def test_the_commit_thread_decides_the_outcome(client, config, pg_dsn, how):
    """Finding 3: the writer's commit has linked data and attr and waits in the
    directory fsync.  A cancellation then (runner cleanup after SHUTDOWN_TIMEOUT) must
    not abort the writer under the thread nor roll the intent back while the files stay;
    a failure after the link counts as visible: the files go with the rollback."""
    el, root = element(client), config.storage_local_base_path
    started, release = threading.Event(), threading.Event()
    el.backend.dirsync = _blocking_dirsync(started, release, fail=how == "fsync_fails")
    spec = uploads.UploadSpec("c.txt", "text/plain", declared_size=5000)
    who = Identity(sub="sub", name="tester", role="admin", token_type="service_account",
                   is_service_account=True)
    task = asyncio.create_task(uploads.store(el, spec, who, _chunks(b"x" * 5000)))
    try:
        assert await asyncio.to_thread(started.wait, 10)
        linked = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
        assert len(linked) == 2  # data and attr in place, the fsync running
        if how == "cancelled":
            task.cancel()
            await asyncio.sleep(0.2)  # the cancellation lands while the thread runs
    finally:
        release.set()
    with pytest.raises(asyncio.CancelledError if how == "cancelled" else Exception):
        await task
    await asyncio.sleep(0.1)
    conn = await connect(pg_dsn)
    try:
        wal = await conn.fetch(f"SELECT status FROM {config.table_prefix}_wal")
        assert [r["status"] for r in wal] == ["rolled_back"]
        assert await check_store(conn, config.table_prefix, root) == {}
        assert temp_files(root) == []
    finally:
        await conn.close()


async def test_recovery_does_not_publish_an_upload_in_ro(app_factory, auth, config, pg_dsn):
    """Finding 4: a process died with an upload's files in place; the element went ro;
    the next start's recovery removes the upload instead of publishing it."""
    a = await _restart(app_factory, config)
    el, root = element(a), config.storage_local_base_path
    meta = _meta("complete.txt")
    txid = await _intent(el, "file_create", meta)
    plant(root, meta, b"complete, never acknowledged")
    await el.db.pool.execute(f"UPDATE {config.table_prefix}_config SET current_mode = 'ro' "
                             "WHERE id = 1")
    b = await _restart(app_factory, config, a)
    conn = await connect(pg_dsn)
    try:
        status, why = await _wal(conn, config.table_prefix, txid)
        assert status == "rolled_back" and "ro mode" in why
        assert await check_store(conn, config.table_prefix, root) == {}
    finally:
        await conn.close()
    resp = await b.get(f"/api/v1/files/{meta.file_id}/download", headers=auth())
    assert resp.status == 404


async def test_scrub_does_not_report_a_file_whose_delete_is_in_flight(client, auth, config,
                                                                      pg_dsn):
    """A DELETE holds the file's lock and unlinks the data before the attr; a scrub that
    looks in between must wait for it, not report ``missing_data`` (exit 1, a page)."""
    el, root = element(client), config.storage_local_base_path
    file_id = uuid.UUID((await upload(client, auth(), b"going", "g.txt"))["file_id"])
    meta = await repo.get_file(el.db, file_id)
    conn = await connect(pg_dsn)
    try:
        txid = uuid.uuid4()
        began = await repo.begin_change(conn, el.db.q, txid=txid, op="file_delete",
                                        file_id=file_id, data={}, user_id="sub",
                                        started_at=utcnow(), modes=None, app_mode="edit")
        assert began.status == "ok"
        (root / meta.relative_path).unlink()  # the data first, as backend.delete does
        scrub = asyncio.create_task(maintenance.scrub(el))
        await asyncio.sleep(0.5)  # scrub found the data missing and the attr there
        (root / (meta.relative_path + ".attr.json")).unlink()
        await repo.end_delete(conn, el.db.q, txid, file_id, {}, utcnow())
        tally = await asyncio.wait_for(scrub, 10)
    finally:
        await conn.close()
    assert tally.counts["missing_data"] == 0, tally.problems


async def test_shutdown_keeps_the_serve_lock_and_lease_until_commits_drained(
        app_factory, config, pg_dsn):
    """The serve lock and the lease go only after the group commit has drained: until
    then a starting process must take this one for alive (its last finishes settle
    intents that an exclusive pass would otherwise resolve under them)."""
    a = await _restart(app_factory, config)
    el = element(a)
    lease_id = el.runtime.lease.id
    meta = _meta("last.txt")
    txid = await _intent(el, "file_create", meta)
    in_batch, go = asyncio.Event(), asyncio.Event()

    async def before_batch():
        in_batch.set()
        await go.wait()

    conn = await connect(pg_dsn)
    try:
        serve = locks.key(config.table_prefix, locks.SERVE)
        with hooks(commit__before_batch=before_batch):
            finishing = asyncio.create_task(el.commits.finish(meta, txid, {}))
            await asyncio.wait_for(in_batch.wait(), 10)
            closing = asyncio.create_task(a.close())
            await asyncio.sleep(0.5)  # the shutdown runs up to the drain
            assert not closing.done()
            assert await locks.holders(conn, el.db.q, serve)  # still held
            assert await conn.fetchval(f"SELECT count(*) FROM {config.table_prefix}_leases "
                                       "WHERE lease_id = $1", lease_id) == 1
            go.set()
            await asyncio.wait_for(closing, 20)
        assert (await finishing).status == "ok"
        assert await locks.holders(conn, el.db.q, serve) == []
        assert await conn.fetchval(f"SELECT count(*) FROM {config.table_prefix}_leases") == 0
    finally:
        go.set()
        await conn.close()


async def test_a_lost_serve_lock_session_is_noticed_and_the_lock_taken_again(client, pg_dsn,
                                                                             config):
    """Finding 1's first half: the session holding the serve lock is terminated; the
    process notices (the connection's end wakes its keeper) and takes the lock again on a
    new session, instead of serving without it until the next 5-minute round."""
    el = element(client)
    serve = locks.key(config.table_prefix, locks.SERVE)
    conn = await connect(pg_dsn)
    try:
        [before] = await locks.holders(conn, el.db.q, serve)
        await conn.fetchval("SELECT pg_terminate_backend($1)", before.pid)
        again = []
        for _ in range(100):
            again = await locks.holders(conn, el.db.q, serve)
            if again and again[0].pid != before.pid:
                break
            await asyncio.sleep(0.1)
        assert [h.pid != before.pid and "serving" in h.label for h in again] == [True]
    finally:
        await conn.close()


async def test_writes_wait_until_the_lease_is_confirmed(client, auth):
    """A process that cannot confirm its lease (its renewals fail: the database is away)
    refuses new writes with 503 instead of writing as a process others may take for dead;
    the next renewal lets them in again."""
    lease = element(client).runtime.lease
    lease.confirmed -= liveness.LEASE_TTL_S  # as if the last renewals had failed
    resp = await client.post("/api/v1/files/upload", data=form(b"x", "x.txt"), headers=auth())
    assert resp.status == 503, await resp.text()
    assert resp.headers["Retry-After"] == "2"
    await lease.beat()
    await upload(client, auth(), b"x", "x.txt")


async def test_quarantine_evidence_includes_a_patch_acknowledged_before_it(client, auth,
                                                                          config, pg_dsn):
    """quarantine() copies the attr document under the file's lock: a PATCH in flight
    when it starts is in the evidence once acknowledged (before: the copy was taken
    before the lock, and missed it)."""
    el, root = element(client), config.storage_local_base_path
    file_id = uuid.UUID((await upload(client, auth(), b"rotten", "r.txt",
                                      description="old"))["file_id"])
    meta = await repo.get_file(el.db, file_id)
    doc = attrs.loads(await el.backend.read_attr(meta.relative_path), meta.relative_path)
    conn = await connect(pg_dsn)
    try:
        txid = uuid.uuid4()
        began = await repo.begin_change(conn, el.db.q, txid=txid, op="file_update",
                                        file_id=file_id, data={"description": "new"},
                                        user_id="sub", started_at=utcnow(), modes=None,
                                        app_mode="edit")
        assert began.status == "ok"
        moving = asyncio.create_task(maintenance.quarantine(el, meta.relative_path, doc,
                                                            "test"))
        await asyncio.sleep(0.5)  # quarantine has copied the data, waits for the lock
        meta.description = "new"
        await el.backend.write_attr(meta.relative_path, uploads.attr_document(meta))
        await repo.end_update(conn, el.db.q, txid, file_id, description="new", version=None,
                              metadata=None, replace_metadata=False, updated_at=utcnow(),
                              ttl_hours=24, result={}, at=utcnow())
        target = await asyncio.wait_for(moving, 10)
    finally:
        await conn.close()
    evidence = json.loads((root / (target + ".attr-quarantined.json")).read_bytes())
    assert evidence["description"] == "new"
