"""Running a search and the legacy list (issue 7).

The request is validated into a :class:`~storage.db.search_sql.SearchParams` by
:mod:`storage.domain.search_query`; the statements are composed in
:mod:`storage.db.search_sql` from trusted fragments, every piece of request text bound
as a value.  Rows are ordered by the sort key and then ``file_id`` in the same
direction, so the condition "after (key, id)" resumes exactly after the last row
sent: no row that existed when paging began is skipped or repeated while others
upload.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..db import repo_search, search_sql
from ..db.pool import Db
from ..db.search_sql import SORTS, SearchParams
from .search_query import encode_cursor

# Above this many matches ``total`` is the planner's estimate (``total_is_estimate``);
# at or below it an exact count, which reads at most this many rows.  At a million
# files an exact count of 10,000 scattered matches reads ~10,000 heap pages (20-40 ms,
# more than the page itself); 1,000 keeps it to a few ms (bench/results/search-*.md).
EXACT_TOTAL_LIMIT = 1_000




@dataclass(slots=True)
class SearchResult:
    files: list[str]  # each a FileMetadataResponse as JSON text, rendered by PostgreSQL
    next_cursor: str | None
    total: int
    total_is_estimate: bool

    def body(self) -> str:
        """The response body: ``{"files": [...], "next_cursor", "total", "total_is_estimate"}``
        (the files are spliced in as PostgreSQL wrote them, never re-parsed)."""
        tail = json.dumps({"next_cursor": self.next_cursor, "total": self.total,
                           "total_is_estimate": self.total_is_estimate})
        return '{"files": [' + ", ".join(self.files) + "], " + tail[1:]


async def run(db: Db, p: SearchParams, *, exact_limit: int = EXACT_TOTAL_LIMIT) -> SearchResult:
    """One page of results, the cursor of the next one, and the total.

    The total is exact when the whole result fits on a first page, when nothing is
    filtered (the file counter) and up to ``exact_limit`` matches; above, the planner's
    estimate with ``total_is_estimate``.
    """
    prefix = db.q.prefix
    async with db.pool.acquire() as conn:
        # Session-level, without a transaction's two extra round trips; the connection
        # is marked for the pool's reset on release (storage.db.pool.session_state_changed).
        await repo_search.use_custom_plans(conn, search_sql.custom_plans_statement(prefix))
        rows = await repo_search.search_page(conn, *search_sql.page_statement(prefix, p))
        more = len(rows) > p.limit
        rows = rows[:p.limit]
        cursor = encode_cursor(p.sort, rows[-1][1], rows[-1][2]) if more else None
        if p.cursor is None and not more:
            total, estimated = len(rows), False  # the whole result is on this page
        elif not p.filtered:
            total, estimated = await repo_search.total_files(conn, db.q), False
        else:
            total, estimated = await _total(conn, prefix, p, exact_limit)
    return SearchResult([r[0] for r in rows], cursor, total, estimated)


async def _total(conn, prefix: str, p: SearchParams, limit: int) -> tuple[int, bool]:
    estimate = await repo_search.estimate_matches(conn, *search_sql.estimate_statement(prefix, p))
    if estimate <= limit:
        count = search_sql.count_statement(prefix, p, limit + 1)
        exact = await repo_search.count_matches(conn, *count)
        if exact <= limit:
            return exact, False
        estimate = max(estimate, exact)
    return estimate, True


async def legacy_page(db: Db, limit: int, skip: int) -> str:
    """``{"total": n, "files": [...]}`` of the legacy list; total is the O(1) file counter."""
    async with db.pool.acquire() as conn:
        rows = await repo_search.search_page(conn, *search_sql.legacy_page_statement(
            db.q.prefix, SORTS["-created_at"], limit, skip))
        total = await repo_search.total_files(conn, db.q)
    return f'{{"total": {int(total)}, "files": [' + ", ".join(r[0] for r in rows) + "]}"
