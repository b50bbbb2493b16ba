"""The metadata cache rebuilt from attr files (reference §7.4–§7.5, fixed per §7.6).

Every operation holds the prefix's ``maintenance`` advisory lock (409 when busy),
streams the storage walk in batches and never holds the whole table in memory.

- **Full rebuild**: each batch of attr documents is upserted in one statement —
  new and differing rows written in full, equal rows only stamped as verified.
  When the walk has finished, rows it neither wrote nor verified are candidates
  for removal; each is re-checked against the store before it goes, so a walk
  that missed a directory cannot wipe rows.  Readers never see an empty or
  half-empty table (there is no TRUNCATE), and the element totals are recomputed
  at the end.
- **Incremental**: inserts rows for attr files whose id has none; reads only those.
- **Consistency**: a dry run; attr ids are streamed into ``<prefix>_cache_scan``
  and compared with the rows by two anti-joins.
- **Cleanup-expired**: each expired row is refreshed from its attr document, or
  removed when both the attr and the data are gone.  (Upstream deleted every
  expired row, hiding files whose attr was fine until an incremental rebuild;
  refreshing keeps the "no expired entries left" outcome without that.)

An attr document whose data object is gone (a lost block, an operator's mistake) never
becomes a row, in any of them: a row never points at missing bytes.  The rebuilds name
it in their errors (the full one also removes a row it still has, unless a write is in
flight on the file), the consistency report counts it (``missing_data_count``), and
``scrub --quarantine`` moves the document aside.

A file that any write touched while a scan ran is left alone by that scan (see
sql/cache.sql); the next run picks it up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from ..backends.base import ObjectMissing
from ..db import locks, repo_cache
from ..errors import StorageError
from ..models import FileMeta, utcnow
from . import attrmeta, files, naming
from .element import Element
from .scan import (
    BATCH,
    Errors,
    Scanned,
    bare_data,
    mark_missing_data,
    path_batches,
    read_doc,
    read_docs,
    to_row,
    unique_rows,
)

log = logging.getLogger(__name__)
SKEW = timedelta(minutes=5)  # tolerated clock difference between app hosts and PostgreSQL


@dataclass(slots=True)
class Statistics:
    attr_files_scanned: int = 0
    cache_entries_before: int = 0
    cache_entries_after: int = 0
    entries_created: int = 0
    entries_updated: int = 0
    entries_deleted: int = 0


@dataclass(slots=True)
class Outcome:
    """Upstream's ``RebuildResult`` (reference §7.4)."""

    operation_type: str
    started_at: datetime
    statistics: Statistics = field(default_factory=Statistics)
    errors: Errors = field(default_factory=Errors)
    completed_at: datetime | None = None

    def finish(self) -> Outcome:
        self.completed_at = utcnow()
        return self

    def to_dict(self) -> dict:
        end = self.completed_at or utcnow()
        return {
            "operation_type": self.operation_type,
            "started_at": self.started_at.isoformat(),
            "completed_at": end.isoformat(),
            "duration_seconds": round((end - self.started_at).total_seconds(), 2),
            "statistics": asdict(self.statistics),
            "errors": list(self.errors.shown),
        }


Progress = Callable[[Statistics, Errors], None]
Hook = Callable[[Statistics], Awaitable[None]]


# operations -----------------------------------------------------------------------------


async def full_rebuild(el: Element, *, batch: int = BATCH, progress: Progress | None = None,
                       before_write: Hook | None = None) -> Outcome:
    """Rebuild every row from the attr files (lossless; see the module docstring).

    Reading batch N+1 overlaps writing batch N (one batch in flight, memory stays
    bounded).  ``before_write`` (tests) runs after a batch is read, before its write.
    """
    out = Outcome("full", utcnow())
    stats, errors, q = out.statistics, out.errors, el.db.q
    async with locks.hold(el.db, locks.MAINTENANCE, "full cache rebuild") as conn:
        scan_start = await repo_cache.db_now(conn, q)
        horizon = out.started_at - SKEW
        stats.cache_entries_before = await repo_cache.count_files(conn, q)
        ttl, complete = files.ttl_hours(el), True

        async def write(rows: list[FileMeta], lost: list[Scanned]) -> None:
            if rows:
                counts = await repo_cache.rebuild_upsert(
                    conn, q, rows, scan_start=scan_start, horizon=horizon, ttl=ttl)
                stats.entries_created += counts.created
                stats.entries_updated += counts.updated
                if counts.verified + counts.created + counts.updated < len(rows):
                    await _report_conflicts(conn, el, rows, errors)
            if lost:
                stats.entries_deleted += await _drop_rows_without_data(el, conn, lost, ttl)

        writing: asyncio.Task | None = None
        try:
            async for relpaths in path_batches(el, batch):
                scanned = await read_docs(el, relpaths)
                stats.attr_files_scanned += len(scanned)
                complete &= not any(s.transient for s in scanned)
                lost = await mark_missing_data(el, scanned)
                rows = unique_rows([m for s in scanned if (m := to_row(s, ttl, errors))],
                                   errors)
                if before_write:
                    await before_write(stats)
                if writing:
                    await writing
                writing = asyncio.create_task(write(rows, lost)) if rows or lost else None
                if progress:
                    progress(stats, errors)
            if writing:
                await writing
        finally:
            if writing and not writing.done():
                writing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writing
        if complete:
            stats.entries_deleted += await _remove_unseen(el, conn, scan_start, horizon, errors)
        else:
            errors.add("the store failed while scanning, so no cache rows were removed")
        async with conn.transaction():
            await repo_cache.recompute_totals(conn, q)
        stats.cache_entries_after = await repo_cache.count_files(conn, q)
    log.info("full cache rebuild: %s, %d error(s)", asdict(stats), errors.count)
    return out.finish()


async def _drop_rows_without_data(el: Element, conn, lost: list[Scanned], ttl: int) -> int:
    """Remove the rows of documents whose data object is gone (each looked up again
    first: a concurrent DELETE removes the data before the attr).  The document stays
    for ``scrub --quarantine``; the error is already reported."""
    removed = 0
    for item in lost:
        assert item.doc is not None
        if await el.backend.exists(item.relpath):
            continue
        meta = attrmeta.to_meta(item.doc, ttl)
        directory, name = posixpath.split(item.relpath)
        meta.storage_path, meta.storage_filename = directory + "/" if directory else "", name
        removed += await repo_cache.delete_without_data(conn, el.db.q, meta)
    return removed


async def _report_conflicts(conn, el: Element, rows: list[FileMeta], errors: Errors) -> None:
    for file_id, other in await repo_cache.name_conflicts(conn, el.db.q, rows):
        errors.add(f"file {file_id}: its storage filename belongs to file {other}; skipped")


async def _remove_unseen(el: Element, conn, scan_start: datetime, horizon: datetime,
                         errors: Errors) -> int:
    """Delete rows the scan did not see, after confirming each has no attr file."""
    removed, after = 0, repo_cache.NIL
    while rows := await repo_cache.unseen(conn, el.db.q, scan_start=scan_start,
                                          horizon=horizon, after=after, limit=BATCH):
        after = rows[-1].file_id
        gone = []
        for meta in rows:
            try:
                await el.backend.read_attr(meta.relative_path)
            except ObjectMissing:
                gone.append(meta.file_id)
            except StorageError as exc:
                errors.add(f"file {meta.file_id}: cannot confirm its attr file is gone "
                           f"({exc.detail}); row kept")
            else:
                errors.add(f"file {meta.file_id}: attr file exists but the walk missed it; "
                           "row kept")
        if gone:
            removed += await repo_cache.delete_unseen(conn, el.db.q, gone,
                                                      scan_start=scan_start, horizon=horizon)
    return removed


async def incremental_rebuild(el: Element, *, batch: int = BATCH,
                              progress: Progress | None = None) -> Outcome:
    """Insert rows for attr files that have none; existing rows are not touched."""
    out = Outcome("incremental", utcnow())
    stats, errors, q = out.statistics, out.errors, el.db.q
    async with locks.hold(el.db, locks.MAINTENANCE, "incremental cache rebuild") as conn:
        horizon = out.started_at - SKEW
        stats.cache_entries_before = await repo_cache.count_files(conn, q)
        ttl = files.ttl_hours(el)
        async for relpaths in path_batches(el, batch):
            stats.attr_files_scanned += len(relpaths)
            named = {p: naming.extract_file_id(posixpath.basename(p)) for p in relpaths}
            known = await repo_cache.existing_ids(conn, q, [i for i in named.values() if i])
            missing = [p for p, i in named.items() if i is None or i not in known]
            scanned = await read_docs(el, missing)
            await mark_missing_data(el, scanned)
            rows = unique_rows([m for s in scanned if (m := to_row(s, ttl, errors))], errors)
            if rows:
                stats.entries_created += await repo_cache.insert_missing(
                    conn, q, rows, horizon=horizon, ttl=ttl)
            if progress:
                progress(stats, errors)
        stats.cache_entries_after = await repo_cache.count_files(conn, q)
    log.info("incremental cache rebuild: %s", asdict(stats))
    return out.finish()


async def consistency(el: Element, *, batch: int = BATCH,
                      progress: Progress | None = None) -> dict:
    """Upstream's ``ConsistencyReport``: orphan rows, orphan attr files, expired rows."""
    q, scan_id = el.db.q, uuid.uuid4()
    stats, errors = Statistics(), Errors()
    async with locks.hold(el.db, locks.MAINTENANCE, "cache consistency check") as conn:
        # Only operations that overlap the scan are left out: the horizon is its start on
        # the database clock (a report, so no SKEW margin: damage done a second before the
        # check is reported, not hidden for five minutes).
        horizon = await repo_cache.db_now(conn, q)
        without_data: list[str] = []  # attr files whose data object is missing
        await repo_cache.scan_clear(conn, q)  # leftovers of a crashed check
        try:
            async for relpaths in path_batches(el, batch):
                stats.attr_files_scanned += len(relpaths)
                await repo_cache.scan_add(conn, q, scan_id, await _scan_ids(el, relpaths))
                without_data += sorted(await el.backend.missing(relpaths))
                if progress:
                    progress(stats, errors)
            await repo_cache.scan_analyze(conn, q)
            orphan_cache = await repo_cache.scan_orphan_cache(conn, q, scan_id, horizon)
            orphan_attr = await repo_cache.scan_orphan_attr(conn, q, scan_id, horizon)
            expired = await repo_cache.scan_expired(conn, q)
            total_cache = await repo_cache.count_files(conn, q)
            bare = [p async for p in bare_data(el)]
        finally:
            await repo_cache.scan_drop(conn, q, scan_id)
    without_data = await _still_without_data(el, without_data)
    total_attr = stats.attr_files_scanned
    bad = orphan_cache[0] + orphan_attr[0] + len(bare) + len(without_data)
    return {
        "total_attr_files": total_attr,
        "total_cache_entries": total_cache,
        "orphan_cache_count": orphan_cache[0],
        "orphan_attr_count": orphan_attr[0],
        "expired_cache_count": expired[0],
        # data objects without attr file, row or pending intent (a failed commit's):
        # ``scrub`` removes them
        "orphan_data_count": len(bare),
        # attr files whose data object is gone: no row (``scrub --quarantine`` moves them)
        "missing_data_count": len(without_data),
        "is_consistent": bad == 0,
        "inconsistency_percentage": round(bad / total_attr * 100, 2) if total_attr else 0.0,
        "details": {
            "orphan_cache_entries": orphan_cache[1],
            "orphan_attr_files": orphan_attr[1],
            "expired_cache_entries": expired[1],
            "orphan_data_files": bare[:10],
            "attr_files_without_data": without_data[:10],
        },
    }


async def _still_without_data(el: Element, relpaths: list[str]) -> list[str]:
    """Those of ``relpaths`` whose attr file is still there and data still missing (a
    DELETE that ran during the scan removes the data first, then the attr)."""
    if not relpaths:
        return []
    gone = await el.backend.missing(relpaths)
    still = []
    for relpath in relpaths:
        if relpath in gone and not (await read_doc(el, relpath)).vanished:
            still.append(relpath)
    return still


async def _scan_ids(el: Element, relpaths: list[str]) -> list[tuple[uuid.UUID | None, str]]:
    """(file id, relpath): from the name like upstream, else from the document."""
    named = [(naming.extract_file_id(posixpath.basename(p)), p) for p in relpaths]
    unnamed = [p for i, p in named if i is None]
    if not unnamed:
        return named
    docs = {s.relpath: s.doc for s in await read_docs(el, unnamed)}
    return [(i or (d.file_id if (d := docs.get(p)) else None), p) for i, p in named]


async def cleanup_expired(el: Element, *, batch: int = 200) -> Outcome:
    """Refresh each expired row from its attr file; drop it only when the file is gone."""
    out = Outcome("cleanup_expired", utcnow())
    stats, q = out.statistics, el.db.q
    async with locks.hold(el.db, locks.MAINTENANCE, "expired cache cleanup") as conn:
        stats.cache_entries_before = await repo_cache.count_files(conn, q)
        ttl, after = files.ttl_hours(el), repo_cache.NIL
        while rows := await repo_cache.expired_after(conn, q, after, batch):
            after = rows[-1].file_id
            for meta in rows:
                await _cleanup_one(el, conn, meta, ttl, out)
        stats.cache_entries_after = await repo_cache.count_files(conn, q)
    log.info("expired cache cleanup: %s", asdict(stats))
    return out.finish()


async def _cleanup_one(el: Element, conn, meta: FileMeta, ttl: int, out: Outcome) -> None:
    stats, errors, q = out.statistics, out.errors, el.db.q
    item = await read_doc(el, meta.relative_path)
    if item.vanished:
        if await el.backend.exists(meta.relative_path):
            errors.add(f"file {meta.file_id}: attr file missing but data present; row kept")
        elif await repo_cache.delete_if_expired(conn, q, meta.file_id):
            stats.entries_deleted += 1
        return
    stats.attr_files_scanned += 1
    if item.doc is None:
        errors.add(f"{item.error}; expired row kept")
        return
    fresh = attrmeta.to_meta(item.doc, ttl)
    if await repo_cache.refresh_if_unchanged(conn, q, fresh, ttl, meta.cache_updated_at):
        stats.entries_updated += 1
