"""Reading, changing and deleting stored files (the attr document is the truth).

PATCH and DELETE hold the file's lock (a session advisory lock on the file id, which
maintenance and recovery take too, see migrations/0007) for the whole operation, so
concurrent changes of one file serialise across processes, and the attr document is
written *before* the row: the database never runs ahead of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from .. import attrs
from ..backends.base import ObjectMissing
from ..db import repo, repo_cache
from ..db.pool import session_state_changed, session_state_cleared
from ..errors import NotFound, StorageError
from ..models import FileMeta, Identity, Served, utcnow
from . import attrmeta, faults, liveness, modes
from .element import Element
from .uploads import attr_document

log = logging.getLogger(__name__)
TTL_HOURS = {"edit": 24, "rw": 24, "ro": 168, "ar": 168}


def ttl_hours(el: Element) -> int:
    return TTL_HOURS.get(el.runtime.mode, 24)


async def get(el: Element, file_id: uuid.UUID, *, refresh: bool = True) -> FileMeta:
    """The file's metadata; an expired cache row is refreshed from its attr document.

    :raises NotFound: when there is no such file.
    """
    meta = await repo.get_file(el.db, file_id)
    if meta is None:
        raise NotFound(f"File {file_id} not found")
    if refresh and meta.cache_expired:
        meta = await _refresh(el, meta)
    return meta


async def served(el: Element, file_id: uuid.UUID, *,
                 headers: Callable[[Served], Mapping[str, str]], fresh: bool = False) -> Served:
    """What a download needs, from this process's cache (:mod:`storage.domain.served`) or the
    database; ``headers`` builds the response headers of a new entry.  A row past its
    cache time is refreshed from its attr document first (reference §7.2).

    :raises NotFound: when there is no such file.
    """
    now = utcnow()
    if not fresh and (hit := el.served.get(file_id)) is not None and hit.cache_expires_at > now \
            and hit.version is not None:
        return hit
    found = await repo.get_served(el.db, file_id)
    if found is None:
        raise NotFound(f"File {file_id} not found")
    if found.cache_expires_at <= now:
        meta = await get(el, file_id)
        found = Served(file_id, meta.relative_path, meta.file_size, meta.checksum,
                       meta.created_at, meta.original_filename, meta.content_type,
                       meta.cache_updated_at + timedelta(hours=meta.cache_ttl_hours))
    found = replace(found, headers=tuple(headers(found).items()))
    el.served.put(replace(found, cached=True))
    return found


async def _refresh(el: Element, meta: FileMeta) -> FileMeta:
    """Lazy rebuild (reference §7.2) with the correct key mapping; stale row on failure."""
    try:
        doc = attrs.loads(await el.backend.read_attr(meta.relative_path), meta.relative_path)
        fresh = attrmeta.to_meta(doc)
        fresh.storage_path, fresh.storage_filename = meta.storage_path, meta.storage_filename
        # Guarded: a PATCH that committed after we read the attr document wins.
        await repo_cache.refresh_if_unchanged(el.db.pool, el.db.q, fresh, ttl_hours(el),
                                              meta.cache_updated_at)
        return await repo.get_file(el.db, meta.file_id) or meta
    except (StorageError, attrs.AttrError, OSError) as exc:
        log.warning("lazy refresh of %s failed, serving the cached row: %s", meta.file_id, exc)
        return meta


async def update(el: Element, file_id: uuid.UUID, who: Identity, *, description: str | None,
                 version: str | None, metadata: dict[str, Any] | None) -> FileMeta:
    """PATCH: attr document first (unknown keys kept), then the row, under the file's lock.

    Two round trips: ``repo.begin_change`` (lock, mode, row, committed intent) and
    ``repo.end_update`` (row, WAL commit, unlock); the attr write happens in between.
    """
    now = utcnow()
    txid = uuid.uuid4()
    data = {"description": description, "version": version, "metadata": metadata}
    async with _change(el, txid, "file_update", file_id, data, who, now, "update") as change:
        meta = change.meta
        extra = await _attr_extra(el, meta)
        if description is not None:
            meta.description = description
        if version is not None:
            meta.version = version
        if metadata is not None:
            meta.metadata_json = metadata
        meta.updated_at = now
        await el.backend.write_attr(meta.relative_path, attr_document(meta, extra))
        change.storage_changed = True  # the attr file is replaced: only forward from here
        await faults.point(el, "update.after_attr")
        row = await repo.end_update(
            change.conn, el.db.q, txid, file_id, description=description, version=version,
            metadata=metadata or None, replace_metadata=metadata is not None,
            updated_at=now, ttl_hours=ttl_hours(el), result={"file_id": str(file_id)},
            at=utcnow())
        change.done = True
    await faults.point(el, "update.after_commit")
    return row


class Missing(NotFound):
    """The file to change does not exist (nothing was locked or logged)."""


class _Change:
    """A PATCH or DELETE between its two round trips: the connection holding the file's
    lock, the row as it was, and how far the storage step got."""

    __slots__ = ("conn", "meta", "storage_changed", "done")

    def __init__(self, conn: Any, meta: FileMeta) -> None:
        self.conn, self.meta = conn, meta
        self.storage_changed = self.done = False


@contextlib.asynccontextmanager
async def _change(el: Element, txid: uuid.UUID, op: str, file_id: uuid.UUID,
                  data: dict[str, Any], who: Identity, now: datetime, action: str | None):
    """Take the file's lock and commit the intent (``repo.begin_change``); on the way out
    make sure the lock is released: by the second round trip, or here, rolling the intent
    back unless the storage was already changed (then the intent stays pending and
    recovery finishes the operation from the storage state, issue 11).

    :raises Missing: no such file.  :raises BadRequest: the mode forbids ``action``.
    """
    allowed = modes.ALLOWED[action] if action else None
    liveness.require_writable(el.runtime)
    data = liveness.stamp(el.runtime, dict(data))
    async with el.db.pool.acquire() as conn:
        session_state_changed(conn)  # session locks: the pool resets it if we fail to
        began = await repo.begin_change(conn, el.db.q, txid=txid, op=op, file_id=file_id,
                                        data=data, user_id=who.sub, started_at=now,
                                        modes=allowed, app_mode=el.config.app_mode)
        if began.meta is None:  # nothing is held
            session_state_cleared(conn)
            if began.status == "mode":
                modes.require(action, began.mode)
            raise Missing(f"File not found: {file_id}")
        change = _Change(conn, began.meta)
        try:
            await faults.point(el, f"{op.removeprefix('file_')}.after_intent")
            yield change
        except BaseException as exc:
            if not change.done:
                await _release(el, change, txid, file_id, exc)
            raise
        session_state_cleared(conn)


async def _release(el: Element, change: _Change, txid: uuid.UUID, file_id: uuid.UUID,
                   exc: BaseException) -> None:
    """Release the file's lock after a failure; roll the intent back unless the storage
    was already changed (then it stays pending for recovery)."""
    if change.storage_changed:
        log.warning("WAL %s left pending for recovery: storage already changed when the "
                    "operation failed (%r)", txid, exc)
        error = None
    else:
        error = exc.detail if isinstance(exc, StorageError) else repr(exc)
    try:
        await asyncio.shield(repo.abort_change(change.conn, el.db.q, txid, file_id, error,
                                               utcnow()))
        session_state_cleared(change.conn)
    except Exception:  # the pool's reset (or the session's end) releases the lock
        log.exception("could not release the lock of WAL %s", txid)
        error = None  # left pending: recovery's to settle
    if error is None and (lease := liveness.owner(el.runtime)) is not None:
        await asyncio.shield(lease.disown(txid))  # recovery's to finish, now


async def _attr_extra(el: Element, meta: FileMeta) -> dict[str, Any] | None:
    """Unknown keys of the current attr document, to be preserved on rewrite."""
    try:
        raw = await el.backend.read_attr(meta.relative_path)
    except ObjectMissing:
        return None
    try:
        return attrs.loads(raw, meta.relative_path).extra
    except attrs.AttrError as exc:
        log.warning("replacing unreadable attr document: %s", exc)
        return None


async def delete(el: Element, file_id: uuid.UUID, who: Identity, *,
                 action: str | None = "delete") -> FileMeta | None:
    """Remove data, attr and row; a missing data file does not block it.  ``action`` is
    the mode rule checked where the delete commits (None: any mode, garbage collection).

    Two round trips, like :func:`update`.  Returns the deleted row, or None when there was
    no row.
    """
    now = utcnow()
    txid = uuid.uuid4()
    try:
        async with _change(el, txid, "file_delete", file_id, {}, who, now, action) as change:
            meta = change.meta
            change.storage_changed = True  # from here on (even if it fails) only forward
            existed = await el.backend.delete(meta.relative_path)
            await faults.point(el, "delete.after_files")
            if not existed:
                log.warning("deleting %s: its data object was already missing", file_id)
            await repo.end_delete(change.conn, el.db.q, txid, file_id,
                                  {"file_id": str(file_id)}, utcnow())
            change.done = True
            el.served.forget(file_id)  # other processes find the data gone (storage.domain.served)
    except Missing:
        return None
    await faults.point(el, "delete.after_commit")
    return meta
