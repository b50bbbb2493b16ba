"""When recovery runs, and what a pass may resolve: the startup pass under the serve lock,
and the periodic pass (the rules themselves: :mod:`storage.domain.recovery`).

**Who may resolve what.**  Several processes (workers, hosts) can serve one prefix,
and a pending row of a live process must not be "recovered" under its feet.  Every
server holds the prefix's ``serve`` advisory lock *shared* for its lifetime
(PostgreSQL drops it when the process dies) and a **lease** row that it renews every
two seconds (:mod:`storage.domain.liveness`).  At startup a process takes the
``recovery`` lock and tries the ``serve`` lock *exclusively*:

- granted, and no other process's lease is live (or the live ones name processes of
  this host that no longer exist) → no other server is alive, every pending row is
  orphaned: resolve all of them and sweep every temp file ("exclusive" pass).  The
  lease decides, not the lock alone: a session that PostgreSQL dropped (a restart, a
  terminated backend, a proxy) releases the lock of a process that is still serving,
  but not its lease;
- refused → other servers are alive: resolve the rows whose owner's lease expired,
  and of the rows that name no owner, updates and deletes older than 5 minutes (a
  live one holds its row lock, and NOWAIT skips it), uploads older than 24 hours, and
  temp files untouched for an hour ("shared" pass, also run every few minutes by each
  server for its crashed siblings).

Every row is claimed before it is touched (:func:`storage.domain.recovery.resolve`).
The serve lock is kept by :func:`keep_alive`: its connection is checked with every
heartbeat and at once when it closes, and re-taken (the result checked) on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

import asyncpg

from ..db import locks
from . import liveness
from .element import Element
from .recovery import Report, forget_dead_local, recover

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


async def claim(conn: asyncpg.Connection, el: Element, lease: liveness.Lease | None) -> bool:
    """Try the serve lock exclusively: True when no server of this prefix is alive.

    A holder that is a dead process on this host (a predecessor just SIGKILLed, whose
    database session PostgreSQL has not reaped yet) is waited for, briefly.  Then the
    leases decide: another process's live lease means it is alive, whether or not its
    session still holds the lock (leases of dead processes of this host are removed).
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
    alive = await forget_dead_local(el, lease.id if lease is not None else uuid.UUID(int=0))
    if alive:
        log.warning("the serve lock was free but %d other process(es) hold a live lease "
                    "(%s): not alone, shared recovery pass", len(alive),
                    "; ".join(r.holder for r in alive[:5]))
        await locks.unlock(conn, q, serve)
        return False
    return True


async def startup(el: Element, conn: asyncpg.Connection, *, serve: bool,
                  force: bool = False, lease: liveness.Lease | None = None) -> Report:
    """The startup pass on ``conn``; with ``serve`` the connection keeps the shared serve
    lock afterwards.  ``force`` (ops CLI) resolves everything even if servers seem alive.
    ``lease``: this process's lease, default the element's; registered here (if it is
    not yet) before the recovery lock goes, so the next process to start sees this one
    alive, while processes starting together do not take each other for alive: only
    one of them holds the recovery lock at a time."""
    q = el.db.q
    lease = lease or liveness.owner(el.runtime)
    rec_key, serve_key = locks.key(el.prefix, locks.RECOVERY), locks.key(el.prefix, locks.SERVE)
    await locks.set_label(conn, q, locks.label("startup recovery" if serve else "recovery"))
    await _lock_wait(conn, el, rec_key, "recovery")
    try:
        exclusive = await claim(conn, el, lease)
        try:
            report = await recover(el, alone=exclusive, force=force,
                                   claimer=lease.id if lease is not None else None)
        finally:
            if serve and not await locks.try_lock(conn, q, serve_key, shared=True):
                raise RuntimeError("could not take the shared serve lock")
            if exclusive:
                await locks.unlock(conn, q, serve_key)
            if lease is not None and not lease.registered:
                await lease.register()
    finally:
        await locks.unlock(conn, q, rec_key)
    await locks.set_label(conn, q, locks.label("serving"))
    return report


async def connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn)


async def _serve_lock_alive(conn: asyncpg.Connection, el: Element) -> bool:
    if conn.is_closed():
        return False
    try:
        await asyncio.wait_for(conn.fetchval(el.db.q.ping), liveness.HEARTBEAT_S * 2)
        return True
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        return False


async def _retake_serve_lock(el: Element, dsn: str, holder: list[asyncpg.Connection],
                             lost: asyncio.Event) -> bool:
    """A new connection holding the serve lock shared; False if the lock was refused
    (an exclusive pass of a starting process holds it: retried at the next heartbeat)."""
    old = holder[0]
    if not old.is_closed():
        old.terminate()
    conn = await connect(dsn)
    try:
        await locks.set_label(conn, el.db.q, locks.label("serving"))
        if not await locks.try_lock(conn, el.db.q, locks.key(el.prefix, locks.SERVE),
                                    shared=True):
            await conn.close()
            return False
    except BaseException:
        conn.terminate()
        raise
    conn.add_termination_listener(lambda _c: lost.set())
    holder[0] = conn
    return True


async def keep_alive(el: Element, dsn: str, holder: list[asyncpg.Connection],
                     lease: liveness.Lease) -> None:
    """Every heartbeat: renew the lease, and check the serve lock's connection; a
    connection that closes wakes this at once.  A lost lock is re-taken on a new
    connection (the outcome checked and logged).  Writes depend on the lease, which a
    lost session does not take away, not on the lock."""
    lost = asyncio.Event()
    holder[0].add_termination_listener(lambda _c: lost.set())
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lost.wait(), liveness.HEARTBEAT_S)
        lost.clear()
        try:
            await lease.beat()
        except Exception as exc:  # noqa: BLE001 - the database is away; next round
            log.warning("lease renewal failed: %r", exc)
        try:
            if not await _serve_lock_alive(holder[0], el):
                log.warning("the serve lock's database session is gone; taking it again")
                if await _retake_serve_lock(el, dsn, holder, lost):
                    log.info("serve lock taken again on a new session")
                else:
                    log.warning("serve lock refused (a starting process holds it "
                                "exclusively); retrying at the next heartbeat")
        except Exception as exc:  # noqa: BLE001 - the database is away; next round
            log.warning("could not take the serve lock again: %r", exc)


async def maintain(el: Element, counted: Callable[[Report], None] = lambda _report: None) -> None:
    """Every few minutes: resolve crashed siblings' rows, purge; each pass's report goes
    to ``counted`` (the metrics).  (The serve lock and the lease: :func:`keep_alive`.)"""
    while True:
        await asyncio.sleep(MAINTAIN_EVERY_S)
        try:
            async with locks.hold(el.db, locks.RECOVERY, "periodic recovery"):
                report = await recover(el, alone=False)
            counted(report)
            if report.completed or report.rolled_back or report.wal_purged:
                log.info("periodic recovery: %s", report.summary())
        except locks.LockBusy:
            continue
        except Exception:  # keep the task alive; the next round retries
            log.exception("periodic recovery failed")
