"""Resumable uploads (tus 1.0.0, issue 17): create, append, complete, terminate, expire.

**State** lives in PostgreSQL, one row of ``<prefix>_uploads`` per upload
(:mod:`storage.repo_uploads`): offset, length (or deferred), the metadata, the
creator, the final names, the backend's staging bookkeeping, the sliding expiry.
The capacity reservation is the ``reserved_bytes`` of the upload's pending WAL row
(operation ``file_upload_resumable``, reserved by the group commit like every upload's),
so it counts against capacity and survives restarts; the declared length is reserved
at creation, a deferred one grows (``uploads._grow``) as bytes arrive.

**Bytes** are staged by :mod:`storage.backends.staging` (a file under
``<root>/.resumable/`` or chunk objects in the bucket) and made durable *before* the
row's offset moves; only then is the PATCH acknowledged.  The offset in the row is
the truth: staged bytes past it (a PATCH that died, a refused checksum) are dropped.

**One PATCH at a time** across processes and hosts: a lease in the row
(``lease_owner``, ``lease_until``), taken by a conditional UPDATE (busy: 423),
renewed every 20 s while the request runs, released at its end; no database
connection is held while a body streams.  A lease whose owner is a dead process on
this host (a SIGKILLed predecessor) is taken over at once, any other only when it
runs out (60 s); the exclusive startup recovery breaks them all.  Every commit is
conditional on the lease *and* the expected offset, so a writer that lost its lease
changes nothing.  (A session advisory lock would need a dedicated connection per
process and disappears silently with it; the lease survives database restarts and
works from the pool.)

**The sha256** of the whole content is kept running per upload in the process that
appended last (:class:`Hashes`); a PATCH that lands anywhere else (another worker,
another host, after a restart) first rebuilds it from the staged bytes, once.

**Completion** (offset == length) goes through the commit protocol of every upload:
the FileMeta (``uploads.build_meta``) and its attr document, data and attr visible
together at the final relpath (``Staging.publish``), then ``uploads._finish`` inserts
the row and commits the upload's own WAL row, releasing the reservation in the same
statement.  The row is then marked complete (kept until it expires, so ``HEAD``
still says "complete") and the staged bytes go.  A crash anywhere in between leaves
a full upload whose completion is simply run again (by the next request, or by the
recovery resolver :func:`resolve`); a half-published object of an earlier attempt is
this upload's own and is replaced.

**Expiry**: an unfinished upload untouched for ``UPLOAD_EXPIRY_HOURS`` answers 404 and
is removed (staged bytes, row, reservation) by the recovery passes (startup and
every few minutes): :func:`resolve` for its WAL row, :func:`sweep` for leftovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg

from ..auth.access import Identity
from ..backends.staging import Session, Staging, make_staging
from ..db import locks, repo, repo_uploads
from ..db.repo_uploads import NewUpload, ResumableUpload
from ..errors import (
    BadRequest,
    ChecksumMismatch,
    ClientGone,
    Conflict,
    Forbidden,
    Locked,
    NotFound,
    PayloadTooLarge,
    StorageError,
    Unavailable,
)
from ..models import FileMeta, WalEntry, utcnow
from ..web import tusproto
from . import faults, uploads
from .element import Element

if TYPE_CHECKING:
    from .recovery import Report

log = logging.getLogger(__name__)
OP = "file_upload_resumable"
LEASE = timedelta(seconds=60)
RENEW_EVERY_S = 20.0
# A writer stops this long before its lease could run out (other hosts' clocks differ).
LEASE_MARGIN_S = 15.0


@dataclass(slots=True)
class Creation:
    length: int | None  # None: Upload-Defer-Length: 1
    fields: tusproto.FileFields


@dataclass(slots=True)
class Append:
    offset: int
    length: int | None = None  # Upload-Length sent with a PATCH (deferred uploads)
    checksum: tusproto.Checksum | None = None
    content_length: int | None = None


@dataclass(slots=True)
class Progress:
    upload: ResumableUpload
    received: int = 0
    completed: bool = False
    rehashed: bool = False


class Hashes:
    """The running sha256 of the uploads this process appended to last, by offset.

    Bounded (least recently used out); a miss costs one rebuild from the staged bytes.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._items: OrderedDict[uuid.UUID, tuple[int, Any]] = OrderedDict()

    def get(self, file_id: uuid.UUID, offset: int) -> Any | None:
        """A copy (a refused chunk must not reach the kept one) when it is at ``offset``."""
        item = self._items.get(file_id)
        if item is None or item[0] != offset:
            return None
        self._items.move_to_end(file_id)
        return item[1].copy()

    def put(self, file_id: uuid.UUID, offset: int, hasher: Any) -> None:
        self._items[file_id] = (offset, hasher)
        self._items.move_to_end(file_id)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def drop(self, file_id: uuid.UUID) -> None:
        self._items.pop(file_id, None)


# --- the lease ------------------------------------------------------------------------


def _expiry(el: Element, now: datetime) -> datetime:
    return now + timedelta(hours=el.config.upload_expiry_hours)


class Lease:
    """The right to change one upload (see the module docstring), renewed while held."""

    def __init__(self, el: Element, file_id: uuid.UUID) -> None:
        self.el, self.file_id = el, file_id
        self.owner = locks.label(f"tus {secrets.token_hex(4)}")
        self.held = self.lost = False
        self._task: asyncio.Task | None = None
        self._valid_until = 0.0

    def _granted(self) -> None:
        loop = asyncio.get_running_loop()
        self._valid_until = loop.time() + LEASE.total_seconds() - LEASE_MARGIN_S

    def adopt(self) -> None:
        """The lease is ours (taken, or written with a new row): start renewing it."""
        self.held = True
        self._granted()
        self._task = asyncio.create_task(self._renew(), name=f"tus-lease-{self.file_id}")

    async def take(self, *, force: bool = False, who: Identity | None = None) -> ResumableUpload:
        """The upload, leased to us.  ``force``: break any other lease (no server is alive).
        ``who``: a request's caller, who must see the upload (404/403 before 423).

        :raises NotFound: / Forbidden: / Locked: (423) another request holds it.
        """
        db, now = self.el.db, utcnow()
        up = await repo_uploads.take_lease(db, self.file_id, self.owner, now + LEASE, now)
        if up is None:
            current = await repo_uploads.get(db, self.file_id)
            if current is None or who is not None:
                _visible(current, who, self.file_id)
            holder = current.lease_owner or ""
            if force or locks.dead_local(locks.Holder(0, holder, None, "")):
                up = await repo_uploads.take_lease(db, self.file_id, self.owner, now + LEASE,
                                                   now, holder)
            if up is None:
                raise Locked(f"Upload {self.file_id} is busy: another request is writing to it "
                             "(one PATCH at a time); retry when it is done",
                             headers={"Retry-After": "1"})
        self.adopt()
        if who is not None:
            try:
                _visible(up, who, self.file_id)
            except StorageError:
                await self.release()
                raise
        return up

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            now = utcnow()
            try:
                if not await repo_uploads.renew_lease(self.el.db, self.file_id, self.owner,
                                                      now + LEASE, _expiry(self.el, now)):
                    self.lost = True
                    return
                self._granted()
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                log.warning("upload %s: could not renew the lease: %r", self.file_id, exc)

    def check(self) -> None:
        """:raises Unavailable: the lease is lost, or could run out before it is renewed
        (nothing more is written, nothing is committed)."""
        if self.lost or asyncio.get_running_loop().time() > self._valid_until:
            raise Unavailable(f"Upload {self.file_id}: the request lost its lease; retry",
                              headers={"Retry-After": "1"})

    def given_up(self) -> None:
        """The database dropped the lease with a statement of ours (commit, removal)."""
        self.held = False

    async def release(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.held:
            self.held = False
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await asyncio.shield(repo_uploads.release_lease(self.el.db, self.file_id,
                                                                self.owner))


# --- requests -------------------------------------------------------------------------


def max_size(el: Element) -> int:
    """``Tus-Max-Size``: the explicit per-file cap, else the element's capacity."""
    return uploads.max_file_size(el)


def check_length(el: Element, length: int | None) -> None:
    """:raises PayloadTooLarge: (413) only for an explicit ``STORAGE_MAX_FILE_SIZE``."""
    cap = el.config.storage_max_file_size
    if length is not None and cap > 0 and length > cap:
        raise PayloadTooLarge(f"Upload-Length {length} exceeds the maximum file size of {cap} "
                              "bytes", headers={"Connection": "close"})


def _authorize(up: ResumableUpload, who: Identity) -> None:
    if who.role != "admin" and who.sub != up.created_by_id:
        raise Forbidden("Only the creator of this upload or an admin may use it")


def _gone(up: ResumableUpload | None, now: datetime) -> bool:
    """Unknown, expired, or a row whose reservation is gone (removal under way)."""
    return (up is None or up.expires_at <= now
            or (up.completed_at is None and up.wal_status not in ("pending", "committed")))


def _visible(up: ResumableUpload | None, who: Identity | None, file_id: uuid.UUID) -> None:
    """:raises NotFound: (unknown and expired uploads alike) / Forbidden:"""
    if _gone(up, utcnow()):
        raise NotFound(f"Upload {file_id} not found (unknown, expired or terminated)")
    if who is not None:
        _authorize(up, who)


async def _load(el: Element, file_id: uuid.UUID, who: Identity) -> ResumableUpload:
    up = await repo_uploads.get(el.db, file_id)
    _visible(up, who, file_id)
    return up


async def _leased(el: Element, file_id: uuid.UUID, who: Identity) -> tuple[Lease, ResumableUpload]:
    lease = Lease(el, file_id)
    return lease, await lease.take(who=who)


async def create(el: Element, hashes: Hashes, req: Creation, who: Identity,
                 body: AsyncIterator[bytes] | None, checksum: tusproto.Checksum | None = None,
                 content_length: int | None = None) -> Progress:
    """POST: reserve the declared length, record the upload, store a first chunk if sent.

    :raises BadRequest: / PayloadTooLarge: / Conflict: (the file_id is taken) /
        InsufficientStorage: (507) -- and anything a first chunk raises, in which case
        the upload is removed again (the client never learnt its URL).
    """
    now, f = utcnow(), req.fields
    file_id = f.file_id or uuid.uuid4()
    spec = uploads.UploadSpec(original_filename=f.filename or str(file_id),
                              content_type=f.content_type, file_id=file_id,
                              description=f.description, version=f.version, metadata=f.metadata)
    meta = uploads.build_meta(spec, who, file_id, now)
    meta.metadata_json = spec.metadata or None
    uploads.attr_document(meta)  # 400 now rather than when the last byte is in
    check_length(el, req.length)
    txid = uuid.uuid4()
    intent = {"op": OP, "file_id": file_id, "user_id": who.sub, "started_at": now,
              "data": {"relative_path": meta.relative_path, "upload_length": req.length,
                       "storage": el.backend.name}}
    await uploads._reserve(el, txid, req.length or 0, insert=intent,
                           check_id=f.file_id is not None)
    lease = Lease(el, file_id)
    new = NewUpload(file_id, txid, req.length, f.header, meta.original_filename,
                    meta.content_type, meta.description, meta.version, meta.metadata_json,
                    who.sub, who.name, meta.storage_path, meta.storage_filename, now,
                    _expiry(el, now))
    try:
        up = await repo_uploads.insert(el.db, new, lease.owner, now + LEASE)
    except BaseException as exc:
        await asyncio.shield(_rollback(el, txid, f"upload record not created: {exc!r}"))
        if isinstance(exc, asyncpg.UniqueViolationError):
            raise Conflict(f"An upload with ID {file_id} already exists") from None
        raise
    lease.adopt()
    try:
        progress = Progress(up)
        try:
            await make_staging(el.backend).create(file_id)
            if body is not None:
                progress = await _append(el, hashes, lease, up, Append(
                    0, checksum=checksum, content_length=content_length), body,
                    keep_partial=False)
        except BaseException as exc:
            reason = exc.detail if isinstance(exc, StorageError) else repr(exc)
            await asyncio.shield(_remove(el, hashes, up, lease, f"creation failed: {reason}"))
            raise
        if progress.upload.full:
            await _complete(el, hashes, lease, progress.upload)
            progress.completed = True
        return progress
    finally:
        await lease.release()


async def status(el: Element, hashes: Hashes, file_id: uuid.UUID, who: Identity) -> ResumableUpload:
    """HEAD: the upload as stored; a full upload whose completion died is completed first
    (unless another request holds it).  :raises NotFound: / Forbidden:"""
    up = await _load(el, file_id, who)
    if up.completed_at is None and (up.full or up.finished):
        lease = Lease(el, file_id)
        try:
            up = await lease.take()
        except Locked:
            return up
        try:
            if up.completed_at is None:
                await _complete(el, hashes, lease, up)
        finally:
            await lease.release()
    return up


async def append(el: Element, hashes: Hashes, file_id: uuid.UUID, who: Identity, req: Append,
                 body: AsyncIterator[bytes]) -> Progress:
    """PATCH: the body at ``req.offset``; the file is made when the last byte is in.

    :raises NotFound: / Forbidden: / Locked: (423) / Conflict: (409, wrong offset) /
        PayloadTooLarge: (past Upload-Length) / ChecksumMismatch: (460) / BadRequest: /
        InsufficientStorage: -- none of them moves the offset.  A body cut short (client
        gone, too slow) keeps what arrived, unless a checksum was sent, and re-raises.
    """
    lease, up = await _leased(el, file_id, who)
    try:
        if up.finished:  # a repeated last PATCH, or a completion to finish
            if req.offset != up.upload_length:
                raise Conflict(f"Upload-Offset {req.offset} does not match the upload's "
                               f"offset {up.upload_length}: the upload is complete")
            if up.completed_at is None:
                await _complete(el, hashes, lease, up)
            return Progress(up)
        progress = await _append(el, hashes, lease, up, req, body)
        if progress.upload.full:
            await _complete(el, hashes, lease, progress.upload)
            progress.completed = True
        return progress
    finally:
        await lease.release()


async def terminate(el: Element, hashes: Hashes, file_id: uuid.UUID, who: Identity) -> None:
    """DELETE: staged bytes, record and reservation gone (a finished upload's file stays).

    :raises NotFound: / Forbidden: / Locked:"""
    lease, up = await _leased(el, file_id, who)
    try:
        await _remove(el, hashes, up, lease, "terminated by the client")
    finally:
        await lease.release()


# --- the steps ------------------------------------------------------------------------


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
    await uploads._reserve(el, up.transaction_id, length, insert=None)  # exactly that, now
    if not await repo_uploads.declare_length(el.db, up.file_id, lease.owner, length):
        raise Unavailable(f"Upload {up.file_id} changed under the request; retry")
    up.upload_length, up.reserved_bytes = length, length


async def _rehash(el: Element, stg: Staging, up: ResumableUpload) -> Any:
    """The sha256 of the first ``upload_offset`` staged bytes, read back from the store."""
    hasher = hashlib.sha256()
    await stg.hash_into(up.file_id, up.upload_offset, up.staging, hasher)
    return hasher


async def _append(el: Element, hashes: Hashes | None, lease: Lease, up: ResumableUpload,
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
    hasher = hashes.get(up.file_id, up.upload_offset) if hashes is not None else None
    if hasher is None:
        hasher, progress.rehashed = await _rehash(el, stg, up), up.upload_offset > 0
        if hashes is not None:  # kept even if this request's bytes are refused
            hashes.put(up.file_id, up.upload_offset, hasher.copy())
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
                                          staging=staging, at=now, expires_at=_expiry(el, now),
                                          keep_lease=full):
            raise Unavailable(f"Upload {up.file_id} changed under the request; retry",
                              headers={"Retry-After": "1"})
        if not full:
            lease.given_up()  # released by that statement: one round trip less
        await session.committed()
    finally:
        await session.close()
    if hashes is not None:
        hashes.put(up.file_id, offset, hasher)
    up.upload_offset, up.staging, up.updated_at = offset, staging, now
    up.expires_at, up.reserved_bytes = _expiry(el, now), max(reserved, up.reserved_bytes)
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
    cap = uploads.max_file_size(el)
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
                    reserved = await uploads._grow(el, up.transaction_id, reserved, total, cap)
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


async def _complete(el: Element, hashes: Hashes | None, lease: Lease,
                    up: ResumableUpload) -> None:
    """Make the full upload an ordinary file (see the module docstring); idempotent.

    :raises Conflict: the file_id was taken meanwhile (the upload is removed).
    """
    stg = make_staging(el.backend)
    if up.wal_status != "committed":
        if await repo.get_file(el.db, up.file_id) is not None:  # taken meanwhile
            await _refuse_completion(el, hashes, up, lease, published=False)
        hasher = hashes.get(up.file_id, up.upload_offset) if hashes is not None else None
        if hasher is None:
            hasher = await _rehash(el, stg, up)
        meta = file_meta(up, hasher.hexdigest())
        try:
            await stg.publish(up.file_id, up.upload_offset, up.staging, meta.relative_path,
                              uploads.attr_document(meta), content_type=meta.content_type,
                              checksum=meta.checksum, tag=str(up.transaction_id))
        except Conflict:  # another file has the very name: it must stay
            await _refuse_completion(el, hashes, up, lease, published=False)
        await faults.point(el, "tus.after_publish")
        try:
            await uploads._finish(el, meta, up.transaction_id)
        except Conflict:
            await _refuse_completion(el, hashes, up, lease, published=True)
        except (BadRequest, uploads.Abandoned):
            # the element left the upload modes (or recovery resolved the intent): the
            # published file goes again; the staged upload stays for a later attempt
            await _quietly(el.backend.delete(up.relative_path), f"remove {up.relative_path}")
            raise
        await faults.point(el, "tus.after_finish")
    now = utcnow()
    await repo_uploads.mark_completed(el.db, up.file_id, now, _expiry(el, now))
    lease.given_up()
    up.completed_at, up.upload_offset, up.staging = now, up.upload_length or 0, {}
    up.wal_status, up.expires_at = "committed", _expiry(el, now)
    if hashes is not None:
        hashes.drop(up.file_id)
    await _quietly(stg.discard(up.file_id), f"remove the staged bytes of {up.file_id}")


async def _refuse_completion(el: Element, hashes: Hashes | None, up: ResumableUpload,
                             lease: Lease, *, published: bool) -> None:
    """The file id was taken by another upload meanwhile: what this one published goes
    (never the other file), then the upload.  :raises Conflict:"""
    reason = f"File with ID {up.file_id} already exists; the upload was removed"
    if published:
        await _quietly(el.backend.delete(up.relative_path), f"remove {up.relative_path}")
    await asyncio.shield(_remove(el, hashes, up, lease, f"completion refused: {reason}"))
    raise Conflict(reason)


async def _remove(el: Element, hashes: Hashes | None, up: ResumableUpload, lease: Lease,
                  reason: str) -> None:
    """Row and reservation in one statement, then the staged bytes (a crash in between
    leaves bytes without a row, which :func:`sweep` removes)."""
    await repo_uploads.remove(el.db, up.file_id, lease.owner, reason, utcnow())
    lease.given_up()
    if hashes is not None:
        hashes.drop(up.file_id)
    await make_staging(el.backend).discard(up.file_id)


async def _rollback(el: Element, txid: uuid.UUID, reason: str) -> None:
    await _quietly(repo.rollback_wal(el.db.pool, el.db.q, txid, reason, utcnow()),
                   f"roll back WAL {txid}")


async def _quietly(step, what: str) -> None:
    """Cleanup that must not mask the real outcome; what it leaves, the sweep removes."""
    try:
        await step
    except Exception:  # noqa: BLE001
        log.warning("could not %s; left for the recovery sweep", what, exc_info=True)


# --- recovery -------------------------------------------------------------------------


async def resolve(el: Element, wal: WalEntry, report: Report) -> None:
    """The recovery resolver of a pending ``file_upload_resumable`` WAL row.

    A live upload is left alone (not counted); an expired one is removed (staged bytes,
    row, reservation); a full one whose completion died is completed; an intent whose
    upload row was never written is rolled back.  An upload another process holds is
    skipped until the next pass.
    """
    up = await repo_uploads.get(el.db, wal.file_id) if wal.file_id else None
    if up is None or up.transaction_id != wal.transaction_id:
        if up is None and wal.file_id is not None:
            await make_staging(el.backend).discard(wal.file_id)
        await repo.rollback_wal(el.db.pool, el.db.q, wal.transaction_id,
                                "recovery: the upload record was never written", utcnow())
        report.rolled_back += 1
        return report.note(wal, "rolled back", "resumable upload without a record")
    expired = up.expires_at <= utcnow()
    if not expired and not up.full:
        return None
    lease = Lease(el, up.file_id)
    try:
        up = await lease.take(force=report.mode == "exclusive")
    except Locked:
        return None
    try:
        if up.full:
            await _complete(el, None, lease, up)
            report.completed += 1
            report.uploads_completed += 1
            return report.note(wal, "committed", "resumable upload complete, file made")
        await _remove(el, None, up, lease, "expired")
        report.rolled_back += 1
        report.uploads_expired += 1
        return report.note(wal, "rolled back", "resumable upload expired, removed")
    finally:
        await lease.release()


async def sweep(el: Element) -> int:
    """Drop the records of finished uploads whose time is up, and staged bytes no
    unfinished upload owns (a removal or completion that died half-way); how many."""
    removed = await repo_uploads.purge_finished(el.db, utcnow())
    stg = make_staging(el.backend)
    staged = await stg.staged_ids()
    if staged:
        live = await repo_uploads.live_ids(el.db, staged)
        for file_id in staged:
            if file_id not in live:
                await stg.discard(file_id)
                removed += 1
    return removed
