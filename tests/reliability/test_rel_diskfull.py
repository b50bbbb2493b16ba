"""Disk full (R12, R13): the storage tree on a 20 MiB tmpfs mounted for the test.

- an upload announced larger than the free space gets 507 before its body is read
  (with ``Expect: 100-continue`` no ``100 Continue`` is sent);
- the disk filling up *while* a body streams in (another process takes the space)
  gets 507 and leaves no temp file;
- the data fitting but its attr.json not (R13) gets 507 and leaves nothing;
- a PATCH on a full disk gets 507 and changes nothing; reads keep working; a DELETE
  works (and frees space);
- once space is freed, uploads and PATCHes work again, no space is leaked (no deleted
  temp file held open), and the invariant check is clean.

tmpfs ignores fsync, which is fine here: the subject is ENOSPC, not power loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import subprocess
import uuid
from pathlib import Path

import aiohttp
import pytest
from relharness import (
    MIB,
    PROFILES,
    RESULTS,
    Timer,
    http_request,
    inspect_store,
    raw_http,
    read_response,
)

SCENARIO = "disk full (20 MiB tmpfs)"
DISK = 20 * MIB
PAGE = 4096


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB tmpfs; unmounted (lazily, so a straggler cannot block it) at teardown."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK // MIB}m,mode=0755",
                           "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here ({done.stderr.strip()}): the disk-full "
                    "scenario needs root; STORAGE_MAX_SIZE only simulates capacity")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def fill(filler: Path, leave: int) -> None:
    """Take all free space but ``leave`` bytes (page-rounded), outside the server."""
    free = free_bytes(filler.parent)
    extra = free - leave
    if extra <= 0:
        return
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        os.posix_fallocate(fd, size, extra)
    finally:
        os.close(fd)


def tree_bytes(root: Path) -> int:
    """Bytes the files under ``root`` occupy on tmpfs (whole pages)."""
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_blocks * 512
    return total


class Client:
    def __init__(self, server, headers) -> None:
        self.url, self.port, self.headers = server.url, server.port, headers
        self.statuses: list[int] = []

    async def put(self, session, fid: str, data: bytes, *, chunked: bool = False) -> tuple:
        async def gen():
            for i in range(0, len(data), 64 * 1024):
                yield data[i:i + 64 * 1024]

        body = gen() if chunked else io.BytesIO(data)
        async with session.put(f"{self.url}/api/v1/files/{fid}", params={"filename": "f.bin"},
                               data=body) as resp:
            self.statuses.append(resp.status)
            return resp.status, await resp.json(content_type=None)

    async def call(self, session, method: str, path: str, **kwargs) -> tuple:
        async with session.request(method, f"{self.url}{path}", **kwargs) as resp:
            raw = await resp.read()
            self.statuses.append(resp.status)
            ctype = resp.headers.get("Content-Type", "")
            return resp.status, raw, ctype


def _is_problem(status_body) -> bool:
    _status, body = status_body[:2]
    return isinstance(body, dict) and isinstance(body.get("detail"), str)


async def _stream_then_fill(client: Client, fid: str, token: str, filler: Path) -> tuple:
    """Send 1 MiB of an 8 MiB body, let another process take the disk, send the rest."""
    size = 8 * MIB
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    head = http_request("PUT", f"/api/v1/files/{fid}?filename=big.bin",
                        {"Authorization": token, "Content-Length": str(size)})
    chunk = os.urandom(MIB)
    writer.write(head + chunk)
    await writer.drain()
    await asyncio.sleep(0.5)  # the first MiB is on disk
    await asyncio.to_thread(fill, filler, 0)

    async def rest():
        with contextlib.suppress(ConnectionError):
            for _ in range(7):
                writer.write(chunk)
                await writer.drain()

    sender = asyncio.create_task(rest())
    try:
        resp = await read_response(reader, timeout=30)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.transport.abort()
    return resp


@PROFILES
async def test_disk_full(profile, small_disk, server_factory, server_env, auth):
    row = RESULTS.row(f"{SCENARIO} [{profile}]")
    root = small_disk / "store"
    env = {**server_env, "STORAGE_LOCAL_BASE_PATH": str(root), "STORAGE_DISK_RESERVE": "0"}
    server = server_factory(env)
    headers = auth()
    token = headers["Authorization"]
    client = Client(server, headers)
    filler = small_disk / "filler"
    failures: list[str] = []
    kept: dict[str, str] = {}  # file_id -> sha256 of files that must stay readable
    with Timer(row):
        async with aiohttp.ClientSession(headers=headers) as session:
            for _ in range(3):
                data = os.urandom(100_000)
                fid = str(uuid.uuid4())
                status, body = await client.put(session, fid, data)
                assert status == 201, body
                kept[fid] = hashlib.sha256(data).hexdigest()
                row.acked += 1
            baseline_free = free_bytes(small_disk)

            # a small chunked upload (no Content-Length) fits in the free space
            fid = str(uuid.uuid4())
            data = os.urandom(300_000)
            status, body = await client.put(session, fid, data, chunked=True)
            if status != 201:
                failures.append(f"chunked 300 kB upload with {baseline_free} bytes free: "
                                f"{status} {body}")
            else:
                kept[fid] = hashlib.sha256(data).hexdigest()
                row.acked += 1

            for cycle in range(max(1, profile.rounds // 4)):
                row.rounds += 1
                # announced too large, with and without Expect: 100-continue
                for expect in (True, False):
                    hdrs = {"Authorization": token, "Content-Length": str(30 * MIB)}
                    if expect:
                        hdrs["Expect"] = "100-continue"
                    resp = await raw_http(server.port, http_request(
                        "PUT", f"/api/v1/files/{uuid.uuid4()}?filename=x", hdrs))
                    client.statuses.append(resp.status)
                    if resp.status != 507 or not resp.is_problem_json:
                        failures.append(f"30 MiB announced (expect={expect}): {resp.status} "
                                        f"{resp.body[:200]!r}")
                # a chunked body larger than the disk
                status, body = await client.put(session, str(uuid.uuid4()),
                                                 os.urandom(24 * MIB), chunked=True)
                if status != 507 or not _is_problem((status, body)):
                    failures.append(f"24 MiB chunked: {status} {body}")

                # the disk fills up while a body streams in
                resp = await _stream_then_fill(client, str(uuid.uuid4()), token, filler)
                client.statuses.append(resp.status)
                if resp.status != 507 or not resp.is_problem_json:
                    failures.append(f"ENOSPC mid-body: {resp.status} {resp.body[:300]!r}")

                # full disk (the failed upload's space was given back: take it too):
                # reads work, PATCH is 507 and changes nothing, DELETE works
                await asyncio.to_thread(fill, filler, 0)
                attrs_before = {p: p.read_bytes() for p in root.rglob("*.attr.json")}
                for fid, sha in kept.items():
                    status, raw, _ = await client.call(
                        session, "GET", f"/api/v1/files/{fid}/download")
                    if status != 200 or hashlib.sha256(raw).hexdigest() != sha:
                        failures.append(f"read {fid} on a full disk: {status}")
                status, raw, _ = await client.call(session, "GET", "/api/v1/files")
                if status != 200:
                    failures.append(f"list on a full disk: {status}")
                victim = next(iter(kept))
                status, raw, ctype = await client.call(
                    session, "PATCH", f"/api/v1/files/{victim}",
                    json={"description": "x" * 200, "metadata": {"k": "v" * 100}})
                if status != 507 or "json" not in ctype:
                    failures.append(f"PATCH on a full disk: {status} {raw[:200]!r}")
                if {p: p.read_bytes() for p in root.rglob("*.attr.json")} != attrs_before:
                    failures.append("a refused PATCH changed an attr file")

                # R13: exactly enough room for the data, none for its attr.json
                filler.unlink()
                size = 64 * PAGE
                await asyncio.to_thread(fill, filler, size)
                status, body = await client.put(session, str(uuid.uuid4()), os.urandom(size))
                if status != 507 or not _is_problem((status, body)):
                    failures.append(f"data fits, attr does not: {status} {body}")
                res = await inspect_store(env["DATABASE_URL"], env["DB_TABLE_PREFIX"], root)
                if res.count:
                    failures.append(f"cycle {cycle}, disk full: residue {res.describe()}")
                row.residue += res.count

                # DELETE on a full disk frees space
                fid = str(uuid.uuid4())
                filler.unlink()
                status, body = await client.put(session, fid, os.urandom(200_000))
                assert status == 201, body
                row.acked += 1
                await asyncio.to_thread(fill, filler, 0)
                status, raw, _ = await client.call(session, "DELETE", f"/api/v1/files/{fid}")
                if status != 204:
                    failures.append(f"DELETE on a full disk: {status} {raw[:200]!r}")
                else:
                    row.acked += 1

                # space freed: writes work again, nothing leaked
                filler.unlink()
                data = os.urandom(MIB)
                fid = str(uuid.uuid4())
                status, body = await client.put(session, fid, data)
                if status != 201:
                    failures.append(f"upload after freeing space: {status} {body}")
                else:
                    kept[fid] = hashlib.sha256(data).hexdigest()
                    row.acked += 1
                status, raw, _ = await client.call(
                    session, "PATCH", f"/api/v1/files/{victim}", json={"description": "ok"})
                if status != 200:
                    failures.append(f"PATCH after freeing space: {status} {raw[:200]!r}")
                else:
                    row.acked += 1
            # every acknowledged file is still there, byte for byte
            for fid, sha in kept.items():
                status, raw, _ = await client.call(
                    session, "GET", f"/api/v1/files/{fid}/download")
                if status != 200 or hashlib.sha256(raw).hexdigest() != sha:
                    row.lost += 1
                    failures.append(f"{fid} lost after the disk-full cycles: {status}")
        res = await inspect_store(env["DATABASE_URL"], env["DB_TABLE_PREFIX"], root)
        row.residue += res.count
        if res.count:
            failures.append(f"residue at the end: {res.describe()}")
        leaked = used_bytes(small_disk) - tree_bytes(small_disk)
        if leaked > 256 * 1024:
            row.residue += 1
            failures.append(f"{leaked} bytes of the disk are used by no file (a deleted "
                            "temp file still open?)")
        row.errors_500 += client.statuses.count(500)
    assert not failures, "\n".join(failures)
