"""Creating a file: WAL intent → stream to a temp object while hashing → commit →
attr document → metadata row + WAL commit.  Any failure leaves nothing visible.

The WAL intent row doubles as the capacity reservation
(:mod:`storage.domain.reservations`); a crash frees it when recovery resolves it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from .. import attrs
from ..backends.base import Writer
from ..db import repo
from ..errors import (
    BadRequest,
    ClientGone,
    Conflict,
    InsufficientStorage,
    StorageError,
)
from ..models import FileMeta, Identity, utcnow
from . import attrmeta, faults, liveness, naming, reservations
from .element import Element

log = logging.getLogger(__name__)
# A piece up to this size is held back: if it is the body's last, the writer may hash it on
# the loop and write it together with the commit (a small upload: one executor hop).
DEFER_MAX = 64 * 1024


@dataclass(slots=True, frozen=True)
class UploadSpec:
    """What the client asked to store (everything but the bytes).  Frozen: the form
    fields that follow a multipart file part arrive only as the body ends, and are
    applied by :func:`store` at one point (``trailing``), not behind its back."""

    original_filename: str
    content_type: str = "application/octet-stream"
    file_id: uuid.UUID | None = None
    description: str | None = None
    version: str | None = None
    metadata: dict[str, Any] | None = None
    declared_size: int | None = None  # exact size when known (raw body Content-Length)
    size_bound: int | None = None  # an upper bound (multipart body Content-Length)
    digests: dict[str, bytes] = field(default_factory=dict)


def build_meta(spec: UploadSpec, who: Identity, file_id: uuid.UUID, now: datetime) -> FileMeta:
    try:
        storage_filename = naming.storage_filename(spec.original_filename, who.name, now, file_id)
    except naming.NamingError as exc:
        raise BadRequest(str(exc)) from None
    return FileMeta(
        file_id=file_id, original_filename=spec.original_filename,
        storage_filename=storage_filename, file_size=0, content_type=spec.content_type,
        created_at=now, updated_at=now, created_by_id=who.sub,
        created_by_username=who.name, storage_path=naming.storage_path(now),
        checksum="0" * 64, description=spec.description, version=spec.version,
        metadata_json=spec.metadata or None, cache_updated_at=now,
    )


def attr_document(meta: FileMeta, extra: dict[str, Any] | None = None) -> bytes:
    """The attr.json bytes for ``meta``; :raises BadRequest: when over 4096 bytes."""
    try:
        doc = attrmeta.to_doc(meta, extra)
        data = doc.serialize()  # validated as it was built
        if len(data) > attrs.MAX_ATTR_SIZE:
            attrs.check_size(doc)  # raises, naming the field that contributes most
        return data
    except attrs.AttrError as exc:
        raise BadRequest(exc.reason) from None


ATTR_FIXED_PART = 1024  # an attr document with every text field empty is shorter


def attr_surely_fits(meta: FileMeta) -> bool:
    """True when ``meta``'s attr document cannot exceed the 4 KiB limit whatever its
    size and checksum: no metadata, and even at six bytes per character (a JSON escape)
    the texts fit beside the fixed part.  Saves building the document twice per upload
    (it is built for real, and checked again, at commit)."""
    if meta.metadata_json:
        return False
    texts = (meta.original_filename, meta.storage_filename, meta.content_type,
             meta.created_by_id, meta.created_by_username, meta.created_by_fullname,
             meta.storage_path, meta.description, meta.version)
    return ATTR_FIXED_PART + 6 * sum(len(t) for t in texts if t) <= attrs.MAX_ATTR_SIZE


def _first_reservation(el: Element, spec: UploadSpec) -> tuple[int, int | None]:
    """Bytes to reserve with the WAL intent, and a smaller fallback if they are refused.

    A raw body's size is exact.  A multipart file is at most its body's length: reserving
    that covers a small upload whole (reserving the length less the envelope allowance
    left 0 bytes for a 4 KiB upload, so its first chunk cost another reservation round
    trip); only if that is refused is the lower bound tried, so a file that fits exactly
    into the remaining capacity is not refused for its envelope.
    """
    cap = reservations.max_file_size(el)
    if spec.declared_size is not None:
        return spec.declared_size, None
    if not spec.size_bound:
        return 0, None
    need, lower = min(spec.size_bound, cap), min(reservations.file_size_bound(spec.size_bound), cap)
    return need, (lower if lower < need else None)


async def _stream(el: Element, spec: UploadSpec, txid: uuid.UUID, writer: Writer,
                  chunks: AsyncIterator[bytes], reserved: int) -> None:
    """Body → writer, reading the next chunk while the previous one is written."""
    cap = reservations.max_file_size(el)
    most = min(cap, spec.size_bound) if spec.size_bound else cap
    body, received = aiter(chunks), 0
    in_flight: asyncio.Future | None = None
    held = bytearray()  # small pieces that may turn out to be the body's end
    try:
        while True:
            # Only the body read means "the client went away": a ConnectionError from
            # the reservation below is the database (503), not an interrupted upload.
            try:
                chunk = await anext(body)
            except StopAsyncIteration:
                break
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                raise ClientGone(f"The upload was interrupted: {exc}") from None
            received += len(chunk)
            if received > cap:
                raise reservations.over_limit(el, None)
            if received > reserved:
                # A body of known length (multipart) never needs more than that length.
                reserved = await reservations.grow(el, txid, reserved, received, most)
            if held or len(chunk) <= DEFER_MAX:
                held += chunk  # linear however small the pieces come
                if len(held) <= DEFER_MAX:
                    continue  # small so far: likely the body's end, see below
                chunk, held = bytes(held), bytearray()
            if in_flight is not None:
                await in_flight  # one write at a time, in order
            in_flight = asyncio.ensure_future(writer.write(chunk))
        if in_flight is not None:
            await in_flight
            in_flight = None
        tail = bytes(held)
        if tail and not writer.defer(tail):
            await writer.write(tail)  # else it is written by commit, in the same hop
    finally:
        if in_flight is not None and not in_flight.done():
            # never let the writer be aborted under a running write
            await asyncio.shield(asyncio.wait([in_flight]))
        if in_flight is not None and in_flight.done() and not in_flight.cancelled():
            in_flight.exception()  # retrieved: the error that matters is already raised
    if spec.declared_size is not None and writer.size != spec.declared_size:
        raise ClientGone(
            f"Received {writer.size} bytes but Content-Length announced {spec.declared_size}"
        )


def _verify_digests(spec: UploadSpec, writer: Writer) -> None:
    actual = {"sha256": bytes.fromhex(writer.sha256), "md5": writer.md5}
    for algo, expected in spec.digests.items():
        if algo in actual and not hmac.compare_digest(actual[algo], expected):
            raise BadRequest(
                f"Checksum mismatch: the body's {algo} does not match the digest the client "
                "sent; nothing was stored"
            )


async def store(el: Element, spec: UploadSpec, who: Identity, chunks: AsyncIterator[bytes],
                *, trailing: Mapping[str, Any] | None = None) -> FileMeta:
    """Store one upload durably.  Nothing is visible unless this returns.

    ``trailing``: ``UploadSpec`` fields (description, version, metadata) that the body
    itself carries after the bytes (multipart fields after the file part); read once
    ``chunks`` is exhausted, and they override ``spec``'s.
    """
    now = utcnow()
    file_id = spec.file_id or uuid.uuid4()
    meta = build_meta(spec, who, file_id, now)
    if not attr_surely_fits(meta):
        attr_document(meta)  # 400 up front when the attr file would be too large
    txid = uuid.uuid4()
    need, fallback = _first_reservation(el, spec)
    # The writer touches nothing until its first write, so its temp path can go
    # into the intent row: recovery then removes exactly that partial file.  A temp
    # name known only later (an S3 multipart upload) is added before any byte leaves.
    writer = el.backend.create(meta.relative_path, spec.declared_size,
                               content_type=meta.content_type)
    writer.on_temp = functools.partial(repo.set_wal_temp, el.db, txid)
    writer.tag = str(txid)  # an undo removes only an object this upload wrote
    intent = {
        "op": "file_create", "file_id": file_id, "user_id": who.sub, "started_at": now,
        "data": liveness.stamp(el.runtime, {
            "original_filename": meta.original_filename,
            "storage_filename": meta.storage_filename, "storage_path": meta.storage_path,
            "relative_path": meta.relative_path, "content_type": meta.content_type,
            "temp_path": writer.temp_name,
        }),
    }
    try:
        await reservations.reserve(el, txid, need, insert=intent, check_id=spec.file_id is not None)
    except InsufficientStorage:
        if fallback is None:
            raise
        need = fallback  # a nearly full element: reserve no more than the file can be
        await reservations.reserve(el, txid, need, insert=intent, check_id=spec.file_id is not None)
    await faults.point(el, "upload.after_intent")
    committing = False
    try:
        async with writer:
            if "md5" in spec.digests:
                writer.hasher.enable_md5()
            await _stream(el, spec, txid, writer, chunks, need)
            await faults.point(el, "upload.after_body")
            _verify_digests(spec, writer)
            meta.file_size, meta.checksum = writer.size, writer.sha256
            if trailing:  # multipart fields that followed the file part
                spec = dataclasses.replace(spec, **trailing)
                meta.description, meta.version = spec.description, spec.version
                meta.metadata_json = spec.metadata or None  # {} reads back as null
            attr = attr_document(meta)
            # data and attr document in one step: one directory fsync for both.  The
            # commit thread's outcome decides, a cancellation waits for it (the writer is
            # never aborted under it), and ``writer.landed`` says whether this upload's
            # files may be in place (a failure after the link, such as the directory
            # fsync, counts; a commit refused because another upload's file is at the
            # name does not, and that file is never removed).
            await _to_the_end(writer.commit(attr))
        await faults.point(el, "upload.after_files")
        committing = True
        meta = await finish(el, meta, txid)
        committing = False
        await faults.point(el, "upload.after_commit")
    except BaseException as exc:
        if committing and isinstance(exc, Abandoned) and exc.claimed:
            raise  # recovery holds the intent and decides about the files
        if committing and not _commit_refused(exc):
            # The row may be in: removing the files could leave it without them.
            log.warning("upload %s: the database commit may or may not have happened "
                        "(%r); WAL %s left pending for recovery", meta.file_id, exc, txid)
            await asyncio.shield(_disown(el, txid))
            raise
        await asyncio.shield(_undo(el, meta, txid, exc, writer,
                                   remove_data=writer.landed))
        raise
    return meta


async def _to_the_end(step) -> None:
    """Await ``step`` until it has ended, even if the caller is cancelled meanwhile (the
    cancellation is raised after; ``step``'s own error, if any, then goes unraised)."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and task.cancelled():
                raise
            cancelled = True
        except Exception:  # noqa: BLE001 - raised below, from the task
            break
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller gets
        raise asyncio.CancelledError
    task.result()


def _commit_refused(exc: BaseException) -> bool:
    """True if the final statement certainly did not commit (the server refused it).

    A lost connection, a timeout or an asyncpg error while releasing the connection
    leaves the outcome open: the row may be committed (issue 11 saw exactly that
    when PostgreSQL shut down: the statement committed, the pool's reset failed).
    """
    if isinstance(exc, StorageError):
        return True  # Conflict: the id exists
    never_connected = (asyncpg.exceptions.CannotConnectNowError,
                       asyncpg.exceptions.TooManyConnectionsError, OSError)
    if isinstance(exc, never_connected):
        return True  # refused while connecting: the statement was never sent
    ambiguous = (asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError)
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, ambiguous)


async def finish(el: Element, meta: FileMeta, txid: uuid.UUID) -> FileMeta:
    """The row in and the intent committed, in the next group commit.

    :raises Conflict: the id (or the storage name) is taken.
    :raises BadRequest: the element left the upload modes while the body was streaming
        (the same answer as for an upload that starts in that mode).
    :raises Abandoned: recovery resolved the intent meanwhile and removed the files.
    In every case nothing was committed.  (An upload that ran so long that recovery in
    another process found it complete and inserted its row itself has succeeded.)
    """
    result = {"file_id": str(meta.file_id), "checksum": meta.checksum,
              "file_size": meta.file_size}
    done = await el.commits.finish(meta, txid, result)
    settled = await _settled(el, txid) if done.status == "gone" else "committed"
    if done.status == "gone" and settled == "committed" \
            and (row := await repo.get_file(el.db, meta.file_id)) is not None \
            and row.storage_filename == meta.storage_filename:
        return row  # recovery elsewhere found this very upload complete and finished it
    if done.status == "exists":
        raise Conflict(f"File with ID {meta.file_id} already exists")
    if done.status == "mode":
        raise BadRequest(f"File upload not allowed in {done.mode} mode")
    if done.status == "gone":
        raise Abandoned("The upload was abandoned by crash recovery while it was running; "
                        "nothing was stored, send it again", headers={"Retry-After": "1"},
                        claimed=settled == "pending")
    return meta


SETTLE_WAIT_S = 10.0  # how long a finish waits for recovery to settle a claimed intent


async def _settled(el: Element, txid: uuid.UUID) -> str:
    """The intent's status once no claimer is settling it, or "pending" if one still is
    after :data:`SETTLE_WAIT_S` (its files are then the claimer's to keep or remove)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_WAIT_S
    while True:
        state = await repo.wal_state(el.db.pool, el.db.q, txid)
        if state is None or state[0] != "pending" or state[1] is None:
            return state[0] if state else "gone"
        if loop.time() > deadline:
            return "pending"
        await asyncio.sleep(0.1)


class Abandoned(StorageError):
    """The upload's WAL intent was resolved by recovery before the upload finished
    (``claimed``: recovery is still resolving it, and owns its files)."""

    status, code = 503, "upload_abandoned"

    def __init__(self, detail: str, *, claimed: bool = False, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.claimed = claimed


async def _undo(el: Element, meta: FileMeta, txid: uuid.UUID, exc: BaseException,
                writer: Writer, *, remove_data: bool) -> None:
    """Remove what this upload wrote and roll its intent back.

    When its files may be in place, the intent is claimed first: between the removal and
    the rollback nobody may publish or resolve it.  Only an object this upload wrote is
    removed (``writer.tag``: another upload's object at the same key stays).  What cannot
    be removed (the store is down) stays named by the intent, left pending, abandoned and
    disowned, so the next recovery pass removes it (its reservation is released now).
    """
    reason = exc.detail if isinstance(exc, StorageError) else repr(exc)
    lease = liveness.owner(el.runtime)
    db, q = el.db, el.db.q
    try:
        claimer = None
        if remove_data and lease is not None:
            if await repo.claim_wal(db.pool, q, txid, lease.id, ttl_s=liveness.LEASE_TTL_S,
                                    force=True) is None:
                state = await repo.wal_state(db.pool, q, txid)
                if state is not None and state[0] == "rolled_back":
                    # recovery settled it without this upload's files (linked after it looked)
                    await _remove_own(el, meta, writer)
                return  # else committed by recovery (it is a file now) or claimed by it
            claimer = lease.id
        if remove_data:
            await _remove_own(el, meta, writer)
        if writer.left:  # something of this upload could not be removed: recovery's turn
            await repo.abandon_wal(el.db, txid, reason, claimer=claimer)
        else:
            await repo.rollback_wal(db.pool, q, txid, reason, utcnow(), claimer=claimer)
    except Exception:  # recovery will resolve the pending row; never mask the real error
        log.exception("could not roll back upload %s (WAL %s)", meta.file_id, txid)
        await _disown(el, txid)


async def _remove_own(el: Element, meta: FileMeta, writer: Writer) -> None:
    """Remove this upload's data object, never another upload's at the same key; when the
    store refuses, ``writer.left`` says so."""
    try:
        await el.backend.delete(meta.relative_path, owner=writer.tag)
    except StorageError as failed:
        writer.left = True
        log.warning("upload %s: could not remove its data (%s)", meta.file_id, failed.detail)


async def _disown(el: Element, txid: uuid.UUID) -> None:
    """Left pending with its outcome unknown: recovery may resolve it at its next pass."""
    lease = liveness.owner(el.runtime)
    if lease is not None:
        await lease.disown(txid)
