"""A live process is never taken for dead (issue 22, finding 1), with real processes.

A 7 MiB raw PUT streams into process 1.  PostgreSQL terminates every session (as a
restart that kept the data, ``idle_session_timeout`` or a proxy cutting idle connections
would): process 1 loses the session that held its shared ``serve`` lock, while it keeps
serving.  Process 2 then starts.  Before the fix its startup pass won the exclusive claim,
resolved process 1's intent and removed the upload's temp file: the upload ended in 503.
Now process 1's lease (a row, renewed through its pool) says it is alive, process 2 runs a
shared pass, and the upload ends 201 with its bytes intact; the store is clean after.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import asyncpg
from relharness import MIB, http_request, inspect_store, read_response, wait_until


async def _terminate_every_session(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")
    finally:
        await conn.close()


async def test_a_live_upload_survives_lost_sessions_and_a_second_start(
        server_env, server_factory, pg_dsn, token, tmp_path):
    first = server_factory(server_env)
    body = bytes(range(256)) * (7 * MIB // 256)
    file_id = "7b0f8e52-5b8d-4d4c-9a39-0c3f1d7c2a11"
    head = http_request("PUT", f"/api/v1/files/{file_id}?filename=big.bin", {
        "Authorization": f"Bearer {token()}", "Content-Type": "application/octet-stream",
        "Content-Length": str(len(body))})
    reader, writer = await asyncio.open_connection("127.0.0.1", first.port)
    try:
        writer.write(head + body[:2 * MIB])
        await writer.drain()
        root = tmp_path / "proc-store"
        # the upload streams into its temp file
        assert await wait_until(lambda: any(p.name.startswith(".tmp")
                                            for p in root.rglob("*")), 20)
        assert await _terminate_every_session(pg_dsn) > 0
        second = await asyncio.to_thread(server_factory, server_env)
        writer.write(body[2 * MIB:])
        await writer.drain()
        resp = await read_response(reader, timeout=60)
    finally:
        writer.close()
    assert resp.status == 201, resp.body
    startup = [line for line in second.log_path.read_text().splitlines()
               if "startup recovery (" in line]
    assert len(startup) == 1 and "startup recovery (shared pass)" in startup[0], startup
    async with asyncpg.create_pool(pg_dsn, min_size=1, max_size=1) as pool:
        row = await pool.fetchrow(f"SELECT file_size, checksum FROM "
                                  f"{server_env['DB_TABLE_PREFIX']}_files WHERE file_id = $1",
                                  uuid.UUID(file_id))
    assert row["file_size"] == len(body)
    assert row["checksum"] == hashlib.sha256(body).hexdigest()
    assert (await asyncio.to_thread(first.stop)) == 0
    assert (await asyncio.to_thread(second.stop)) == 0
    residue = await inspect_store(pg_dsn, server_env["DB_TABLE_PREFIX"], root)
    assert residue.count == 0, residue.describe()
