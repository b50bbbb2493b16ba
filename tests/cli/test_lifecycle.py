"""The real process: SIGTERM drains uploads, the mode crosses processes, logs are JSON."""

import asyncio
import json
import secrets
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from helpers import temp_files
from server_proc import ServerProcess

from storage.config import Config
from storage.domain.element import runtime_key

SHUTDOWN_TIMEOUT = 2.0
CHUNK = 256 * 1024


@pytest.fixture
def server_env(pg_dsn, keypair, tmp_path):
    def build(**extra) -> dict[str, str]:
        return {"DATABASE_URL": pg_dsn, "DB_TABLE_PREFIX": "lc" + secrets.token_hex(4),
                "STORAGE_LOCAL_BASE_PATH": str(tmp_path / "store"),
                "DATA_DIR": str(tmp_path / "data"), "JWT_PUBLIC_KEY_PATH": str(keypair[1]),
                "APP_MODE": "edit", "STORAGE_DISK_RESERVE": "0", "LOG_FORMAT": "json",
                **extra}
    return build


async def _metric(session, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def _body(size: int, gate: asyncio.Event):
    yield b"a" * (size // 2)
    await gate.wait()
    yield b"b" * (size - size // 2)


async def test_sigterm_finishes_uploads_in_time_and_aborts_the_rest(server_env, tmp_path,
                                                                    token, pg_dsn):
    app_name = "lc_" + secrets.token_hex(4)
    sep = "&" if "?" in pg_dsn else "?"
    env = server_env(SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT), UPLOAD_CHUNK_SIZE="65536",
                     DATABASE_URL=f"{pg_dsn}{sep}application_name={app_name}")
    server = ServerProcess(env, tmp_path / "server.log").start()
    jwt = token()
    headers = {"Authorization": f"Bearer {jwt}", "Content-Length": str(2 * CHUNK)}
    fast_id, slow_id = uuid.uuid4(), uuid.uuid4()
    finish, never = asyncio.Event(), asyncio.Event()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            fast = asyncio.create_task(session.put(
                f"{server.url}/api/v1/files/{fast_id}", data=_body(2 * CHUNK, finish),
                headers={**headers, "X-Request-ID": "lc-fast"}))
            slow = asyncio.create_task(session.put(
                f"{server.url}/api/v1/files/{slow_id}", data=_body(2 * CHUNK, never),
                headers={**headers, "X-Request-ID": "lc-slow"}))
            store = Path(env["STORAGE_LOCAL_BASE_PATH"])
            for _ in range(300):  # both bodies half written
                if len(temp_files(store)) == 2:
                    break
                await asyncio.sleep(0.02)
            assert len(temp_files(store)) == 2
            assert await _metric(session, server.url, "storage_uploads_in_flight") == 2
            sigterm_at = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            finish.set()  # the fast client sends the rest within the shutdown timeout
            resp = await fast
            assert resp.status == 201, await resp.text()
            with pytest.raises(aiohttp.ClientError):
                resp = await slow  # never finishes: cut off after SHUTDOWN_TIMEOUT
                await resp.read()
        code = await asyncio.to_thread(server.proc.wait, 30)
        elapsed = time.monotonic() - sigterm_at
    finally:
        server.kill()
    log = server.log_path.read_text()
    assert code == 0, server.log_tail()
    assert elapsed < SHUTDOWN_TIMEOUT * 2 + 3, elapsed
    assert temp_files(store) == [], "an aborted upload left its temp file"
    prefix = env["DB_TABLE_PREFIX"]
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = {r["file_id"] for r in await conn.fetch(f"SELECT file_id FROM {prefix}_files")}
        assert rows == {fast_id}
        wal = {r["file_id"]: r["status"] for r in await conn.fetch(
            f"SELECT file_id, status FROM {prefix}_wal")}
        assert wal == {fast_id: "committed", slow_id: "rolled_back"}
        left = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name)
        assert left == 0, "the pool was not closed"
    finally:
        await conn.close()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert lines and len(lines) == len([ln for ln in log.splitlines() if ln.strip()])
    by_rid = {e.get("request_id"): e for e in lines if e.get("logger") == "storage.access"}
    assert by_rid["lc-fast"]["status"] == 201
    assert by_rid["lc-slow"]["status"] == 499
    assert jwt not in log and "Traceback" not in log


async def _mode_of(session, url: str) -> str:
    async with session.get(f"{url}/api/v1/info") as resp:
        return (await resp.json())["mode"]


async def test_mode_change_reaches_another_process_and_survives_its_restart(
        server_env, tmp_path, app_factory, auth):
    env = server_env(APP_MODE="rw")
    here = await app_factory(app_mode="rw", table_prefix=env["DB_TABLE_PREFIX"],
                             storage_local_base_path=Path(env["STORAGE_LOCAL_BASE_PATH"]))
    server = ServerProcess(env, tmp_path / "a.log").start()
    try:
        async with aiohttp.ClientSession() as session:
            assert await _mode_of(session, server.url) == "rw"
            resp = await here.post("/api/v1/mode", json={"target_mode": "ro"}, headers=auth())
            assert resp.status == 200
            t0 = time.monotonic()
            while await _mode_of(session, server.url) != "ro":
                assert time.monotonic() - t0 < 1.0, "the other process missed the change"
                await asyncio.sleep(0.02)
    finally:
        assert server.stop() == 0
    again = ServerProcess(env, tmp_path / "b.log").start()
    try:
        async with aiohttp.ClientSession() as session:
            assert await _mode_of(session, again.url) == "ro"
    finally:
        assert again.stop() == 0
    startup = [json.loads(ln) for ln in again.log_path.read_text().splitlines()]
    assert [e["level"] for e in startup
            if "APP_MODE=rw is overridden by the persisted mode ro" in e["msg"]] == ["warning"]


def test_shutdown_timeout_default_is_30_seconds():
    assert Config().shutdown_timeout == 30.0
    assert Config.from_env({"SHUTDOWN_TIMEOUT": "5"}).shutdown_timeout == 5.0


async def test_drain_waits_for_requests_in_flight_only_up_to_the_timeout(client, auth):
    from storage.cli.lifecycle import drain

    release = asyncio.Event()

    async def body():
        yield b"x" * 10
        await release.wait()
        yield b"y" * 10

    task = asyncio.create_task(client.put(
        f"/api/v1/files/{uuid.uuid4()}", data=body(), headers={**auth(), "Content-Length": "20"}))
    runtime = client.app[runtime_key]
    for _ in range(200):
        if runtime.active_requests:
            break
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    assert await drain(client.app, 0.2) == 1
    assert 0.15 < time.monotonic() - t0 < 1.0
    release.set()
    assert await drain(client.app, 5) == 0
    assert (await task).status == 201


def test_sigterm_stops_the_embedded_database(keypair, tmp_path):
    env = {"DATA_DIR": str(tmp_path / "data"), "STORAGE_LOCAL_BASE_PATH": str(tmp_path / "s"),
           "JWT_PUBLIC_KEY_PATH": str(keypair[1]), "APP_MODE": "edit",
           "STORAGE_DISK_RESERVE": "0", "DATABASE_URL": "", "DB_HOST": ""}
    server = ServerProcess(env, tmp_path / "embedded.log").start(timeout=120)
    pid_file = tmp_path / "data" / "pg" / "postmaster.pid"
    try:
        assert pid_file.exists()  # the embedded PostgreSQL is running
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()
    assert not pid_file.exists(), "the embedded PostgreSQL was left running"
    assert "embedded PostgreSQL stopped" in server.log_path.read_text()


async def test_serve_in_process_drains_on_sigterm(make_config, auth):
    """The same sequence as the subprocess test, in-process (signal sent to ourselves)."""
    import os

    from server_proc import free_port

    from storage.cli import lifecycle
    from storage.web.app import make_app

    config = make_config(server_host="127.0.0.1", server_port=free_port(), shutdown_timeout=5.0)
    serving = asyncio.create_task(lifecycle._serve(make_app(config), config, False))
    url = f"http://127.0.0.1:{config.server_port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(f"{url}/health/ready") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.02)
        gate = asyncio.Event()
        upload = asyncio.create_task(session.put(
            f"{url}/api/v1/files/{uuid.uuid4()}", data=_body(2 * CHUNK, gate),
            headers={**auth(), "Content-Length": str(2 * CHUNK)}))
        await asyncio.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.2)
        with pytest.raises(aiohttp.ClientConnectionError):  # no longer listening
            async with aiohttp.ClientSession() as fresh:
                await fresh.get(f"{url}/health/live")
        gate.set()
        resp = await upload
        assert resp.status == 201
    await asyncio.wait_for(serving, 10)
