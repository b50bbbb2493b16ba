"""Resumable uploads through real ``python run.py`` processes: tuspy (requests) as the
client, SIGKILL in the middle of a PATCH and of a completion, two processes of one
element taking alternate PATCHes, and flat memory (``-m heavy``: 2 GiB in 8 MiB PATCHes).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import requests
from helpers import BOTH_BACKENDS
from server_proc import rss_kib
from tus_helpers import OCTETS, ROOT, TUS
from tusclient.client import TusClient
from tusclient.exceptions import TusCommunicationError, TusUploadFailed
from yarl import URL

KIB, MIB = 1024, 1024 * 1024


@pytest.fixture
def kind_env(request, server_env, storage_kind) -> dict[str, str]:
    """``server_env`` on the backend of ``storage_kind`` (SeaweedFS for ``s3``)."""
    env = dict(server_env)
    if storage_kind == "s3":
        env.update(request.getfixturevalue("s3_endpoint").element_env(
            request.getfixturevalue("s3_bucket"), "se"))
    return env


def _file(server, headers, upload_url: str) -> dict:
    fid = URL(upload_url).path.rsplit("/", 1)[1]
    resp = requests.get(f"{server.url}/api/v1/files/{fid}", headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _download(server, headers, upload_url: str) -> bytes:
    fid = URL(upload_url).path.rsplit("/", 1)[1]
    resp = requests.get(f"{server.url}/api/v1/files/{fid}/download", headers=headers,
                        timeout=30)
    assert resp.status_code == 200
    return resp.content


def _stored(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_sigkill_mid_patch_and_mid_completion_then_resume(server_factory, server_env, auth,
                                                          tmp_path):
    """Acknowledged bytes survive a SIGKILL, unacknowledged ones are dropped, and a
    completion killed after the file was published is finished by startup recovery."""
    data = os.urandom(3 * MIB + 123)
    headers, env = auth(), dict(server_env)
    server = server_factory(env)
    env["SERVER_PORT"] = str(server.port)  # the upload URL names it: restarts keep it
    client = TusClient(server.url + ROOT, headers=headers)
    uploader = client.uploader(file_stream=io.BytesIO(data), chunk_size=512 * KIB,
                               metadata={"filename": "data.bin"}, upload_checksum=True)
    uploader.upload_chunk()
    uploader.upload_chunk()  # 1 MiB acknowledged
    url = uploader.url
    server.kill()

    crashing = server_factory({**env, "STORAGE_FAULT_POINT": "tus.after_write"})
    with pytest.raises(TusUploadFailed):
        uploader.upload_chunk()  # the server dies with the bytes written, not yet synced
    assert crashing.proc.wait(10) == -9

    completing = server_factory({**env, "STORAGE_FAULT_POINT": "tus.after_publish"})
    resumed = client.uploader(file_stream=io.BytesIO(data), url=url, chunk_size=512 * KIB)
    assert resumed.offset == MIB  # from HEAD: every acknowledged byte, nothing more
    with pytest.raises(TusUploadFailed):
        resumed.upload()  # the last PATCH dies after data and attr are in place
    assert completing.proc.wait(10) == -9

    final = server_factory(env)  # startup recovery finishes the completion
    meta = _file(final, headers, url)
    assert (meta["file_size"], meta["checksum"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert meta["original_filename"] == "data.bin"
    assert _download(final, headers, url) == data
    assert client.uploader(file_stream=io.BytesIO(data), url=url).offset == len(data)
    relpath = meta["storage_path"] + meta["storage_filename"]
    root = tmp_path / "proc-store"
    assert _stored(root) == [relpath, relpath + ".attr.json"]


def test_two_processes_take_alternate_patches(server_factory, server_env, auth, tmp_path):
    """Two ``python run.py`` of one element (same prefix and store); tuspy switches between
    them on every chunk: each PATCH lands where the running sha256 is not, and rebuilds
    it from the staged bytes, once."""
    data = os.urandom(2 * MIB + 777)
    headers = auth()
    one, two = server_factory(server_env), server_factory(server_env)
    uploader = TusClient(one.url + ROOT, headers=headers).uploader(
        file_stream=io.BytesIO(data), chunk_size=300 * KIB, metadata={"filename": "two.bin"})
    uploader.upload_chunk()  # created on one, first chunk on one
    path, patches = URL(uploader.url).path, 1
    while uploader.offset < len(data):
        uploader.url = (one, two)[patches % 2].url + path
        uploader.upload_chunk()
        patches += 1
    meta = _file(two, headers, path)
    assert (meta["file_size"], meta["checksum"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert _download(one, headers, path) == data
    rehashes = sum(_metric(s, "storage_tus_rehashes_total") for s in (one, two))
    assert rehashes == patches - 1


@BOTH_BACKENDS
def test_a_hash_belongs_to_one_upload_not_to_its_file_id(storage_kind, server_factory,
                                                         kind_env, auth):
    """Issue 23, finding 1: process one keeps the running sha256 of an upload that process
    two terminates and creates again under the same client-chosen id; the next PATCH in
    process one must not continue the old upload's hash."""
    headers, fid = {**auth(), **TUS}, str(uuid.uuid4())
    one, two = server_factory(kind_env), server_factory(kind_env)
    meta = {"Upload-Metadata": f"file_id {base64.b64encode(fid.encode()).decode()}"}

    def create(server) -> str:
        resp = requests.post(server.url + ROOT, timeout=10, headers={
            **headers, **meta, "Upload-Length": "20"})
        assert resp.status_code == 201, resp.text
        return URL(resp.headers["Location"]).path

    def patch(server, path: str, offset: int, data: bytes) -> None:
        resp = requests.patch(server.url + path, data=data, timeout=10, headers={
            **headers, **OCTETS, "Upload-Offset": str(offset)})
        assert resp.status_code == 204, resp.text

    path = create(one)
    patch(one, path, 0, b"X" * 10)  # process one now holds the hash of X*10 at offset 10
    resp = requests.delete(two.url + path, headers=headers, timeout=10)
    assert resp.status_code == 204, resp.text
    assert create(two) == path
    patch(two, path, 0, b"Y" * 10)
    patch(one, path, 10, b"Z" * 10)
    data = b"Y" * 10 + b"Z" * 10
    assert _download(one, auth(), path) == data
    assert _file(one, auth(), path)["checksum"] == hashlib.sha256(data).hexdigest()


def _metric(server, name: str) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return next(float(line.split()[1]) for line in text.splitlines()
                if line.startswith(name + " "))


def test_a_patch_in_flight_when_the_server_dies_is_locked_for_nobody(
        server_factory, server_env, auth):
    """The dead process's lease is taken over at once by its successor on this host."""
    headers, env = {**auth(), **TUS}, dict(server_env)
    server = server_factory({**env, "STORAGE_FAULT_POINT": "tus.after_write"})
    env["SERVER_PORT"] = str(server.port)
    created = requests.post(server.url + ROOT, headers={**headers, "Upload-Length": "10"},
                            timeout=10)
    assert created.status_code == 201
    with pytest.raises(requests.ConnectionError):
        requests.patch(created.headers["Location"], data=b"01234", timeout=10,
                       headers={**headers, **OCTETS, "Upload-Offset": "0"})
    server.proc.wait(10)
    server_factory(env)
    resp = requests.patch(created.headers["Location"], data=b"0123456789", timeout=10,
                          headers={**headers, **OCTETS, "Upload-Offset": "0"})
    assert resp.status_code == 204, resp.text


async def _patch_then_drop(server, location: str, headers: dict, data: bytes, sent: int) -> int:
    """A raw PATCH that announces all of ``data``, sends ``sent`` bytes and drops the
    connection; the offset HEAD then reports, once the server has finished the request."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = "".join(f"{k}: {v}\r\n" for k, v in {
        **headers, **OCTETS, "Upload-Offset": "0", "Content-Length": str(len(data)),
        "Host": f"127.0.0.1:{server.port}"}.items())
    writer.write(f"PATCH {URL(location).path} HTTP/1.1\r\n{head}\r\n".encode() + data[:sent])
    await writer.drain()
    await asyncio.sleep(0.5)  # let the server read what was sent
    writer.close()
    await writer.wait_closed()
    offset = 0
    for _ in range(200):  # the server finishes the request after the client left
        offset = int(requests.head(location, headers=headers, timeout=10)
                     .headers["Upload-Offset"])
        if offset:
            break
        await asyncio.sleep(0.05)
    return offset


async def test_a_body_cut_short_keeps_what_arrived(server_factory, server_env, auth):
    """tus: store as much of an interrupted PATCH as possible (no checksum was sent).
    A real process: the in-process test server cancels handlers when the client leaves."""
    server, headers = server_factory(server_env), {**auth(), **TUS}
    data = os.urandom(3 * MIB)
    created = requests.post(server.url + ROOT, headers={**headers, "Upload-Length": str(
        len(data))}, timeout=10)
    location = created.headers["Location"]
    # a raw connection that announces 3 MiB, sends half and drops
    offset = await _patch_then_drop(server, location, headers, data, 3 * MIB // 2)
    assert 0 < offset <= 3 * MIB // 2
    staged = Path(server_env["STORAGE_LOCAL_BASE_PATH"]) / ".resumable" / location.rsplit("/")[-1]
    assert staged.stat().st_size == offset
    resp = requests.patch(location, data=data[offset:], timeout=30, headers={
        **headers, **OCTETS, "Upload-Offset": str(offset)})
    assert resp.status_code == 204, resp.text
    assert _file(server, headers, location)["checksum"] == hashlib.sha256(data).hexdigest()


@BOTH_BACKENDS
async def test_an_interrupted_patch_keeps_every_byte_that_arrived(storage_kind,
                                                                  server_factory, kind_env,
                                                                  auth):
    """Issue 23, finding 10: 1,000,000 bytes arrive (less than UPLOAD_CHUNK_SIZE, 1 MiB)
    and the connection drops: all of them are staged, made durable and counted."""
    server, headers = server_factory(kind_env), {**auth(), **TUS}
    data = os.urandom(3 * MIB)
    created = requests.post(server.url + ROOT, headers={**headers, "Upload-Length": str(
        len(data))}, timeout=10)
    location, sent = created.headers["Location"], 1_000_000
    offset = await _patch_then_drop(server, location, headers, data, sent)
    assert offset == sent
    resp = requests.patch(location, data=data[offset:], timeout=30, headers={
        **headers, **OCTETS, "Upload-Offset": str(offset)})
    assert resp.status_code == 204, resp.text
    assert _file(server, headers, location)["checksum"] == hashlib.sha256(data).hexdigest()


# --- memory ------------------------------------------------------------------------------

PIECE = os.urandom(8 * MIB)


async def _tus_upload(url: str, headers: dict, size: int,
                      patch_size: int) -> tuple[str, str, float]:
    """Create and fill an upload in ``patch_size`` PATCHes; (sha256 sent, seconds)."""
    digest, sent = hashlib.sha256(), 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        t0 = time.monotonic()
        async with session.post(url + ROOT, headers={**headers, **TUS,
                                                     "Upload-Length": str(size)}) as resp:
            assert resp.status == 201
            location = resp.headers["Location"]
        while sent < size:
            body = memoryview(PIECE)[: min(patch_size, size - sent)]
            digest.update(body)
            async with session.patch(location, data=io.BytesIO(body), headers={
                    **headers, **TUS, **OCTETS, "Upload-Offset": str(sent)}) as resp:
                assert resp.status == 204, await resp.text()
                sent = int(resp.headers["Upload-Offset"])
        seconds = time.monotonic() - t0
    assert sent == size
    return location, digest.hexdigest(), seconds


async def _sample(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_kib(pid))
        await asyncio.sleep(0.05)


async def _flat(server_factory, server_env, auth, size: int) -> None:
    server, headers = server_factory(server_env), auth()
    base = rss_kib(server.pid)
    peak, stop = [base], asyncio.Event()
    sampler = asyncio.create_task(_sample(server.pid, peak, stop))
    try:
        location, sha, seconds = await _tus_upload(server.url, headers, size, 8 * MIB)
    finally:
        stop.set()
        await sampler
    fid = location.rsplit("/", 1)[1]
    meta = requests.get(f"{server.url}/api/v1/files/{fid}", headers=headers, timeout=10).json()
    assert (meta["file_size"], meta["checksum"]) == (size, sha)
    growth = (peak[0] - base) / 1024
    print(f"\ntus {size // MIB} MiB in 8 MiB PATCHes: {size / MIB / seconds:.0f} MiB/s, "
          f"server RSS +{growth:.1f} MiB (peak {peak[0] / 1024:.0f} MiB)")
    assert growth < 50, growth


async def test_memory_stays_flat_in_8_mib_patches(server_factory, server_env, auth):
    await _flat(server_factory, server_env, auth, 96 * MIB)


@pytest.mark.heavy
async def test_2_gib_in_8_mib_patches_in_flat_memory(server_factory, server_env, auth):
    await _flat(server_factory, server_env, auth, 2048 * MIB)


def test_unknown_upload_url_is_404_for_tuspy(server_factory, server_env, auth, tmp_path):
    server = server_factory(server_env)
    with pytest.raises(TusCommunicationError) as caught:
        TusClient(server.url + ROOT, headers=auth()).uploader(
            file_stream=io.BytesIO(b"x"), url=f"{server.url}{ROOT}/{uuid.uuid4()}")
    assert caught.value.status_code == 404
