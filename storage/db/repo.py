"""Thin repository functions: one per statement, returning dataclasses.

Each takes ``db`` (pool + rendered statements of the app's prefix) or an open
connection ``conn`` plus ``q`` when it must run inside a caller's transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from ..models import ElementState, FileMeta, Served, WalEntry
from .pool import Db
from .sql import Queries

Conn = asyncpg.Connection | asyncpg.Pool


# files ----------------------------------------------------------------------------------


def insert_args(m: FileMeta) -> tuple[Any, ...]:
    """``$1..$16`` of ``insert_file``; also the finish columns of ``commit_batch``."""
    return (m.file_id, m.original_filename, m.storage_filename, m.file_size, m.content_type,
            m.created_at, m.updated_at, m.created_by_id, m.created_by_username,
            m.created_by_fullname, m.description, m.version, m.storage_path, m.checksum,
            m.metadata_json, m.cache_ttl_hours)


async def insert_file(conn: Conn, q: Queries, m: FileMeta) -> FileMeta:
    return FileMeta.from_record(await conn.fetchrow(q.insert_file, *insert_args(m)))




async def get_file(db: Db, file_id: uuid.UUID) -> FileMeta | None:
    rec = await db.pool.fetchrow(db.q.get_file, file_id)
    return FileMeta.from_record(rec) if rec else None


async def get_served(db: Db, file_id: uuid.UUID) -> Served | None:
    """What a download needs (see :mod:`storage.domain.served`), or None without a row."""
    rec = await db.pool.fetchrow(db.q.get_served, file_id)
    return Served(file_id, *rec) if rec else None


async def lock_file(conn: asyncpg.Connection, q: Queries, file_id: uuid.UUID) -> FileMeta | None:
    rec = await conn.fetchrow(q.get_file_for_update, file_id)
    return FileMeta.from_record(rec) if rec else None


@dataclass(frozen=True, slots=True)
class Began:
    status: str  # ok (the session holds the file's lock) | missing | mode
    mode: str  # the element's mode as the statement saw it
    meta: FileMeta | None  # the row, when status is ok


async def begin_change(conn: asyncpg.Connection, q: Queries, *, txid: uuid.UUID, op: str,
                       file_id: uuid.UUID, data: dict[str, Any], user_id: str,
                       started_at: datetime, modes: tuple[str, ...] | None,
                       app_mode: str) -> Began:
    """PATCH/DELETE, first round trip: the file's lock, the mode, the row and the
    committed WAL intent.  Only with status ``ok`` does the session keep the lock."""
    rec = await conn.fetchrow(q.begin_change, txid, op, file_id, data, user_id, started_at,
                              list(modes) if modes is not None else None, app_mode)
    meta = FileMeta.from_record(rec) if rec["status"] == "ok" else None
    return Began(rec["status"], rec["mode"], meta)


async def end_update(conn: asyncpg.Connection, q: Queries, txid: uuid.UUID,
                     file_id: uuid.UUID, *, description: str | None, version: str | None,
                     metadata: dict[str, Any] | None, replace_metadata: bool,
                     updated_at: datetime, ttl_hours: int, result: dict[str, Any],
                     at: datetime) -> FileMeta:
    """PATCH, second round trip: the row, the WAL commit, the lock released."""
    rec = await conn.fetchrow(q.end_update, txid, file_id, description, version, metadata,
                              replace_metadata, updated_at, ttl_hours, result, at)
    return FileMeta.from_record(rec)


async def end_delete(conn: asyncpg.Connection, q: Queries, txid: uuid.UUID,
                     file_id: uuid.UUID, result: dict[str, Any], at: datetime) -> bool:
    """DELETE, second round trip: the row gone, the WAL commit, the lock released."""
    return await conn.fetchval(q.end_delete, txid, file_id, result, at)


async def abort_change(conn: asyncpg.Connection, q: Queries, txid: uuid.UUID,
                       file_id: uuid.UUID, error: str | None, at: datetime) -> None:
    """Release the lock of :func:`begin_change`; with ``error`` roll the intent back."""
    await conn.execute(q.abort_change, txid, file_id,
                       error[:4000] if error is not None else None, at)


async def refresh_file(conn: Conn, q: Queries, m: FileMeta, ttl_hours: int) -> FileMeta | None:
    rec = await conn.fetchrow(
        q.refresh_file, m.file_id, m.original_filename, m.file_size, m.content_type,
        m.description, m.version, m.created_at, m.updated_at, m.checksum, m.metadata_json,
        ttl_hours,
    )
    return FileMeta.from_record(rec) if rec else None


async def delete_file(conn: Conn, q: Queries, file_id: uuid.UUID) -> FileMeta | None:
    rec = await conn.fetchrow(q.delete_file, file_id)
    return FileMeta.from_record(rec) if rec else None


# WAL ------------------------------------------------------------------------------------


async def insert_wal(
    conn: Conn, q: Queries, *, txid: uuid.UUID, op: str, file_id: uuid.UUID | None,
    data: dict[str, Any], user_id: str | None, started_at: datetime, reserved: int = 0,
) -> WalEntry:
    rec = await conn.fetchrow(q.insert_wal, txid, op, file_id, data, user_id, started_at, reserved)
    return WalEntry.from_record(rec)


async def commit_wal(conn: Conn, q: Queries, txid: uuid.UUID, result: dict[str, Any],
                     at: datetime, *, claimer: uuid.UUID | None = None) -> bool:
    """Commit a pending intent: an unclaimed one, or one claimed by ``claimer``."""
    return await conn.fetchval(q.commit_wal, txid, result, at, claimer) is not None


async def rollback_wal(conn: Conn, q: Queries, txid: uuid.UUID, error: str,
                       at: datetime, *, claimer: uuid.UUID | None = None) -> bool:
    """Roll back a pending intent: an unclaimed one, or one claimed by ``claimer``."""
    return await conn.fetchval(q.rollback_wal, txid, error[:4000], at, claimer) is not None


async def claim_wal(conn: Conn, q: Queries, txid: uuid.UUID, claimer: uuid.UUID, *,
                    ttl_s: float, force: bool = False) -> WalEntry | None:
    """Claim a pending intent for ``claimer`` (see sql/wal.sql); None when refused."""
    rec = await conn.fetchrow(q.claim_wal, txid, claimer, ttl_s, force)
    return WalEntry.from_record(rec) if rec else None


async def release_wal_claim(conn: Conn, q: Queries, txid: uuid.UUID,
                            claimer: uuid.UUID) -> bool:
    return await conn.fetchval(q.release_wal_claim, txid, claimer) is not None


async def disown_wal(conn: Conn, q: Queries, txid: uuid.UUID) -> bool:
    return await conn.fetchval(q.disown_wal, txid) is not None


async def wal_state(conn: Conn, q: Queries, txid: uuid.UUID) -> tuple[str, uuid.UUID | None] | None:
    """(status, claimer) of one intent, None when there is no such row."""
    rec = await conn.fetchrow(q.wal_state, txid)
    return (rec["status"], rec["claimed_by"]) if rec else None


async def mode_for_commit(conn: Conn, q: Queries, app_mode: str) -> str:
    """The effective mode, the config row locked for the transaction (as commit_batch)."""
    return await conn.fetchval(q.mode_for_commit, app_mode)


async def set_wal_temp(db: Db, txid: uuid.UUID, temp_path: str) -> bool:
    """Record in a pending intent where its partial data lives; False if not pending."""
    return await db.pool.fetchval(db.q.set_wal_temp, txid, temp_path) is not None


async def pending_temps(db: Db) -> frozenset[str]:
    """Temp names (temp paths, multipart upload ids) that pending intents name."""
    return frozenset(r["temp_path"] for r in await db.pool.fetch(db.q.pending_temps))


async def pending_paths(db: Db) -> frozenset[str]:
    """Storage paths that pending intents name (their objects may be half written)."""
    return frozenset(r["relative_path"] for r in await db.pool.fetch(db.q.pending_paths))


async def abandon_wal(db: Db, txid: uuid.UUID, reason: str, *,
                      claimer: uuid.UUID | None = None) -> bool:
    """Leave a pending upload to recovery at once (see sql/wal.sql); False if it is not
    pending, or claimed by another than ``claimer``."""
    return await db.pool.fetchval(db.q.abandon_wal, txid, reason, claimer) is not None


@dataclass(frozen=True, slots=True)
class Reservation:
    status: str  # ok | exists | capacity | disk | gone
    used: int
    reserved: int


@dataclass(slots=True)
class Reserve:
    """A group-commit member: reserve ``need`` bytes in total for WAL ``txid``; with
    ``intent`` the WAL row is inserted (an upload starts), without it the row's
    reservation grows."""

    txid: uuid.UUID
    need: int
    intent: dict[str, Any] | None = None
    check_id: bool = False


@dataclass(slots=True)
class Finish:
    """A group-commit member: insert ``meta``'s row and commit WAL ``txid`` with ``result``."""

    meta: FileMeta
    txid: uuid.UUID
    result: dict[str, Any]
    at: datetime


@dataclass(frozen=True, slots=True)
class Finished:
    status: str  # ok | exists (id or name taken) | gone (intent resolved) | mode
    mode: str | None  # the element's mode as the batch saw it


async def commit_batch(db: Db, members: list[Reserve | Finish], *, limit: int,
                       free: int | None, app_mode: str) -> list[Reservation | Finished]:
    """One group commit (``storage.domain.groupcommit``): every member in one statement and one
    transaction; returns a :class:`Reservation` or :class:`Finished` per member, in order."""
    reserves = [(i, m) for i, m in enumerate(members) if not isinstance(m, Finish)]
    finishes = [(i, m) for i, m in enumerate(members) if isinstance(m, Finish)]
    r_cols: list[list[Any]] = [[] for _ in range(8)]
    for _, m in reserves:
        i = m.intent or {}
        for col, value in zip(r_cols, (m.txid, m.need, i.get("op"), i.get("file_id"),
                                       i.get("data"), i.get("user_id"), i.get("started_at"),
                                       m.check_id), strict=True):
            col.append(value)
    f_cols: list[list[Any]] = [[] for _ in range(19)]
    for _, m in finishes:
        for col, value in zip(f_cols, (m.txid, m.result, m.at, *insert_args(m.meta)),
                              strict=True):
            col.append(value)
    rows = await db.pool.fetch(db.q.commit_batch, limit, free, app_mode, *r_cols, *f_cols)
    out: list[Any] = [None] * len(members)
    for rec in rows:
        if rec["kind"] == "reserve":
            pos = reserves[rec["idx"] - 1][0]
            out[pos] = Reservation(rec["status"], rec["used"] or 0, rec["reserved"] or 0)
        else:
            out[finishes[rec["idx"] - 1][0]] = Finished(rec["status"], rec["mode"])
    return out


async def purge_wal(db: Db, cutoff: datetime) -> int:
    status = await db.pool.execute(db.q.purge_wal, cutoff)
    return int(status.split()[-1])


# element state --------------------------------------------------------------------------


async def capacity_usage(conn: Conn, q: Queries) -> tuple[int, int, int]:
    """(committed bytes, file count, bytes reserved by uploads in flight)."""
    rec = await conn.fetchrow(q.capacity_usage)
    return rec["used"], rec["files"], rec["reserved"]


async def get_state(db: Db) -> ElementState:
    return ElementState.from_record(await db.pool.fetchrow(db.q.get_state))


async def ping(db: Db) -> None:
    await db.pool.fetchval(db.q.ping)
