"""S3 backend on aiobotocore: two clients per backend (downloads' streams have their own
connection pool), streamed multipart uploads.

Keys are ``{app_folder}/{relpath}[.attr.json]``.  Objects below ``s3_multipart_threshold``
take one ``put_object``; larger ones a multipart upload of threshold-sized parts, one part
uploading while the next fills (two part buffers alive).  Commits send ``If-None-Match: *``
(never clobber; a 412 is a :class:`Conflict`), and every object carries its upload's tag
(``upload`` metadata, the WAL txid): SeaweedFS does not apply the condition atomically to
concurrent completes, so an undo removes only an object whose tag is its own, and a commit
that botocore retried after a lost response recognises its own object (issue 24).
Unlike upstream (reference §12, §8.4) the readiness probe never writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiobotocore.session import AioSession
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from ..config import Config
from ..errors import Conflict
from .base import (
    ATTR_SUFFIX,
    Backend,
    Hasher,
    NoSpace,
    ObjectInfo,
    ObjectMissing,
    Reader,
    SizeMismatch,
    StoreUnavailable,
    Writer,
)

log = logging.getLogger(__name__)
MIN_PART = 5 * 1024 * 1024  # S3's minimum size of every part but the last
HASH_IN_THREAD = 256 * 1024  # hash chunks at least this big off the event loop
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}
_SPACE = {"EntityTooLarge", "QuotaExceeded", "XMinioStorageFull", "InsufficientStorage"}
_SESSION: AioSession | None = None
NOT_DATA = ("_resumable", ".quarantine")  # staged tus bytes, scrub's quarantine


def _session() -> AioSession:
    """One botocore session per process: it caches the parsed S3 service model, so each
    further client takes ~10 ms instead of ~150 ms (an app, a test, a CLI command)."""
    global _SESSION  # noqa: PLW0603 - a process-wide cache, no state of any element
    if _SESSION is None:
        _SESSION = AioSession()
    return _SESSION


@contextlib.contextmanager
def translating(what: str, missing: str | None = None) -> Iterator[None]:
    """Turn botocore/aiohttp errors into domain errors.  :raises ObjectMissing: on a 404
    when ``missing`` (its message) is given, NoSpace: on size/quota, StoreUnavailable: else"""
    try:
        yield
    except ClientError as exc:
        error, meta = exc.response.get("Error", {}), exc.response.get("ResponseMetadata", {})
        code, status = str(error.get("Code", "")), meta.get("HTTPStatusCode")
        if missing and (code in _MISSING or status in (404, 412)):  # 412: If-Match
            raise ObjectMissing(missing) from exc
        if code in _SPACE or status == 507:
            raise NoSpace(f"Not enough storage space to {what} ({code})") from exc
        message = error.get("Message") or status
        raise StoreUnavailable(f"S3 error while trying to {what}: {code} {message}") from exc
    except (BotoCoreError, aiohttp.ClientError, OSError) as exc:  # OSError covers timeouts
        raise StoreUnavailable(f"S3 is unreachable while trying to {what}: {exc}") from exc


class S3Writer(Writer):
    """Buffers below the threshold, then streams parts.  Metadata ``checksum`` and
    ``original_size`` is exact for single puts; multipart metadata precedes the data, so it
    only has ``original_size`` from ``size_hint`` (the attr document holds the checksum)."""

    def __init__(self, backend: S3Backend, relpath: str, size_hint: int | None,
                 content_type: str | None) -> None:
        self.relpath, self.hasher = relpath, Hasher()
        self._backend, self._key = backend, backend.key(relpath)
        self._size_hint, self._content_type = size_hint, content_type or "application/octet-stream"
        self._buf, self._upload_id, self._finished = io.BytesIO(), "", False
        self._parts: list[dict[str, Any]] = []
        self._inflight: asyncio.Task[dict[str, Any]] | None = None

    @property
    def temp_name(self) -> str:
        return self._upload_id

    async def write(self, chunk: bytes) -> None:
        if self._finished:
            raise StoreUnavailable("The upload was already committed or aborted")
        if len(chunk) >= HASH_IN_THREAD:
            await asyncio.to_thread(self.hasher.update, chunk)
        else:
            self.hasher.update(chunk)
        view, part_size = memoryview(chunk), self._backend.part_size
        while view:
            view = view[self._buf.write(view[:part_size - self._buf.tell()]):]
            if self._buf.tell() == part_size:
                await self._ship()

    async def _ship(self) -> None:
        """Detach the buffer as the next part, wait for the part in flight, upload this one.

        The first time, the multipart upload is created and announced (:attr:`on_temp`)
        before its first part is sent.  :raises StoreUnavailable: / NoSpace:"""
        part, self._buf = self._buf, io.BytesIO()
        part.seek(0)
        client, bucket = self._backend.client, self._backend.bucket
        if not self._upload_id:
            meta = {} if self._size_hint is None else {"original_size": str(self._size_hint)}
            meta.update(self._owner())
            with translating("store the file"):
                resp = await client.create_multipart_upload(
                    Bucket=bucket, Key=self._key, ContentType=self._content_type,
                    Metadata=meta)
            self._upload_id = resp["UploadId"]  # from here on abort() aborts it
            if self.on_temp is not None:  # outside translating: its errors are its own
                await self.on_temp(self._upload_id)
        with translating("store the file"):
            await self._drain()
        self._inflight = asyncio.create_task(client.upload_part(
            Bucket=bucket, Key=self._key, Body=part, UploadId=self._upload_id,
            PartNumber=len(self._parts) + 1))

    async def _drain(self) -> None:
        """Await and record the part in flight.  On failure it stays referenced so
        :meth:`abort` waits for it: a part landing after the abort would be an orphan."""
        if self._inflight is not None:
            etag = (await self._inflight)["ETag"]
            self._parts.append({"PartNumber": len(self._parts) + 1, "ETag": etag})
            self._inflight = None

    def _owner(self) -> dict[str, str]:
        return {"upload": self.tag} if self.tag else {}

    async def commit(self, attr: bytes | None = None) -> None:
        """Single put or complete the upload, then the attr object if given.

        :raises Conflict: another upload's object is at the key (412)
        :raises StoreUnavailable: / NoSpace:"""
        if self._finished:
            raise StoreUnavailable("The upload was already committed or aborted")
        client, bucket = self._backend.client, self._backend.bucket
        with translating("store the file"):
            try:
                if not self._upload_id:
                    meta = {"checksum": self.sha256, "original_size": str(self.size),
                            **self._owner()}
                    self._buf.seek(0)
                    self.landed = True  # from here on the object may be there
                    await client.put_object(Bucket=bucket, Key=self._key, Body=self._buf,
                                            ContentType=self._content_type, Metadata=meta,
                                            IfNoneMatch="*")
                else:
                    if self._buf.tell():
                        await self._ship()
                    await self._drain()
                    self.landed = True
                    await client.complete_multipart_upload(
                        Bucket=bucket, Key=self._key, UploadId=self._upload_id,
                        MultipartUpload={"Parts": self._parts}, IfNoneMatch="*")
            except ClientError as exc:
                if not await self._landed_anyway(exc):
                    raise
        self._finished, self._buf = True, io.BytesIO()
        if attr is not None:
            await self._backend.write_attr(self.relpath, attr)

    async def _landed_anyway(self, exc: ClientError) -> bool:
        """After a refused commit: True when the object at the key is this upload's own
        (botocore retried a request whose response was lost: the retry meets the first
        attempt's object, 412, or its completed upload, NoSuchUpload).

        :raises Conflict: another upload's object is there (412)"""
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status != 412 and not (self._upload_id and code == "NoSuchUpload"):
            return False
        head = await self._backend._head(self._key)
        if head is not None and self.tag and head.get("Metadata", {}).get("upload") == self.tag:
            return True
        if status != 412:
            return False
        self.landed = False  # refused: nothing of ours is at the key
        raise Conflict(f"Another file is stored at {self.relpath}") from None

    async def abort(self) -> None:
        """Cancel the part in flight, abort the upload; idempotent.  Never raises: a failed
        abort is logged and left to ``remove_stray_temps``."""
        if not self._finished:
            self._finished, self._buf = True, io.BytesIO()
            await asyncio.shield(self._abort())

    async def _abort(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._upload_id:
            try:
                await self._backend.abort_upload(self._key, self._upload_id)
            except StoreUnavailable as exc:
                self.left = True  # the caller keeps the intent naming it for recovery
                log.warning("Left upload %s of %s: %s", self._upload_id, self._key, exc.detail)


class S3Reader(Reader):
    """An object at a unique key (commits never overwrite); each range is one GET.

    Opened without a HEAD (``verify``), the first GET checks the object's total size in
    its Content-Range against ``info.size``.
    """

    def __init__(self, backend: S3Backend, key: str, info: ObjectInfo, *,
                 verify: bool = False) -> None:
        self._backend, self._key, self.info = backend, key, info
        self._verify = verify  # info.version, when set, is also checked (If-Match)

    def _check_size(self, resp: dict[str, Any]) -> None:
        total = str(resp.get("ContentRange", "")).rpartition("/")[2]
        if total != str(self.info.size):
            raise SizeMismatch(f"Stored object {self._key} has {total or 'an unknown number'} "
                               f"of bytes, not {self.info.size}")
        self._verify = False

    async def iter_range(self, start: int, end: int, chunk_size: int) -> AsyncIterator[bytes]:
        """Stream one ranged GET.  :raises ObjectMissing: / StoreUnavailable:"""
        if end < start:
            return
        missing, sent = f"Stored data at {self._key} is missing", 0
        with translating("read the file", missing=missing):
            extra = {"IfMatch": self.info.version} if self.info.version else {}
            resp = await self._backend.streams.get_object(
                Bucket=self._backend.bucket, Key=self._key, Range=f"bytes={start}-{end}",
                **extra)
            async with resp["Body"] as body:
                if self._verify:
                    self._check_size(resp)
                if self.info.version is None and resp.get("ETag"):
                    self.info = dataclasses.replace(self.info, version=resp["ETag"])
                async for data in body.iter_chunks(chunk_size):
                    sent += len(data)
                    yield data
        if sent != end - start + 1:
            raise StoreUnavailable("The stored file is shorter than its metadata says")

    async def close(self) -> None:
        """Nothing to release: every :meth:`iter_range` closes its own response."""


class S3Backend(Backend):
    name = "s3"

    def __init__(self, config: Config, *, connect_timeout: float = 5.0,
                 read_timeout: float = 60.0, max_attempts: int = 3) -> None:
        self.bucket, self.folder = config.s3_bucket_name, config.s3_app_folder.strip("/")
        self.location, self.prefix = f"{self.bucket}/{self.folder}", self.folder + "/"
        self.part_size = max(config.s3_multipart_threshold, MIN_PART)
        self._config, self._stack = config, contextlib.AsyncExitStack()
        self._client: Any = None
        self._streams: Any = None
        self._boto_config = BotoConfig(
            region_name=config.s3_region, s3={"addressing_style": config.s3_addressing_style},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            max_pool_connections=config.s3_max_connections)

    def key(self, relpath: str) -> str:
        """The object key of ``relpath``.  :raises ObjectMissing: on ``..``/empty segments"""
        rel = relpath.lstrip("/")
        if not rel or any(part in ("", ".", "..") for part in rel.split("/")):
            raise ObjectMissing(f"Invalid storage path: {relpath}")
        return f"{self.folder}/{rel}"

    @property
    def client(self) -> Any:
        """The aiobotocore client.  :raises StoreUnavailable: before :meth:`start`"""
        if self._client is None:
            raise StoreUnavailable("The S3 backend is not started")
        return self._client

    @property
    def streams(self) -> Any:
        """The client of downloads' ranged GETs: a pool of its own, so connections that
        slow readers hold never starve uploads, lookups or readiness (issue 24).
        :raises StoreUnavailable: before :meth:`start`"""
        if self._streams is None:
            raise StoreUnavailable("The S3 backend is not started")
        return self._streams

    async def start(self) -> None:
        """Create the two clients (no network traffic until the first request)."""
        if self._client is None:
            cfg = self._config

            def make() -> Any:
                return _session().create_client(
                    "s3", endpoint_url=cfg.s3_endpoint_url, region_name=cfg.s3_region,
                    aws_access_key_id=cfg.s3_access_key_id,
                    aws_secret_access_key=cfg.s3_secret_access_key, config=self._boto_config)

            self._client = await self._stack.enter_async_context(make())
            self._streams = await self._stack.enter_async_context(make())

    async def close(self) -> None:
        self._client = self._streams = None
        await self._stack.aclose()

    def create(self, relpath: str, size_hint: int | None = None, *,
               content_type: str | None = None) -> Writer:
        return S3Writer(self, relpath, size_hint, content_type)

    async def _head(self, key: str) -> dict[str, Any] | None:
        """``head_object`` of ``key``, or None when it does not exist."""
        with contextlib.suppress(ObjectMissing), translating("look up the file", "absent"):
            return await self.client.head_object(Bucket=self.bucket, Key=key)
        return None

    async def open(self, relpath: str, *, expect_size: int | None = None,
                   expect_version: str | None = None) -> Reader:
        key = self.key(relpath)
        if expect_size:  # the first ranged GET checks existence and size: no HEAD first
            return S3Reader(self, key, ObjectInfo(size=expect_size, version=expect_version),
                            verify=True)
        head = await self._head(key)
        if head is None or expect_version is not None and head.get("ETag") != expect_version:
            raise ObjectMissing(f"Stored data for {relpath} is missing")
        return S3Reader(self, key, ObjectInfo(size=head["ContentLength"],
                                              version=head.get("ETag")))

    async def read_attr(self, relpath: str) -> bytes:
        key = self.key(relpath + ATTR_SUFFIX)
        with translating("read the attribute file", f"Attribute file for {relpath} is missing"):
            resp = await self.client.get_object(Bucket=self.bucket, Key=key)
            async with resp["Body"] as body:
                return await body.read()

    async def write_attr(self, relpath: str, data: bytes) -> None:
        key = self.key(relpath + ATTR_SUFFIX)
        with translating("write the attribute file"):
            await self.client.put_object(Bucket=self.bucket, Key=key, Body=data,
                                         ContentType="application/json")

    async def delete(self, relpath: str, *, owner: str | None = None) -> bool:
        """Delete data then attr (an attr never outlives its data); True if data existed.

        With ``owner``: only if the data object is that upload's (its ``upload``
        metadata; an object written before uploads were tagged counts as the owner's)."""
        key = self.key(relpath)
        head = await self._head(key)
        existed = head is not None
        if owner is not None and head is not None \
                and head.get("Metadata", {}).get("upload", owner) != owner:
            log.warning("Left %s in place: another upload wrote it, not %s", key, owner)
            return False
        with translating("delete the file"):
            await self.client.delete_object(Bucket=self.bucket, Key=key)
            await self.client.delete_object(Bucket=self.bucket, Key=key + ATTR_SUFFIX)
        return existed

    async def exists(self, relpath: str) -> bool:
        return await self._head(self.key(relpath)) is not None

    async def iter_attr_paths(self) -> AsyncIterator[str]:
        """Relpaths with an attr document, one ``list_objects_v2`` page at a time."""
        paginator = self.client.get_paginator("list_objects_v2")
        with translating("list the stored files"):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", ()):
                    if obj["Key"].endswith(ATTR_SUFFIX):
                        yield obj["Key"][len(self.prefix):-len(ATTR_SUFFIX)]

    async def iter_bare_data(self, older_than_s: float) -> AsyncIterator[str]:
        """Data objects without their attr object (keys come sorted, and ``X.attr.json``
        sorts soon after ``X``: only the data keys whose attr key is not yet passed are
        held), last modified ``older_than_s`` ago or earlier."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        skip = tuple(f"{self.prefix}{d}/" for d in NOT_DATA)
        waiting: dict[str, datetime] = {}  # data key -> last modified, attr not seen yet
        paginator = self.client.get_paginator("list_objects_v2")
        with translating("list the stored files"):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", ()):
                    key = obj["Key"]
                    if key.startswith(skip):
                        continue
                    while waiting and (first := next(iter(waiting))) + ATTR_SUFFIX < key:
                        if waiting.pop(first) <= cutoff:
                            yield first[len(self.prefix):]
                    if key.endswith(ATTR_SUFFIX):
                        waiting.pop(key[:-len(ATTR_SUFFIX)], None)
                    else:
                        waiting[key] = obj["LastModified"]
        for key, modified in waiting.items():
            if modified <= cutoff:
                yield key[len(self.prefix):]

    async def check(self) -> dict[str, Any]:
        """``head_bucket`` plus a one-key listing; never writes (upstream PUT ``.keep``)."""
        endpoint = self._config.s3_endpoint_url
        with translating(f"reach bucket {self.bucket!r} at {endpoint}"):
            await self.client.head_bucket(Bucket=self.bucket)
            await self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        return {"s3_bucket": "accessible", "s3_app_folder": "accessible", "s3_endpoint": endpoint,
                "s3_bucket_name": self.bucket, "s3_app_folder_name": self.folder}

    async def abort_upload(self, key: str, upload_id: str) -> bool:
        """Abort one multipart upload (e.g. a WAL ``temp_name``); False if already gone."""
        with contextlib.suppress(ObjectMissing), translating("abort the upload", "gone"):
            await self.client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                     UploadId=upload_id)
            return True
        return False

    async def free_bytes(self) -> int | None:
        return None  # a bucket has no free space to report; capacity is STORAGE_MAX_SIZE

    async def discard_temp(self, relpath: str, temp_name: str) -> bool:
        """Abort the multipart upload ``temp_name`` of ``relpath`` (a WAL intent names it
        from before its first part was sent, see :attr:`Writer.on_temp`)."""
        return bool(temp_name) and await self.abort_upload(self.key(relpath), temp_name)

    async def remove_stray_temps(self, older_than_s: float = 0,
                                 keep: frozenset[str] = frozenset()) -> int:
        """Abort multipart uploads under the app folder initiated ``older_than_s`` ago,
        except those ``keep`` names (a live upload may run for hours)."""
        cutoff, removed = datetime.now(UTC) - timedelta(seconds=older_than_s), 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        with translating("list stale uploads"):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for up in page.get("Uploads", ()):
                    if up["Initiated"] <= cutoff and up["UploadId"] not in keep:
                        removed += await self.abort_upload(up["Key"], up["UploadId"])
        return removed
