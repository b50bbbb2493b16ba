"""``/api/v1/cache/*`` (reference §7.4–§7.5): lossless rebuilds, consistency, expiry, locks."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import uuid
from datetime import timedelta
from urllib.parse import quote

import pytest
from cache_helpers import (
    LOSSLESS,
    connect,
    element,
    plant,
    rows,
    totals,
)
from helpers import s3_client, s3_folder, temp_files, upload

from storage.cli import ops
from storage.db import locks, repo_cache
from storage.domain import cache, files, naming
from storage.models import FileMeta, Identity, utcnow

CACHE = [("POST", "/api/v1/cache/rebuild"), ("POST", "/api/v1/cache/rebuild/incremental"),
         ("GET", "/api/v1/cache/consistency"), ("POST", "/api/v1/cache/cleanup-expired")]
SERVICE_ONLY = ("Service account access required. "
                "Only service accounts can perform GC operations.")
STAT_KEYS = {"attr_files_scanned", "cache_entries_before", "cache_entries_after",
             "entries_created", "entries_updated", "entries_deleted"}
WHO = Identity(sub="race-test", name="race", role="admin", token_type="service_account",
               is_service_account=True)


async def _call(client, auth, method, path, status=200):
    resp = await client.request(method, path, headers=auth())
    body = await resp.json(content_type=None)
    assert resp.status == status, body
    return body


async def _rebuild(client, auth, kind="") -> dict:
    body = await _call(client, auth, "POST", "/api/v1/cache/rebuild" + kind)
    assert body["status"] == "success" and set(body) == {"status", "message", "result"}
    result = body["result"]
    assert set(result) == {"operation_type", "started_at", "completed_at", "duration_seconds",
                           "statistics", "errors"}
    assert set(result["statistics"]) == STAT_KEYS
    return result


async def _variety(client, auth) -> list[str]:
    """Uploads covering every column: types, unicode, null/empty fields, PATCH, raw PUT."""
    ids = [
        (await upload(client, auth(), b"alpha", "report final.pdf", "application/pdf",
                      description="first", version="1.0",
                      metadata=json.dumps({"tags": ["a", "b"], "n": 1})))["file_id"],
        (await upload(client, auth(), b"", "empty.bin", "application/octet-stream"))["file_id"],
        (await upload(client, auth(name="Иван Петров", sub="user-42", token_type="admin_user",
                                   role="user"),
                      "отчёт".encode(), "отчёт.txt", "text/plain; charset=utf-8",
                      description="описание"))["file_id"],
    ]
    raw_id = str(uuid.uuid4())
    resp = await client.put(
        f"/api/v1/files/{raw_id}?filename=raw.json&metadata={quote(json.dumps({'k': None}))}",
        data=b'{"x": 1}', headers={**auth(), "Content-Type": "application/json"})
    assert resp.status == 201, await resp.text()
    ids.append(raw_id)
    patched = (await upload(client, auth(), b"patch me", "p.txt"))["file_id"]
    resp = await client.patch(f"/api/v1/files/{patched}", headers=auth(),
                              json={"description": "after", "metadata": {"v": [1, 2.5, True]}})
    assert resp.status == 200, await resp.text()
    return [*ids, patched]


async def test_cache_api_is_for_service_accounts_only(client, auth):
    for method, path in CACHE:
        assert (await client.request(method, path)).status == 401
        resp = await client.request(method, path, headers=auth(token_type="admin_user"))
        assert resp.status == 403 and (await resp.json())["detail"] == SERVICE_ONLY
        assert (await client.request(method, path, headers=auth())).status == 200


async def test_full_rebuild_after_losing_the_table_restores_every_row_exactly(
        client, auth, config, pg_dsn):
    ids = await _variety(client, auth)
    conn = await connect(pg_dsn)
    try:
        before = await rows(conn, config.table_prefix)
        assert sorted(before) == sorted(ids)
        await conn.execute(f"TRUNCATE {config.table_prefix}_files")
        result = await _rebuild(client, auth)
        assert result["operation_type"] == "full" and result["errors"] == []
        assert result["statistics"] == {
            "attr_files_scanned": 5, "cache_entries_before": 0, "cache_entries_after": 5,
            "entries_created": 5, "entries_updated": 0, "entries_deleted": 0}
        after = await rows(conn, config.table_prefix)
        for file_id in ids:  # field by field, so a failure names the column
            for column in LOSSLESS:
                assert after[file_id][column] == before[file_id][column], (file_id, column)
        assert before[ids[1]]["version"] is None and before[ids[1]]["metadata_json"] is None
        config_totals, real = await totals(conn, config.table_prefix)
        assert config_totals == real == (5, sum(r["file_size"] for r in before.values()))
        # a second rebuild finds everything equal: nothing created, updated or deleted
        again = await _rebuild(client, auth)
        assert again["statistics"]["entries_created"] == 0
        assert again["statistics"]["entries_updated"] == 0
        assert again["statistics"]["entries_deleted"] == 0
    finally:
        await conn.close()
    for file_id in ids:
        resp = await client.get(f"/api/v1/files/{file_id}", headers=auth())
        assert resp.status == 200


async def test_rebuild_repairs_wrong_rows_removes_orphans_and_keeps_totals(
        client, auth, config, pg_dsn):
    ids = [(await upload(client, auth(), f"f{i}".encode(), f"f{i}.txt"))["file_id"]
           for i in range(4)]
    prefix = config.table_prefix
    stray = uuid.uuid4()
    conn = await connect(pg_dsn)
    try:
        good = await rows(conn, prefix)
        await conn.execute(f"UPDATE {prefix}_files SET description = 'wrong', "
                           f"content_type = 'x/y', file_size = 999 WHERE file_id = $1", ids[0])
        await conn.execute(f"DELETE FROM {prefix}_files WHERE file_id = $1", ids[1])
        await conn.execute(
            f"INSERT INTO {prefix}_files (file_id, original_filename, storage_filename, "
            "file_size, content_type, created_by_id, created_by_username, storage_path, "
            "checksum) VALUES ($1, 'ghost', 'ghost_x', 7, 'a/b', 'x', 'x', '2020/01/01/00/', "
            "repeat('0', 64))", stray)
        result = await _rebuild(client, auth)
        assert result["statistics"] | {} == {
            "attr_files_scanned": 4, "cache_entries_before": 4, "cache_entries_after": 4,
            "entries_created": 1, "entries_updated": 1, "entries_deleted": 1}
        assert await rows(conn, prefix) == good
        config_totals, real = await totals(conn, prefix)
        assert config_totals == real
        state = await conn.fetchrow(f"SELECT last_cache_rebuild FROM {prefix}_config")
        assert state["last_cache_rebuild"] is not None
    finally:
        await conn.close()


async def test_rebuild_reports_bad_attr_files_by_path_and_keeps_their_rows(
        client, auth, config, pg_dsn):
    ids = [(await upload(client, auth(), f"f{i}".encode(), f"f{i}.txt"))["file_id"]
           for i in range(5)]
    root = config.storage_local_base_path
    attrs_by_id = {naming.extract_file_id(p.name): p for p in root.rglob("*.attr.json")}
    damaged = {
        ids[0]: b"{not json",
        ids[1]: attrs_by_id[uuid.UUID(ids[1])].read_bytes()[:40],  # truncated
        ids[2]: b'{"x": "' + b"y" * 5000 + b'"}',  # oversized
        ids[3]: json.dumps({**json.loads(attrs_by_id[uuid.UUID(ids[3])].read_text()),
                            "schema_version": "9.9"}).encode(),
    }
    for file_id, content in damaged.items():
        attrs_by_id[uuid.UUID(file_id)].write_bytes(content)
    conn = await connect(pg_dsn)
    try:
        before = await rows(conn, config.table_prefix)
        result = await _rebuild(client, auth)
        assert result["statistics"]["attr_files_scanned"] == 5
        assert result["statistics"]["entries_deleted"] == 0
        assert len(result["errors"]) == 4
        for file_id in damaged:
            name = attrs_by_id[uuid.UUID(file_id)].name
            assert any(name in e for e in result["errors"]), (name, result["errors"])
        assert any("unsupported schema_version" in e for e in result["errors"])
        assert await rows(conn, config.table_prefix) == before  # unreadable ≠ gone
    finally:
        await conn.close()


async def test_rebuild_leaves_files_written_during_the_scan_alone(client, auth, config, pg_dsn):
    """Delete, PATCH and upload between the scan reading documents and writing rows."""
    ids = [(await upload(client, auth(), f"f{i}".encode(), f"f{i}.txt"))["file_id"]
           for i in range(6)]
    el = element(client)
    done: dict[str, str] = {}

    async def meddle(stats):
        if done:
            return
        await files.delete(el, uuid.UUID(ids[0]), WHO)
        await files.update(el, uuid.UUID(ids[1]), WHO, description="newer", version=None,
                           metadata=None)
        done["new"] = (await upload(client, auth(), b"late", "late.txt"))["file_id"]

    conn = await connect(pg_dsn)
    try:
        outcome = await cache.full_rebuild(el, batch=100, before_write=meddle)
        found = await rows(conn, config.table_prefix)
        assert ids[0] not in found  # deleted meanwhile: not resurrected from the stale read
        assert found[ids[1]]["description"] == "newer"  # not overwritten by the stale read
        assert done["new"] in found  # written after the walk: not removed as unseen
        assert set(found) == {*ids[1:], done["new"]}
        assert outcome.statistics.entries_deleted == 0
        config_totals, real = await totals(conn, config.table_prefix)
        assert config_totals == real
    finally:
        await conn.close()
    report = await _call(client, auth, "GET", "/api/v1/cache/consistency")
    assert report["report"]["is_consistent"], report


async def test_readers_never_see_an_empty_table_during_a_rebuild(client, auth, config, pg_dsn):
    """Every row is rewritten and one orphan removed, while a reader keeps counting."""
    for i in range(12):
        await upload(client, auth(), f"f{i}".encode(), f"f{i}.txt")
    el = element(client)
    seen: list[int] = []
    conn = await connect(pg_dsn)
    prefix = config.table_prefix
    await conn.execute(f"UPDATE {prefix}_files SET description = 'drifted'")
    await conn.execute(
        f"INSERT INTO {prefix}_files (file_id, original_filename, storage_filename, file_size, "
        "content_type, created_by_id, created_by_username, storage_path, checksum) VALUES "
        "($1, 'g', 'ghost', 1, 'a/b', 'x', 'x', '2020/01/01/00/', repeat('0', 64))",
        uuid.uuid4())

    async def reader():
        while True:
            seen.append(await conn.fetchval(f"SELECT count(*) FROM {config.table_prefix}_files"))
            await asyncio.sleep(0)

    task = asyncio.create_task(reader())
    try:
        outcome = await cache.full_rebuild(el, batch=2)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await conn.close()
    assert outcome.statistics.entries_updated == 12 and outcome.statistics.entries_deleted == 1
    assert len(seen) > 5 and min(seen) == 12 and max(seen) == 13


async def test_incremental_adds_only_missing_rows(client, auth, config, pg_dsn):
    ids = [(await upload(client, auth(), f"f{i}".encode(), f"f{i}.txt"))["file_id"]
           for i in range(4)]
    prefix = config.table_prefix
    conn = await connect(pg_dsn)
    try:
        good = await rows(conn, prefix)
        await conn.execute(f"DELETE FROM {prefix}_files WHERE file_id = ANY($1::uuid[])",
                           ids[:2])
        await conn.execute(f"UPDATE {prefix}_files SET description = 'local edit' "
                           "WHERE file_id = $1", ids[2])
        result = await _rebuild(client, auth, "/incremental")
        assert result["operation_type"] == "incremental"
        assert result["statistics"] == {
            "attr_files_scanned": 4, "cache_entries_before": 2, "cache_entries_after": 4,
            "entries_created": 2, "entries_updated": 0, "entries_deleted": 0}
        now = await rows(conn, prefix)
        assert now[ids[0]] == good[ids[0]] and now[ids[1]] == good[ids[1]]
        assert now[ids[2]]["description"] == "local edit"  # incremental never updates
        config_totals, real = await totals(conn, prefix)
        assert config_totals == real
    finally:
        await conn.close()


async def test_consistency_report_counts_orphans_both_ways_and_expired(
        client, auth, config, pg_dsn):
    ids = [(await upload(client, auth(), f"f{i}".encode(), f"f{i}.txt"))["file_id"]
           for i in range(8)]
    prefix = config.table_prefix
    conn = await connect(pg_dsn)
    try:
        await conn.execute(f"DELETE FROM {prefix}_files WHERE file_id = $1", ids[0])
        strays = [uuid.uuid4() for _ in range(12)]
        for n, stray in enumerate(strays):
            await conn.execute(
                f"INSERT INTO {prefix}_files (file_id, original_filename, storage_filename, "
                "file_size, content_type, created_by_id, created_by_username, storage_path, "
                "checksum) VALUES ($1, 'g', $2, 1, 'a/b', 'x', 'x', '2020/01/01/00/', "
                "repeat('0', 64))", stray, f"ghost{n}")
        await conn.execute(f"UPDATE {prefix}_files SET cache_updated_at = now() - "
                           "interval '25 hours' WHERE file_id = ANY($1::uuid[])", ids[1:3])
        body = await _call(client, auth, "GET", "/api/v1/cache/consistency")
    finally:
        await conn.close()
    assert body["status"] == "success" and body["message"] == "Consistency check completed"
    report = body["report"]
    assert {k: v for k, v in report.items() if k != "details"} == {
        "total_attr_files": 8, "total_cache_entries": 19, "orphan_cache_count": 12,
        "orphan_attr_count": 1, "expired_cache_count": 2, "orphan_data_count": 0,
        "missing_data_count": 0,
        "is_consistent": False,
        "inconsistency_percentage": round(13 / 8 * 100, 2)}
    details = report["details"]
    assert details["orphan_attr_files"] == [ids[0]]
    assert len(details["orphan_cache_entries"]) == 10
    assert set(details["orphan_cache_entries"]) <= {str(s) for s in strays}
    assert sorted(details["expired_cache_entries"]) == sorted(ids[1:3])


async def test_consistency_reports_damage_done_right_after_an_upload(client, auth, config,
                                                                     pg_dsn):
    """The horizon is the scan start on the database clock: a file whose data and attr
    are removed by hand a moment after its upload is reported at once (it was hidden for
    five minutes), by the API and by ``python run.py check``'s code path alike."""
    from test_recovery import _ops

    fid = (await upload(client, auth(), b"soon gone", "gone.txt"))["file_id"]
    kept = (await upload(client, auth(), b"stays", "kept.txt"))["file_id"]
    for path in config.storage_local_base_path.rglob("*"):
        if path.is_file() and fid in path.name:
            path.unlink()  # the data file and its attr document
    report = (await _call(client, auth, "GET", "/api/v1/cache/consistency"))["report"]
    assert report["orphan_cache_count"] == 1 and not report["is_consistent"]
    assert report["details"]["orphan_cache_entries"] == [fid]
    code, body, _ = await _ops(config, pg_dsn, "check")
    assert code == 1 and body["details"]["orphan_cache_entries"] == [fid]
    assert kept not in body["details"]["orphan_cache_entries"]


async def test_consistency_skips_operations_that_overlap_the_scan(client, auth, monkeypatch):
    """Files deleted after the walk saw their attr documents, before the comparison, are
    not reported: their WAL entries completed after the scan started."""
    el = element(client)
    ids = [(await upload(client, auth(), b"x", f"{i}.txt"))["file_id"] for i in range(2)]
    real = repo_cache.scan_analyze

    async def delete_then_analyze(conn, q):
        for fid in ids:
            await files.delete(el, uuid.UUID(fid), WHO)
        await real(conn, q)

    monkeypatch.setattr(repo_cache, "scan_analyze", delete_then_analyze)
    report = await cache.consistency(el)
    assert report["total_attr_files"] == 2 and report["total_cache_entries"] == 0
    assert report["is_consistent"], report


async def test_consistent_element_and_empty_element(client, auth):
    report = (await _call(client, auth, "GET", "/api/v1/cache/consistency"))["report"]
    assert report["is_consistent"] and report["inconsistency_percentage"] == 0.0
    assert report["total_attr_files"] == 0
    await upload(client, auth(), b"x", "x.txt")
    report = (await _call(client, auth, "GET", "/api/v1/cache/consistency"))["report"]
    assert report["is_consistent"] and report["total_attr_files"] == 1


async def test_cleanup_expired_refreshes_from_attr_and_drops_only_vanished_files(
        client, auth, config, pg_dsn):
    ids = [(await upload(client, auth(), f"f{i}".encode(), f"f{i}.txt", description="orig"))
           ["file_id"] for i in range(4)]
    prefix, root = config.table_prefix, config.storage_local_base_path
    by_id = {str(naming.extract_file_id(p.name)): p for p in root.rglob("*.attr.json")}
    by_id[ids[1]].unlink()  # attr and data gone: the row goes
    by_id[ids[1]].with_name(by_id[ids[1]].name[: -len(".attr.json")]).unlink()
    by_id[ids[2]].unlink()  # attr gone, data still there: kept and reported
    conn = await connect(pg_dsn)
    try:
        await conn.execute(f"UPDATE {prefix}_files SET cache_updated_at = now() - "
                           "interval '30 hours', description = 'stale' "
                           "WHERE file_id = ANY($1::uuid[])", ids[:3])
        result = (await _call(client, auth, "POST", "/api/v1/cache/cleanup-expired"))["result"]
        assert result["operation_type"] == "cleanup_expired"
        stats = result["statistics"]
        assert (stats["entries_updated"], stats["entries_deleted"]) == (1, 1)
        assert stats["cache_entries_before"] == 4 and stats["cache_entries_after"] == 3
        assert len(result["errors"]) == 1 and ids[2] in result["errors"][0]
        now = await rows(conn, prefix)
        assert ids[1] not in now and now[ids[0]]["description"] == "orig"
        expired = await conn.fetchval(
            f"SELECT count(*) FROM {prefix}_files WHERE cache_updated_at + "
            "make_interval(hours => cache_ttl_hours) < now()")
        assert expired == 1  # only the unverifiable one is left expired
        config_totals, real = await totals(conn, prefix)
        assert config_totals == real
    finally:
        await conn.close()


async def test_expired_row_is_refreshed_lazily_on_read(client, auth, config, pg_dsn):
    file_id = (await upload(client, auth(), b"x", "x.txt", description="truth"))["file_id"]
    conn = await connect(pg_dsn)
    try:
        await conn.execute(f"UPDATE {config.table_prefix}_files SET description = 'stale', "
                           "cache_updated_at = now() - interval '2 days' WHERE file_id = $1",
                           file_id)
    finally:
        await conn.close()
    body = await (await client.get(f"/api/v1/files/{file_id}", headers=auth())).json()
    assert body["description"] == "truth" and body["cache_expired"] is False
    assert body["cache_ttl_hours"] == 24


async def test_lock_conflict_is_409_naming_the_holder(client, auth, config, pg_dsn):
    el = element(client)
    conn = await connect(pg_dsn)
    try:
        label = locks.label("full cache rebuild")
        await locks.set_label(conn, el.db.q, label)
        assert await locks.try_lock(conn, el.db.q, locks.key(config.table_prefix,
                                                             locks.MAINTENANCE))
        for method, path in CACHE:
            resp = await client.request(method, path, headers=auth())
            body = await resp.json(content_type=None)
            assert resp.status == 409, body
            assert "already running" in body["detail"] and label in body["detail"]
            assert body["lock"]["held_by"] == [label]
    finally:
        await conn.close()  # the session ends: PostgreSQL drops the lock
    await _rebuild(client, auth)


async def test_one_maintenance_operation_per_prefix_across_apps(app_factory, auth, config):
    """Two apps (two 'processes') on one prefix: the second is refused while the first runs."""
    a = await app_factory(table_prefix=config.table_prefix,
                          storage_local_base_path=config.storage_local_base_path)
    b = await app_factory(table_prefix=config.table_prefix,
                          storage_local_base_path=config.storage_local_base_path)
    for i in range(6):
        await upload(a, auth(), f"f{i}".encode(), f"f{i}.txt")
    gate, release = asyncio.Event(), asyncio.Event()

    async def hold(stats):
        gate.set()
        await release.wait()

    running = asyncio.create_task(cache.full_rebuild(element(a), batch=2, before_write=hold))
    await gate.wait()
    resp = await b.post("/api/v1/cache/rebuild", headers=auth())
    assert resp.status == 409
    assert "full cache rebuild by" in (await resp.json())["detail"]
    release.set()
    outcome = await running
    assert outcome.statistics.attr_files_scanned == 6
    assert (await b.post("/api/v1/cache/rebuild", headers=auth())).status == 200


def _generated(seed: int, i: int) -> tuple[FileMeta, bytes]:
    from bench.rebuild_bench import make_meta

    return make_meta(seed, i)


@pytest.mark.parametrize("count", [
    300, pytest.param(100_000, marks=pytest.mark.heavy, id="100k")])
async def test_rebuild_of_planted_attr_files_matches_the_originals(
        client, auth, config, pg_dsn, count):
    """``count`` attr files written by another tool (schema v2 and v1 mixed); after a
    rebuild every row equals the original metadata, compared column by column."""
    from bench.rebuild_bench import index_of, plant_many

    seed = 7
    await asyncio.to_thread(plant_many, config.storage_local_base_path, count, seed)
    result = await _rebuild(client, auth)
    assert result["errors"] == []
    assert result["statistics"]["attr_files_scanned"] == count
    assert result["statistics"]["entries_created"] == count
    conn = await connect(pg_dsn)
    try:
        checked = 0
        async with conn.transaction():
            async for rec in conn.cursor(f"SELECT * FROM {config.table_prefix}_files"):
                original, _data = _generated(seed, index_of(rec["file_id"]))
                for column in LOSSLESS:
                    assert rec[column] == getattr(original, column), (rec["file_id"], column)
                checked += 1
        assert checked == count
        config_totals, real = await totals(conn, config.table_prefix)
        assert config_totals == real and real[0] == count
    finally:
        await conn.close()
    assert temp_files(config.storage_local_base_path) == []


async def test_rebuild_reads_v1_documents_written_by_upstream(client, auth, config, pg_dsn):
    now = utcnow().replace(microsecond=123456)
    file_id = uuid.uuid4()
    meta = FileMeta(
        file_id=file_id, original_filename="legacy.txt",
        storage_filename=naming.storage_filename("legacy.txt", "ingester", now, file_id),
        file_size=0, content_type="text/plain", created_at=now, updated_at=now,
        created_by_id="sub-1", created_by_username="ingester", storage_path=naming.storage_path(
            now), checksum="0" * 64, description=None, version=None,
        metadata_json={"legacy": True})
    plant(config.storage_local_base_path, meta, b"legacy bytes", v1=True)
    result = await _rebuild(client, auth)
    assert result["statistics"]["entries_created"] == 1 and result["errors"] == []
    conn = await connect(pg_dsn)
    try:
        row = (await rows(conn, config.table_prefix))[str(file_id)]
    finally:
        await conn.close()
    assert row == {k: getattr(meta, k) for k in LOSSLESS}


def test_ttl_hours_follow_the_mode():
    assert files.TTL_HOURS == {"edit": 24, "rw": 24, "ro": 168, "ar": 168}
    assert timedelta(hours=files.TTL_HOURS["ro"]) == timedelta(days=7)


async def _lose_data(config, relpath: str) -> None:
    """Remove a data object behind the element's back, its attr document left."""
    if config.storage_type != "s3":
        (config.storage_local_base_path / relpath).unlink()
        return
    async with s3_client(config) as s3:
        await s3.delete_object(Bucket=config.s3_bucket_name, Key=s3_folder(config) + relpath)


@pytest.mark.parametrize("storage_kind", ["local", "s3"], indirect=True)
async def test_attr_without_data_gets_no_row_is_reported_and_left_to_scrub(
        client, auth, config, pg_dsn):
    """Issue 26: a lost data object (its attr left) never gets a cache row from a full or
    incremental rebuild (a row never points at missing bytes); the rebuilds and the
    consistency report name it, and ``scrub --quarantine`` moves the attr aside."""
    metas = [await upload(client, auth(), f"bytes {i}".encode() * (i + 1), f"f{i}.txt")
             for i in range(3)]
    lost = metas[0]
    conn = await connect(pg_dsn)
    try:
        relpath = await conn.fetchval(
            f"SELECT storage_path || storage_filename FROM {config.table_prefix}_files "
            "WHERE file_id = $1", uuid.UUID(lost["file_id"]))
    finally:
        await conn.close()
    await _lose_data(config, relpath)

    result = await _rebuild(client, auth)
    assert any(relpath in e and "data object is missing" in e for e in result["errors"]), result
    assert result["statistics"]["entries_deleted"] == 1
    resp = await client.get(f"/api/v1/files/{lost['file_id']}", headers=auth())
    assert resp.status == 404
    listed = await _call(client, auth, "GET", "/api/v1/files")
    assert {f["file_id"] for f in listed["files"]} == {m["file_id"] for m in metas[1:]}
    capacity = await _call(client, auth, "GET", "/api/v1/capacity")
    assert capacity["capacity"]["used"] == sum(m["file_size"] for m in metas[1:])

    result = await _rebuild(client, auth, "/incremental")
    assert result["statistics"]["entries_created"] == 0
    assert any(relpath in e and "data object is missing" in e for e in result["errors"]), result
    assert (await client.get(f"/api/v1/files/{lost['file_id']}", headers=auth())).status == 404

    report = (await _call(client, auth, "GET", "/api/v1/cache/consistency"))["report"]
    assert (report["missing_data_count"], report["is_consistent"]) == (1, False)
    assert report["details"]["attr_files_without_data"] == [relpath]

    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(command="scrub", quarantine=True, max_mib_per_second=0.0,
                              incremental=False, force=False, dry_run=False)
    assert await ops.execute(config, pg_dsn, args, out=out, err=err) == 1  # it found one
    scrubbed = json.loads(out.getvalue())
    assert (scrubbed["missing_data"], scrubbed["quarantined"]) == (1, 1)
    report = (await _call(client, auth, "GET", "/api/v1/cache/consistency"))["report"]
    assert (report["missing_data_count"], report["orphan_attr_count"],
            report["is_consistent"]) == (0, 0, True)
    assert (await _rebuild(client, auth))["errors"] == []
