import asyncpg
import pytest

from storage.db import migrate
from storage.web.app import make_app


async def _tables(dsn: str, like: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_name LIKE $1", like)
        return {r["table_name"] for r in rows}
    finally:
        await conn.close()


def _all_ids() -> list[str]:
    with migrate.using_prefix("mgx"):
        return [m.id for m in migrate._migrations()]


async def test_two_prefixes_migrate_and_roll_back_independently(pg_dsn):
    everything = _all_ids()
    assert everything[0] == "0001.initial"
    assert migrate.apply(pg_dsn, "mga") == everything
    assert migrate.apply(pg_dsn, "mgb") == everything
    assert migrate.apply(pg_dsn, "mga") == []  # idempotent
    for p in ("mga", "mgb"):
        tables = await _tables(pg_dsn, f"{p}\\_%")
        assert {f"{p}_files", f"{p}_wal", f"{p}_config", f"{p}_yoyo_migration",
                f"{p}_yoyo_log", f"{p}_yoyo_version", f"{p}_yoyo_lock"} <= tables
    assert not await _tables(pg_dsn, "\\_yoyo%")  # no shared bookkeeping tables

    assert migrate.rollback(pg_dsn, "mga", 1) == everything[-1:]
    assert migrate.rollback(pg_dsn, "mga") == everything[-2::-1]
    assert migrate.status(pg_dsn, "mga").pending == tuple(everything)
    assert "mga_files" not in await _tables(pg_dsn, "mga\\_%")
    assert {"mgb_files", "mgb_wal", "mgb_config"} <= await _tables(pg_dsn, "mgb\\_%")
    assert migrate.status(pg_dsn, "mgb").applied == tuple(everything)

    migrate.drop_bookkeeping(pg_dsn, "mga")
    assert not await _tables(pg_dsn, "mga\\_%")


def test_invalid_prefix_is_refused_before_any_sql(pg_dsn):
    with pytest.raises(ValueError, match="DB_TABLE_PREFIX"):
        migrate.apply(pg_dsn, "x;drop")


def test_yoyo_uri_accepts_libpq_forms():
    assert migrate.yoyo_uri("postgresql://u@/db?host=/run/pg") == (
        "storage+psycopg://u@/db?host=/run/pg")
    assert migrate.yoyo_uri("postgres://u:p@h:1/db").startswith("storage+psycopg://")
    with pytest.raises(ValueError):
        migrate.yoyo_uri("mysql://x/y")


async def test_server_refuses_to_start_when_schema_is_behind(make_config):
    from storage.web.app import StartupError, database_ctx

    startup = database_ctx(make_app(make_config(db_auto_migrate=False)))
    with pytest.raises(StartupError, match="schema .* is behind"):
        await startup.__anext__()
