"""Long-running upkeep of the store: scrub (bit-rot detection, optional quarantine) and
the v1 → v2 attr migration.  Both stream the storage walk and report per file.

Quarantine moves a corrupt object out of the way rather than deleting it: the data
(unless it is lost: an attr document whose data object is missing moves alone)
and its attr document are copied under ``<root>/.quarantine/<storage_path><txid>/``
(the attr copy is named ``…attr-quarantined.json`` so no walk mistakes it for a live
one), then data, attr and row are removed under the file's row lock, inside a
``file_quarantine`` WAL intent.  The file therefore disappears from the API as a
whole (404, like Swift after a quarantine) instead of being served as known-bad
bytes, and the evidence stays for an operator to inspect or restore (move both
back, then run an incremental rebuild).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import posixpath
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import attrs
from ..backends.base import ATTR_SUFFIX, ObjectMissing
from ..db import locks, repo
from ..errors import StorageError
from ..models import utcnow
from .element import Element
from .scan import QUARANTINE, bare_data, path_batches, read_doc

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024
MAX_LISTED = 100


class Throttle:
    """At most ``rate`` bytes per second on average (0 = unlimited)."""

    def __init__(self, rate: float) -> None:
        self.rate, self.start, self.done = rate, time.monotonic(), 0

    async def spend(self, n: int) -> None:
        self.done += n
        if self.rate > 0:
            ahead = self.done / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                await asyncio.sleep(ahead)


async def check_data(el: Element, relpath: str, doc: attrs.AttrDoc,
                     throttle: Throttle | None = None) -> tuple[str, str] | None:
    """None when the data object has the document's size and sha256, else ``(kind, why)``
    with kind ``missing_data``, ``size_mismatch`` or ``corrupt``."""
    try:
        reader = await el.backend.open(relpath)
    except ObjectMissing:
        return "missing_data", "data file missing"
    try:
        if reader.info.size != doc.file_size:
            return ("size_mismatch",
                    f"data is {reader.info.size} bytes, the attr file says {doc.file_size}")
        digest = hashlib.sha256()
        if doc.file_size:
            async for chunk in reader.iter_range(0, doc.file_size - 1, CHUNK):
                await asyncio.to_thread(digest.update, chunk)
                if throttle:
                    await throttle.spend(len(chunk))
        if digest.hexdigest() != doc.checksum.lower():
            return "corrupt", f"sha256 is {digest.hexdigest()}, the attr file says {doc.checksum}"
        return None
    finally:
        await reader.close()


@dataclass(slots=True)
class Tally:
    """Counters plus the first :data:`MAX_LISTED` problems, each with its path."""

    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def problem(self, key: str, message: str) -> None:
        self.add(key)
        log.warning("%s: %s", key, message)
        if len(self.problems) < MAX_LISTED:
            self.problems.append(message)

    def as_dict(self) -> dict:
        return {**self.counts, "problems": list(self.problems)}


Progress = Callable[[Tally], None]


async def _copy(el: Element, source: str, target: str) -> None:
    reader = await el.backend.open(source)
    try:
        async with el.backend.create(target, reader.info.size) as writer:
            if reader.info.size:
                async for chunk in reader.iter_range(0, reader.info.size - 1, CHUNK):
                    await writer.write(chunk)
            await writer.commit()
    finally:
        await reader.close()


async def _put(el: Element, target: str, data: bytes) -> None:
    async with el.backend.create(target, len(data)) as writer:
        await writer.write(data)
        await writer.commit()


async def quarantine(el: Element, relpath: str, doc: attrs.AttrDoc, why: str, *,
                     has_data: bool = True) -> str:
    """Move a corrupt object aside (see the module docstring); returns where it went.
    Without ``has_data`` (the data object is lost) only the attr document moves."""
    q, txid = el.db.q, uuid.uuid4()
    directory, name = posixpath.split(relpath)
    target = f"{QUARANTINE}/{directory + '/' if directory else ''}{txid.hex}/{name}"
    await repo.insert_wal(el.db.pool, q, txid=txid, op="file_quarantine", file_id=doc.file_id,
                          data={"relative_path": relpath, "quarantine_path": target,
                                "reason": why},
                          user_id="scrub", started_at=utcnow())
    try:
        if has_data:
            await _copy(el, relpath, target)
        async with el.db.pool.acquire() as conn, conn.transaction():
            row = await repo.lock_file(conn, q, doc.file_id)
            # the attr under the file's lock: a PATCH acknowledged before is in the evidence
            await _put(el, target + ".attr-quarantined.json", await el.backend.read_attr(relpath))
            await el.backend.delete(relpath)
            if row is not None and row.relative_path == relpath:
                await repo.delete_file(conn, q, doc.file_id)
            await repo.commit_wal(conn, q, txid, {"file_id": str(doc.file_id),
                                                  "quarantine_path": target}, utcnow())
    except BaseException as exc:
        reason = exc.detail if isinstance(exc, StorageError) else repr(exc)
        await asyncio.shield(repo.rollback_wal(el.db.pool, q, txid, reason, utcnow()))
        raise
    log.warning("quarantined %s to %s: %s", relpath, target, why)
    return target


async def scrub(el: Element, *, move: bool = False, rate: float = 0,
                progress: Progress | None = None) -> Tally:
    """Re-hash every data file against its attr checksum; with ``move``, quarantine the
    corrupt ones (checksum or size mismatch)."""
    tally, throttle = Tally(), Throttle(rate)
    for key in ("scanned", "bytes_checked", "ok", "corrupt", "size_mismatch", "missing_data",
                "unreadable_attr", "quarantined", "bare_data_removed"):
        tally.add(key, 0)
    async with locks.hold(el.db, locks.SCRUB, "scrub"):
        async for relpaths in path_batches(el, 100):
            for relpath in relpaths:
                await _scrub_one(el, relpath, tally, throttle, move)
                if progress:
                    progress(tally)
        await _remove_bare_data(el, tally)
    return tally


async def _remove_bare_data(el: Element, tally: Tally) -> None:
    """Remove data objects a failed commit left without attr, row or intent (see
    :func:`storage.domain.scan.bare_data`); each is looked at again just before."""
    async for relpath in bare_data(el):
        if relpath in await repo.pending_paths(el.db):
            continue  # an upload to this very path began meanwhile
        try:
            if await el.backend.exists(relpath + ATTR_SUFFIX):
                continue  # its attr document arrived meanwhile
            await el.backend.delete(relpath)
        except StorageError as exc:
            tally.problem("bare_data_failed", f"{relpath}: {exc.detail}")
            continue
        tally.add("bare_data_removed")
        if len(tally.problems) < MAX_LISTED:
            tally.problems.append(f"{relpath}: data without attr file removed")


async def _scrub_one(el: Element, relpath: str, tally: Tally, throttle: Throttle,
                     move: bool) -> None:
    item = await read_doc(el, relpath)
    if item.vanished:
        return
    tally.add("scanned")
    if item.doc is None:
        return tally.problem("unreadable_attr", item.error or relpath)
    found = await check_data(el, relpath, item.doc, throttle)
    if found is None:
        tally.add("ok")
        tally.add("bytes_checked", item.doc.file_size)
        return
    kind, why = found
    if kind == "missing_data" and await _deleted_meanwhile(el, relpath, item.doc):
        return
    tally.problem(kind, f"{relpath}: {why}")
    if move and kind in ("corrupt", "size_mismatch", "missing_data"):
        try:
            target = await quarantine(el, relpath, item.doc, why,
                                      has_data=kind != "missing_data")
        except StorageError as exc:
            return tally.problem("quarantine_failed", f"{relpath}: {exc.detail}")
        tally.add("quarantined")
        if len(tally.problems) < MAX_LISTED:
            tally.problems.append(f"{relpath}: moved to {target}")


async def _deleted_meanwhile(el: Element, relpath: str, doc: attrs.AttrDoc) -> bool:
    """True when the data is missing because a DELETE removed the file while we looked.
    A DELETE unlinks the data before the attr, under the file's lock: waiting for that
    lock lets one in flight finish, and then its attr (or row) is gone too."""
    async with el.db.pool.acquire() as conn, conn.transaction():
        await repo.lock_file(conn, el.db.q, doc.file_id)
        # with or without a row (a rebuild drops the row of an attr whose data is lost,
        # issue 26): the attr that is still there after the DELETE's lock is a lost object
        return not await _attr_exists(el, relpath)


async def _attr_exists(el: Element, relpath: str) -> bool:
    try:
        await el.backend.read_attr(relpath)
    except ObjectMissing:
        return False
    return True


def _version(raw: bytes) -> str:
    """The schema version of raw attr bytes.  :raises attrs.AttrError:"""
    try:
        return attrs.detect_version(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        raise attrs.AttrError("", f"corrupt or truncated JSON: {exc}") from None


async def migrate_attrs(el: Element, *, dry_run: bool = False,
                        progress: Progress | None = None) -> Tally:
    """Rewrite every v1 attr file as v2 (atomically, under the file's row lock)."""
    tally = Tally()
    for key in ("scanned", "v1", "v2", "migrated", "too_large", "unreadable"):
        tally.add(key, 0)
    async with locks.hold(el.db, locks.MAINTENANCE, "attr migration"):
        async for relpaths in path_batches(el, 200):
            for relpath in relpaths:
                await _migrate_one(el, relpath, tally, dry_run)
                if progress:
                    progress(tally)
    return tally


async def _migrate_one(el: Element, relpath: str, tally: Tally, dry_run: bool) -> None:
    where = relpath + ".attr.json"
    item = await read_doc(el, relpath)
    if item.vanished:
        return
    tally.add("scanned")
    if item.doc is None:
        return tally.problem("unreadable", item.error or where)
    async with el.db.pool.acquire() as conn, conn.transaction():
        await repo.lock_file(conn, el.db.q, item.doc.file_id)  # PATCH/DELETE wait for us
        try:
            raw = await el.backend.read_attr(relpath)  # again, under the lock
            version = _version(raw)
        except ObjectMissing:
            return
        except attrs.AttrError as exc:
            return tally.problem("unreadable", f"{where}: {exc.reason}")
        tally.add("v1" if version == "1.0" else "v2")
        if version != "1.0" or dry_run:
            return
        try:
            doc = attrs.migrate_v1_to_v2(json.loads(raw), where)
            attrs.check_size(doc)
        except attrs.AttrTooLarge as exc:
            return tally.problem("too_large", f"{where}: stays v1, {exc.reason}")
        except attrs.AttrError as exc:
            return tally.problem("unreadable", f"{where}: {exc.reason}")
        await el.backend.write_attr(relpath, attrs.dumps(doc))
        tally.add("migrated")
