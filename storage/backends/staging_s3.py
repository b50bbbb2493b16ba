"""S3 staging: chunk objects of one part size plus a tail object, assembled at the end.

Keys: ``{app_folder}/_resumable/{file_id}/{n:06d}.chunk`` (exactly ``part`` bytes each,
``part`` = the backend's multipart part size, >= 5 MiB) and ``…/{offset:015d}.tail``
(the remaining ``< part`` bytes).  Why this shape:

- S3 wants every part of a multipart upload but the last to be >= 5 MiB, and tus clients
  send chunks far smaller.  Like tusd's s3store, the incomplete tail lives in an object
  of its own: a PATCH reads it back (at most one part), appends its bytes, stores each
  full part as the next chunk object and the rest as a new tail object (a new key, so a
  crash never leaves the committed tail half-written); the database then records the
  offset and the old tail object is deleted.
- The parts of an unfinished multipart upload cannot be read back, but the sha256 of the
  whole content must be rebuilt from stored bytes when a PATCH lands in a process that
  does not hold the running hash (another worker, another host, after a restart).
  Chunk and tail objects are ordinary objects: readable by any process (one GET each).
- Completion copies them server-side into the final key (``CreateMultipartUpload``,
  ``UploadPartCopy`` per object, ``CompleteMultipartUpload`` with ``If-None-Match: *``)
  and writes the attr object: no byte passes through the element again, and no
  multipart upload stays open between requests.  The prefix is deleted afterwards.
- The prefix has no leading dot: SeaweedFS lists nothing under a dot-directory (its
  multipart area is ``.uploads``), which would hide staged bytes from the sweep.

Costs: a PATCH smaller than a part rewrites the tail (up to one part, as tusd does);
an upload has at most 10,000 parts (``part`` x 10,000 bytes: 48.8 GiB at 5 MiB).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import ClientError

from ..errors import Conflict, PayloadTooLarge
from .base import StoreUnavailable
from .s3 import HASH_IN_THREAD, S3Backend, translating
from .staging import OnTemp, Session, Staging

PREFIX = "_resumable"
MAX_PARTS = 10_000
COPY_CONCURRENCY = 8
DELETE_BATCH = 1000
READ = 1024 * 1024


class _Exists(Exception):
    """The final key already has an object (a conditional write answered 412)."""


def _feed(hashers: Sequence[Any], chunk: bytes) -> None:
    for h in hashers:
        h.update(chunk)


class S3Session(Session):
    """Appends at the committed offset: the old tail, then the new bytes, cut into parts."""

    def __init__(self, stg: S3Staging, file_id: uuid.UUID, offset: int,
                 staging: dict[str, Any], tail: bytes) -> None:
        self._stg, self._id, self._staging = stg, file_id, staging
        self._part, self._chunks = int(staging["part"]), int(staging["chunks"])
        self._buf, self._pos, self._start = bytearray(tail), offset, offset
        self._inflight: asyncio.Task | None = None
        self._new_tail: str | None = None

    async def write(self, chunk: bytes, hashers: Sequence[Any]) -> None:
        if len(chunk) >= HASH_IN_THREAD:
            await asyncio.to_thread(_feed, hashers, chunk)
        else:
            _feed(hashers, chunk)
        self._buf += chunk
        self._pos += len(chunk)
        while len(self._buf) >= self._part:
            if self._chunks + 1 >= MAX_PARTS:
                raise PayloadTooLarge(f"An upload to S3 holds at most {MAX_PARTS} parts of "
                                      f"{self._part} bytes")
            piece = bytes(self._buf[:self._part])
            del self._buf[:self._part]
            await self._drain()
            key = self._stg.chunk_key(self._id, self._chunks)
            self._inflight = asyncio.create_task(self._stg.put(key, piece))
            self._chunks += 1

    async def _drain(self) -> None:
        if self._inflight is not None:
            task, self._inflight = self._inflight, None
            await task

    async def flush(self) -> dict[str, Any]:
        await self._drain()
        if self._pos == self._start:
            return self._staging
        tail = None
        if self._buf:
            tail = f"{self._pos:015d}.tail"
            await self._stg.put(self._stg.key(self._id, tail), bytes(self._buf))
            self._new_tail = tail
        return {"part": self._part, "chunks": self._chunks, "tail": tail,
                "tail_size": len(self._buf)}

    async def committed(self) -> None:
        old = self._staging.get("tail")
        if old and old != self._new_tail and self._pos != self._start:
            await self._stg.delete_keys([self._stg.key(self._id, old)])

    async def discard(self) -> None:
        await self.close()
        if self._new_tail and self._new_tail != self._staging.get("tail"):
            await self._stg.delete_keys([self._stg.key(self._id, self._new_tail)])
        self._new_tail = None

    async def close(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class S3Staging(Staging):
    def __init__(self, backend: S3Backend) -> None:
        self.backend = backend

    def key(self, file_id: uuid.UUID, name: str = "") -> str:
        return self.backend.key(f"{PREFIX}/{file_id}/{name}") if name else \
            f"{self.backend.prefix}{PREFIX}/{file_id}/"

    def chunk_key(self, file_id: uuid.UUID, n: int) -> str:
        return self.key(file_id, f"{n:06d}.chunk")

    def _sources(self, file_id: uuid.UUID, offset: int, staging: dict[str, Any]) -> list[str]:
        """The object keys holding bytes ``0..offset`` in order.  :raises StoreUnavailable:"""
        if not staging:
            staging = {"part": self.backend.part_size, "chunks": 0, "tail": None}
        chunks, tail = int(staging["chunks"]), staging.get("tail")
        if chunks * int(staging["part"]) + int(staging.get("tail_size") or 0) != offset:
            raise StoreUnavailable(f"The staged parts of upload {file_id} do not add up to "
                                   f"its offset {offset}")
        keys = [self.chunk_key(file_id, n) for n in range(chunks)]
        return keys + ([self.key(file_id, tail)] if tail else [])

    async def put(self, key: str, data: bytes) -> None:
        with translating("stage the upload"):
            await self.backend.client.put_object(Bucket=self.backend.bucket, Key=key, Body=data)

    async def _get(self, key: str) -> bytes:
        with translating("read the upload", f"Staged object {key} is missing"):
            resp = await self.backend.client.get_object(Bucket=self.backend.bucket, Key=key)
            async with resp["Body"] as body:
                return await body.read()

    async def create(self, file_id: uuid.UUID) -> dict[str, Any]:
        return {"part": self.backend.part_size, "chunks": 0, "tail": None, "tail_size": 0}

    async def open(self, file_id: uuid.UUID, offset: int, staging: dict[str, Any]) -> Session:
        staging = staging or await self.create(file_id)
        self._sources(file_id, offset, staging)  # consistency check
        tail = staging.get("tail")
        data = await self._get(self.key(file_id, tail)) if tail else b""
        if len(data) != int(staging.get("tail_size") or 0):
            raise StoreUnavailable(f"The staged tail of upload {file_id} has {len(data)} bytes, "
                                   f"not {staging.get('tail_size')}")
        return S3Session(self, file_id, offset, staging, data)

    async def hash_into(self, file_id: uuid.UUID, offset: int, staging: dict[str, Any],
                        hasher: Any) -> None:
        client, bucket = self.backend.client, self.backend.bucket
        for key in self._sources(file_id, offset, staging):
            with translating("read the upload", f"Staged object {key} is missing"):
                resp = await client.get_object(Bucket=bucket, Key=key)
                async with resp["Body"] as body:
                    async for data in body.iter_chunks(READ):
                        await asyncio.to_thread(hasher.update, data)

    async def publish(self, file_id: uuid.UUID, offset: int, staging: dict[str, Any],
                      relpath: str, attr: bytes, *, content_type: str, checksum: str,
                      tag: str, on_temp: OnTemp | None = None) -> None:
        sources, key = self._sources(file_id, offset, staging), self.backend.key(relpath)
        args = (key, sources, content_type,
                {"checksum": checksum, "original_size": str(offset), "upload": tag}, on_temp)
        try:
            await self._assemble(*args)
        except _Exists:
            head = await self.backend._head(key)
            if head is not None and head.get("Metadata", {}).get("upload") != tag:
                raise Conflict(f"Another file is stored at {relpath}") from None
            # this upload's own object from an attempt that died before the database commit
            await self.backend.delete(relpath)
            await self._assemble(*args)
        await self.backend.write_attr(relpath, attr)

    async def _assemble(self, key: str, sources: list[str], content_type: str,
                        meta: dict[str, str], on_temp: OnTemp | None) -> None:
        client, bucket = self.backend.client, self.backend.bucket
        with translating("store the file"):
            try:
                if not sources:
                    await client.put_object(Bucket=bucket, Key=key, Body=b"", Metadata=meta,
                                            ContentType=content_type, IfNoneMatch="*")
                    return
                upload = await client.create_multipart_upload(
                    Bucket=bucket, Key=key, ContentType=content_type, Metadata=meta)
                upload_id = upload["UploadId"]
                try:
                    if on_temp is not None:  # named where recovery finds it (issue 24)
                        await on_temp(upload_id)
                    parts = await self._copy_parts(key, upload_id, sources)
                    await client.complete_multipart_upload(
                        Bucket=bucket, Key=key, UploadId=upload_id,
                        MultipartUpload={"Parts": parts}, IfNoneMatch="*")
                except BaseException:
                    await asyncio.shield(self.backend.abort_upload(key, upload_id))
                    raise
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
                    raise _Exists(key) from exc
                raise

    async def _copy_parts(self, key: str, upload_id: str,
                          sources: list[str]) -> list[dict[str, Any]]:
        """``UploadPartCopy`` of every source, a few at a time; the parts list in order."""
        client, bucket = self.backend.client, self.backend.bucket
        gate = asyncio.Semaphore(COPY_CONCURRENCY)

        async def copy(number: int, source: str) -> dict[str, Any]:
            async with gate:
                resp = await client.upload_part_copy(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                    CopySource={"Bucket": bucket, "Key": source})
            return {"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]}

        return list(await asyncio.gather(*(copy(n, s) for n, s in enumerate(sources, 1))))

    async def delete_keys(self, keys: list[str]) -> None:
        client, bucket = self.backend.client, self.backend.bucket
        with translating("remove the upload"):
            for i in range(0, len(keys), DELETE_BATCH):
                batch = [{"Key": k} for k in keys[i:i + DELETE_BATCH]]
                await client.delete_objects(Bucket=bucket, Delete={"Objects": batch,
                                                                   "Quiet": True})

    async def discard(self, file_id: uuid.UUID) -> None:
        keys: list[str] = []
        paginator = self.backend.client.get_paginator("list_objects_v2")
        with translating("list the upload"):
            async for page in paginator.paginate(Bucket=self.backend.bucket,
                                                 Prefix=self.key(file_id)):
                keys += [o["Key"] for o in page.get("Contents", ())]
        if keys:
            await self.delete_keys(keys)

    async def staged_ids(self) -> list[uuid.UUID]:
        found: list[uuid.UUID] = []
        root = f"{self.backend.prefix}{PREFIX}/"
        paginator = self.backend.client.get_paginator("list_objects_v2")
        with translating("list the uploads"):
            async for page in paginator.paginate(Bucket=self.backend.bucket, Prefix=root,
                                                 Delimiter="/"):
                for p in page.get("CommonPrefixes", ()):
                    try:
                        found.append(uuid.UUID(p["Prefix"][len(root):].strip("/")))
                    except ValueError:
                        continue
        return found
