"""GC API (reference §8.3): ``DELETE /api/v1/gc/{id}`` and ``GET /api/v1/gc/{id}/exists``."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

import pytest
from cache_helpers import connect, rows, totals
from helpers import upload

SERVICE_ONLY = ("Service account access required. "
                "Only service accounts can perform GC operations.")
GC_KEYS = {"status", "file_id", "deleted_at", "deleted_by", "reason"}


async def _gc(client, headers, file_id, status=200, **kwargs) -> dict:
    resp = await client.delete(f"/api/v1/gc/{file_id}", headers=headers, **kwargs)
    body = await resp.json(content_type=None)
    assert resp.status == status, body
    return body


async def _exists(client, headers, file_id) -> bool:
    resp = await client.get(f"/api/v1/gc/{file_id}/exists", headers=headers)
    body = await resp.json()
    assert resp.status == 200 and body["file_id"] == str(file_id)
    return body["exists"]


async def test_gc_is_for_service_accounts_only(client, auth):
    file_id = uuid.uuid4()
    for method, path in (("DELETE", f"/api/v1/gc/{file_id}"),
                         ("GET", f"/api/v1/gc/{file_id}/exists")):
        assert (await client.request(method, path)).status == 401
        for token_type in ("admin_user", "access"):
            resp = await client.request(method, path,
                                        headers=auth(token_type=token_type, role="admin"))
            assert resp.status == 403 and (await resp.json())["detail"] == SERVICE_ONLY
    # upstream's legacy service-account form: type access + client_id sa_*
    legacy = auth(token_type="access", client_id="sa_ingester")
    assert (await client.get(f"/api/v1/gc/{file_id}/exists", headers=legacy)).status == 200


async def test_a_readonly_service_account_never_deletes(client, auth):
    """artStore let any service account delete; a readonly one (and a role mapped to
    readonly, as upstream's ``auditor``) gets 403 and the file stays (issue 19)."""
    file_id = (await upload(client, auth(), b"keep me", "keep.txt"))["file_id"]
    for role in ("readonly", "auditor"):
        body = await _gc(client, auth(role=role), file_id, status=403)
        assert body["detail"] == "Role readonly cannot delete files"
        assert await _exists(client, auth(role=role), file_id)  # reading is still allowed
    assert (await client.get(f"/api/v1/files/{file_id}/download",
                             headers=auth())).status == 200
    assert (await _gc(client, auth(role="user"), file_id))["status"] == "deleted"


async def test_unknown_file_is_already_deleted_with_every_key(client, auth):
    file_id = uuid.uuid4()
    body = await _gc(client, auth(name="gc-bot", sub="sa-gc-1"), file_id)
    assert set(body) == GC_KEYS and body["status"] == "already_deleted"
    assert body["file_id"] == str(file_id) and body["deleted_by"] == "sa-gc-1"
    assert body["reason"] == "gc_cleanup"
    assert datetime.fromisoformat(body["deleted_at"]).utcoffset().total_seconds() == 0
    again = await _gc(client, auth(), file_id, json={"reason": "ttl", "cleanup_type": "orphaned"})
    assert again["status"] == "already_deleted" and again["reason"] == "ttl"
    assert not await _exists(client, auth(), file_id)


async def test_gc_deletes_data_attr_and_row_and_logs_the_intent(client, auth, config, pg_dsn):
    file_id = (await upload(client, auth(), b"bye", "bye.txt"))["file_id"]
    assert await _exists(client, auth(), file_id)
    body = await _gc(client, auth(sub="sa-gc"), file_id,
                     json={"reason": "finalized copy", "cleanup_type": "finalized"})
    assert body["status"] == "deleted" and body["reason"] == "finalized copy"
    assert not await _exists(client, auth(), file_id)
    assert [p for p in config.storage_local_base_path.rglob("*") if p.is_file()] == []
    conn = await connect(pg_dsn)
    try:
        wal = await conn.fetch(f"SELECT * FROM {config.table_prefix}_wal WHERE file_id = $1 "
                               "ORDER BY started_at", file_id)
        assert [(w["operation_type"], w["status"]) for w in wal] == [
            ("file_create", "committed"), ("file_delete", "committed")]
        assert wal[1]["user_id"] == "sa-gc"
        config_totals, real = await totals(conn, config.table_prefix)
        assert config_totals == real == (0, 0)
    finally:
        await conn.close()
    assert (await _gc(client, auth(), file_id))["status"] == "already_deleted"


async def test_gc_with_the_data_file_already_gone_still_removes_the_row(
        client, auth, config, pg_dsn):
    """Upstream answered already_deleted and kept the row (§15.2 item 6); the answer
    must be true: the row goes and the status says it was deleted."""
    file_id = (await upload(client, auth(), b"half", "half.txt"))["file_id"]
    data = next(p for p in config.storage_local_base_path.rglob("*")
                if p.is_file() and not p.name.endswith(".attr.json"))
    data.unlink()
    body = await _gc(client, auth(), file_id)
    assert body["status"] == "deleted"
    assert not await _exists(client, auth(), file_id)
    conn = await connect(pg_dsn)
    try:
        assert file_id not in await rows(conn, config.table_prefix)
    finally:
        await conn.close()
    assert [p for p in config.storage_local_base_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("mode", ["rw", "ro", "ar"])
async def test_gc_works_in_every_mode(app_factory, auth, config, mode):
    writer = await app_factory(table_prefix=config.table_prefix, app_mode="edit",
                               storage_local_base_path=config.storage_local_base_path)
    file_id = (await upload(writer, auth(), b"x", "x.txt"))["file_id"]
    other = await app_factory(table_prefix=config.table_prefix, app_mode=mode,
                              storage_local_base_path=config.storage_local_base_path)
    resp = await other.delete(f"/api/v1/files/{file_id}", headers=auth())
    assert resp.status == 400  # the normal DELETE is refused outside edit mode
    assert (await _gc(other, auth(), file_id))["status"] == "deleted"
    assert not await _exists(other, auth(), file_id)


async def test_bad_gc_requests_are_clear_4xx(client, auth):
    resp = await client.delete("/api/v1/gc/not-a-uuid", headers=auth())
    assert resp.status == 422
    resp = await client.get("/api/v1/gc/not-a-uuid/exists", headers=auth())
    assert resp.status == 422
    file_id = uuid.uuid4()
    for body in (b"{oops", b"[1, 2]", b'{"reason": 5}', b'{"reason": "' + b"r" * 600 + b'"}',
                 b'{"cleanup_type": {"a": 1}}', b'{"reason": "a\\u0000b"}'):
        resp = await client.delete(f"/api/v1/gc/{file_id}", data=body,
                                   headers={**auth(), "Content-Type": "application/json"})
        problem = await resp.json(content_type=None)
        assert resp.status == 400 and isinstance(problem["detail"], str), (body, problem)
    # an empty body or JSON null means the defaults
    for body in (b"", b"null", b"  "):
        resp = await client.delete(f"/api/v1/gc/{file_id}", data=body, headers=auth())
        assert resp.status == 200 and (await resp.json())["reason"] == "gc_cleanup"


async def test_exists_refreshes_an_expired_row(client, auth, config, pg_dsn):
    file_id = (await upload(client, auth(), b"x", "x.txt", description="truth"))["file_id"]
    conn = await connect(pg_dsn)
    try:
        await conn.execute(f"UPDATE {config.table_prefix}_files SET description = 'stale', "
                           "cache_updated_at = now() - interval '3 days' WHERE file_id = $1",
                           file_id)
        assert await _exists(client, auth(), file_id)
        row = (await rows(conn, config.table_prefix))[file_id]
        assert row["description"] == "truth"
    finally:
        await conn.close()


async def test_gc_body_sent_in_pieces_and_oversized(client, auth):
    file_id = uuid.uuid4()

    async def pieces():
        for part in (b'{"rea', b'son": "sl', b'ow client"}'):
            yield part
            await asyncio.sleep(0.05)

    resp = await client.delete(f"/api/v1/gc/{file_id}", data=pieces(),
                               headers={**auth(), "Content-Type": "application/json"})
    assert resp.status == 200 and (await resp.json())["reason"] == "slow client"

    async def big():
        for _ in range(100):
            yield b" " * 1024

    resp = await client.delete(f"/api/v1/gc/{file_id}", data=big(), headers=auth())
    assert resp.status == 400 and "too large" in (await resp.json())["detail"]
