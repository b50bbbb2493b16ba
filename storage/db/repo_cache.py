"""Repository functions for cache maintenance and recovery (sql/cache.sql, sql/recovery.sql).

One function per statement, as in :mod:`storage.db.repo`.  Arrays go to PostgreSQL as
``unnest`` parameters, so a batch is one round trip and every statement prepares.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from ..models import FileMeta, WalEntry
from .sql import Queries

Conn = asyncpg.Connection | asyncpg.Pool
NIL = uuid.UUID(int=0)
_COLUMNS = (
    "file_id", "original_filename", "storage_filename", "file_size", "content_type",
    "created_at", "updated_at", "created_by_id", "created_by_username",
    "created_by_fullname", "description", "version", "storage_path", "checksum",
    "metadata_json",
)


def columns(rows: Sequence[FileMeta]) -> list[list[Any]]:
    """The fifteen parallel arrays ``rebuild_upsert``/``rebuild_insert_missing`` take."""
    return [[getattr(m, c) for m in rows] for c in _COLUMNS]


@dataclass(frozen=True, slots=True)
class UpsertCounts:
    verified: int
    created: int
    updated: int


async def db_now(conn: Conn, q: Queries) -> datetime:
    return await conn.fetchval(q.cache_db_now)


async def count_files(conn: Conn, q: Queries) -> int:
    return await conn.fetchval(q.cache_count_files)


async def existing_ids(conn: Conn, q: Queries, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    return {r["file_id"] for r in await conn.fetch(q.cache_existing_ids, list(ids))}


async def rebuild_upsert(conn: Conn, q: Queries, rows: Sequence[FileMeta], *,
                         scan_start: datetime, horizon: datetime, ttl: int) -> UpsertCounts:
    rec = await conn.fetchrow(q.rebuild_upsert, scan_start, horizon, ttl, *columns(rows))
    return UpsertCounts(rec["verified"], rec["created"], rec["updated"])


async def insert_missing(conn: Conn, q: Queries, rows: Sequence[FileMeta], *,
                         horizon: datetime, ttl: int) -> int:
    return len(await conn.fetch(q.rebuild_insert_missing, horizon, ttl, *columns(rows)))


async def name_conflicts(conn: Conn, q: Queries, rows: Sequence[FileMeta]
                         ) -> list[tuple[uuid.UUID, uuid.UUID]]:
    recs = await conn.fetch(q.rebuild_name_conflicts, [m.file_id for m in rows],
                            [m.storage_filename for m in rows])
    return [(r["file_id"], r["other"]) for r in recs]


async def unseen(conn: Conn, q: Queries, *, scan_start: datetime, horizon: datetime,
                 after: uuid.UUID, limit: int) -> list[FileMeta]:
    recs = await conn.fetch(q.rebuild_unseen, scan_start, horizon, after, limit)
    return [FileMeta.from_record(r) for r in recs]


async def delete_unseen(conn: Conn, q: Queries, ids: Sequence[uuid.UUID], *,
                        scan_start: datetime, horizon: datetime) -> int:
    return len(await conn.fetch(q.rebuild_delete_unseen, list(ids), scan_start, horizon))


async def delete_without_data(conn: Conn, q: Queries, meta: FileMeta) -> bool:
    """Remove the row ``meta`` (read from an attr document) describes, if it still does."""
    return await conn.fetchval(q.rebuild_delete_without_data, meta.file_id, meta.storage_path,
                               meta.storage_filename, meta.checksum) is not None


async def recompute_totals(conn: asyncpg.Connection, q: Queries) -> tuple[int, int]:
    """Reset the config totals from the table; the caller holds a transaction."""
    await conn.fetchval(q.totals_lock)
    rec = await conn.fetchrow(q.totals_recompute)
    return rec["total_files"], rec["total_size_bytes"]


async def scan_clear(conn: Conn, q: Queries) -> None:
    await conn.execute(q.scan_clear)


async def scan_add(conn: Conn, q: Queries, scan_id: uuid.UUID,
                   items: Sequence[tuple[uuid.UUID | None, str]]) -> None:
    await conn.execute(q.scan_add, scan_id, [i for i, _ in items], [p for _, p in items])


async def scan_analyze(conn: Conn, q: Queries) -> None:
    await conn.execute(q.scan_analyze)


async def scan_orphan_attr(conn: Conn, q: Queries, scan_id: uuid.UUID,
                           horizon: datetime) -> tuple[int, list[str]]:
    rec = await conn.fetchrow(q.scan_orphan_attr, scan_id, horizon)
    return rec["n"], list(rec["sample"] or [])


async def scan_orphan_cache(conn: Conn, q: Queries, scan_id: uuid.UUID,
                            horizon: datetime) -> tuple[int, list[str]]:
    rec = await conn.fetchrow(q.scan_orphan_cache, scan_id, horizon)
    return rec["n"], list(rec["sample"] or [])


async def scan_expired(conn: Conn, q: Queries) -> tuple[int, list[str]]:
    rec = await conn.fetchrow(q.scan_expired)
    return rec["n"], list(rec["sample"] or [])


async def scan_drop(conn: Conn, q: Queries, scan_id: uuid.UUID) -> None:
    await conn.execute(q.scan_drop, scan_id)


async def expired_after(conn: Conn, q: Queries, after: uuid.UUID,
                        limit: int) -> list[FileMeta]:
    return [FileMeta.from_record(r) for r in await conn.fetch(q.expired_rows_after, after, limit)]


async def refresh_if_unchanged(conn: Conn, q: Queries, m: FileMeta, ttl: int,
                               seen: datetime) -> bool:
    return await conn.fetchval(
        q.refresh_if_unchanged, m.file_id, m.original_filename, m.file_size, m.content_type,
        m.description, m.version, m.created_at, m.updated_at, m.checksum, m.metadata_json,
        ttl, seen,
    ) is not None


async def delete_if_expired(conn: Conn, q: Queries, file_id: uuid.UUID) -> bool:
    return await conn.fetchval(q.delete_if_expired, file_id) is not None


async def lock_file_nowait(conn: asyncpg.Connection, q: Queries,
                           file_id: uuid.UUID) -> FileMeta | None:
    """The row, locked; :raises asyncpg.LockNotAvailableError: when a live operation has it."""
    rec = await conn.fetchrow(q.lock_file_nowait, file_id)
    return FileMeta.from_record(rec) if rec else None


async def pending_page(conn: Conn, q: Queries, *, before: datetime,
                       after: tuple[datetime, uuid.UUID], limit: int) -> list[WalEntry]:
    recs = await conn.fetch(q.pending_wal_page, before, after[0], after[1], limit)
    return [WalEntry.from_record(r) for r in recs]
