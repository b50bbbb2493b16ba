"""Capacity reservations and size limits of uploads (plain and resumable).

An upload's WAL intent doubles as its capacity reservation: while it is pending its
``reserved_bytes`` count against the element's capacity, so concurrent uploads cannot
overshoot, and a crash frees the reservation when recovery resolves it.  The intent is
inserted, and later grown, through the group commit (:mod:`storage.domain.groupcommit`),
which checks the capacity and the disk's free space in the same statement.
"""

from __future__ import annotations

import uuid

import asyncpg

from ..backends import make_staging
from ..db import repo, repo_uploads
from ..errors import ClientGone, Conflict, InsufficientStorage, PayloadTooLarge, StorageError
from ..models import utcnow
from . import liveness
from .element import Element

GROWTH_STEP = 64 * 1024 * 1024  # reservation step for bodies of unknown length
MIN_RESERVATION = 1024 * 1024  # first reservation step for bodies of unknown length
FORM_ALLOWANCE = 64 * 1024  # multipart framing and form fields, beyond the file itself


def max_file_size(el: Element) -> int:
    cap = el.config.storage_max_file_size
    return cap if cap > 0 else el.config.storage_max_size


def over_limit(el: Element, size: int | None) -> StorageError:
    """A file over :func:`max_file_size`: 413 only when ``STORAGE_MAX_FILE_SIZE`` is set
    explicitly; without it the limit is the element's capacity, and a file that cannot
    fit the element is 507, the one status on which artStore's ingester tries another
    element (any other refusal ends the upload)."""
    cap, what = max_file_size(el), "File" if size is None else f"File size {size}"
    if el.config.storage_max_file_size > 0:
        return PayloadTooLarge(f"{what} exceeds the maximum of {cap} bytes",
                               headers={"Connection": "close"})
    return InsufficientStorage(f"Not enough capacity: {what.lower()} exceeds the element's "
                               f"capacity of {cap} bytes", headers={"Connection": "close"})


def file_size_bound(body_length: int) -> int:
    """The largest file a multipart body of ``body_length`` bytes can carry, as far as
    limits go: the framing and form fields get :data:`FORM_ALLOWANCE` (a file of
    exactly the limit must not be refused for its envelope; the streamed byte count
    enforces the real limit)."""
    return max(body_length - FORM_ALLOWANCE, 0)


def check_declared_size(el: Element, size: int | None) -> None:
    """413 or 507 (see :func:`over_limit`) before any byte is read when the announced
    size is over the limit."""
    if size is not None and size > max_file_size(el):
        raise over_limit(el, size)


def _refuse(el: Element, r: repo.Reservation, need: int) -> None:
    """:raises Conflict / InsufficientStorage: for a reservation that was refused."""
    if r.status == "exists":
        raise Conflict("File with this ID already exists")
    limit = el.config.storage_max_size
    if r.status == "capacity":
        raise InsufficientStorage(
            f"Not enough capacity: {need} bytes requested, "
            f"{max(limit - r.used - r.reserved, 0)} of {limit} bytes available",
            headers={"Connection": "close"},
        )
    if r.status == "disk":
        raise InsufficientStorage(f"Not enough free disk space for {need} bytes",
                                  headers={"Connection": "close"})
    if r.status != "ok":
        raise ClientGone("The upload was cancelled while it was running")


async def _free(el: Element) -> int | None:
    free = await el.backend.free_bytes()
    return None if free is None else free - el.config.storage_disk_reserve


async def precheck_capacity(el: Element, need: int | None) -> None:
    """An early, non-reserving 507 (e.g. before answering ``100 Continue``)."""
    if need:
        used, _files, reserved = await repo.capacity_usage(el.db.pool, el.db.q)
        free = await _free(el)
        if used + reserved + need > el.config.storage_max_size:
            _refuse(el, repo.Reservation("capacity", used, reserved), need)
        if free is not None and free - reserved < need:
            _refuse(el, repo.Reservation("disk", used, reserved), need)


async def reserve(el: Element, txid: uuid.UUID, need: int, *, insert: dict | None,
                   check_id: bool = False) -> None:
    """Atomically check capacity and (insert the WAL row with | grow) a reservation.

    :raises Conflict: the id is a file, or held by an unfinished upload (see
        ``migrations/0012.upload_ids.py``; a resumable one that expired is removed first,
        as its ``HEAD`` already answers 404) / InsufficientStorage:
    :raises Unavailable: (503) a new intent while this process cannot confirm its lease.
    """
    if insert is not None:
        liveness.require_writable(el.runtime)
    try:
        try:
            r = await el.commits.reserve(txid, need, intent=insert, check_id=check_id)
        except asyncpg.UniqueViolationError as exc:
            if insert is None or not (exc.constraint_name or "").endswith("_wal_upload_id"):
                raise
            if not await _reap_expired(el, insert["file_id"]):
                raise Conflict(f"File with ID {insert['file_id']} is being uploaded by "
                               "another request (an upload holds its ID until it ends)") from None
            r = await el.commits.reserve(txid, need, intent=insert, check_id=check_id)
    except Conflict:
        raise  # refused by the database: no intent was inserted
    except Exception:
        # the intent may have been inserted (a lost connection): never let it wait for
        # this live process to die before recovery may resolve it
        if insert is not None and (lease := liveness.owner(el.runtime)) is not None:
            await lease.disown(txid)
        raise
    if r.status == "exists":
        raise Conflict(f"File with ID {insert['file_id']} already exists")
    _refuse(el, r, need)


async def _reap_expired(el: Element, file_id: uuid.UUID) -> bool:
    """Remove the expired, unswept resumable upload of ``file_id`` (row, reservation,
    staged bytes) so the id is free again; False if there is none."""
    if not await repo_uploads.reap_expired(el.db, file_id, utcnow(),
                                           "expired; its id was taken by a new upload"):
        return False
    await make_staging(el.backend).discard(file_id)  # before the new upload stages any
    return True


async def grow(el: Element, txid: uuid.UUID, reserved: int, need: int, cap: int) -> int:
    """Grow the reservation by a step; near the limit, by just what is ``need``ed.

    A whole step (64 MiB) must not be demanded from a disk with less free space than
    that: a small chunked upload would get 507 on a disk with room for it (issue 11).
    """
    # Doubling from 1 MiB, by at most GROWTH_STEP at a time: a small chunked body never
    # holds 64 MiB of capacity that concurrent uploads could use.  Never less than
    # ``need``: a need past ``cap`` is reserved as it is (and refused by the capacity),
    # not quietly capped (issue 23: a deferred upload grew past the capacity that way).
    step = max(need, min(cap, max(MIN_RESERVATION, min(2 * reserved, reserved + GROWTH_STEP))))
    try:
        await reserve(el, txid, step, insert=None)
        return step
    except InsufficientStorage:
        if step == need:
            raise
    await reserve(el, txid, need, insert=None)
    return need
