"""When recovery runs, and what a pass may resolve: the startup pass under the serve lock,
and the periodic pass (the rules themselves: :mod:`storage.domain.recovery`).

**Who may resolve what.**  Several processes (workers, hosts) can serve one prefix,
and a pending row of a live process must not be "recovered" under its feet.  Every
server holds the prefix's ``serve`` advisory lock *shared* for its lifetime
(PostgreSQL drops it when the process dies).  At startup a process takes the
``recovery`` lock and tries the ``serve`` lock *exclusively*:

- granted → no other server is alive, every pending row is orphaned: resolve all
  of them and sweep every temp file ("exclusive" pass);
- refused → other servers are alive and may own young rows: resolve only updates
  and deletes older than 5 minutes (a live one holds its row lock, and NOWAIT skips
  it), uploads older than 24 hours, and temp files untouched for an hour ("shared"
  pass, also run every few minutes by each server for its crashed siblings).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

from ..db import locks
from .element import Element
from .recovery import Report, recover

log = logging.getLogger(__name__)
MAINTAIN_EVERY_S = 300.0
ALONE_WAIT_S = 5.0  # a killed predecessor's database session may take a moment to end


async def _lock_wait(conn: asyncpg.Connection, el: Element, lock_key: int, what: str) -> None:
    """Wait for an exclusive advisory lock, saying every 10 s who holds it."""
    loop = asyncio.get_running_loop()
    next_note = loop.time()
    while not await locks.try_lock(conn, el.db.q, lock_key):
        if loop.time() >= next_note:
            who = "; ".join(h.describe() for h in await locks.holders(conn, el.db.q, lock_key))
            log.info("waiting for the %s lock held by %s", what, who or "another session")
            next_note = loop.time() + 10
        await asyncio.sleep(0.2)


async def claim(conn: asyncpg.Connection, el: Element) -> bool:
    """Try the serve lock exclusively: True when no server of this prefix is alive.

    A holder that is a dead process on this host (a predecessor just SIGKILLed, whose
    database session PostgreSQL has not reaped yet) is waited for, briefly.
    """
    q, serve = el.db.q, locks.key(el.prefix, locks.SERVE)
    deadline = asyncio.get_running_loop().time() + ALONE_WAIT_S
    while not await locks.try_lock(conn, q, serve):
        holders = await locks.holders(conn, q, serve)
        if not all(locks.dead_local(h) for h in holders):
            return False
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def startup(el: Element, conn: asyncpg.Connection, *, serve: bool,
                  force: bool = False) -> Report:
    """The startup pass on ``conn``; with ``serve`` the connection keeps the shared serve
    lock afterwards.  ``force`` (ops CLI) resolves everything even if servers seem alive."""
    q = el.db.q
    rec_key, serve_key = locks.key(el.prefix, locks.RECOVERY), locks.key(el.prefix, locks.SERVE)
    await locks.set_label(conn, q, locks.label("startup recovery" if serve else "recovery"))
    await _lock_wait(conn, el, rec_key, "recovery")
    try:
        exclusive = await claim(conn, el)
        try:
            report = await recover(el, alone=exclusive or force)
        finally:
            if serve and not await locks.try_lock(conn, q, serve_key, shared=True):
                raise RuntimeError("could not take the shared serve lock")
            if exclusive:
                await locks.unlock(conn, q, serve_key)
    finally:
        await locks.unlock(conn, q, rec_key)
    await locks.set_label(conn, q, locks.label("serving"))
    return report


async def connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn)


async def maintain(el: Element, dsn: str, holder: list[asyncpg.Connection],
                    counted: Callable[[Report], None] = lambda _report: None) -> None:
    """Every few minutes: keep the serve lock, resolve crashed siblings' rows, purge;
    each pass's report goes to ``counted`` (the metrics)."""
    while True:
        await asyncio.sleep(MAINTAIN_EVERY_S)
        try:
            if holder[0].is_closed():  # the database restarted: take the serve lock again
                holder[0] = await connect(dsn)
                await locks.set_label(holder[0], el.db.q, locks.label("serving"))
                await locks.try_lock(holder[0], el.db.q, locks.key(el.prefix, locks.SERVE),
                                     shared=True)
            async with locks.hold(el.db, locks.RECOVERY, "periodic recovery"):
                report = await recover(el, alone=False)
            counted(report)
            if report.completed or report.rolled_back or report.wal_purged:
                log.info("periodic recovery: %s", report.summary())
        except locks.LockBusy:
            continue
        except Exception:  # keep the task alive; the next round retries
            log.exception("periodic recovery failed")
