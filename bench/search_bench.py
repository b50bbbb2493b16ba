"""Search benchmark (issue 7): p50/p99 of representative queries at a million files.

    python -m bench.search_bench                   # 1,000,000 rows, embedded PostgreSQL
    python -m bench.search_bench --rows 50000      # while developing
    DATABASE_URL=postgresql://... python -m bench.search_bench --reuse

Loads ``--rows`` realistic rows (bench/search_gen.py) through the repository layer
into ``<prefix>_files`` of a freshly migrated prefix (default ``sbench``; a prefix that
already holds rows is rolled back and migrated again, i.e. its tables are DROPPED,
unless ``--reuse`` finds exactly ``--rows`` rows), runs ``VACUUM (ANALYZE)``, then times each query
as the endpoint runs it (``storage.domain.search.run``: page + cursor + total, then the JSON
response body) under concurrency 1 and 8, and prints a Markdown table with the index
each query's page statement uses (from ``EXPLAIN (ANALYZE, BUFFERS)``).  ``--out``
writes the report to a file.  Not a timed test: run it by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from multidict import MultiDict

from bench import search_gen
from storage.db import migrate, repo_search, search_sql
from storage.db.embedded import EmbeddedPostgres
from storage.db.pool import Db, close_db, open_db
from storage.domain import search, search_query

TARGET_P99_MS = 20.0


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    what: str
    params: dict[str, str]


def cases(seed: int, end: datetime) -> list[Case]:
    """The representative queries, with values that exist in the generated data."""
    vocab = search_gen.Vocabulary.build(seed)
    start = end - timedelta(days=365 * search_gen.YEARS)
    mid = start + (end - start) / 2
    user = vocab.users[4][1]
    project = vocab.projects[25]
    deep = search_query.encode_cursor(search_sql.SORTS["-created_at"], mid,
                                      uuid.UUID(int=2**128 - 1))
    by_name = search_query.encode_cursor(search_sql.SORTS["original_filename"], "minutes",
                                         uuid.UUID(int=0))
    return [
        Case("list", "no filter (newest first, the default sort)", {}),
        Case("text", f"q={project} (a project name), newest first", {"q": project}),
        Case("text_rank", f"q={project}, best match first", {"q": project, "sort": "rank"}),
        Case("text_common", "q=invoice (a common word)", {"q": "invoice"}),
        Case("text_rare", f"q={vocab.words[3000]} (a rare word), best match first",
             {"q": vocab.words[3000], "sort": "rank"}),
        Case("text_filter", "q=budget + content_type=application/pdf",
             {"q": "budget", "content_type": "application/pdf"}),
        Case("phrase_not", 'q="annual report" -draft', {"q": '"annual report" -draft'}),
        Case("cyrillic", "q=отчёт квартал", {"q": "отчёт квартал"}),
        Case("type_prefix", "content_type=image/*, newest first", {"content_type": "image/*"}),
        Case("type_rare", "content_type=video/quicktime, newest first",
             {"content_type": "video/quicktime"}),
        Case("type_by_size", "content_type=video/mp4, smallest first",
             {"content_type": "video/mp4", "sort": "file_size"}),
        Case("date_range", "a 7-day created_at window, oldest first",
             {"created_after": mid.isoformat(),
              "created_before": (mid + timedelta(days=7)).isoformat(), "sort": "created_at"}),
        Case("metadata", f"metadata.project={vocab.projects[3]} + metadata.status=final",
             {"metadata.project": vocab.projects[3], "metadata.status": "final"}),
        Case("metadata_rare", "metadata.case_id=CASE-12345",
             {"metadata.case_id": "CASE-12345"}),
        Case("user_by_size", f"created_by={user}, largest first",
             {"created_by": user, "sort": "-file_size"}),
        Case("size_range", "10–50 MB, smallest first",
             {"min_size": str(10 * 2**20), "max_size": str(50 * 2**20), "sort": "file_size"}),
        Case("deep_page", "a keyset page half way down the newest-first list",
             {"cursor": deep}),
        Case("name_page", "by original_filename, resuming after 'minutes'",
             {"sort": "original_filename", "cursor": by_name}),
    ]


async def statements_only(db: Db, p: search_sql.SearchParams) -> None:
    """What :func:`storage.domain.search.run` asks of PostgreSQL, rows left undecoded.

    Mirrors ``run``: the page (its row count read from the command status), then the
    same choice of total (none, the file counter, or estimate + capped count).
    """
    prefix = db.q.prefix
    async with db.pool.acquire() as conn:
        await conn.execute(search_sql.custom_plans_statement(prefix))
        status = await conn.execute(*_flat(search_sql.page_statement(prefix, p)))
        more = int(status.split()[-1]) > p.limit
        if p.cursor is None and not more:
            return
        if not p.filtered:
            await repo_search.total_files(conn, db.q)
            return
        estimate = await repo_search.estimate_matches(
            conn, *search_sql.estimate_statement(prefix, p))
        if estimate <= search.EXACT_TOTAL_LIMIT:
            await conn.execute(*_flat(search_sql.count_statement(prefix, p,
                                                             search.EXACT_TOTAL_LIMIT + 1)))


def _flat(statement: tuple[str, list[Any]]) -> tuple[Any, ...]:
    return (statement[0], *statement[1])


async def time_case(db: Db, case: Case, concurrency: int, requests: int,
                    level: str) -> list[float]:
    """Latencies (ms) of ``requests`` calls by ``concurrency`` tasks sharing one pool.

    level "endpoint": ``search.run`` and the JSON body, as the handler does;
    level "db": :func:`statements_only`.
    """
    params = search_query.parse_params(MultiDict(case.params))
    samples: list[float] = []

    async def endpoint() -> None:
        result = await search.run(db, params)
        result.body()

    async def statements() -> None:
        await statements_only(db, params)

    call = endpoint if level == "endpoint" else statements

    async def worker(n: int) -> None:
        for _ in range(n):
            t = time.perf_counter()
            await call()
            samples.append((time.perf_counter() - t) * 1000)

    for _ in range(3):  # warm-up: caches, prepared statements
        await call()
    for _ in range(2):  # ... on as many pooled connections as the timed run will use
        await asyncio.gather(*(call() for _ in range(concurrency)))
    share = max(1, requests // concurrency)
    await asyncio.gather(*(worker(share) for _ in range(concurrency)))
    return samples


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def _plan(db: Db, statement: tuple[str, list[Any]]) -> dict[str, Any]:
    """One ``EXPLAIN (ANALYZE, BUFFERS)`` run: index scans used, sorts, time and buffers."""
    prefix = db.q.prefix
    sql = search_sql.explain_analyze_statement(prefix, statement[0])
    async with db.pool.acquire() as conn:
        await repo_search.use_custom_plans(conn, search_sql.custom_plans_statement(prefix))
        plan = await repo_search.explain_analyze(conn, sql, statement[1])
    nodes = list(_walk(plan[0]["Plan"]))
    root = nodes[0]
    return {
        "indexes": [f"{n['Node Type'].replace(' Scan', '')}:{n['Index Name']}"
                    for n in nodes if "Index Name" in n],
        "seq_scans": [n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"],
        "sorted": any(n["Node Type"] == "Sort" for n in nodes),
        "ms": plan[0]["Execution Time"],
        "buffers": root.get("Shared Hit Blocks", 0) + root.get("Shared Read Blocks", 0),
    }


async def explain(db: Db, case: Case) -> dict[str, Any]:
    """The page statement's plan, and how the total was found (and its plan)."""
    prefix = db.q.prefix
    params = search_query.parse_params(MultiDict(case.params))
    page = await _plan(db, search_sql.page_statement(prefix, params))
    result = await search.run(db, params)
    if params.cursor is None and result.next_cursor is None:
        how = "rows of the page"
    elif not params.filtered:
        how = "file counter"
    elif result.total_is_estimate:
        how = "planner estimate"
    else:
        count = await _plan(db, search_sql.count_statement(prefix, params,
                                                       search.EXACT_TOTAL_LIMIT + 1))
        how = f"count: {_describe(count, prefix)}"
    return {**page, "total": result.total, "estimate": result.total_is_estimate,
            "how": how}


def _describe(plan: dict[str, Any], prefix: str) -> str:
    text = ", ".join(_short(i, prefix) for i in plan["indexes"]) or "—"
    if plan["seq_scans"]:
        text += " + SEQ SCAN"
    if plan["sorted"]:
        text += " + sort"
    return f"{text}; {plan['ms']:.1f} ms, {plan['buffers']:,} buffers"


def _walk(node: dict[str, Any]):
    yield node
    for child in node.get("Plans", []):
        yield from _walk(child)


def _short(name: str, prefix: str) -> str:
    return name.replace(f"idx_{prefix}_", "").replace(f"{prefix}_", "")


async def prepare(dsn: str, prefix: str, rows: int, reuse: bool, seed: int) -> float:
    """Make ``<prefix>_files`` hold exactly ``rows`` generated rows; returns load seconds."""
    await asyncio.to_thread(migrate.apply, dsn, prefix)
    db = await open_db(dsn, prefix, max_size=8, timeout=3600)
    async with db.pool.acquire() as conn:
        have = await repo_search.total_files(conn, db.q)
    if reuse and have == rows:
        await close_db(db)
        return 0.0
    if have:  # start from an empty table: roll the prefix back and migrate it again
        await close_db(db)
        await asyncio.to_thread(migrate.rollback, dsn, prefix)
        await asyncio.to_thread(migrate.apply, dsn, prefix)
        db = await open_db(dsn, prefix, max_size=8, timeout=3600)
    t = time.perf_counter()
    step = max(rows // 20, 1)

    def progress(done: int) -> None:
        if done % step < search_gen.BATCH:
            rate = done / (time.perf_counter() - t)
            print(f"  loaded {done:,} rows ({rate:,.0f}/s)", file=sys.stderr, flush=True)

    try:
        await search_gen.load(db, rows, seed=seed, progress=progress)
        async with db.pool.acquire() as conn:
            await repo_search.vacuum_analyze(conn, search_sql.fragments(prefix)["vacuum_analyze"])
    finally:
        await close_db(db)
    return time.perf_counter() - t


def render(prefix: str, rows: int, load_s: float, results: list[dict[str, Any]],
           requests: int, settings: dict[str, str]) -> str:
    now = datetime.now(UTC)
    loaded = f", loaded in {load_s:.0f} s" if load_s else ""
    lines = [
        f"# Search benchmark, {now:%Y-%m-%d %H:%M} UTC",
        "",
        f"{rows:,} rows (bench/search_gen.py, fixed seed){loaded}; {os.cpu_count()} CPUs "
        f"shared with other work; PostgreSQL {settings['version']}, shared_buffers "
        f"{settings['shared_buffers']}, work_mem {settings['work_mem']}. {requests} requests "
        "per query, level and concurrency, after a warm-up at that concurrency (every "
        "pooled connection connected, its statements prepared); concurrency = tasks of "
        "one Python process sharing a pool of 8 connections. p50 / p99 in ms; target: p99 < "
        f"{TARGET_P99_MS:.0f} ms.",
        "",
        "- **endpoint**: `storage.domain.search.run` (page of up to 100 files as JSON text "
        "rendered by PostgreSQL, next_cursor, total) and the response body, as the "
        "handler does.",
        "- **db**: the same statements with the rows left undecoded: what PostgreSQL "
        "costs.",
        "",
        "| query | what | endpoint c=1 | endpoint c=8 | db c=1 | db c=8 | total "
        "| page plan | how the total was found |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        plan = r["plan"]
        total = f"{'~' if plan['estimate'] else ''}{plan['total']:,}"
        cells = []
        for key in (("endpoint", 1), ("endpoint", 8), ("db", 1), ("db", 8)):
            p50, p99 = r[key]
            mark = "" if p99 < TARGET_P99_MS else " ⚠"
            cells.append(f"{p50:.1f} / {p99:.1f}{mark}")
        lines.append(f"| {r['case'].name} | {r['case'].what} | {' | '.join(cells)} | {total} "
                     f"| {_describe(plan, prefix)} | {plan['how']} |")
    lines += ["", "`~` marks an estimated total (`total_is_estimate`); ⚠ a p99 over the "
              "target. Plans: `Index`/`Index Only`/`Bitmap Index` scans by index name "
              "(`idx_<prefix>_` dropped), `+ sort` when rows are sorted after the scan; "
              "time and buffers of one `EXPLAIN (ANALYZE, BUFFERS)` run.", ""]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> int:
    embedded = None
    dsn = args.dsn or os.environ.get("DATABASE_URL")
    if not dsn:
        embedded = EmbeddedPostgres(Path(args.workdir))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dsn = await asyncio.to_thread(embedded.start)
    try:
        load_s = await prepare(dsn, args.prefix, args.rows, args.reuse, args.seed)
        db = await open_db(dsn, args.prefix, max_size=8, timeout=60)
        frags = search_sql.fragments(args.prefix)
        async with db.pool.acquire() as conn:
            newest = await repo_search.newest_created_at(conn, frags["newest_created_at"])
            settings = await repo_search.server_settings(conn, frags["server_settings"])
        results = []
        for case in cases(args.seed, newest):
            if args.only and case.name not in args.only.split(","):
                continue
            row: dict[str, Any] = {"case": case}
            for level in ("endpoint", "db"):
                for c in (1, 8):
                    samples = await time_case(db, case, c, args.requests, level)
                    row[(level, c)] = (pct(samples, 50), pct(samples, 99))
            row["plan"] = await explain(db, case)
            results.append(row)
            print(f"  {case.name:14} " + "  ".join(
                f"{lv[0]}{c} {row[(lv, c)][0]:5.1f}/{row[(lv, c)][1]:5.1f}"
                for lv in ("endpoint", "db") for c in (1, 8)) + f"  {row['plan']['indexes']}",
                file=sys.stderr, flush=True)
        await close_db(db)
        report = render(args.prefix, args.rows, load_s, results, args.requests, settings)
        print(report)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(report, encoding="utf-8")
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.search_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=400,
                    help="timed requests per query and concurrency (default 400)")
    ap.add_argument("--dsn", help="PostgreSQL URI (default $DATABASE_URL, else embedded)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "search-bench"),
                    help="embedded PostgreSQL's data dir parent (kept for --reuse)")
    ap.add_argument("--prefix", default="sbench")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--reuse", action="store_true",
                    help="keep the loaded table when it already holds --rows rows")
    ap.add_argument("--only", help="comma-separated query names")
    ap.add_argument("--out", help="also write the Markdown report here")
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
