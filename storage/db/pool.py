"""The asyncpg pool and the rendered statements of one app, bundled as ``Db``."""

from __future__ import annotations

import asyncio
import json
import weakref
from dataclasses import dataclass

import asyncpg

from .sql import Queries, queries


@dataclass(frozen=True, slots=True)
class Db:
    pool: asyncpg.Pool
    q: Queries


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(
            typ, encoder=lambda v: json.dumps(v, ensure_ascii=False), decoder=json.loads,
            schema="pg_catalog",
        )


_needs_reset: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()


def session_state_changed(conn: asyncpg.Connection) -> None:
    """Say that ``conn`` (a pooled connection) now carries session state (a session
    setting, an advisory lock, a label): it gets the full reset when released."""
    _needs_reset.add(getattr(conn, "_con", conn))  # a PoolConnectionProxy wraps it


def session_state_cleared(conn: asyncpg.Connection) -> None:
    """Say that ``conn`` released what :func:`session_state_changed` announced."""
    _needs_reset.discard(getattr(conn, "_con", conn))


async def _reset(conn: asyncpg.Connection) -> None:
    """Release-time reset.  asyncpg's default resets every connection with one more
    round trip (UNLISTEN, RESET ALL, unlock advisory locks), which cost as much as a
    small request's own query; an open transaction is rolled back by asyncpg either
    way.  Only connections marked by :func:`session_state_changed` need the rest."""
    if conn in _needs_reset:
        _needs_reset.discard(conn)
        await conn.execute(conn.get_reset_query())


async def open_db(dsn: str, prefix: str, *, max_size: int, timeout: float) -> Db:
    pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=max_size, init=_init_connection, command_timeout=timeout,
        max_inactive_connection_lifetime=300, reset=_reset,
    )
    return Db(pool=pool, q=queries(prefix))


async def close_db(db: Db, timeout: float = 10) -> None:
    try:
        await asyncio.wait_for(db.pool.close(), timeout)
    except TimeoutError:
        db.pool.terminate()
