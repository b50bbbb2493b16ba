"""Search SQL: the composition of trusted fragments, and the validated query
(:class:`SearchParams`) they are composed for (issue 7).

Trust boundary ("safeholders vs placeholders", after Kinto's PostgreSQL storage):

- *Safeholders* are the SQL fragments of ``sql/search.sql``, loaded once, rendered for
  the validated table prefix and picked here by FIXED names only: one per filter, an
  ORDER BY and a keyset condition per whitelisted sort key (:data:`SORTS`).  The only
  string work done per request is joining trusted filter fragments with `` AND `` and
  filling the ``{select}``/``{where}``/``{order}`` safeholders of a statement fragment.
- *Placeholders* are the values: every piece of request text (the query, a content
  type, a metadata key or value, a date, a cursor's contents) is bound as ``$n``.
  (A metadata filter is bound as one jsonpath value whose key and value are
  JSON-escaped string literals, see :func:`metadata_jsonpath`.)
  No request text ever becomes SQL text, so no input can change a statement's shape
  beyond choosing among the fragments.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from .sql import SQL_DIR, render

# --- the query a statement is built from -------------------------------------------------

DEFAULT_LIMIT = 100


@dataclass(frozen=True, slots=True)
class Sort:
    """A whitelisted sort: which column feeds the cursor and its fragment names."""

    name: str
    column: str  # a search_page column (FileMeta field or search_rank)
    order: str  # fragment names
    after: str
    needs_q: bool = False


def _sort(name: str, column: str, direction: str) -> Sort:
    return Sort(name, column, f"order_{column}_{direction}", f"after_{column}_{direction}")


SORTS: Mapping[str, Sort] = MappingProxyType({
    "-created_at": _sort("-created_at", "created_at", "desc"),
    "created_at": _sort("created_at", "created_at", "asc"),
    "-file_size": _sort("-file_size", "file_size", "desc"),
    "file_size": _sort("file_size", "file_size", "asc"),
    "-original_filename": _sort("-original_filename", "original_filename", "desc"),
    "original_filename": _sort("original_filename", "original_filename", "asc"),
    "rank": Sort("rank", "search_rank", "order_rank", "after_rank", needs_q=True),
})


@dataclass(frozen=True, slots=True)
class Cursor:
    sort: str
    key: Any
    file_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class SearchParams:
    """A validated search request; built by
    :func:`storage.domain.search_query.parse_params`."""

    q: str | None = None
    content_type: str | None = None  # exact media type, or "image/" for image/*
    content_type_prefix: bool = False
    created_by: str | None = None
    min_size: int | None = None
    max_size: int | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    sort: Sort = field(default_factory=lambda: SORTS["-created_at"])
    limit: int = DEFAULT_LIMIT
    cursor: Cursor | None = None

    @property
    def filtered(self) -> bool:
        """Whether any condition narrows the set (the total is then not the file counter)."""
        return any((self.q, self.content_type, self.created_by, self.metadata,
                    self.min_size is not None, self.max_size is not None,
                    self.created_after, self.created_before))


_NUMBER = re.compile(r"-?(?:0|[1-9]\d{0,15})(?:\.\d{1,15})?")


def metadata_jsonpath(key: str, value: str) -> str:
    """A jsonpath *value* meaning "top-level ``key`` equals ``value``".

    The value arrives as text; it also matches the number, boolean or null it spells,
    and lax mode makes an array match by element (``metadata.tag=x`` finds
    ``{"tag": ["x", "y"]}``).  Key and value enter only as JSON-escaped string
    literals, so they cannot change the path's structure.
    """
    path = "$." + json.dumps(key, ensure_ascii=False)
    literals = [json.dumps(value, ensure_ascii=False)]
    if _NUMBER.fullmatch(value) or value in ("true", "false", "null"):
        literals.append(value)
    return " || ".join(f"{path} == {literal}" for literal in literals)


_FRAGMENT = re.compile(r"^-- fragment: ([a-z_]+)[ \t]*$", re.MULTILINE)
_PARAM = re.compile(r"(?<![:\w]):([a-z_]+)\b")


@functools.cache
def _fragment_templates() -> Mapping[str, str]:
    text = (SQL_DIR / "search.sql").read_text(encoding="utf-8")
    parts = _FRAGMENT.split(text)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [ln for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith("--")]
        if name in found or not lines:
            raise ValueError(f"search.sql: fragment {name!r} is empty or defined twice")
        found[name] = " ".join(ln.strip() for ln in lines)
    tsquery = found["tsquery"]
    return MappingProxyType({n: t.replace("{tsquery}", tsquery) for n, t in found.items()})


@functools.cache
def fragments(prefix: str) -> Mapping[str, str]:
    """Every fragment rendered for ``prefix`` (validated by :func:`storage.db.sql.render`)."""
    return MappingProxyType({n: render(t, prefix) for n, t in _fragment_templates().items()})


class Statement:
    """Trusted fragments joined into one statement, with their values as ``$n`` arguments."""

    def __init__(self, prefix: str) -> None:
        self.frags = fragments(prefix)
        self.args: list[Any] = []
        self._slots: dict[tuple[str, str], int] = {}

    def use(self, name: str, **values: Any) -> str:
        """Fragment ``name`` with its ``:params`` bound to ``values`` (same value, same $n)."""
        def slot(match: re.Match[str]) -> str:
            param = match.group(1)
            value = values[param]
            key = (param, json.dumps(value, sort_keys=True, default=str))
            if key not in self._slots:
                self.args.append(value)
                self._slots[key] = len(self.args)
            return f"${self._slots[key]}"

        return _PARAM.sub(slot, self.frags[name])


def _conditions(st: Statement, p: SearchParams) -> list[str]:
    where = []
    if p.q:
        where.append(st.use("where_q", q=p.q))
    if p.content_type and p.content_type_prefix:
        hi = p.content_type[:-1] + chr(ord(p.content_type[-1]) + 1)
        where.append(st.use("where_content_type_prefix", ctype_lo=p.content_type, ctype_hi=hi))
    elif p.content_type:
        where.append(st.use("where_content_type", content_type=p.content_type))
    if p.created_by:
        where.append(st.use("where_created_by", created_by=p.created_by))
    if p.min_size is not None:
        where.append(st.use("where_min_size", min_size=p.min_size))
    if p.max_size is not None:
        where.append(st.use("where_max_size", max_size=p.max_size))
    if p.created_after:
        where.append(st.use("where_created_after", created_after=p.created_after))
    if p.created_before:
        where.append(st.use("where_created_before", created_before=p.created_before))
    for key, value in p.metadata:
        where.append(st.use("where_metadata", metadata=metadata_jsonpath(key, value)))
    return where


def _fill(skeleton: str, **parts: str) -> str:
    for name, text in parts.items():
        skeleton = skeleton.replace("{" + name + "}", text)
    return skeleton


def _where(st: Statement, conditions: list[str]) -> str:
    return " AND ".join(conditions) if conditions else st.use("all_rows")


def page_statement(prefix: str, p: SearchParams) -> tuple[str, list[Any]]:
    """One page plus one row (to know whether another page follows)."""
    st = Statement(prefix)
    select = st.use("select_ranked", q=p.q) if p.q else st.use("select")
    conditions = _conditions(st, p)
    sort_values = {"q": p.q} if p.sort.needs_q else {}
    if p.cursor is not None:
        conditions.append(st.use(p.sort.after, after_key=p.cursor.key,
                                 after_id=p.cursor.file_id, **sort_values))
    order = st.use(p.sort.order, **sort_values)
    skeleton = st.use("page", limit=p.limit + 1)
    page = _fill(skeleton, select=select, where=_where(st, conditions), order=order)
    response = _fill(st.use("response"), rank=st.use("rank_item") if p.q else "",
                     key=p.sort.column)  # a column name from SORTS, never request text
    return _fill(response, page=page), st.args


def legacy_page_statement(prefix: str, order: Sort, limit: int,
                          skip: int) -> tuple[str, list[Any]]:
    """The legacy list's skip/limit page in ``order``, rendered like a search page."""
    st = Statement(prefix)
    page = _fill(st.use("page_offset", limit=limit, skip=skip), select=st.use("select"),
                 where=st.use("all_rows"), order=st.use(order.order))
    response = _fill(st.use("response"), rank="", key=order.column)
    return _fill(response, page=page), st.args


def count_statement(prefix: str, p: SearchParams, cap: int) -> tuple[str, list[Any]]:
    """``count(*)`` of the matches, reading at most ``cap`` rows."""
    st = Statement(prefix)
    where = _where(st, _conditions(st, p))
    return _fill(st.use("count", cap=cap), where=where), st.args


def estimate_statement(prefix: str, p: SearchParams) -> tuple[str, list[Any]]:
    """The planner's row estimate of the matches (``EXPLAIN``, nothing is read)."""
    st = Statement(prefix)
    where = _where(st, _conditions(st, p))
    return _fill(st.use("estimate"), where=where), st.args


def custom_plans_statement(prefix: str) -> str:
    return fragments(prefix)["custom_plans"]


def explain_analyze_statement(prefix: str, statement: str) -> str:
    """``statement`` (one built here) run under ``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)``."""
    return _fill(fragments(prefix)["explain_analyze"], statement=statement)
