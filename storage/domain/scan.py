"""Walking the store for cache maintenance: attr paths in batches, documents read a few
at a time, each turned into a cache row or a reported problem (never an exception).

Used by :mod:`storage.domain.cache` (rebuild, consistency, expiry) and
:mod:`storage.domain.maintenance` (scrub, migrate-attrs).
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from .. import attrs
from ..backends.base import ATTR_SUFFIX, ObjectMissing
from ..db import repo
from ..errors import StorageError
from ..models import FileMeta
from . import attrmeta, naming
from .element import Element

log = logging.getLogger(__name__)

QUARANTINE = ".quarantine"  # scrub moves corrupt objects here; never part of the cache
BATCH = 500
READ_CONCURRENCY = 16
MAX_ERRORS_REPORTED = 10
# A data object stays without its attr document for a moment while its upload commits
# (S3: two PUTs); one older than this, with no row and no pending intent, was left by a
# commit that failed between the two and nothing else will ever remove it.
BARE_GRACE_S = 600.0
# Cache column widths (migrations/0001): a document over them is reported, not a 500.
_WIDTHS = {"original_filename": 500, "storage_filename": 500, "content_type": 255,
           "created_by_id": 255, "created_by_username": 255, "created_by_fullname": 500,
           "version": 50, "storage_path": 1000}


@dataclass(slots=True)
class Errors:
    """Every problem is logged and counted; the first few go into the response."""

    shown: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, message: str) -> None:
        self.count += 1
        log.warning("cache: %s", message)
        if len(self.shown) < MAX_ERRORS_REPORTED:
            self.shown.append(message)


@dataclass(slots=True)
class Scanned:
    """One attr file read during a walk: a document, or why there is none."""

    relpath: str
    doc: attrs.AttrDoc | None = None
    error: str | None = None
    transient: bool = False  # the store failed (not the document): the walk is incomplete
    vanished: bool = False  # deleted between listing and reading
    data_missing: bool = False  # the document is there, its data object is not


async def path_batches(el: Element, size: int = BATCH) -> AsyncIterator[list[str]]:
    """Relative paths of every data object with an attr file, in batches (quarantine skipped)."""
    batch: list[str] = []
    async for relpath in el.backend.iter_attr_paths():
        if relpath == QUARANTINE or relpath.startswith(QUARANTINE + "/"):
            continue
        batch.append(relpath)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


async def read_docs(el: Element, relpaths: Sequence[str]) -> list[Scanned]:
    """Read and parse the attr files of ``relpaths`` (a few at a time, order kept)."""
    gate = asyncio.Semaphore(READ_CONCURRENCY)

    async def one(relpath: str) -> Scanned:
        async with gate:
            return await read_doc(el, relpath)

    return list(await asyncio.gather(*(one(p) for p in relpaths)))


async def read_doc(el: Element, relpath: str) -> Scanned:
    where = relpath + ATTR_SUFFIX
    try:
        raw = await el.backend.read_attr(relpath)
    except ObjectMissing:
        return Scanned(relpath, error=f"{where}: vanished while scanning", vanished=True)
    except StorageError as exc:
        return Scanned(relpath, error=f"{where}: {exc.detail}", transient=True)
    try:
        doc = attrs.loads(raw, where)
    except attrs.AttrError as exc:
        return Scanned(relpath, error=str(exc))
    return Scanned(relpath, doc=doc)


async def mark_missing_data(el: Element, scanned: Sequence[Scanned]) -> list[Scanned]:
    """Flag the documents whose data object is gone (a lost block, an operator's
    mistake); returns them.  Such a document never becomes a cache row: a row must not
    point at missing bytes.  ``scrub --quarantine`` moves the document aside."""
    with_doc = [s for s in scanned if s.doc is not None]
    gone = await el.backend.missing([s.relpath for s in with_doc]) if with_doc else set()
    lost = [s for s in with_doc if s.relpath in gone]
    for item in lost:
        item.data_missing = True
    return lost


def to_row(item: Scanned, ttl: int, errors: Errors) -> FileMeta | None:
    """The cache row for a scanned document, or None (reported) when it cannot be one."""
    if item.doc is None:
        if not item.vanished:
            errors.add(item.error or f"{item.relpath}{ATTR_SUFFIX}: unreadable")
        return None
    if item.data_missing:
        errors.add(f"{item.relpath}{ATTR_SUFFIX}: its data object is missing; no cache row "
                   "(scrub --quarantine moves the attr file aside)")
        return None
    meta = attrmeta.to_meta(item.doc, ttl)
    directory, name = posixpath.split(item.relpath)
    location = (directory + "/" if directory else "", name)
    if (meta.storage_path, meta.storage_filename) != location:
        errors.add(f"{item.relpath}{ATTR_SUFFIX}: describes {meta.relative_path} but lies "
                   f"next to {item.relpath}; using its real location")
        meta.storage_path, meta.storage_filename = location
    for column, width in _WIDTHS.items():
        value = getattr(meta, column)
        if value is not None and len(value) > width:
            errors.add(f"{item.relpath}{ATTR_SUFFIX}: {column} is longer than the cache "
                       f"column ({len(value)} > {width} characters)")
            return None
    return meta


def unique_rows(rows: list[FileMeta], errors: Errors) -> list[FileMeta]:
    """One row per file id and per storage filename (the newest ``updated_at`` wins)."""
    rows = sorted(rows, key=lambda m: m.updated_at, reverse=True)
    ids: dict[uuid.UUID, FileMeta] = {}
    names: set[str] = set()
    for m in rows:
        if m.file_id in ids or m.storage_filename in names:
            errors.add(f"{m.relative_path}{ATTR_SUFFIX}: file id {m.file_id} or its storage "
                       "filename is claimed by another attr file; skipped")
            continue
        ids[m.file_id] = m
        names.add(m.storage_filename)
    return list(ids.values())


async def bare_data(el: Element, grace_s: float | None = None) -> AsyncIterator[str]:
    """Data objects without an attr document, older than ``grace_s`` (default
    :data:`BARE_GRACE_S`), that no pending intent names and no row points at: leftovers
    of failed commits (issue 24).  A row without its attr file is another problem (the
    consistency report's orphan rows), so such an object is not listed."""
    busy = await repo.pending_paths(el.db)
    async for relpath in el.backend.iter_bare_data(
            BARE_GRACE_S if grace_s is None else grace_s):
        if relpath in busy:
            continue
        file_id = naming.extract_file_id(posixpath.basename(relpath))
        row = await repo.get_file(el.db, file_id) if file_id else None
        if row is None or row.relative_path != relpath:
            yield relpath
