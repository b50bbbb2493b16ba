"""The steps of a resumable upload, each taken under the upload's lease: stage a body and
move the offset, complete (the commit protocol of every upload), remove.  Called by the
requests and by recovery's resolver in :mod:`storage.domain.resumable`, which describes
the protocol.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ..backends import make_staging
from ..backends.staging import Session, Staging
from ..db import repo, repo_uploads
from ..db.repo_uploads import ResumableUpload
from ..errors import (
    BadRequest,
    ChecksumMismatch,
    ClientGone,
    Conflict,
    InsufficientStorage,
    PayloadTooLarge,
    StorageError,
    Unavailable,
)
from ..models import FileMeta, Identity, utcnow
from . import faults, reservations, uploads
from .element import Element
from .resumable_lease import Lease, expiry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Checksum:
    """``Upload-Checksum: <algorithm> <base64 digest>`` of one PATCH body."""

    algorithm: str
    digest: bytes

    def hasher(self) -> Any:
        return CHECKSUMS[self.algorithm]()


# Upload-Checksum algorithms (the tus checksum extension) and their hashers
CHECKSUMS: dict[str, Callable[[], Any]] = {
    "sha1": hashlib.sha1, "sha256": hashlib.sha256,
    "md5": lambda: hashlib.md5(usedforsecurity=False)}


@dataclass(slots=True)
class Append:
    offset: int
    length: int | None = None  # Upload-Length sent with a PATCH (deferred uploads)
    checksum: Checksum | None = None
    content_length: int | None = None


@dataclass(slots=True)
class Progress:
    upload: ResumableUpload
    received: int = 0
    completed: bool = False
    rehashed: bool = False


class Hashes:
    """The running sha256 of the uploads this process appended to last, by offset.

    Keyed by the upload's own identity, its ``transaction_id`` (new for every creation),
    never by the file id: an upload terminated or expired in another process and created
    again under the same id must not find this one's hash (issue 23, finding 1).
    Bounded (least recently used out); a miss costs one rebuild from the staged bytes.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._items: OrderedDict[uuid.UUID, tuple[int, Any]] = OrderedDict()

    def get(self, txid: uuid.UUID, offset: int) -> Any | None:
        """A copy (a refused chunk must not reach the kept one) when it is at ``offset``."""
        item = self._items.get(txid)
        if item is None or item[0] != offset:
            return None
        self._items.move_to_end(txid)
        return item[1].copy()

    def put(self, txid: uuid.UUID, offset: int, hasher: Any) -> None:
        self._items[txid] = (offset, hasher)
        self._items.move_to_end(txid)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def drop(self, txid: uuid.UUID) -> None:
        self._items.pop(txid, None)


def check_length(el: Element, length: int | None) -> None:
    """A length (declared, or received so far) the element can never hold is refused
    before anything is reserved (a length near 2**63 would overflow the reservation's
    sum in the database): :raises PayloadTooLarge: (413) over an explicit
    ``STORAGE_MAX_FILE_SIZE`` / InsufficientStorage: (507) over the capacity."""
    cap = el.config.storage_max_file_size
    if length is not None and cap > 0 and length > cap:
        raise PayloadTooLarge(f"Upload-Length {length} exceeds the maximum file size of {cap} "
                              "bytes", headers={"Connection": "close"})
    if length is not None and length > reservations.max_file_size(el):
        raise reservations.over_limit(el, length)


async def check_pending(el: Element, sub: str, extra: int = 0) -> None:
    """``UPLOAD_MAX_PENDING_BYTES``: what ``sub``'s unfinished uploads hold reserved (plus
    ``extra`` not reserved yet) may not exceed it.  Called after each reservation of a
    resumable upload is made (so two requests racing both see each other's: at worst
    both are refused, never both let through), and with ``extra`` before one is made.

    :raises InsufficientStorage: (507) -- the caller undoes the reservation it made."""
    limit = el.config.upload_max_pending_bytes
    if limit <= 0:
        return
    held = extra + (await repo_uploads.pending_bytes(el.db, sub) if extra <= limit else 0)
    if held > limit:
        raise InsufficientStorage(
            f"Not enough capacity for this caller: its unfinished resumable uploads would "
            f"hold {held} bytes, more than the {limit} one caller may hold "
            "(UPLOAD_MAX_PENDING_BYTES); finish or terminate some first",
            headers={"Connection": "close"})


async def _grow(el: Element, up: ResumableUpload, reserved: int, need: int) -> int:
    """Grow a deferred upload's reservation to cover ``need`` bytes, within the capacity
    and the creator's ``UPLOAD_MAX_PENDING_BYTES`` (a refused growth is given back)."""
    grown = await reservations.grow(el, up.transaction_id, reserved, need,
                                    reservations.max_file_size(el))
    while True:
        try:
            await check_pending(el, up.created_by_id)
            return grown
        except InsufficientStorage:
            # a whole growth step is over the bound: just what is needed, else nothing
            grown = need if grown > need else reserved
            await asyncio.shield(repo_uploads.shrink_reservation(el.db, up.transaction_id,
                                                                 grown))
            if grown == reserved:
                raise


async def _declare_length(el: Element, lease: Lease, up: ResumableUpload,
                          length: int) -> None:
    if up.upload_length is not None:
        if length != up.upload_length:
            raise BadRequest(f"Upload-Length is {up.upload_length} already; it cannot change")
        return
    if length < up.upload_offset:
        raise BadRequest(f"Upload-Length {length} is less than the {up.upload_offset} bytes "
                         "already received")
    check_length(el, length)
    await reservations.reserve(el, up.transaction_id, length, insert=None)  # exactly that, now
    try:
        await check_pending(el, up.created_by_id)
    except InsufficientStorage:
        await asyncio.shield(repo_uploads.shrink_reservation(el.db, up.transaction_id,
                                                             up.reserved_bytes))
        raise
    if not await repo_uploads.declare_length(el.db, up.file_id, lease.owner, length):
        raise Unavailable(f"Upload {up.file_id} changed under the request; retry")
    up.upload_length, up.reserved_bytes = length, length


async def _rehash(el: Element, stg: Staging, up: ResumableUpload) -> Any:
    """The sha256 of the first ``upload_offset`` staged bytes, read back from the store."""
    hasher = hashlib.sha256()
    await stg.hash_into(up.file_id, up.upload_offset, up.staging, hasher)
    return hasher


async def append_body(el: Element, hashes: Hashes | None, lease: Lease, up: ResumableUpload,
                  req: Append, body: AsyncIterator[bytes] | None, *,
                  keep_partial: bool = True) -> Progress:
    """Stage ``body`` at the upload's offset, make it durable, then move the offset."""
    if req.offset != up.upload_offset:
        raise Conflict(f"Upload-Offset {req.offset} does not match the upload's offset "
                       f"{up.upload_offset}")
    if req.length is not None:
        await _declare_length(el, lease, up, req.length)
    left = None if up.upload_length is None else up.upload_length - up.upload_offset
    if req.content_length is not None and left is not None and req.content_length > left:
        raise PayloadTooLarge(f"The body has {req.content_length} bytes but only {left} of the "
                              f"upload's {up.upload_length} are missing; nothing was stored",
                              headers={"Connection": "close"})
    progress = Progress(up)
    if body is None or req.content_length == 0:
        return progress
    stg = make_staging(el.backend)
    hasher = hashes.get(up.transaction_id, up.upload_offset) if hashes is not None else None
    if hasher is None:
        hasher, progress.rehashed = await _rehash(el, stg, up), up.upload_offset > 0
        if hashes is not None:  # kept even if this request's bytes are refused
            hashes.put(up.transaction_id, up.upload_offset, hasher.copy())
    session = await stg.open(up.file_id, up.upload_offset, up.staging)
    try:
        staging, received, reserved, cut = await _stage(el, lease, up, req, body, session,
                                                        hasher, keep_partial)
        if received == 0:
            return progress
        now, offset = utcnow(), up.upload_offset + received
        # Never undone from here on: once flushed, the bytes may be what the database
        # records (a lost reply), and a lease lost to another writer must not be touched.
        full = up.upload_length == offset  # completion follows, under the same lease
        if not await repo_uploads.advance(el.db, up.file_id, lease.owner,
                                          expected=up.upload_offset, offset=offset,
                                          staging=staging, at=now, expires_at=expiry(el, now),
                                          keep_lease=full):
            raise Unavailable(f"Upload {up.file_id} changed under the request; retry",
                              headers={"Retry-After": "1"})
        if not full:
            lease.given_up()  # released by that statement: one round trip less
        await session.committed()
    finally:
        await session.close()
    if hashes is not None:
        hashes.put(up.transaction_id, offset, hasher)
    up.upload_offset, up.staging, up.updated_at = offset, staging, now
    up.expires_at, up.reserved_bytes = expiry(el, now), max(reserved, up.reserved_bytes)
    progress.received = received
    await faults.point(el, "tus.after_commit")
    if cut is not None:
        raise cut  # what arrived is stored; the client is gone or too slow anyway
    return progress


async def _stage(el: Element, lease: Lease, up: ResumableUpload, req: Append,
                 body: AsyncIterator[bytes], session: Session, hasher: Any,
                 keep_partial: bool) -> tuple[dict[str, Any], int, int, StorageError | None]:
    """Stream ``body`` into ``session`` and flush it: (staging, bytes, reservation, the
    error that cut the body short if its bytes are kept).  On any error before the flush
    the session's bytes are discarded (the offset never moves for them)."""
    check = req.checksum.hasher() if req.checksum is not None else None
    feeds = [hasher] if check is None else [hasher, check]
    left = None if up.upload_length is None else up.upload_length - up.upload_offset
    received, reserved, cut = 0, up.reserved_bytes, None
    try:
        chunks = aiter(body)
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                cut = ClientGone(f"The upload was interrupted: {exc}")
                break
            except StorageError as exc:  # the body ended early, or came too slowly (408)
                cut = exc
                break
            received += len(chunk)
            if left is not None and received > left:
                raise PayloadTooLarge(f"The body goes past Upload-Length "
                                      f"({up.upload_length}); nothing was stored",
                                      headers={"Connection": "close"})
            total = up.upload_offset + received
            if left is None:
                check_length(el, total)
                if total > reserved:
                    reserved = await _grow(el, up, reserved, total)
            await session.write(chunk, feeds)
            lease.check()
        if cut is not None and (not keep_partial or check is not None or received == 0):
            raise cut
        if check is not None and not hmac.compare_digest(check.digest(), req.checksum.digest):
            raise ChecksumMismatch(f"The body's {req.checksum.algorithm} does not match "
                                   "Upload-Checksum; the chunk was discarded")
        if received == 0:
            return up.staging, 0, reserved, None
        await faults.point(el, "tus.after_write")
        staging = await session.flush()
        lease.check()
    except BaseException:
        if not lease.lost:  # else another writer may own the staged bytes by now
            await asyncio.shield(session.discard())
        raise
    return staging, received, reserved, cut


def file_meta(up: ResumableUpload, checksum: str) -> FileMeta:
    """The finished upload's metadata row, with the names fixed at its creation."""
    who = Identity(sub=up.created_by_id, name=up.created_by_username, role="user",
                   token_type="access", is_service_account=False)
    spec = uploads.UploadSpec(original_filename=up.original_filename,
                              content_type=up.content_type, file_id=up.file_id,
                              description=up.description, version=up.version,
                              metadata=up.metadata_json)
    meta = uploads.build_meta(spec, who, up.file_id, up.created_at)
    meta.storage_path, meta.storage_filename = up.storage_path, up.storage_filename
    meta.file_size, meta.checksum = up.upload_offset, checksum
    meta.metadata_json = up.metadata_json or None
    return meta


async def complete(el: Element, hashes: Hashes | None, lease: Lease,
                    up: ResumableUpload) -> None:
    """Make the full upload an ordinary file (see the module docstring); idempotent.

    :raises Conflict: the file_id was taken meanwhile (the upload is removed).
    """
    stg = make_staging(el.backend)
    if up.wal_status != "committed":
        if await repo.get_file(el.db, up.file_id) is not None:  # taken meanwhile
            await _refuse_completion(el, hashes, up, lease, published=False)
        hasher = hashes.get(up.transaction_id, up.upload_offset) if hashes is not None else None
        if hasher is None:
            hasher = await _rehash(el, stg, up)
        meta = file_meta(up, hasher.hexdigest())
        try:
            await stg.publish(up.file_id, up.upload_offset, up.staging, meta.relative_path,
                              uploads.attr_document(meta), content_type=meta.content_type,
                              checksum=meta.checksum, tag=str(up.transaction_id),
                              on_temp=functools.partial(repo.set_wal_temp, el.db,
                                                        up.transaction_id))
        except Conflict:  # another file has the very name: it must stay
            await _refuse_completion(el, hashes, up, lease, published=False)
        await faults.point(el, "tus.after_publish")
        try:
            await uploads.finish(el, meta, up.transaction_id)
        except Conflict:
            await _refuse_completion(el, hashes, up, lease, published=True)
        except (BadRequest, uploads.Abandoned) as exc:
            # the element left the upload modes (or recovery resolved the intent): the
            # published file goes again; the staged upload stays for a later attempt
            await _quietly(el.backend.delete(up.relative_path), f"remove {up.relative_path}")
            if isinstance(exc, BadRequest):
                # not a plain refusal: the bytes stay and the file is made later (the body
                # says so, ``upload_kept``, so a client or a checker can tell)
                raise BadRequest(f"{exc.detail}: the upload's {up.upload_offset} bytes are "
                                 "kept; it becomes a file once uploads are allowed again "
                                 "(by the next HEAD or PATCH, or the recovery pass), or "
                                 "expires", extra={"upload_kept": True,
                                                   "upload_offset": up.upload_offset}
                                 ) from None
            raise
        await faults.point(el, "tus.after_finish")
    now = utcnow()
    await repo_uploads.mark_completed(el.db, up.file_id, now, expiry(el, now))
    lease.given_up()
    up.completed_at, up.upload_offset, up.staging = now, up.upload_length or 0, {}
    up.wal_status, up.expires_at = "committed", expiry(el, now)
    if hashes is not None:
        hashes.drop(up.transaction_id)
    await _quietly(stg.discard(up.file_id), f"remove the staged bytes of {up.file_id}")


async def _refuse_completion(el: Element, hashes: Hashes | None, up: ResumableUpload,
                             lease: Lease, *, published: bool) -> None:
    """The file id was taken by another upload meanwhile: what this one published goes
    (never the other file), then the upload.  :raises Conflict:"""
    reason = f"File with ID {up.file_id} already exists; the upload was removed"
    if published:
        await _quietly(el.backend.delete(up.relative_path), f"remove {up.relative_path}")
    await asyncio.shield(remove(el, hashes, up, lease, f"completion refused: {reason}"))
    raise Conflict(reason)


async def remove(el: Element, hashes: Hashes | None, up: ResumableUpload, lease: Lease,
                  reason: str) -> None:
    """Row and reservation in one statement, then the staged bytes (a crash in between
    leaves bytes without a row, which :func:`sweep` removes)."""
    await repo_uploads.remove(el.db, up.file_id, lease.owner, reason, utcnow())
    lease.given_up()
    if hashes is not None:
        hashes.drop(up.transaction_id)
    await make_staging(el.backend).discard(up.file_id)


async def rollback(el: Element, txid: uuid.UUID, reason: str) -> None:
    await _quietly(repo.rollback_wal(el.db.pool, el.db.q, txid, reason, utcnow()),
                   f"roll back WAL {txid}")


async def _quietly(step, what: str) -> None:
    """Cleanup that must not mask the real outcome; what it leaves, the sweep removes."""
    try:
        await step
    except Exception:  # noqa: BLE001
        log.warning("could not %s; left for the recovery sweep", what, exc_info=True)
