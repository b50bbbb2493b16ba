"""WAL crash recovery: resolve pending intents so nothing partial stays visible and
nothing committed is lost (reference §4, §15.2 item 14).

Every create, update and delete records a ``pending`` WAL row before it touches
storage, and commits or rolls it back at the end.  A row still pending means its
process died (or is still working).  Resolution, with the attr file as the truth:

- ``file_create``: data and attr present, the attr parses, names this file and its
  size and sha256 match the data → insert the row, commit.  Anything less → remove
  data and attr, roll back.  (The client never saw a 201; a complete upload is kept
  because the bytes are durable and the id may be the client's own.)
- ``file_update``: the row is refreshed from the attr file (a PATCH writes the attr
  first, so the attr holds either the old or the new values, never a mix); the WAL
  row is committed if the attr carries the requested values, else rolled back.
- ``file_delete``: finished — data, attr and row are removed, commit.  The client
  asked for it and the intent is durable; a retried DELETE then gets 404, and a
  crash half-way through the unlinking (data gone, attr left) has only one sane
  outcome anyway, so every state of a delete resolves the same way.
- ``file_quarantine`` (scrub): finished if the data is already gone, else rolled back.
- ``file_upload_resumable`` (tus, :func:`storage.domain.resumable.resolve`): an upload in
  progress is left alone (it is alive, not an error); an expired one is removed with
  its staged bytes and reservation; a full one whose completion died is completed.
- Any other operation is left pending and reported.

Then the records of finished resumable uploads that expired and staged bytes no
unfinished upload owns are removed, and finished uploads never marked complete (the
database went away after the finish) are marked (:func:`storage.domain.resumable.sweep`),
stray ``.tmp*`` files are removed and finished WAL rows older than
``WAL_RETENTION_HOURS`` are purged.

Which rows a pass may resolve, and when passes run (startup, every few minutes,
``python run.py recover``): :mod:`storage.domain.recovery_passes`.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

import asyncpg

from .. import attrs
from ..backends.base import ObjectMissing
from ..db import locks, repo, repo_cache, repo_leases
from ..errors import StorageError
from ..models import WalEntry, utcnow
from . import attrmeta, faults, files, liveness, modes, resumable
from .element import Element
from .maintenance import check_data

log = logging.getLogger(__name__)

STALE_CHANGE = timedelta(minutes=5)
STALE_CREATE = timedelta(hours=24)
TEMP_GRACE_S = 3600.0
PAGE = 200


@dataclass(slots=True)
class Report:
    mode: str  # "exclusive" (no other server alive) or "shared"
    completed: int = 0
    rolled_back: int = 0
    skipped: int = 0
    errors: int = 0
    temps_removed: int = 0
    wal_purged: int = 0
    uploads_completed: int = 0  # resumable uploads made files (their completion had died)
    uploads_expired: int = 0  # resumable uploads removed after UPLOAD_EXPIRY_HOURS
    # finished upload records removed or marked complete, orphaned staged bytes removed
    uploads_swept: int = 0
    actions: list[str] = field(default_factory=list)
    claimer: uuid.UUID | None = None  # the lease this pass claims intents with
    force: bool = False  # resolve intents whose owner is alive too (``recover --force``)

    def note(self, wal: WalEntry, outcome: str, what: str) -> None:
        line = f"{wal.operation_type} {wal.file_id} (WAL {wal.transaction_id}): {outcome}: {what}"
        log.warning("recovery: %s", line)
        if len(self.actions) < 100:
            self.actions.append(line)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items()
                if k not in ("actions", "claimer", "force")}


class ClaimLost(StorageError):
    """The intent is no longer claimed by this pass (another took it over)."""


async def _commit(el: Element, wal: WalEntry, result: dict, report: Report, conn=None) -> None:
    if not await repo.commit_wal(conn or el.db.pool, el.db.q, wal.transaction_id,
                                 {"file_id": str(wal.file_id), **result}, utcnow(),
                                 claimer=report.claimer):
        raise ClaimLost(f"WAL {wal.transaction_id} is no longer claimed by this pass")


async def _rollback(el: Element, wal: WalEntry, why: str, report: Report, conn=None) -> None:
    if not await repo.rollback_wal(conn or el.db.pool, el.db.q, wal.transaction_id,
                                   f"recovery: {why}", utcnow(), claimer=report.claimer):
        raise ClaimLost(f"WAL {wal.transaction_id} is no longer claimed by this pass")


async def _complete_upload(el: Element, wal: WalEntry, relpath: str) -> attrs.AttrDoc | str:
    """The attr document when the upload at ``relpath`` is complete, else the reason."""
    try:
        doc = attrs.loads(await el.backend.read_attr(relpath), relpath)
    except ObjectMissing:
        return "no attr file"
    except attrs.AttrError as exc:
        return f"attr file unusable ({exc.reason})"
    if doc.file_id != wal.file_id or doc.storage_path + doc.storage_filename != relpath:
        return "attr file describes another file"
    problem = await check_data(el, relpath, doc)
    return problem[1] if problem else doc


async def _resolve_create(el: Element, wal: WalEntry, report: Report) -> None:
    relpath = wal.operation_data.get("relative_path")
    if not isinstance(relpath, str) or wal.file_id is None:
        await _rollback(el, wal, "intent has no target path", report)
        report.rolled_back += 1
        return report.note(wal, "rolled back", "intent has no target path")
    row = await repo.get_file(el.db, wal.file_id)
    if row is not None and row.relative_path == relpath:
        await _commit(el, wal, {"recovered": "row already present"}, report)
        report.completed += 1
        return report.note(wal, "committed", "the row was already written")
    found = await _complete_upload(el, wal, relpath) if row is None else "id taken"
    await faults.point(el, "recovery.checked")
    if isinstance(found, attrs.AttrDoc):
        meta = attrmeta.to_meta(found, files.ttl_hours(el))
        async with el.db.pool.acquire() as conn, conn.transaction():
            # the mode as a live finish would see it: an upload is published only where
            # uploads are allowed (a complete upload that outlived a change to ro/ar is
            # removed, as its live finish would have been refused)
            mode = await repo.mode_for_commit(conn, el.db.q, el.config.app_mode)
            if mode in modes.ALLOWED["upload"]:
                await repo.insert_file(conn, el.db.q, meta)
                await _commit(el, wal, {"checksum": meta.checksum, "file_size": meta.file_size,
                                        "recovered": "data and attr complete"}, report, conn)
        if mode in modes.ALLOWED["upload"]:
            report.completed += 1
            return report.note(wal, "committed", "data and attr file complete, row inserted")
        found = f"complete, but uploads are not published in {mode} mode"
    await el.backend.delete(relpath, owner=str(wal.transaction_id))  # not a rival's object
    await el.backend.discard_temp(relpath, str(wal.operation_data.get("temp_path") or ""))
    await faults.point(el, "recovery.removed")
    await _rollback(el, wal, f"incomplete upload removed ({found})", report)
    report.rolled_back += 1
    report.note(wal, "rolled back", f"incomplete upload removed ({found})")


def _update_applied(data: dict, doc: attrs.AttrDoc) -> bool:
    wanted = ((data.get("description"), doc.description), (data.get("version"), doc.version),
              (data.get("metadata"), doc.custom_attributes))
    return all(want is None or want == have for want, have in wanted)


async def _resolve_update(el: Element, wal: WalEntry, report: Report) -> None:
    q = el.db.q
    async with el.db.pool.acquire() as conn, conn.transaction():
        row = await repo_cache.lock_file_nowait(conn, q, wal.file_id)
        if row is None:
            await _rollback(el, wal, "the file no longer exists", report, conn)
            report.rolled_back += 1
            return report.note(wal, "rolled back", "the file no longer exists")
        try:
            doc = attrs.loads(await el.backend.read_attr(row.relative_path), row.relative_path)
        except (ObjectMissing, attrs.AttrError) as exc:
            why = f"attr file unreadable, row left as it was ({exc})"
            await _rollback(el, wal, why, report, conn)
            report.rolled_back += 1
            return report.note(wal, "rolled back", why)
        fresh = attrmeta.to_meta(doc)
        fresh.storage_path, fresh.storage_filename = row.storage_path, row.storage_filename
        await repo.refresh_file(conn, q, fresh, files.ttl_hours(el))
        if _update_applied(wal.operation_data, doc):
            await _commit(el, wal, {"recovered": "attr file has the update"}, report, conn)
            report.completed += 1
            return report.note(wal, "committed", "attr file has the update; row refreshed")
        await _rollback(el, wal, "the update never reached the attr file", report, conn)
        report.rolled_back += 1
        report.note(wal, "rolled back", "the update never reached the attr file; row refreshed")


async def _resolve_removal(el: Element, wal: WalEntry, report: Report) -> None:
    """file_delete (always finished) and file_quarantine (finished once the data is gone)."""
    q = el.db.q
    async with el.db.pool.acquire() as conn, conn.transaction():
        row = await repo_cache.lock_file_nowait(conn, q, wal.file_id) if wal.file_id else None
        relpath = row.relative_path if row else wal.operation_data.get("relative_path")
        if (wal.operation_type == "file_quarantine" and isinstance(relpath, str)
                and await el.backend.exists(relpath)):
            await _rollback(el, wal, "data still in place; quarantine abandoned", report, conn)
            report.rolled_back += 1
            return report.note(wal, "rolled back", "data still in place")
        if isinstance(relpath, str):
            await el.backend.delete(relpath)
        if row is not None:
            await repo.delete_file(conn, q, row.file_id)
        await _commit(el, wal, {"recovered": "removal finished"}, report, conn)
    report.completed += 1
    report.note(wal, "committed", "removal finished (data, attr and row gone)")


# what resumable.resolve did: the counters it adds to, the outcome and the note
_RESUMABLE = {
    "unrecorded": (("rolled_back",), "rolled back", "resumable upload without a record"),
    "completed": (("completed", "uploads_completed"), "committed",
                  "resumable upload complete, file made"),
    "expired": (("rolled_back", "uploads_expired"), "rolled back",
                "resumable upload expired, removed"),
}


async def _resolve_resumable(el: Element, wal: WalEntry, report: Report) -> None:
    done = await resumable.resolve(el, wal, exclusive=report.mode == "exclusive")
    if done is None:  # alive, or held by another process: left for a later pass
        return
    counters, outcome, what = _RESUMABLE[done]
    for counter in counters:
        setattr(report, counter, getattr(report, counter) + 1)
    report.note(wal, outcome, what)


RESOLVERS = {"file_create": _resolve_create, "file_update": _resolve_update,
             "file_delete": _resolve_removal, "file_quarantine": _resolve_removal,
             resumable.OP: _resolve_resumable}


CLAIMED = ("file_create", "file_update", "file_delete", "file_quarantine")


async def resolve(el: Element, wal: WalEntry, report: Report) -> None:
    """Resolve one pending intent, claimed first (resumable uploads are held by their
    record's lease instead, :mod:`storage.domain.resumable_lease`)."""
    resolver = RESOLVERS.get(wal.operation_type)
    if resolver is None:
        report.skipped += 1
        return report.note(wal, "left pending", "unknown operation type")
    claimer = report.claimer
    if wal.operation_type in CLAIMED and claimer is not None:
        claimed = await repo.claim_wal(el.db.pool, el.db.q, wal.transaction_id, claimer,
                                       ttl_s=liveness.LEASE_TTL_S, force=report.force)
        if claimed is None:  # settled meanwhile, or its live owner (or a claimer) has it
            return None
        wal = claimed
        await faults.point(el, "recovery.claimed")
    try:
        await resolver(el, wal, report)
    except asyncpg.LockNotAvailableError:
        await _release(el, wal, claimer)
        report.skipped += 1
        return report.note(wal, "left pending", "a live operation holds the file")
    except (StorageError, asyncpg.PostgresError, OSError) as exc:
        await _release(el, wal, claimer)
        report.errors += 1
        log.exception("recovery of WAL %s failed", wal.transaction_id)
        return report.note(wal, "left pending", f"failed: {exc}")
    await faults.point(el, "recovery.resolved")


async def _release(el: Element, wal: WalEntry, claimer: uuid.UUID | None) -> None:
    if claimer is None or wal.operation_type not in CLAIMED:
        return
    try:
        await repo.release_wal_claim(el.db.pool, el.db.q, wal.transaction_id, claimer)
    except (asyncpg.PostgresError, OSError):  # our own claim: this process re-takes it
        log.exception("could not release the claim on WAL %s", wal.transaction_id)


async def forget_dead_local(el: Element, own: uuid.UUID) -> list[repo_leases.LeaseRow]:
    """Remove the live-looking leases of processes of this host that no longer exist (a
    SIGKILLed predecessor); returns the other leases that remain live."""
    live = await repo_leases.others_live(el.db.pool, el.db.q, own, liveness.LEASE_TTL_S)
    dead = [r for r in live if locks.dead_local(locks.Holder(0, r.holder, None, ""))]
    if dead:
        await repo_leases.drop(el.db.pool, el.db.q, [r.lease_id for r in dead])
        log.info("removed the leases of %d dead process(es) of this host", len(dead))
    return [r for r in live if r not in dead]


def _eligible(wal: WalEntry, now: datetime, *, alone: bool) -> bool:
    """Whether a pass may try ``wal``.  An intent that names its owner's lease is tried
    whatever its age (the claim refuses it while the owner lives); one without (written
    before leases, or by a maintenance command) only by the age rules of a shared pass."""
    if alone or "lease" in wal.operation_data or wal.operation_data.get("abandoned"):
        return True  # (an upload that gave up but could not remove its data: at once)
    if wal.operation_type == "file_create":
        return wal.started_at <= now - STALE_CREATE
    return wal.started_at <= now - STALE_CHANGE


async def recover(el: Element, *, alone: bool, claimer: uuid.UUID | None = None,
                  force: bool = False) -> Report:
    """Resolve pending WAL rows (all of them when ``alone``), sweep temps, purge the WAL.

    ``claimer``: the lease the intents are claimed with (default: this process's lease,
    else a one-off id); ``force``: intents of live owners too (``recover --force``).
    """
    if claimer is None:
        lease = liveness.owner(el.runtime)
        claimer = lease.id if lease is not None else uuid.uuid4()
    report = Report("exclusive" if alone or force else "shared", claimer=claimer, force=force)
    await forget_dead_local(el, claimer)
    alone = alone or force
    now = utcnow()
    after: tuple[datetime, object] = (datetime.min.replace(tzinfo=now.tzinfo), repo_cache.NIL)
    while rows := await repo_cache.pending_page(el.db.pool, el.db.q,
                                                before=now + timedelta(days=1),
                                                after=after, limit=PAGE):
        after = (rows[-1].started_at, rows[-1].transaction_id)
        for wal in rows:
            if _eligible(wal, now, alone=alone):
                await resolve(el, wal, report)
    report.uploads_swept = await resumable.sweep(el)
    # never a live upload's: a pending intent (plain or resumable) names its temp
    keep = await repo.pending_temps(el.db)
    report.temps_removed = await el.backend.remove_stray_temps(0 if alone else TEMP_GRACE_S,
                                                               keep)
    report.wal_purged = await repo.purge_wal(
        el.db, utcnow() - timedelta(hours=el.config.wal_retention_hours))
    await repo_leases.purge(el.db.pool, el.db.q, liveness.LEASE_FORGET_S)
    return report
