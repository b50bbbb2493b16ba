"""Resumable uploads (tus 1.0.0, issue 17): create, append, complete, terminate, expire.

This module has the protocol, the requests and recovery's entry points; the lease is
:mod:`storage.domain.resumable_lease`, the steps taken under it (stage a body, complete,
remove) :mod:`storage.domain.resumable_steps`.

**State** lives in PostgreSQL, one row of ``<prefix>_uploads`` per upload
(:mod:`storage.db.repo_uploads`): offset, length (or deferred), the metadata, the
creator, the final names, the backend's staging bookkeeping, the sliding expiry.
The capacity reservation is the ``reserved_bytes`` of the upload's pending WAL row
(operation ``file_upload_resumable``, reserved by the group commit like every upload's),
so it counts against capacity and survives restarts; the declared length is reserved
at creation, a deferred one grows (``reservations.grow``) as bytes arrive.

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
appended last (:class:`Hashes`, keyed by the upload's transaction id, never by the file
id alone); a PATCH that lands anywhere else (another worker, another host, after a
restart) first rebuilds it from the staged bytes, once.

**Completion** (offset == length) goes through the commit protocol of every upload:
the FileMeta (``uploads.build_meta``) and its attr document, data and attr visible
together at the final relpath (``Staging.publish``), then ``uploads.finish`` inserts
the row and commits the upload's own WAL row, releasing the reservation in the same
statement.  The row is then marked complete (kept until it expires, so ``HEAD``
still says "complete") and the staged bytes go.  A crash anywhere in between leaves
a full upload whose completion is simply run again (by the next request, or by the
recovery resolver :func:`resolve`; one that died after the finish committed, before the
mark, is marked by the recovery sweep :func:`sweep`); a half-published object of an
earlier attempt is this upload's own and is replaced.  In a mode that forbids uploads a
full upload is left as it is (``HEAD`` reports its offset): completing it would publish
the file only to remove it again when the finish is refused.

**The id** is held by the upload from its creation until it ends: every creation
starts with a WAL intent, and a trigger (``migrations/0012.upload_ids.py``) refuses
another creation's intent for an id a pending resumable intent holds (409).

**Limits**: a declared length, and a deferred one as it grows, is refused past the
capacity (507) or ``STORAGE_MAX_FILE_SIZE`` (413) before anything is reserved; with
``UPLOAD_MAX_PENDING_BYTES`` what one caller (``sub``) holds reserved in unfinished
uploads is bounded too (507).

**Expiry**: an unfinished upload untouched for ``UPLOAD_EXPIRY_HOURS`` answers 404 and
is removed (staged bytes, row, reservation) by the recovery passes (startup and
every few minutes): :func:`resolve` for its WAL row, :func:`sweep` for leftovers; a
full one too when the mode forbids making it a file.  A new creation of its id removes
it at once (:func:`storage.domain.reservations.reserve`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from ..backends import make_staging
from ..db import repo, repo_uploads
from ..db.repo_uploads import NewUpload, ResumableUpload
from ..errors import BadRequest, Conflict, Locked, PayloadTooLarge, StorageError
from ..models import Identity, WalEntry, utcnow
from . import modes, reservations, uploads
from . import resumable_steps as steps
from .element import Element
from .resumable_lease import LEASE, Lease, expiry, visible
from .resumable_steps import Append, Checksum, Hashes, Progress, check_length

OP = "file_upload_resumable"


@dataclass(slots=True)
class FileFields:
    """What a finished upload's file gets from its ``Upload-Metadata``."""

    filename: str | None = None
    content_type: str = "application/octet-stream"
    description: str | None = None
    version: str | None = None
    metadata: dict[str, Any] | None = None
    file_id: uuid.UUID | None = None
    header: str = ""  # the canonical Upload-Metadata, echoed by HEAD
    unknown: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Creation:
    length: int | None  # None: Upload-Defer-Length: 1
    fields: FileFields


# --- requests -------------------------------------------------------------------------


def max_size(el: Element) -> int:
    """``Tus-Max-Size``: the explicit per-file cap, else the element's capacity."""
    return reservations.max_file_size(el)


async def _load(el: Element, file_id: uuid.UUID, who: Identity) -> ResumableUpload:
    up = await repo_uploads.get(el.db, file_id)
    visible(up, who, file_id)
    return up


async def _leased(el: Element, file_id: uuid.UUID, who: Identity) -> tuple[Lease, ResumableUpload]:
    lease = Lease(el, file_id)
    return lease, await lease.take(who=who)


async def create(el: Element, hashes: Hashes, req: Creation, who: Identity,
                 body: AsyncIterator[bytes] | None, checksum: Checksum | None = None,
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
    await steps.check_pending(el, who.sub, req.length or 0)  # a length alone over the bound
    txid = uuid.uuid4()
    intent = {"op": OP, "file_id": file_id, "user_id": who.sub, "started_at": now,
              "data": {"relative_path": meta.relative_path, "upload_length": req.length,
                       "storage": el.backend.name}}
    await reservations.reserve(el, txid, req.length or 0, insert=intent,
                               check_id=f.file_id is not None)
    try:
        await steps.check_pending(el, who.sub)
    except BaseException as exc:
        await asyncio.shield(steps.rollback(el, txid, f"upload not created: {exc!r}"))
        raise
    lease = Lease(el, file_id)
    new = NewUpload(file_id, txid, req.length, f.header, meta.original_filename,
                    meta.content_type, meta.description, meta.version, meta.metadata_json,
                    who.sub, who.name, meta.storage_path, meta.storage_filename, now,
                    expiry(el, now))
    try:
        up = await repo_uploads.insert(el.db, new, lease.owner, now + LEASE)
    except BaseException as exc:
        await asyncio.shield(steps.rollback(el, txid, f"upload record not created: {exc!r}"))
        if isinstance(exc, asyncpg.UniqueViolationError):
            raise Conflict(f"An upload with ID {file_id} already exists") from None
        raise
    lease.adopt()
    try:
        progress = Progress(up)
        try:
            await make_staging(el.backend).create(file_id)
            if body is not None:
                progress = await steps.append_body(el, hashes, lease, up, Append(
                    0, checksum=checksum, content_length=content_length), body,
                    keep_partial=False)
        except BaseException as exc:
            reason = exc.detail if isinstance(exc, StorageError) else repr(exc)
            await asyncio.shield(steps.remove(el, hashes, up, lease, f"creation failed: {reason}"))
            raise
        if progress.upload.full:
            await steps.complete(el, hashes, lease, progress.upload)
            progress.completed = True
        return progress
    finally:
        await lease.release()


async def status(el: Element, hashes: Hashes, file_id: uuid.UUID, who: Identity) -> ResumableUpload:
    """HEAD: the upload as stored; a full upload whose completion died is completed first
    (unless another request holds it, or the element leaves the upload modes meanwhile:
    then its offset, as in those modes).  :raises NotFound:"""
    up = await _load(el, file_id, who)
    if up.completed_at is None and (up.full or up.finished):
        if not _completable(el, up):
            return up  # the offset, as it is: the file is made when uploads are allowed
        lease = Lease(el, file_id)
        try:
            up = await lease.take()
        except Locked:
            return up
        try:
            if up.completed_at is None:
                await steps.complete(el, hashes, lease, up)
        except BadRequest:  # the mode changed during the completion: the bytes are kept
            return up
        finally:
            await lease.release()
    return up


async def append(el: Element, hashes: Hashes, file_id: uuid.UUID, who: Identity, req: Append,
                 body: AsyncIterator[bytes]) -> Progress:
    """PATCH: the body at ``req.offset``; the file is made when the last byte is in.

    :raises NotFound: / Locked: (423) / Conflict: (409, wrong offset) /
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
            await _no_body(req, body, up.upload_length)
            if up.completed_at is None:
                await steps.complete(el, hashes, lease, up)
            return Progress(up)
        progress = await steps.append_body(el, hashes, lease, up, req, body)
        if progress.upload.full:
            await steps.complete(el, hashes, lease, progress.upload)
            progress.completed = True
        return progress
    finally:
        await lease.release()


async def _no_body(req: Append, body: AsyncIterator[bytes], length: int | None) -> None:
    """:raises PayloadTooLarge: a PATCH at the end of a complete upload carries bytes (they
    would go past ``Upload-Length``; acknowledging it would silently drop them)."""
    if req.content_length == 0:
        return
    if req.content_length is None:  # chunked: an empty body is fine
        async for chunk in body:
            if chunk:
                break
        else:
            return
    raise PayloadTooLarge(f"The body goes past Upload-Length ({length}): the upload is "
                          "complete; nothing was stored", headers={"Connection": "close"})


async def terminate(el: Element, hashes: Hashes, file_id: uuid.UUID, who: Identity) -> None:
    """DELETE: staged bytes, record and reservation gone (a finished upload's file stays).

    :raises NotFound: / Locked:"""
    lease, up = await _leased(el, file_id, who)
    try:
        await steps.remove(el, hashes, up, lease, "terminated by the client")
    finally:
        await lease.release()


# --- recovery -------------------------------------------------------------------------


async def resolve(el: Element, wal: WalEntry, *, exclusive: bool) -> str | None:
    """The recovery resolver of a pending ``file_upload_resumable`` WAL row; what it did:
    ``"unrecorded"``, ``"completed"``, ``"expired"`` or None (nothing).

    A live upload is left alone; an expired one is removed (staged bytes, row,
    reservation); a full one whose completion died is completed; an intent whose
    upload row was never written is rolled back.  An upload another process holds is
    skipped until the next pass.  ``exclusive``: no server of the element is alive, so
    any lease may be broken.
    """
    up = await repo_uploads.get(el.db, wal.file_id) if wal.file_id else None
    if up is None or up.transaction_id != wal.transaction_id:
        if up is None and wal.file_id is not None:
            await make_staging(el.backend).discard(wal.file_id)
        await repo.rollback_wal(el.db.pool, el.db.q, wal.transaction_id,
                                "recovery: the upload record was never written", utcnow())
        return "unrecorded"
    expired = up.expires_at <= utcnow()
    if not expired and not _completable(el, up):
        return None  # live, or full in a mode that forbids making it a file (for now)
    lease = Lease(el, up.file_id)
    try:
        up = await lease.take(force=exclusive)
    except Locked:
        return None
    try:
        # a completion that died left its assembly (S3 multipart upload) named here
        if left := str(wal.operation_data.get("temp_path") or ""):
            await el.backend.discard_temp(up.relative_path, left)
        if _completable(el, up):
            try:
                await steps.complete(el, None, lease, up)
            except BadRequest:  # the mode changed meanwhile: the next pass decides
                return None
            return "completed"
        # expired: unfinished, or full but the mode forbids making it a file
        await steps.remove(el, None, up, lease, "expired")
        return "expired"
    finally:
        await lease.release()


def _completable(el: Element, up: ResumableUpload) -> bool:
    """Full, and the file can be made now: its row is in already, or the element's mode
    allows uploads (else completing would publish the file and remove it again)."""
    return up.finished or (up.full and el.runtime.mode in modes.ALLOWED["upload"])


async def sweep(el: Element) -> int:
    """Drop the records of finished uploads whose time is up, mark complete those whose
    file was made but whose mark was lost (the database went away between the finish
    and the mark: their WAL row is committed, so :func:`resolve` never sees them), and
    drop staged bytes no unfinished upload owns (a removal or completion that died
    half-way); how many."""
    now = utcnow()
    removed = await repo_uploads.purge_finished(el.db, now)
    removed += await repo_uploads.mark_finished(el.db, now, expiry(el, now))
    stg = make_staging(el.backend)
    staged = await stg.staged_ids()
    if staged:
        live = await repo_uploads.live_ids(el.db, staged)
        for file_id in staged:
            if file_id not in live:
                await stg.discard(file_id)
                removed += 1
    return removed
