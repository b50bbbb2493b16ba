"""Liveness (issue 22): a lease row per process, renewed every few seconds.

Recovery must never take a live process for dead.  The ``serve`` advisory lock cannot
say so on its own: it lives in one database session, and a restart of PostgreSQL,
``idle_session_timeout`` or a proxy cutting idle connections drops that session while
the process keeps serving (its pool reconnects by itself).  So every process also holds
a **lease**: a row in ``<prefix>_leases`` whose ``heartbeat_at`` it renews every
:data:`HEARTBEAT_S` through its pool (which survives a lost session).  Liveness is
judged on the database's clock; a lease is expired once its heartbeat is older than
:data:`LEASE_TTL_S`.

- A process writes only while it *knows* its lease is live: its last renewal was
  confirmed less than half the TTL ago (:meth:`Lease.writable`; measured from before
  the renewal was sent, so it errs towards refusing).  Otherwise new writes get 503.
- A renewal that finds its row gone (the process was frozen past the TTL, and another
  process removed it) registers a new lease: a new id, the epoch.  Whatever the old
  lease owned may meanwhile have been claimed by recovery; the claims decide (below).
- Every intent records its owner (``operation_data.lease``).  Recovery claims an intent
  (``<prefix>_wal.claimed_by``, one committed statement, :func:`repo.claim_wal`) before
  it reads or removes anything for it, and the claim is refused while the owner's lease
  is live.  A group-commit finish publishes only an unclaimed intent, so a live upload
  never publishes a row for files that recovery removed.
- An intent its live owner gives up on (its outcome unknown: the files may be in place)
  is *disowned* (:meth:`Lease.disown`), so the next recovery pass may resolve it; a
  disown that cannot reach the database is retried with each heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid

from ..db import locks, repo, repo_leases
from ..db.pool import Db
from ..errors import Unavailable

log = logging.getLogger(__name__)
HEARTBEAT_S = 2.0
LEASE_TTL_S = 20.0  # ten heartbeats: a busy machine or a database restart does not expire it
LEASE_FORGET_S = 24 * 3600.0  # expired leases are removed after this long


class Lease:
    """This process's lease on one element (one per app, or per ``run.py recover``)."""

    def __init__(self, db: Db, what: str) -> None:
        self.db = db
        self.what = what
        self.id = uuid.uuid4()  # known before it is registered: the startup pass claims with it
        self.registered = False
        self.confirmed = -math.inf  # monotonic time the last renewal was sent
        self.disowned: set[uuid.UUID] = set()  # intents still to disown (retried)

    @property
    def label(self) -> str:
        return locks.label(self.what)

    async def register(self) -> uuid.UUID:
        """Insert the lease row (a new id, the next epoch, if it was registered before)."""
        lease_id = uuid.uuid4() if self.registered else self.id
        sent = time.monotonic()
        await repo_leases.register(self.db.pool, self.db.q, lease_id, self.label,
                                   socket.gethostname(), os.getpid())
        self.id, self.confirmed, self.registered = lease_id, sent, True
        return lease_id

    def writable(self) -> bool:
        """True while this process knows no other can take its lease for expired."""
        return time.monotonic() - self.confirmed < LEASE_TTL_S / 2

    async def beat(self) -> None:
        """Renew the lease (a new one if it was removed); retry pending disowns."""
        sent = time.monotonic()
        if not self.registered:
            await self.register()
        elif not await repo_leases.beat(self.db.pool, self.db.q, self.id):
            log.error("lease %s was removed by another process (it had expired: this "
                      "process was taken for dead); registering a new one", self.id)
            await self.register()
        else:
            self.confirmed = sent
        for txid in list(self.disowned):
            await repo.disown_wal(self.db.pool, self.db.q, txid)
            self.disowned.discard(txid)

    async def disown(self, txid: uuid.UUID) -> None:
        """Give up the pending intent ``txid``: recovery may resolve it (now or at the next
        heartbeat, if the database cannot be reached now)."""
        try:
            await repo.disown_wal(self.db.pool, self.db.q, txid)
        except Exception as exc:  # noqa: BLE001 - retried by the heartbeat
            log.warning("could not disown WAL %s now (%r); retried with the heartbeat",
                        txid, exc)
            self.disowned.add(txid)

    async def drop(self) -> None:
        if self.registered:
            await repo_leases.drop(self.db.pool, self.db.q, [self.id])
            self.confirmed, self.registered = -math.inf, False

    async def run(self) -> None:
        """Renew every :data:`HEARTBEAT_S` until cancelled."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self.beat()
            except Exception as exc:  # noqa: BLE001 - the database is away; next round
                log.warning("lease renewal failed: %r", exc)


def owner(runtime) -> Lease | None:
    """This process's lease (None where none is held: a maintenance command's app)."""
    return runtime.lease


def require_writable(runtime) -> None:
    """:raises Unavailable: (503) while this process cannot be sure its lease is live."""
    lease = owner(runtime)
    if lease is not None and not lease.writable():
        raise Unavailable("This server cannot currently confirm that it is alive to the "
                          "other servers of the element (database unreachable); try again",
                          headers={"Retry-After": "2"})


def stamp(runtime, data: dict) -> dict:
    """``data`` with this process's lease as the intent's owner."""
    lease = owner(runtime)
    if lease is not None:
        data["lease"] = str(lease.id)
    return data
