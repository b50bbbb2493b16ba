"""Group commit: the database work of concurrent uploads, one statement and one commit.

Every upload needs two durable database steps: its WAL intent (which is also its
capacity reservation, committed before the first byte is written) and its finish
(metadata row in, intent committed, reservation released, after the data and the attr
document are durable).  Alone, each is a round trip and a commit of its own.  Here they
queue in a :class:`Batcher` per element; while one batch is in flight, whatever arrives
waits, and the next batch takes all of it: one ``<prefix>_commit_batch`` call (see
``migrations/0007.group_commit.py``) for any number of reservations, growths and
finishes.  An idle element adds no latency (a lone request goes at once); a busy one
pays one commit for many requests.

What does not change:

- a member's future resolves only after the batch's transaction has committed, so
  nothing is acknowledged (no byte written after an intent, no 201 after a finish)
  before it is durable;
- each member has its own outcome: a duplicate id, an intent that recovery already
  resolved, a refused reservation or a read-only mode fails that member, never its
  neighbours.  An error of the whole statement that the server raised (bad data in one
  member) is retried member by member, so only the culprit fails;
- capacity is decided in arrival order under the element's capacity lock, across
  processes and elements that share the database, exactly as one reservation at a time.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import asyncpg

from ..db import repo
from ..models import FileMeta, utcnow
from . import faults

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
MAX_BATCH = 256  # members per statement; more wait for the next batch


class Batcher(Generic[T, R]):
    """Runs submitted items through ``run(items) -> results`` in batches, one batch at a
    time; items submitted while a batch is in flight form the next one.

    ``run`` returns one result per item, in order; a result that is an exception is
    raised to that item's submitter only.  If ``run`` itself raises, every item of the
    batch gets the exception.
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R | BaseException]]], *,
                 name: str, max_batch: int = MAX_BATCH,
                 observe: Callable[[int], Any] | None = None) -> None:
        self._run = run
        self._name = name
        self._max = max_batch
        self._observe = observe  # called with each batch's size (metrics)
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # statistics, for tests and metrics
        self.members = 0

    async def submit(self, item: T, *, abandoned: Callable[[R], Any] | None = None) -> R:
        """The item's result once its batch has run.  If the caller is cancelled while
        waiting, the batch still runs; ``abandoned(result)`` is then called with a
        successful result (to undo what nobody will use)."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name=f"group-commit-{self._name}")
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if abandoned is not None:
                fut.add_done_callback(lambda f: _call_if_result(f, abandoned))
            raise

    async def _drain(self) -> None:
        try:
            while self._queue:
                # one loop iteration first: requests made ready by the batch that just
                # ended (or by the same network read) join this one
                await asyncio.sleep(0)
                batch, self._queue = self._queue[:self._max], self._queue[self._max:]
                self.batches += 1
                self.members += len(batch)
                if self._observe is not None:
                    self._observe(len(batch))
                try:
                    results = await self._run([item for item, _ in batch])
                except asyncio.CancelledError:
                    _settle(batch, None)
                    raise
                except Exception as exc:  # noqa: BLE001 - handed to every member
                    _settle(batch, [exc] * len(batch))
                else:
                    _settle(batch, results)
        except asyncio.CancelledError:  # shutdown: what still queues is never run
            _settle(self._queue, None)
            self._queue = []
            raise
        finally:
            self._task = None

    async def close(self) -> None:
        """Wait for the queued batches (shutdown: requests in flight still finish)."""
        while self._task is not None:
            await asyncio.shield(self._task)


def _settle(batch: list[tuple[Any, asyncio.Future]], results: list[Any] | None) -> None:
    """Hand each member its result (an exception is raised to it); None cancels them."""
    for i, (_, fut) in enumerate(batch):
        if fut.done():
            continue
        if results is None:
            fut.cancel()
        elif isinstance(results[i], BaseException):
            fut.set_exception(results[i])
        else:
            fut.set_result(results[i])


_undoing: set[asyncio.Task] = set()  # strong references to undo tasks until they end


def _call_if_result(fut: asyncio.Future, callback: Callable[[Any], Any]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        outcome = callback(fut.result())
        if asyncio.iscoroutine(outcome):
            task = asyncio.ensure_future(outcome)
            _undoing.add(task)
            task.add_done_callback(_undoing.discard)


Member = repo.Reserve | repo.Finish


class GroupCommit:
    """The element's write batcher (one per app and process)."""

    def __init__(self, db, config, free_bytes: Callable[[], Awaitable[int | None]], *,
                 observe: Callable[[int], Any] | None = None) -> None:
        self.db = db
        self.config = config
        self._free_bytes = free_bytes
        self.batcher: Batcher[Member, Any] = Batcher(self._run, name=db.q.prefix,
                                                     observe=observe)
        # called with an intent this process leaves pending for recovery (set to the
        # process lease's ``disown`` by the server, storage.domain.liveness)
        self.orphaned: Callable[[uuid.UUID], Awaitable[None]] | None = None

    async def reserve(self, txid: uuid.UUID, need: int, *, intent: dict[str, Any] | None = None,
                      check_id: bool = False) -> repo.Reservation:
        """Check capacity and insert (``intent``) or grow the WAL reservation of ``txid``."""
        undo = self._release_abandoned(txid) if intent is not None else None
        member = repo.Reserve(txid, need, intent, check_id)
        return await self.batcher.submit(member, abandoned=undo)

    async def finish(self, meta: FileMeta, txid: uuid.UUID,
                     result: dict[str, Any]) -> repo.Finished:
        """The row in and the intent committed, if the intent is still pending, the id is
        free and the mode allows uploads; else the status says which did not hold."""
        return await self.batcher.submit(repo.Finish(meta, txid, result, utcnow()))

    def _release_abandoned(self, txid: uuid.UUID) -> Callable[[repo.Reservation], Any]:
        async def undo(r: repo.Reservation) -> None:
            if r.status == "ok":
                try:
                    await repo.rollback_wal(self.db.pool, self.db.q, txid,
                                            "the request was cancelled", utcnow())
                except Exception:  # recovery resolves a row left pending
                    log.exception("could not release the reservation of WAL %s", txid)
                    if self.orphaned is not None:
                        await self.orphaned(txid)

        return undo

    async def _run(self, members: list[Member]) -> list[Any]:
        free = None
        if any(isinstance(m, repo.Reserve) for m in members):
            free = await self._free()
        await faults.point(self, "commit.before_batch")
        try:
            results = await repo.commit_batch(self.db, members,
                                              limit=self.config.storage_max_size, free=free,
                                              app_mode=self.config.app_mode)
            await faults.point(self, "commit.after_batch")
            return results
        except asyncpg.PostgresError as exc:
            if len(members) == 1 or not _refused(exc):
                raise
            # the server refused the statement for what one member carries: find it
            log.warning("group commit of %d members refused (%r); retrying one by one",
                        len(members), exc)
            results: list[Any] = []
            for i, member in enumerate(members):
                try:
                    await faults.point(self, "commit.retry_member")
                    results += await repo.commit_batch(
                        self.db, [member], limit=self.config.storage_max_size, free=free,
                        app_mode=self.config.app_mode)
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as one:
                    if isinstance(one, asyncpg.PostgresError) and _refused(one):
                        results.append(one)
                        continue
                    # the connection went: this member's outcome is unknown and the rest
                    # were never sent; those already committed alone keep their results
                    results += [one] * (len(members) - i)
                    break
            return results

    async def _free(self) -> int | None:
        free = await self._free_bytes()
        return None if free is None else free - self.config.storage_disk_reserve

    async def close(self) -> None:
        await self.batcher.close()


def _refused(exc: asyncpg.PostgresError) -> bool:
    """True for an error the server raised about the statement's data (nothing
    committed, the session is fine), as opposed to a lost connection or a shutdown."""
    return not isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.InterfaceError |
                          asyncpg.exceptions.OperatorInterventionError)
