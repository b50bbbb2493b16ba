"""Ops commands: ``python run.py rebuild|check|recover|migrate-attrs|scrub``.

Each opens the element like the server does (same config, schema check, backend),
runs one operation from :mod:`storage.domain.cache`, :mod:`storage.domain.recovery` or
:mod:`storage.domain.maintenance`, shows progress on stderr (see :class:`Console`) and prints
a JSON summary on stdout.  Exit status: 0 = done and nothing wrong found, 1 = done but problems were
found or left (details in the summary), 2+ = could not run (as for every command).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, TextIO

import asyncpg
from tqdm import tqdm

from ..backends import make_backend
from ..config import Config
from ..db import locks, repo
from ..db.pool import close_db, open_db
from ..domain import cache, liveness, maintenance, recovery_passes
from ..domain.element import Element
from ..domain.groupcommit import GroupCommit
from ..domain.runtime import Runtime

COMMANDS = ("rebuild", "check", "recover", "migrate-attrs", "scrub")


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    rebuild = sub.add_parser("rebuild", help="rebuild the metadata cache from the attr files")
    rebuild.add_argument("--incremental", action="store_true",
                         help="only add rows for attr files that have none")
    sub.add_parser("check", help="consistency report: orphan rows and attr files, expiry")
    rec = sub.add_parser("recover", help="resolve pending WAL operations, sweep temp files")
    rec.add_argument("--force", action="store_true",
                     help="treat every pending operation as abandoned even when servers of "
                          "this element seem alive (only if you know they are not)")
    mig = sub.add_parser("migrate-attrs", help="rewrite schema v1 attr files as v2")
    mig.add_argument("--dry-run", action="store_true", help="count only, change nothing")
    scrub = sub.add_parser("scrub", help="re-hash every data file against its checksum")
    scrub.add_argument("--quarantine", action="store_true",
                       help="move corrupt objects to <root>/.quarantine/ and drop their rows")
    scrub.add_argument("--max-mib-per-second", type=float, default=0.0, metavar="N",
                       help="read at most N MiB/s on average (default: unlimited)")


class Console:
    """Progress on stderr, the JSON summary on stdout.

    On a terminal, a tqdm bar redrawn at most twice a second with the rate and the ETA;
    otherwise (a log file, a pipe) the same numbers as one plain line every
    ``every`` seconds.  ``total`` is an estimate (the database's count): a bar may end
    past it or short of it.
    """

    PLAIN = ("{desc}: {percentage:3.0f}% {n_fmt}/~{total_fmt} "
             "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
    PLAIN_OPEN = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"  # no estimate of the total

    def __init__(self, out: TextIO, err: TextIO, *, every: float = 5.0) -> None:
        self.out, self.err = out, err
        self.tty = err.isatty()
        self.every = every
        self.start = time.monotonic()
        self.last: float | None = None
        self.bar: tqdm | None = None

    def progress(self, label: str, done: int, total: int | None, extra: str = "",
                 unit: str = "file") -> None:
        postfix = extra.lstrip(", ") or None
        scale = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
        if self.tty:
            if self.bar is None:
                self.bar = tqdm(desc=label, total=total or None, unit=unit, file=self.err,
                                mininterval=0.5, dynamic_ncols=True, **scale)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if self.last is not None and now - self.last < self.every:
            return
        self.last = now
        line = tqdm.format_meter(done, total or None, now - self.start, prefix=label,
                                 unit=unit, postfix=postfix,
                                 bar_format=self.PLAIN if total and done <= total
                                 else self.PLAIN_OPEN, **scale)
        self.err.write(line + "\n")
        self.err.flush()

    def result(self, body: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
        elapsed = round(time.monotonic() - self.start, 2)
        self.out.write(json.dumps({**body, "elapsed_seconds": elapsed}, indent=2,
                                  ensure_ascii=False, default=str) + "\n")
        self.out.flush()


@contextlib.asynccontextmanager
async def open_element(config: Config, dsn: str) -> AsyncIterator[Element]:
    """The element as the server would build it, without HTTP."""
    db = await open_db(dsn, config.table_prefix, max_size=4, timeout=config.db_pool_timeout)
    backend = make_backend(config)
    try:
        await backend.start()
        runtime = Runtime(config)
        state = await repo.get_state(db)
        runtime.mode = state.current_mode or runtime.mode
        commits = GroupCommit(db, config, backend.free_bytes)
        yield Element(config, db, backend, runtime, commits)
    finally:
        await backend.close()
        await close_db(db)


async def _rebuild(el: Element, args: argparse.Namespace, con: Console) -> int:
    total = (await repo.get_state(el.db)).total_files

    def show(stats: cache.Statistics, errors: cache.Errors) -> None:
        con.progress("rebuild", stats.attr_files_scanned, total, f", {errors.count} error(s)")

    run = cache.incremental_rebuild if args.incremental else cache.full_rebuild
    outcome = await run(el, progress=show)
    con.result({**outcome.to_dict(), "errors_total": outcome.errors.count})
    return 1 if outcome.errors.count else 0


async def _check(el: Element, args: argparse.Namespace, con: Console) -> int:
    total = (await repo.get_state(el.db)).total_files

    def show(stats: cache.Statistics, errors: cache.Errors) -> None:
        con.progress("check", stats.attr_files_scanned, total)

    report = await cache.consistency(el, progress=show)
    con.result(report)
    return 0 if report["is_consistent"] else 1


async def _recover(el: Element, args: argparse.Namespace, con: Console) -> int:
    # a lease of its own: the intents it claims are its while it runs, and a server
    # starting meanwhile takes it for alive
    lease = liveness.Lease(el.db, "recovery")
    await lease.register()
    beating = asyncio.create_task(lease.run())
    conn = await asyncpg.connect(args.dsn)
    try:
        report = await recovery_passes.startup(el, conn, serve=False, force=args.force,
                                               lease=lease)
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        await conn.close()
        await lease.drop()
    con.result({**report.summary(), "actions": report.actions})
    return 1 if report.errors or report.skipped else 0


async def _migrate(el: Element, args: argparse.Namespace, con: Console) -> int:
    total = (await repo.get_state(el.db)).total_files

    def show(tally: maintenance.Tally) -> None:
        con.progress("migrate-attrs", tally.counts.get("scanned", 0), total,
                     f", {tally.counts.get('migrated', 0)} migrated")

    tally = await maintenance.migrate_attrs(el, dry_run=args.dry_run, progress=show)
    con.result({"dry_run": args.dry_run, **tally.as_dict()})
    return 1 if tally.counts["unreadable"] or tally.counts["too_large"] else 0


async def _scrub(el: Element, args: argparse.Namespace, con: Console) -> int:
    total_bytes = (await repo.get_state(el.db)).total_size_bytes

    def show(tally: maintenance.Tally) -> None:
        done = tally.counts.get("bytes_checked", 0)
        bad = sum(tally.counts.get(k, 0) for k in ("corrupt", "size_mismatch", "missing_data"))
        con.progress("scrub", done, total_bytes, f", {bad} problem(s)", unit="B")

    tally = await maintenance.scrub(el, move=args.quarantine,
                                    rate=args.max_mib_per_second * 1024 * 1024, progress=show)
    con.result({"quarantine": args.quarantine, **tally.as_dict()})
    problems = ("corrupt", "size_mismatch", "missing_data", "unreadable_attr",
                "quarantine_failed")
    return 1 if any(tally.counts.get(k) for k in problems) else 0


_RUN = {"rebuild": _rebuild, "check": _check, "recover": _recover,
        "migrate-attrs": _migrate, "scrub": _scrub}


async def execute(config: Config, dsn: str, args: argparse.Namespace, *,
                  out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run one ops command against ``dsn`` (the schema must be current)."""
    con = Console(out or sys.stdout, err or sys.stderr)
    args.dsn = dsn
    async with open_element(config, dsn) as el:
        try:
            return await _RUN[args.command](el, args, con)
        except locks.LockBusy as exc:
            print(f"error: {exc.detail}", file=con.err)
            return 3


def run(config: Config, args: argparse.Namespace) -> int:
    """``python run.py <command>``: schema check (or migration), then :func:`execute`."""
    from ..db import migrate
    from ..db.embedded import database

    with database(config) as dsn:
        if config.db_auto_migrate:
            migrate.apply(dsn, config.table_prefix)
        elif pending := migrate.status(dsn, config.table_prefix).pending:
            print(f"error: the schema is behind (pending: {', '.join(pending)}); "
                  "run `python run.py migrate`", file=sys.stderr)
            return 2
        return asyncio.run(execute(config, dsn, args))
