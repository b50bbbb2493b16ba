"""The lease on a resumable upload's row: one PATCH at a time across processes and hosts
(see :mod:`storage.domain.resumable`); and who may see an upload (its creator, an admin)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from datetime import datetime, timedelta

import asyncpg

from ..db import locks, repo_uploads
from ..db.repo_uploads import ResumableUpload
from ..errors import Locked, NotFound, StorageError, Unavailable
from ..models import Identity, utcnow
from .element import Element

log = logging.getLogger(__name__)
LEASE = timedelta(seconds=60)
RENEW_EVERY_S = 20.0
# A writer stops this long before its lease could run out (other hosts' clocks differ).
LEASE_MARGIN_S = 15.0


def expiry(el: Element, now: datetime) -> datetime:
    return now + timedelta(hours=el.config.upload_expiry_hours)


class Lease:
    """The right to change one upload (see the module docstring), renewed while held."""

    def __init__(self, el: Element, file_id: uuid.UUID) -> None:
        self.el, self.file_id = el, file_id
        self.owner = locks.label(f"tus {secrets.token_hex(4)}")
        self.held = self.lost = False
        self._task: asyncio.Task | None = None
        self._valid_until = 0.0

    def _granted(self) -> None:
        loop = asyncio.get_running_loop()
        self._valid_until = loop.time() + LEASE.total_seconds() - LEASE_MARGIN_S

    def adopt(self) -> None:
        """The lease is ours (taken, or written with a new row): start renewing it."""
        self.held = True
        self._granted()
        self._task = asyncio.create_task(self._renew(), name=f"tus-lease-{self.file_id}")

    async def take(self, *, force: bool = False, who: Identity | None = None) -> ResumableUpload:
        """The upload, leased to us.  ``force``: break any other lease (no server is alive).
        ``who``: a request's caller, who must see the upload: checked on a plain read
        *before* the lease is taken, so a stranger's request never holds the lease (it
        would answer the owner's own PATCHes with 423), and gets 404 as for an unknown id.

        :raises NotFound: / Locked: (423) another request holds it.
        """
        db = self.el.db
        if who is not None:
            visible(await repo_uploads.get(db, self.file_id), who, self.file_id)
        now = utcnow()
        up = await repo_uploads.take_lease(db, self.file_id, self.owner, now + LEASE, now)
        if up is None:
            current = await repo_uploads.get(db, self.file_id)
            if current is None:
                visible(current, None, self.file_id)
            holder = current.lease_owner or ""
            if force or locks.dead_local(locks.Holder(0, holder, None, "")):
                up = await repo_uploads.take_lease(db, self.file_id, self.owner, now + LEASE,
                                                   now, holder)
            if up is None:
                raise Locked(f"Upload {self.file_id} is busy: another request is writing to it "
                             "(one PATCH at a time); retry when it is done",
                             headers={"Retry-After": "1"})
        self.adopt()
        if who is not None:
            try:
                visible(up, who, self.file_id)  # the row as leased (a new upload, same id)
            except StorageError:
                await self.release()
                raise
        return up

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            now = utcnow()
            try:
                if not await repo_uploads.renew_lease(self.el.db, self.file_id, self.owner,
                                                      now + LEASE, expiry(self.el, now)):
                    self.lost = True
                    return
                self._granted()
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                log.warning("upload %s: could not renew the lease: %r", self.file_id, exc)

    def check(self) -> None:
        """:raises Unavailable: the lease is lost, or could run out before it is renewed
        (nothing more is written, nothing is committed)."""
        if self.lost or asyncio.get_running_loop().time() > self._valid_until:
            raise Unavailable(f"Upload {self.file_id}: the request lost its lease; retry",
                              headers={"Retry-After": "1"})

    def given_up(self) -> None:
        """The database dropped the lease with a statement of ours (commit, removal)."""
        self.held = False

    async def release(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.held:
            self.held = False
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await asyncio.shield(repo_uploads.release_lease(self.el.db, self.file_id,
                                                                self.owner))


def _authorize(up: ResumableUpload, who: Identity) -> None:
    """Another user's upload is 404, as an unknown one: a 403 would tell a stranger that
    the id is a live upload."""
    if who.role != "admin" and who.sub != up.created_by_id:
        raise NotFound(f"Upload {up.file_id} not found (unknown, expired or terminated)")


def _gone(up: ResumableUpload | None, now: datetime) -> bool:
    """Unknown, expired, or a row whose reservation is gone (removal under way)."""
    return (up is None or up.expires_at <= now
            or (up.completed_at is None and up.wal_status not in ("pending", "committed")))


def visible(up: ResumableUpload | None, who: Identity | None, file_id: uuid.UUID) -> None:
    """:raises NotFound: unknown, expired, terminated, or another user's upload"""
    if _gone(up, utcnow()):
        raise NotFound(f"Upload {file_id} not found (unknown, expired or terminated)")
    if who is not None:
        _authorize(up, who)
