"""The pool resets only connections that carry session state (one round trip saved
on every other release), and those it resets completely."""

from storage.db import migrate
from storage.db.pool import close_db, open_db, session_state_changed


async def _setting(db) -> str:
    async with db.pool.acquire() as conn:
        return await conn.fetchval("SELECT current_setting('application_name')")


async def test_marked_connections_are_reset_and_others_are_not(pg_dsn):
    migrate.apply(pg_dsn, "poolrs")
    db = await open_db(pg_dsn, "poolrs", max_size=1, timeout=10)
    try:
        async with db.pool.acquire() as conn:
            await conn.execute("SELECT set_config('application_name', 'leaky', false)")
        assert await _setting(db) == "leaky"  # unmarked: left as it was (no reset trip)
        async with db.pool.acquire() as conn:
            session_state_changed(conn)
            await conn.execute("SELECT set_config('application_name', 'labelled', false)")
            assert await conn.fetchval("SELECT pg_try_advisory_lock(42)")
        assert await _setting(db) == ""
        async with db.pool.acquire() as conn:
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = "
                "pg_backend_pid()")
        assert held == 0
        async with db.pool.acquire() as conn:
            await conn.execute("BEGIN")  # an abandoned transaction is rolled back anyway
        async with db.pool.acquire() as conn:
            assert not conn.is_in_transaction()
    finally:
        await close_db(db)
