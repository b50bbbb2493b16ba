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

from .db import Db
from .models import ElementState, FileMeta, WalEntry
from .sql import Queries

Conn = asyncpg.Connection | asyncpg.Pool


# files ----------------------------------------------------------------------------------


def insert_args(m: FileMeta) -> tuple[Any, ...]:
    """``$1..$16`` of ``insert_file`` (and of ``finish_create``, which starts the same way)."""
    return (m.file_id, m.original_filename, m.storage_filename, m.file_size, m.content_type,
            m.created_at, m.updated_at, m.created_by_id, m.created_by_username,
            m.created_by_fullname, m.description, m.version, m.storage_path, m.checksum,
            m.metadata_json, m.cache_ttl_hours)


async def insert_file(conn: Conn, q: Queries, m: FileMeta) -> FileMeta:
    return FileMeta.from_record(await conn.fetchrow(q.insert_file, *insert_args(m)))


async def finish_create(db: Db, m: FileMeta, txid: uuid.UUID, result: dict[str, Any],
                        at: datetime) -> FileMeta:
    """Insert the metadata row and commit its WAL intent in one atomic statement."""
    rec = await db.pool.fetchrow(db.q.finish_create, *insert_args(m), txid, result, at)
    return FileMeta.from_record(rec)


async def get_file(db: Db, file_id: uuid.UUID) -> FileMeta | None:
    rec = await db.pool.fetchrow(db.q.get_file, file_id)
    return FileMeta.from_record(rec) if rec else None


async def lock_file(conn: asyncpg.Connection, q: Queries, file_id: uuid.UUID) -> FileMeta | None:
    rec = await conn.fetchrow(q.get_file_for_update, file_id)
    return FileMeta.from_record(rec) if rec else None


async def update_file(
    conn: Conn, q: Queries, file_id: uuid.UUID, *, description: str | None,
    version: str | None, metadata: dict[str, Any] | None, replace_metadata: bool,
    updated_at: datetime, ttl_hours: int,
) -> FileMeta | None:
    rec = await conn.fetchrow(
        q.update_file, file_id, description, version, metadata, replace_metadata, updated_at,
        ttl_hours,
    )
    return FileMeta.from_record(rec) if rec else None


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
                     at: datetime) -> bool:
    return await conn.fetchval(q.commit_wal, txid, result, at) is not None


async def rollback_wal(conn: Conn, q: Queries, txid: uuid.UUID, error: str,
                       at: datetime) -> bool:
    return await conn.fetchval(q.rollback_wal, txid, error[:4000], at) is not None


async def set_wal_temp(db: Db, txid: uuid.UUID, temp_path: str) -> bool:
    """Record in a pending intent where its partial data lives; False if not pending."""
    return await db.pool.fetchval(db.q.set_wal_temp, txid, temp_path) is not None


@dataclass(frozen=True, slots=True)
class Reservation:
    status: str  # ok | exists | capacity | disk | gone
    used: int
    reserved: int


async def reserve(
    db: Db, txid: uuid.UUID, need: int, *, limit: int, free: int | None,
    intent: dict[str, Any] | None = None, check_id: bool = False,
) -> Reservation:
    """Check capacity and insert (``intent`` given) or grow a WAL reservation atomically."""
    i = intent or {}
    rec = await db.pool.fetchrow(
        db.q.reserve, txid, need, limit, free, i.get("op"), i.get("file_id"), i.get("data"),
        i.get("user_id"), i.get("started_at"), check_id,
    )
    return Reservation(rec["status"], rec["used"] or 0, rec["reserved"] or 0)


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
