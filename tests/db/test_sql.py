import json
import re

import asyncpg
import pytest

from storage.config import ConfigError
from storage.db import migrate
from storage.db.sql import parse, queries, render, templates


def test_parse_splits_named_blocks_and_rejects_duplicates():
    text = "-- name: a\n-- $1 x\nSELECT 1;\n\n-- name: b\nSELECT 2;\n"
    assert parse(text) == {"a": "-- $1 x\nSELECT 1;", "b": "SELECT 2;"}
    with pytest.raises(ValueError, match="duplicate"):
        parse("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")
    with pytest.raises(ValueError, match="empty"):
        parse("-- name: a\n\n-- name: b\nSELECT 1;")


def test_render_validates_prefix_and_leaves_no_placeholder():
    assert render("SELECT * FROM <prefix>_files", "se1") == "SELECT * FROM se1_files"
    with pytest.raises(ConfigError):
        render("SELECT * FROM <prefix>_files", "x;drop table y")
    with pytest.raises(ValueError, match="placeholder"):
        render("SELECT <other>", "se1")


def test_queries_are_cached_per_prefix_and_distinct():
    a, b = queries("qa"), queries("qb")
    assert queries("qa") is a and a is not b
    assert "qa_files" in a.get_file and "qb_files" in b.get_file
    with pytest.raises(AttributeError):
        a.no_such_statement  # noqa: B018


EXPLAINABLE = {"SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "VALUES", "MERGE"}


def _relations(plan) -> set[str]:
    """Every table or index an EXPLAIN (FORMAT JSON) plan reads or writes."""
    if isinstance(plan, list):
        return set().union(*map(_relations, plan)) if plan else set()
    if not isinstance(plan, dict):
        return set()
    found = {plan[k] for k in ("Relation Name", "Index Name") if k in plan}
    return found.union(*map(_relations, plan.values()))


async def _generic_plan(conn: asyncpg.Connection, sql: str, params: int):
    """The plan ``sql`` gets for any parameter values (bound ones would be folded in:
    ``file_id = NULL`` plans as no scan at all)."""
    await conn.execute(f"PREPARE plan_check AS {sql}")  # simple protocol: nothing bound
    try:
        args = ", ".join(["NULL"] * params)
        return json.loads(await conn.fetchval(
            f"EXPLAIN (FORMAT JSON) EXECUTE plan_check{f'({args})' if params else ''}"))
    finally:
        await conn.execute("DEALLOCATE plan_check")


async def test_every_statement_prepares_and_touches_only_its_prefix(pg_dsn):
    """Each statement, rendered for two prefixes, is parsed, analysed and type-checked
    against the migrated schema (prepare), takes exactly the parameters its text numbers,
    and its plan touches only that prefix's tables and indexes (or the catalogs): no
    statement hard-codes a table name or reaches another element's."""
    prefixes = ["sqla", "sqlb"]
    for p in prefixes:
        migrate.apply(pg_dsn, p)
    conn = await asyncpg.connect(pg_dsn, server_settings={
        "plan_cache_mode": "force_generic_plan"})
    try:
        for p in prefixes:
            q = queries(p)
            for name in templates():
                sql = getattr(q, name)
                stmt = await conn.prepare(sql)
                numbered = {int(n) for n in re.findall(r"\$(\d+)", sql)}
                assert len(stmt.get_parameters()) == max(numbered, default=0), name
                body = " ".join(ln for ln in sql.splitlines() if not ln.startswith("--"))
                if body.split(None, 1)[0].upper() not in EXPLAINABLE:
                    # a utility statement (ANALYZE) on one of its own tables
                    assert re.fullmatch(rf"[A-Z]+ {p}_\w+;", body.strip()), (name, body)
                    continue
                plan = await _generic_plan(conn, sql, len(stmt.get_parameters()))
                others = {r for r in _relations(plan)
                          if not r.startswith((f"{p}_", f"idx_{p}_", "pg_"))}
                assert others == set(), (name, others)
    finally:
        await conn.close()
