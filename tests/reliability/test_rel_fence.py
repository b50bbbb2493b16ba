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
import random
import uuid

import asyncpg
import pytest
from relharness import MIB, Timer, http_request, inspect_store, read_response, wait_until


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


async def _raw_put(port: int, token: str, file_id: str, body: bytes, *, pause: float,
                   pieces: int = 8):
    """A raw PUT sent in ``pieces`` with ``pause`` between them; the response, or the
    exception that ended it."""
    head = http_request("PUT", f"/api/v1/files/{file_id}?filename=f.bin", {
        "Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream",
        "Content-Length": str(len(body))})
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return exc
    try:
        writer.write(head)
        step = max(len(body) // pieces, 1)
        for at in range(0, len(body), step):
            writer.write(body[at:at + step])
            await writer.drain()
            await asyncio.sleep(pause)
        return await read_response(reader, timeout=90)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return exc
    finally:
        writer.close()


@pytest.mark.reliability
async def test_rounds_of_lost_sessions_and_starts_under_concurrent_uploads(
        server_env, server_factory, pg_dsn, token, tmp_path, results):
    """The full variant: rounds of concurrent uploads (64 KiB to 7 MiB) into process 1,
    every session terminated at a seeded moment, another process started and stopped.
    Every 201 is there with its bytes; nothing else is half there; after a last restart
    (exclusive pass) the store holds no residue."""
    row = results.row("Fence: sessions terminated, second process starts")
    rng = random.Random(2200)
    prefix, root = server_env["DB_TABLE_PREFIX"], tmp_path / "proc-store"
    first = server_factory(server_env)
    acked: dict[str, bytes] = {}
    with Timer(row):
        for _round in range(5):
            row.rounds += 1
            sizes = [rng.choice((64 * 1024, MIB, 3 * MIB, 7 * MIB)) for _ in range(6)]
            ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in sizes]
            bodies = {fid: rng.randbytes(size) for fid, size in zip(ids, sizes, strict=True)}
            puts = [asyncio.create_task(_raw_put(first.port, token(), fid, data, pause=0.15))
                    for fid, data in bodies.items()]
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            await _terminate_every_session(pg_dsn)
            second = await asyncio.to_thread(server_factory, server_env)
            outcomes = await asyncio.gather(*puts)
            assert (await asyncio.to_thread(second.stop)) == 0
            for fid, out in zip(ids, outcomes, strict=True):
                if getattr(out, "status", None) == 201:
                    acked[fid] = bodies[fid]
                    row.acked += 1
                elif isinstance(out, BaseException):
                    row.note(f"connection ended: {out!r}"[:120])
                else:  # the upload failed cleanly: a problem+json 503, never a 500
                    row.errors_500 += out.status == 500
                    assert out.status == 503 and out.is_problem_json, (out.status, out.body)
                    # never destroyed under its live writer by the other process's pass
                    detail = out.json()["detail"]
                    assert "No such file" not in detail, detail
                    assert "abandoned by crash recovery" not in detail, detail
        assert (await asyncio.to_thread(first.stop)) == 0
        last = await asyncio.to_thread(server_factory, server_env)  # exclusive pass
        assert (await asyncio.to_thread(last.stop)) == 0
        residue = await inspect_store(pg_dsn, prefix, root)
        row.residue += residue.count
        assert residue.count == 0, residue.describe()
        for fid, data in acked.items():
            stored = residue.rows.get(fid)
            row.lost += stored is None or stored["checksum"] != hashlib.sha256(data).hexdigest()
        assert row.lost == 0
    assert acked  # the scenario did exercise uploads that survived
