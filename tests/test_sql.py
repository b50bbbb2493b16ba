import asyncpg
import pytest

from storage import migrate
from storage.config import ConfigError
from storage.sql import parse, queries, render, templates


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


def test_no_sql_left_unrendered():
    for name, sql in queries("qc").items():
        assert "<prefix>" not in sql, name


async def test_every_statement_prepares_for_two_prefixes(pg_dsn):
    prefixes = ["sqla", "sqlb"]
    for p in prefixes:
        migrate.apply(pg_dsn, p)
    conn = await asyncpg.connect(pg_dsn)
    try:
        for p in prefixes:
            q = queries(p)
            for name in templates():
                stmt = await conn.prepare(getattr(q, name))
                assert stmt is not None, name
    finally:
        await conn.close()
