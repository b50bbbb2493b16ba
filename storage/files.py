"""Reading, changing and deleting stored files (the attr document is the truth).

PATCH and DELETE hold the file's row lock (``SELECT … FOR UPDATE``) for the whole
operation, so concurrent changes of one file serialise across processes, and the
attr document is written *before* the row: the database never runs ahead of it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from . import attrmeta, attrs, faults, repo, repo_cache
from .access import Identity
from .backends.base import ObjectMissing
from .element import Element
from .errors import NotFound, StorageError
from .models import FileMeta, utcnow
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
    """PATCH: attr document first (unknown keys kept), then the row, under the row lock."""
    now = utcnow()
    txid = uuid.uuid4()
    data = {"description": description, "version": version, "metadata": metadata}
    # The intent row commits on its own before the lock is taken (one connection
    # per request at a time, so a busy pool cannot deadlock).
    await repo.insert_wal(el.db.pool, el.db.q, txid=txid, op="file_update",
                          file_id=file_id, data=data, user_id=who.sub, started_at=now)
    await faults.point(el, "update.after_intent")
    attr_written = False
    try:
        async with el.db.pool.acquire() as conn, conn.transaction():
            meta = await repo.lock_file(conn, el.db.q, file_id)
            if meta is None:
                raise NotFound(f"File not found: {file_id}")
            extra = await _attr_extra(el, meta)
            if description is not None:
                meta.description = description
            if version is not None:
                meta.version = version
            if metadata is not None:
                meta.metadata_json = metadata
            meta.updated_at = now
            await el.backend.write_attr(meta.relative_path, attr_document(meta, extra))
            attr_written = True
            await faults.point(el, "update.after_attr")
            row = await repo.update_file(
                conn, el.db.q, file_id, description=description, version=version,
                metadata=metadata or None, replace_metadata=metadata is not None,
                updated_at=now,
                ttl_hours=ttl_hours(el),
            )
            await repo.commit_wal(conn, el.db.q, txid, {"file_id": str(file_id)}, utcnow())
        await faults.point(el, "update.after_commit")
    except BaseException as exc:
        await _rollback(el, txid, exc, storage_changed=attr_written)
        raise
    return row


async def _rollback(el: Element, txid: uuid.UUID, exc: BaseException, *,
                    storage_changed: bool) -> None:
    """Mark the WAL row rolled back, unless storage was already changed.

    Once the attr file is rewritten or the files are unlinked, the operation can only
    go forward: the row stays ``pending`` so recovery (startup, or the periodic pass)
    finishes it from the storage state.  Recording it as rolled back would leave the
    row for ever without its files, or out of step with its attr file (issue 11).
    """
    if storage_changed:
        log.warning("WAL %s left pending for recovery: storage already changed when the "
                    "database step failed (%r)", txid, exc)
        return
    reason = exc.detail if isinstance(exc, StorageError) else repr(exc)
    try:
        await asyncio.shield(repo.rollback_wal(el.db.pool, el.db.q, txid, reason, utcnow()))
    except Exception:  # recovery resolves a row left pending; keep the original error
        log.exception("could not roll back WAL %s", txid)


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


async def delete(el: Element, file_id: uuid.UUID, who: Identity) -> FileMeta | None:
    """Remove data, attr and row; a missing data file does not block it.

    Returns the deleted row, or None when there was no row.
    """
    now = utcnow()
    txid = uuid.uuid4()
    meta = await repo.get_file(el.db, file_id)
    if meta is None:
        return None
    data = {"original_filename": meta.original_filename,
            "storage_filename": meta.storage_filename, "relative_path": meta.relative_path}
    await repo.insert_wal(el.db.pool, el.db.q, txid=txid, op="file_delete", file_id=file_id,
                          data=data, user_id=who.sub, started_at=now)
    await faults.point(el, "delete.after_intent")
    files_removed = False
    try:
        async with el.db.pool.acquire() as conn, conn.transaction():
            meta = await repo.lock_file(conn, el.db.q, file_id)
            if meta is None:  # deleted by someone else meanwhile
                await repo.rollback_wal(conn, el.db.q, txid, "already deleted", utcnow())
                return None
            files_removed = True  # from here on (even if it fails half-way) only forward
            existed = await el.backend.delete(meta.relative_path)
            await faults.point(el, "delete.after_files")
            if not existed:
                log.warning("deleting %s: its data object was already missing", file_id)
            await repo.delete_file(conn, el.db.q, file_id)
            await repo.commit_wal(conn, el.db.q, txid, {"file_id": str(file_id)}, utcnow())
        await faults.point(el, "delete.after_commit")
    except BaseException as exc:
        await _rollback(el, txid, exc, storage_changed=files_removed)
        raise
    return meta
