"""PostgreSQL advisory locks per prefix: one maintenance operation at a time across
every process and host serving an element (no Redis, unlike upstream §7.3).

A lock is held by one database session for the whole operation; PostgreSQL drops it
when that session ends, so a crashed holder never leaves a stale lock.  The holder
labels its session (``application_name``) with what it does, from where and since
when, so a refused caller can say what is in the way (409).

Keys are 64-bit, derived from the prefix and the purpose:

- ``maintenance``: cache rebuild (full, incremental), consistency check,
  cleanup-expired, migrate-attrs;
- ``scrub``: re-hashing data files;
- ``recovery``: resolving pending WAL rows (one resolver at a time);
- ``serve``: held *shared* by every live server process of the element; whoever gets
  it *exclusively* knows no server is running (see storage/domain/recovery_passes.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ..errors import Conflict
from ..models import utcnow
from .pool import Db, session_state_changed
from .sql import Queries

MAINTENANCE, SCRUB, RECOVERY, SERVE = "maintenance", "scrub", "recovery", "serve"
_BY = re.compile(r" by (?P<host>[^:\s]*):(?P<pid>\d+)(?: |$)")


def key(prefix: str, purpose: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``purpose`` on ``prefix``."""
    digest = hashlib.sha256(f"storage-element:{prefix}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def label(what: str, since: datetime | None = None) -> str:
    """``<what> by <host>:<pid> since <UTC time>`` (application_name keeps 63 bytes)."""
    stamp = (since or utcnow()).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{what} by {_host()}:{os.getpid()} since {stamp}"[:63]


def _host() -> str:
    return socket.gethostname()[:16]


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int
    label: str
    client_addr: str | None
    mode: str

    def describe(self) -> str:
        who = self.label or "an unlabelled session"
        return f"{who} (database session {self.pid})"


def dead_local(holder: Holder) -> bool:
    """True when ``holder``'s label names a process on this host that no longer exists."""
    match = _BY.search(holder.label)
    if not match or match["host"] != _host():
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


class LockBusy(Conflict):
    """Another session holds the lock; ``holders`` says who."""

    code = "lock_busy"

    def __init__(self, what: str, holders: list[Holder]) -> None:
        held_by = "; ".join(h.describe() for h in holders) or "another session"
        super().__init__(
            f"Cannot acquire lock: {what} is already running on this element: {held_by}",
            extra={"lock": {"held_by": [h.label for h in holders]}},
        )
        self.holders = holders


async def holders(conn: asyncpg.Connection, q: Queries, lock_key: int) -> list[Holder]:
    rows = await conn.fetch(q.lock_holders, lock_key)
    return [Holder(r["pid"], r["label"] or "", r["client_addr"], r["mode"]) for r in rows]


async def try_lock(conn: asyncpg.Connection, q: Queries, lock_key: int, *,
                   shared: bool = False) -> bool:
    return await conn.fetchval(q.lock_try_shared if shared else q.lock_try, lock_key)


async def unlock(conn: asyncpg.Connection, q: Queries, lock_key: int, *,
                 shared: bool = False) -> None:
    await conn.fetchval(q.lock_release_shared if shared else q.lock_release, lock_key)


async def set_label(conn: asyncpg.Connection, q: Queries, text: str) -> None:
    await conn.fetchval(q.lock_label, text)


@contextlib.asynccontextmanager
async def hold(db: Db, purpose: str, what: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold ``purpose``'s lock on a pool connection for the block; yields that connection.

    :raises LockBusy: (409) when another session holds it.
    """
    lock_key = key(db.q.prefix, purpose)
    async with db.pool.acquire() as conn:
        session_state_changed(conn)  # the label and the lock go with the pool's reset
        await set_label(conn, db.q, label(what))
        if not await try_lock(conn, db.q, lock_key):
            raise LockBusy(what, await holders(conn, db.q, lock_key))
        try:
            yield conn
        finally:
            # The pool's reset on release unlocks too; this keeps the window minimal.
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await unlock(conn, db.q, lock_key)
