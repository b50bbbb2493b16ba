"""Kill the real server (SIGKILL) at every step of upload, PATCH and delete, restart it,
and check the invariant: nothing partial is visible, nothing committed is lost, the
database and the attr files agree, no temp file (or S3 multipart upload) and no
pending WAL row is left.  The matrix runs on local disk and on S3, where the uploads
are large enough to stream as multipart uploads.

The steps are named fault points (``STORAGE_FAULT_POINT``, storage/domain/faults.py); a kill
in the middle of a body is done from outside while the client is still sending.  One
server process per step: the restart that checks step N is started with step N+1's
fault point, so the whole matrix costs one start per step (about 25 s).  The same
element (prefix and storage directory) lives through every crash, so files committed
in earlier rounds must survive all later ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from cache_helpers import check_s3_store, check_store, connect
from helpers import BOTH_BACKENDS, process_env, s3_uploads, temp_files
from server_proc import free_port

from storage.config import Config

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


class Server:
    """``python run.py`` on one element; each :meth:`start` may set a fault point."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.url = f"http://127.0.0.1:{env['SERVER_PORT']}"
        self.proc: subprocess.Popen | None = None

    def start(self, fault: str | None = None, *, expect_death: bool = False) -> None:
        # the first start creates the schema; later ones only check it (faster)
        env = {**self.env, "STORAGE_FAULT_POINT": fault or "",
               "DB_AUTO_MIGRATE": "on" if self.proc is None else "off"}
        with open(self.log, "ab") as log:
            log.write(f"\n===== start (fault point {fault}) =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "run.py")], cwd=ROOT,
                                         env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if expect_death and self.proc.returncode == -signal.SIGKILL:
                    return
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", int(self.env["SERVER_PORT"])), 0.2):
                    if not expect_death:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not up after 60 s:\n{self.tail()}")

    def wait_killed(self, timeout: float = 20) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the fault point never fired:\n{self.tail()}") from None
        assert self.proc.returncode == -signal.SIGKILL, self.tail()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@dataclass
class World:
    """What the client may rely on: files committed (acknowledged or completed by
    recovery) with their bytes and description; files that must not exist."""

    server: Server
    config: Config  # the element's, for looking at its store
    headers: dict[str, str]
    http: aiohttp.ClientSession
    present: dict[str, tuple[bytes, str | None]] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)

    @property
    def s3(self) -> bool:
        return self.config.storage_type == "s3"

    async def partial_data(self) -> bool:
        """Whether an upload's partial data exists (a temp file, a multipart upload)."""
        if self.s3:
            return bool(await s3_uploads(self.config))
        return bool(temp_files(self.config.storage_local_base_path))

    async def put(self, data: bytes, file_id: str | None = None, description: str = "v1"):
        file_id = file_id or str(uuid.uuid4())
        async with self.http.put(f"{self.server.url}/api/v1/files/{file_id}?filename=f.bin"
                                 f"&description={description}", data=data,
                                 headers=self.headers) as resp:
            assert resp.status == 201, await resp.text()
        self.present[file_id] = (data, description)
        return file_id

    async def attempt(self, method: str, path: str, **kwargs) -> None:
        """A request the server dies in the middle of: no answer reaches the client."""
        with pytest.raises(aiohttp.ClientError):
            async with self.http.request(method, self.server.url + path,
                                         headers=self.headers, **kwargs) as resp:
                await resp.read()
                raise AssertionError(f"got an answer {resp.status}")

    async def verify(self) -> None:
        for file_id, (data, description) in self.present.items():
            async with self.http.get(f"{self.server.url}/api/v1/files/{file_id}",
                                     headers=self.headers) as resp:
                assert resp.status == 200, (file_id, await resp.text())
                assert (await resp.json())["description"] == description, file_id
            async with self.http.get(f"{self.server.url}/api/v1/files/{file_id}/download",
                                     headers=self.headers) as resp:
                body = await resp.read()
                assert resp.status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(
                    data).digest(), file_id
        for file_id in self.absent:
            async with self.http.get(f"{self.server.url}/api/v1/files/{file_id}",
                                     headers=self.headers) as resp:
                assert resp.status == 404, file_id


async def _upload_crash(world: World, point: str, outcome: str) -> None:
    # on S3 a multipart upload: a part is sent while the body streams
    file_id = str(uuid.uuid4())
    data = os.urandom(6 * MIB if world.s3 else 300_000)
    await world.attempt("PUT", f"/api/v1/files/{file_id}?filename=c.bin&description=v1",
                        data=io.BytesIO(data))
    if outcome == "present":
        world.present[file_id] = (data, "v1")
    else:
        world.absent.add(file_id)


async def _patch_crash(world: World, point: str, outcome: str) -> None:
    file_id = await world.put(b"patch target " + point.encode())
    await world.attempt("PATCH", f"/api/v1/files/{file_id}", json={"description": "v2"})
    if outcome == "new":
        world.present[file_id] = (world.present[file_id][0], "v2")


async def _delete_crash(world: World, point: str, outcome: str) -> None:
    file_id = await world.put(b"delete target " + point.encode())
    await world.attempt("DELETE", f"/api/v1/files/{file_id}")
    del world.present[file_id]
    world.absent.add(file_id)


async def _mid_body_kill(world: World) -> None:
    """Kill from outside while the body is half sent: a temp file (a multipart upload
    with a part on its way) exists at that moment."""
    file_id, chunk = str(uuid.uuid4()), os.urandom(256 * 1024)
    sent = asyncio.Event()
    # more than one server read (UPLOAD_CHUNK_SIZE, 1 MiB); on S3 more than one part
    pieces = 24 if world.s3 else 6

    async def body():
        for _ in range(pieces):
            yield chunk
        sent.set()
        await asyncio.sleep(60)  # never finishes: the server dies first
        yield chunk

    async def killer():
        await sent.wait()
        for _ in range(500):  # up to 10 s for the data to reach the store
            if await world.partial_data():
                break
            await asyncio.sleep(0.02)
        assert await world.partial_data(), "no partial data while the body was streaming"
        world.server.kill()

    task = asyncio.create_task(killer())
    headers = {**world.headers, "Content-Length": str(len(chunk) * pieces * 2)}
    with pytest.raises(aiohttp.ClientError):
        async with world.http.put(f"{world.server.url}/api/v1/files/{file_id}?filename=m.bin",
                                  data=body(), headers=headers) as resp:
            await resp.read()
    await task
    world.absent.add(file_id)


# (fault point, action, expected outcome after the restart)
MATRIX = [  # PATCH and delete first: their set-up uploads must not meet an upload fault
    ("update.after_intent", _patch_crash, "old"),
    ("update.after_attr", _patch_crash, "new"),
    ("update.after_commit", _patch_crash, "new"),
    ("delete.after_intent", _delete_crash, "absent"),
    ("delete.after_files", _delete_crash, "absent"),
    ("delete.after_commit", _delete_crash, "absent"),
    ("upload.after_intent", _upload_crash, "absent"),
    ("upload.after_body", _upload_crash, "absent"),
    ("upload.after_files", _upload_crash, "present"),
    ("upload.after_commit", _upload_crash, "present"),
]


@pytest.fixture
def element_config(make_config) -> Config:
    """The crashing element: a fresh prefix and store (a directory, or an S3 app folder
    with the storage_kind fixture)."""
    return make_config()


@pytest.fixture
def server(element_config, tmp_path):
    env = {**os.environ, **process_env(element_config), "SERVER_PORT": str(free_port()),
           "SERVER_HOST": "127.0.0.1", "LOG_FORMAT": "text", "LOG_LEVEL": "info"}
    srv = Server(env, tmp_path / "server.log")
    yield srv
    srv.kill()


async def _check(world: World, pg_dsn: str) -> None:
    conn = await connect(pg_dsn)
    try:
        if world.s3:
            found = await check_s3_store(conn, world.config)
        else:
            config = world.config
            found = await check_store(conn, config.table_prefix, config.storage_local_base_path)
    finally:
        await conn.close()
    assert set(world.present) <= set(found) and not (world.absent & set(found))
    assert set(found) == set(world.present), "a file nobody committed is visible"
    await world.verify()


@BOTH_BACKENDS
async def test_sigkill_at_every_step_leaves_all_or_nothing(server, element_config, token,
                                                           pg_dsn):
    headers = {"Authorization": f"Bearer {token()}"}
    points = [p for p, _, _ in MATRIX]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        world = World(server, element_config, headers, http)
        server.start(points[0])
        await world.put(b"committed before any crash")
        for n, (point, action, outcome) in enumerate(MATRIX):
            await action(world, point, outcome)
            server.wait_killed()
            server.start(points[n + 1] if n + 1 < len(points) else None)
            await _check(world, pg_dsn)
        # a kill while the body streams (no fault point: from outside)
        await _mid_body_kill(world)
        server.start("recovery.resolved", expect_death=True)  # crash inside recovery ...
        server.start()  # ... and the next start finishes it
        await _check(world, pg_dsn)
        server.kill()


async def test_a_crash_during_recovery_is_recovered_by_the_next_start(server, element_config,
                                                                       token, pg_dsn):
    """R25: recovery itself is killed after resolving one of several pending operations."""
    prefix = element_config.table_prefix
    headers = {"Authorization": f"Bearer {token()}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        world = World(server, element_config, headers, http)
        server.start("update.after_attr")
        keep = await world.put(b"keep me")
        await _patch_crash(world, "update.after_attr", "new")
        server.wait_killed()
        conn = await connect(pg_dsn)  # two more abandoned intents, as other crashes leave
        try:
            for _ in range(2):
                await conn.execute(
                    f"INSERT INTO {prefix}_wal (transaction_id, operation_type, status, file_id, "
                    "operation_data, started_at) VALUES ($1, 'file_create', 'pending', $2, "
                    "jsonb_build_object('relative_path', $3::text), "
                    "now() - interval '1 minute')", uuid.uuid4(), file_id := uuid.uuid4(),
                    f"2026/01/01/00/x_{file_id}")
        finally:
            await conn.close()
        server.start("recovery.resolved", expect_death=True)
        conn = await connect(pg_dsn)
        try:
            pending = await conn.fetchval(
                f"SELECT count(*) FROM {prefix}_wal WHERE status = 'pending'")
        finally:
            await conn.close()
        assert pending == 2  # one of three resolved, then the crash
        server.start()
        await _check(world, pg_dsn)
        assert keep in world.present


@pytest.mark.heavy
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
async def test_kill_mid_body_of_a_large_upload(server, element_config, token, pg_dsn,
                                                fraction):
    """R2: a 32 MiB body cut at 10 %, 50 % and 99 %: after the restart nothing of it is
    visible and no temp file is left."""
    headers = {"Authorization": f"Bearer {token()}"}
    size, chunk = 32 * 1024 * 1024, os.urandom(1024 * 1024)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        world = World(server, element_config, headers, http)
        server.start()
        await world.put(os.urandom(512 * 1024))
        file_id, stop = str(uuid.uuid4()), asyncio.Event()

        async def body():
            sent = min(max(1, int(size * fraction) // len(chunk)), size // len(chunk) - 1)
            for _ in range(sent):  # never the whole body
                yield chunk
            stop.set()
            await asyncio.sleep(120)
            yield chunk

        async def killer():
            await stop.wait()
            await asyncio.sleep(0.3)  # let the server write what it got
            server.kill()

        task = asyncio.create_task(killer())
        with pytest.raises(aiohttp.ClientError):
            async with http.put(f"{server.url}/api/v1/files/{file_id}?filename=big.bin",
                                data=body(), headers={**headers, "Content-Length": str(size)}
                                ) as resp:
                await resp.read()
        await task
        world.absent.add(file_id)
        server.start()
        await _check(world, pg_dsn)
