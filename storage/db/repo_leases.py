"""Process leases (``sql/leases.sql``, ``migrations/0011.fence.py``): thin functions."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from .repo import Conn
from .sql import Queries


@dataclass(frozen=True, slots=True)
class LeaseRow:
    lease_id: uuid.UUID
    holder: str
    host: str
    pid: int
    heartbeat_at: datetime


async def register(conn: Conn, q: Queries, lease_id: uuid.UUID, holder: str, host: str,
                   pid: int) -> None:
    await conn.fetchval(q.lease_register, lease_id, holder, host, pid)


async def beat(conn: Conn, q: Queries, lease_id: uuid.UUID) -> bool:
    """Renew; False when the row is gone (it expired and another process removed it)."""
    return await conn.fetchval(q.lease_beat, lease_id) is not None


async def drop(conn: Conn, q: Queries, lease_ids: list[uuid.UUID]) -> None:
    await conn.execute(q.lease_drop, lease_ids)


async def others_live(conn: Conn, q: Queries, own: uuid.UUID, ttl_s: float) -> list[LeaseRow]:
    rows = await conn.fetch(q.lease_others_live, own, ttl_s)
    return [LeaseRow(r["lease_id"], r["holder"], r["host"], r["pid"], r["heartbeat_at"])
            for r in rows]


async def purge(conn: Conn, q: Queries, older_than_s: float) -> int:
    status = await conn.execute(q.lease_purge, older_than_s)
    return int(status.split()[-1])
