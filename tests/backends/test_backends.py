"""One contract suite for the backend seam, run against local disk and a real SeaweedFS S3.

No mocks: the S3 half talks to ``weed server -s3`` started once per session
(the ``s3_endpoint`` fixture in conftest.py); each test gets its own app folder in the
shared bucket.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from s3server import client, create_bucket, free_ports

from storage.backends.base import Backend, NoSpace, ObjectExists, ObjectMissing, StoreUnavailable
from storage.backends.local import TEMP_PREFIX, LocalBackend
from storage.backends.s3 import S3Backend, translating
from storage.config import Config

MIB = 1024 * 1024


@pytest.fixture
def s3_config(s3_endpoint, s3_bucket):
    """``s3_config(**changes)``: a Config for a fresh app folder in the test bucket."""

    def build(**changes) -> Config:
        base = Config(storage_type="s3", s3_endpoint_url=s3_endpoint.endpoint_url,
                      s3_access_key_id=s3_endpoint.access_key,
                      s3_secret_access_key=s3_endpoint.secret_key, s3_bucket_name=s3_bucket,
                      s3_app_folder=f"se-{uuid.uuid4().hex[:12]}", s3_region=s3_endpoint.region,
                      s3_multipart_threshold=5 * MIB)
        return base.with_(**changes)

    return build


@pytest.fixture(params=["local", "s3"])
async def backend(request, tmp_path):
    if request.param == "local":
        store: Backend = LocalBackend(Config(storage_local_base_path=tmp_path / "store"))
    else:
        store = S3Backend(request.getfixturevalue("s3_config")())
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def s3(s3_config):
    store = S3Backend(s3_config())
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def rel(n: int = 0, hour: int = 3) -> str:
    return f"2026/01/02/{hour:02d}/report_ivan_20260102T030405_{n:04d}.bin"


def blob(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


async def store(backend: Backend, relpath: str, data: bytes, chunk: int = 64 * 1024):
    async with backend.create(relpath, len(data)) as writer:
        for i in range(0, len(data), chunk):
            await writer.write(data[i:i + chunk])
        await writer.commit()
    return writer


async def read(backend: Backend, relpath: str, start: int = 0, end: int | None = None,
               chunk: int = 64 * 1024) -> bytes:
    reader = await backend.open(relpath)
    try:
        last = reader.info.size - 1 if end is None else end
        return b"".join([c async for c in reader.iter_range(start, last, chunk)])
    finally:
        await reader.close()


async def leftovers(backend: Backend) -> list[str]:
    """Partial uploads still held by the store (temp files / multipart uploads)."""
    if isinstance(backend, LocalBackend):
        return [p.name for p in backend.root.rglob(f"{TEMP_PREFIX}*")]
    resp = await backend.client.list_multipart_uploads(Bucket=backend.bucket,
                                                       Prefix=backend.folder + "/")
    return [u["UploadId"] for u in resp.get("Uploads", [])]


async def visible(backend: Backend) -> list[str]:
    """Every committed object (data or attr) under the backend's root."""
    if isinstance(backend, LocalBackend):
        return sorted(str(p.relative_to(backend.root)) for p in backend.root.rglob("*")
                      if p.is_file() and not p.name.startswith(TEMP_PREFIX))
    resp = await backend.client.list_objects_v2(Bucket=backend.bucket,
                                                Prefix=backend.folder + "/")
    return sorted(o["Key"] for o in resp.get("Contents", []))


# --- contract: both backends -------------------------------------------------------------


async def test_roundtrip_bytes_and_hashes(backend):
    data = blob(300_001)
    writer = await store(backend, rel(), data)
    assert writer.size == len(data)
    assert writer.sha256 == hashlib.sha256(data).hexdigest()
    assert writer.md5 is None  # md5 only on request (clients sending Content-MD5)
    reader = await backend.open(rel())
    assert reader.info.size == len(data)
    await reader.close()
    assert await read(backend, rel(), chunk=10_000) == data
    assert await leftovers(backend) == []


async def test_md5_when_enabled(backend):
    data = blob(70_000, seed=5)
    async with backend.create(rel()) as writer:
        writer.hasher.enable_md5()
        await writer.write(data)
        await writer.commit()
    assert writer.md5 == hashlib.md5(data, usedforsecurity=False).digest()


async def test_zero_byte_object(backend):
    writer = await store(backend, rel(), b"")
    assert writer.sha256 == hashlib.sha256(b"").hexdigest()
    assert await backend.exists(rel())
    assert await read(backend, rel()) == b""


@pytest.mark.parametrize(("start", "end"), [(0, 0), (99_999, 99_999), (1234, 56_788)])
async def test_ranges(backend, start, end):
    data = blob(100_000, seed=2)
    await store(backend, rel(), data)
    assert await read(backend, rel(), start, end, chunk=4096) == data[start:end + 1]


async def test_abort_leaves_nothing(backend):
    async with backend.create(rel()) as writer:
        await writer.write(b"partial")
        await writer.abort()
        await writer.abort()  # idempotent
    assert not await backend.exists(rel())
    assert await leftovers(backend) == []
    assert await visible(backend) == []


async def test_exception_inside_block_aborts(backend):
    with pytest.raises(RuntimeError, match="client went away"):
        async with backend.create(rel()) as writer:
            await writer.write(blob(1000))
            raise RuntimeError("client went away")
    assert not await backend.exists(rel())
    assert await leftovers(backend) == []


async def test_commit_never_clobbers(backend):
    await store(backend, rel(), b"first")
    with pytest.raises(ObjectExists):  # a Conflict (409): another upload took the path
        await store(backend, rel(), b"second")
    assert await read(backend, rel()) == b"first"
    assert await leftovers(backend) == []


async def test_attr_write_read_overwrite(backend):
    await store(backend, rel(), b"data")
    with pytest.raises(ObjectMissing):
        await backend.read_attr(rel())
    await backend.write_attr(rel(), b'{"v": 1}')
    assert await backend.read_attr(rel()) == b'{"v": 1}'
    await backend.write_attr(rel(), b'{"v": 2}')
    assert await backend.read_attr(rel()) == b'{"v": 2}'


async def test_delete_is_idempotent_and_reports_existence(backend):
    await store(backend, rel(), b"data")
    await backend.write_attr(rel(), b"{}")
    assert await backend.delete(rel()) is True
    assert not await backend.exists(rel())
    with pytest.raises(ObjectMissing):
        await backend.read_attr(rel())
    with pytest.raises(ObjectMissing):
        await backend.open(rel())
    assert await backend.delete(rel()) is False
    assert await visible(backend) == []


async def test_exists(backend):
    assert not await backend.exists(rel())
    await store(backend, rel(), b"x")
    assert await backend.exists(rel())
    assert not await backend.exists(rel(1))


async def test_iter_attr_paths_lists_exactly_attr_bearing_objects(backend):
    expected = []
    for hour in (0, 7, 23):
        for n in range(3):
            await store(backend, rel(n, hour), b"d")
            if n != 1:
                await backend.write_attr(rel(n, hour), b"{}")
                expected.append(rel(n, hour))
    assert sorted([p async for p in backend.iter_attr_paths()]) == sorted(expected)


async def test_iter_attr_paths_empty_store(backend):
    assert [p async for p in backend.iter_attr_paths()] == []


async def test_check_ok_and_side_effect_free(backend):
    details = await backend.check()
    assert all(isinstance(v, str) for v in details.values())
    assert await visible(backend) == []  # no .keep / .health_check left behind


async def test_relpath_escaping_root_is_refused(backend):
    with pytest.raises(ObjectMissing):
        backend.create("../escape.bin")
    with pytest.raises(ObjectMissing):
        await backend.open("../../etc/passwd")


async def test_remove_stray_temps(backend):
    writer = backend.create(rel())
    await writer.write(blob(5 * MIB + 1))  # big enough to start an S3 multipart upload
    assert writer.temp_name
    assert await backend.remove_stray_temps(older_than_s=3600) == 0
    assert await backend.remove_stray_temps(older_than_s=0) == 1
    assert await leftovers(backend) == []
    await writer.abort()  # the sweep already took it; must not raise


def test_the_store_specific_operations_are_part_of_the_contract():
    """No silent defaults: a backend that forgot one cannot even be built (issue 19)."""
    assert {"free_bytes", "remove_stray_temps", "discard_temp"} <= Backend.__abstractmethods__


async def test_free_bytes(backend):
    free = await backend.free_bytes()
    if isinstance(backend, LocalBackend):
        assert isinstance(free, int) and 0 < free <= shutil.disk_usage(backend.root).total
    else:
        assert free is None  # a bucket has no such notion: STORAGE_MAX_SIZE is the capacity


async def test_discard_temp_removes_exactly_the_named_partial_data(backend):
    writer = backend.create(rel())
    await writer.write(blob(5 * MIB + 1))  # big enough to start an S3 multipart upload
    other = backend.create(rel(1, hour=4))
    await other.write(blob(5 * MIB + 1, seed=2))
    local = isinstance(backend, LocalBackend)
    assert await backend.discard_temp(rel(), "") is False
    if local:  # SeaweedFS aborts an upload id under any key, and twice without complaint
        assert await backend.discard_temp(rel(), other.temp_name) is False  # another's
    assert sorted(await leftovers(backend)) == sorted(
        [Path(t).name for t in (writer.temp_name, other.temp_name)])
    assert await backend.discard_temp(rel(), writer.temp_name) is True
    assert await leftovers(backend) == [Path(other.temp_name).name]
    if local:
        assert await backend.discard_temp(rel(), writer.temp_name) is False  # already gone
    await writer.abort()  # discarded already; must not raise
    await other.abort()
    assert await leftovers(backend) == [] and await visible(backend) == []


async def test_the_temp_name_is_known_before_any_data_leaves(backend):
    """A WAL intent can always name the partial data recovery must discard: the local
    temp path from the start; an S3 multipart upload id through ``on_temp``, after the
    upload is created and before its first part is sent (issue 19)."""
    announced: list[tuple[str, list[str], int]] = []

    async def on_temp(name: str) -> None:
        parts = await backend.client.list_parts(Bucket=backend.bucket, Key=backend.key(rel()),
                                                UploadId=name)
        announced.append((name, await leftovers(backend), len(parts.get("Parts", []))))

    writer = backend.create(rel())
    writer.on_temp = on_temp
    known_at_start = writer.temp_name
    async with writer:
        for _ in range(3):
            await writer.write(blob(3 * MIB))  # two parts of 5 MiB leave during these
        await writer.commit()
    if isinstance(backend, LocalBackend):
        assert known_at_start and announced == []
    else:
        assert known_at_start == ""
        assert announced == [(writer.temp_name, [writer.temp_name], 0)]


async def test_a_failing_on_temp_fails_the_write_and_leaves_nothing(s3):
    async def refuse(name: str) -> None:
        raise ConnectionRefusedError("the database is away")

    writer = s3.create(rel())
    writer.on_temp = refuse
    with pytest.raises(ConnectionRefusedError):
        async with writer:
            await writer.write(blob(6 * MIB))
    assert await leftovers(s3) == [] and await visible(s3) == []


# --- S3 only -----------------------------------------------------------------------------


async def test_s3_large_upload_goes_multipart_with_bounded_memory(s3):
    data, chunk = blob(20 * MIB + 12_345, seed=3), 256 * 1024
    tracemalloc.start()
    try:
        async with s3.create(rel(), len(data), content_type="application/pdf") as writer:
            for i in range(0, len(data), chunk):
                await writer.write(data[i:i + chunk])
            parts = await s3.client.list_parts(Bucket=s3.bucket, Key=s3.key(rel()),
                                               UploadId=writer.temp_name)
            assert len(parts["Parts"]) >= 3  # streamed while writing, not at commit
            await writer.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"peak {peak / MIB:.1f} MiB")
    assert peak < 3 * s3.part_size  # one part uploading + one filling, not the whole 20 MiB
    head = await s3.client.head_object(Bucket=s3.bucket, Key=s3.key(rel()))
    assert head["ETag"].strip('"').endswith("-5")  # 4 full parts + the tail
    assert head["ContentType"] == "application/pdf"
    assert head["Metadata"]["original_size"] == str(len(data))
    assert hashlib.sha256(await read(s3, rel(), chunk=MIB)).hexdigest() == writer.sha256
    assert await leftovers(s3) == []


async def test_s3_small_upload_is_one_put_with_metadata(s3):
    writer = await store(s3, rel(), b"hello")
    assert writer.temp_name == ""
    head = await s3.client.head_object(Bucket=s3.bucket, Key=s3.key(rel()))
    assert head["Metadata"] == {"checksum": writer.sha256, "original_size": "5"}
    assert head["ContentType"] == "application/octet-stream"
    assert s3.key(rel()) == f"{s3.folder}/{rel()}"


async def test_s3_interrupted_multipart_leaves_no_parts(s3):
    with pytest.raises(ConnectionResetError):
        async with s3.create(rel()) as writer:
            await writer.write(blob(12 * MIB))
            assert writer.temp_name in await leftovers(s3)
            raise ConnectionResetError("client disconnected mid-upload")
    assert await leftovers(s3) == []
    assert not await s3.exists(rel())
    assert await visible(s3) == []


async def test_s3_upload_lost_by_the_store_fails_cleanly(s3):
    with pytest.raises(StoreUnavailable, match="S3 error"):
        async with s3.create(rel()) as writer:
            await writer.write(blob(6 * MIB))
            assert await s3.abort_upload(s3.key(rel()), writer.temp_name)  # store drops it
            await writer.write(blob(5 * MIB))
            await writer.commit()
    assert await leftovers(s3) == []
    assert not await s3.exists(rel())


async def test_s3_check_unreachable_endpoint_is_quick(s3_config):
    (port,) = free_ports(1)
    config = s3_config(s3_endpoint_url=f"http://127.0.0.1:{port}")
    store = S3Backend(config, connect_timeout=1, read_timeout=2, max_attempts=1)
    await store.start()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await store.check()
        with pytest.raises(StoreUnavailable):
            await store.exists(rel())
        assert time.monotonic() - started < 5
    finally:
        await store.close()


@pytest.mark.parametrize("changes", [{"s3_bucket_name": "no-such-bucket"},
                                     {"s3_secret_access_key": "wrong-secret"}])
async def test_s3_check_wrong_bucket_or_credentials(s3_config, changes):
    store = S3Backend(s3_config(**changes), max_attempts=1)
    await store.start()
    try:
        with pytest.raises(StoreUnavailable, match="S3 error"):
            await store.check()
    finally:
        await store.close()


async def test_s3_check_details(s3, s3_endpoint, s3_bucket):
    assert await s3.check() == {
        "s3_bucket": "accessible", "s3_app_folder": "accessible",
        "s3_endpoint": s3_endpoint.endpoint_url, "s3_bucket_name": s3_bucket,
        "s3_app_folder_name": s3.folder}


async def test_s3_not_started_is_unavailable(s3_config):
    with pytest.raises(StoreUnavailable, match="not started"):
        await S3Backend(s3_config()).exists(rel())


@pytest.mark.parametrize(("code", "status", "missing", "expected"), [
    ("EntityTooLarge", 400, None, NoSpace),
    ("QuotaExceeded", 403, None, NoSpace),
    ("NoSuchKey", 404, "gone", ObjectMissing),
    ("404", 404, None, StoreUnavailable),
    ("InternalError", 500, "gone", StoreUnavailable),
])
def test_s3_error_translation(code, status, missing, expected):
    response = {"Error": {"Code": code, "Message": "m"},
                "ResponseMetadata": {"HTTPStatusCode": status}}
    with pytest.raises(expected), translating("store the file", missing):
        raise ClientError(response, "PutObject")


async def test_s3_helper_client_roundtrip(s3_endpoint, s3_bucket):
    await create_bucket(s3_endpoint, s3_bucket)  # idempotent
    async with client(s3_endpoint) as raw:
        assert s3_bucket in [b["Name"] for b in (await raw.list_buckets())["Buckets"]]
