"""Repository functions for search: run composed statements, and a bulk loader.

The statements come from :mod:`storage.db.search_sql` (trusted fragments, values as ``$n``).
:func:`insert_files` loads many rows in one pipelined round trip (benchmarks, imports);
the search document is computed by the table's trigger as for any other insert.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import asyncpg

from ..models import ElementState, FileMeta
from .pool import session_state_changed
from .repo import insert_args
from .sql import Queries


async def use_custom_plans(conn: asyncpg.Connection, sql: str) -> None:
    """Plan this pooled connection's statements for their actual values until release.

    A session setting: the connection is marked so the pool resets it when released.
    """
    session_state_changed(conn)
    await conn.execute(sql)


async def search_page(conn: asyncpg.Connection, sql: str,
                      args: list[Any]) -> list[tuple[str, Any, uuid.UUID]]:
    """Rows of a ``page_statement``: (FileMetadataResponse JSON text, sort key, file_id)."""
    return [tuple(r) for r in await conn.fetch(sql, *args)]


async def count_matches(conn: asyncpg.Connection, sql: str, args: list[Any]) -> int:
    return await conn.fetchval(sql, *args)


async def estimate_matches(conn: asyncpg.Connection, sql: str, args: list[Any]) -> int:
    """The planner's estimate of the rows a condition matches (nothing is read)."""
    plan = await conn.fetchval(sql, *args)
    return int(plan[0]["Plan"]["Plan Rows"])


async def explain_analyze(conn: asyncpg.Connection, sql: str, args: list[Any]) -> Any:
    """The JSON plan of an ``EXPLAIN (ANALYZE, …)`` statement (it runs the query)."""
    return await conn.fetchval(sql, *args)


async def vacuum_analyze(conn: asyncpg.Connection, sql: str) -> None:
    """Refresh statistics and the visibility map after a bulk load (not in a transaction)."""
    await conn.execute(sql)


async def newest_created_at(conn: asyncpg.Connection, sql: str) -> datetime | None:
    return await conn.fetchval(sql)


async def server_settings(conn: asyncpg.Connection, sql: str) -> dict[str, str]:
    return dict(await conn.fetchrow(sql))


async def total_files(conn: asyncpg.Connection, q: Queries) -> int:
    """The O(1) file counter of ``<prefix>_config`` (kept by a trigger)."""
    return ElementState.from_record(await conn.fetchrow(q.get_state)).total_files


async def insert_files(conn: asyncpg.Connection, q: Queries, metas: Iterable[FileMeta]) -> int:
    """Insert many rows in one pipelined ``executemany`` of ``insert_file``; returns the count."""
    args = [insert_args(m) for m in metas]
    await conn.executemany(q.insert_file, args)
    return len(args)
