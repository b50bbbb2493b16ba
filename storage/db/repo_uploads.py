"""Repository functions for resumable uploads (sql/uploads.sql), one per statement.

:class:`ResumableUpload` is one row of ``<prefix>_uploads`` with the status and the
reservation of its WAL row, which every statement returns with it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..models import from_record
from .pool import Db


@dataclass(slots=True)
class ResumableUpload:
    file_id: uuid.UUID
    transaction_id: uuid.UUID
    upload_offset: int
    upload_length: int | None  # None: deferred (Upload-Defer-Length: 1)
    metadata_header: str  # Upload-Metadata as the client sent it (canonical form)
    original_filename: str
    content_type: str
    description: str | None
    version: str | None
    metadata_json: dict[str, Any] | None
    created_by_id: str
    created_by_username: str
    storage_path: str
    storage_filename: str
    staging: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    completed_at: datetime | None
    lease_owner: str | None
    lease_until: datetime | None
    wal_status: str | None  # of the WAL row holding the reservation
    reserved_bytes: int

    @classmethod
    def from_record(cls, rec: Any) -> ResumableUpload:
        return from_record(cls, rec)

    @property
    def relative_path(self) -> str:
        return self.storage_path + self.storage_filename

    @property
    def full(self) -> bool:
        """Every byte is staged (the file may still have to be made)."""
        return self.upload_length is not None and self.upload_offset == self.upload_length

    @property
    def finished(self) -> bool:
        """It is a file: marked complete, or its WAL row committed before the mark."""
        return self.completed_at is not None or self.wal_status == "committed"


@dataclass(frozen=True, slots=True)
class NewUpload:
    """What ``upload_insert`` stores besides the lease."""

    file_id: uuid.UUID
    transaction_id: uuid.UUID
    upload_length: int | None
    metadata_header: str
    original_filename: str
    content_type: str
    description: str | None
    version: str | None
    metadata_json: dict[str, Any] | None
    created_by_id: str
    created_by_username: str
    storage_path: str
    storage_filename: str
    created_at: datetime
    expires_at: datetime


def _one(rec: Any) -> ResumableUpload | None:
    return ResumableUpload.from_record(rec) if rec else None


async def insert(db: Db, new: NewUpload, owner: str, until: datetime) -> ResumableUpload:
    """:raises asyncpg.UniqueViolationError: an upload with this file_id exists."""
    rec = await db.pool.fetchrow(
        db.q.upload_insert, new.file_id, new.transaction_id, new.upload_length,
        new.metadata_header, new.original_filename, new.content_type, new.description,
        new.version, new.metadata_json, new.created_by_id, new.created_by_username,
        new.storage_path, new.storage_filename, new.created_at, new.expires_at, owner, until)
    return ResumableUpload.from_record(rec)


async def get(db: Db, file_id: uuid.UUID) -> ResumableUpload | None:
    return _one(await db.pool.fetchrow(db.q.upload_get, file_id))


async def take_lease(db: Db, file_id: uuid.UUID, owner: str, until: datetime, now: datetime,
                     dead_owner: str | None = None) -> ResumableUpload | None:
    """The row, now leased to ``owner``; None when another live owner holds it."""
    return _one(await db.pool.fetchrow(db.q.upload_lease_take, file_id, owner, until, now,
                                       dead_owner))


async def renew_lease(db: Db, file_id: uuid.UUID, owner: str, until: datetime,
                      expires_at: datetime) -> bool:
    return await db.pool.fetchval(db.q.upload_lease_renew, file_id, owner, until,
                                  expires_at) is not None


async def release_lease(db: Db, file_id: uuid.UUID, owner: str) -> None:
    await db.pool.execute(db.q.upload_lease_release, file_id, owner)


async def advance(db: Db, file_id: uuid.UUID, owner: str, *, expected: int, offset: int,
                  staging: dict[str, Any], at: datetime, expires_at: datetime,
                  keep_lease: bool) -> bool:
    """Record ``offset`` durably staged; False (nothing changed) when the lease was lost
    or the offset is no longer ``expected``."""
    return await db.pool.fetchval(db.q.upload_advance, file_id, owner, expected, offset,
                                  staging, at, expires_at, keep_lease) is not None


async def declare_length(db: Db, file_id: uuid.UUID, owner: str, length: int) -> bool:
    return await db.pool.fetchval(db.q.upload_declare_length, file_id, owner,
                                  length) is not None


async def mark_completed(db: Db, file_id: uuid.UUID, at: datetime,
                         expires_at: datetime) -> bool:
    return await db.pool.fetchval(db.q.upload_mark_completed, file_id, at,
                                  expires_at) is not None


async def mark_finished(db: Db, at: datetime, expires_at: datetime) -> int:
    """Mark complete the uploads whose file is made but whose mark was lost; how many."""
    status = await db.pool.execute(db.q.upload_mark_finished, at, expires_at)
    return int(status.split()[-1])


async def remove(db: Db, file_id: uuid.UUID, owner: str | None, reason: str,
                 at: datetime) -> tuple[int, int]:
    """Delete the row and roll back its pending WAL row (releasing the reservation) in one
    statement; (rows removed, reservations released)."""
    rec = await db.pool.fetchrow(db.q.upload_remove, file_id, owner, reason[:4000], at)
    return rec["removed"], rec["released"]


async def purge_finished(db: Db, now: datetime) -> int:
    status = await db.pool.execute(db.q.upload_purge_finished, now)
    return int(status.split()[-1])


async def live_ids(db: Db, file_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    rows = await db.pool.fetch(db.q.upload_live_ids, list(file_ids))
    return {r["file_id"] for r in rows}


async def reap_expired(db: Db, file_id: uuid.UUID, now: datetime, reason: str) -> bool:
    """Remove the upload of ``file_id`` if it is unfinished, expired and not held; True
    if it was (its reservation released in the same statement)."""
    rec = await db.pool.fetchrow(db.q.upload_reap_expired, file_id, now, reason[:4000])
    return rec["removed"] > 0


async def pending_bytes(db: Db, user_id: str) -> int:
    """What ``user_id``'s unfinished resumable uploads hold reserved."""
    return await db.pool.fetchval(db.q.upload_pending_bytes, user_id)


async def shrink_reservation(db: Db, txid: uuid.UUID, reserved: int) -> None:
    await db.pool.execute(db.q.upload_shrink_reservation, txid, reserved)
