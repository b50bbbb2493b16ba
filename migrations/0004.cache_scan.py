"""Scratch table for the cache consistency check (reference §7.5, issue 6).

The check compares every attr file id with every cache row without holding either
set in memory: the scan streams the ids found on storage into this table, then two
anti-joins find the orphans.  UNLOGGED because it is rebuilt by every scan and never
needs to survive a crash.  Touches only its own table, so it applies with or without
0002/0003.
"""

from yoyo import step  # noqa: F401  (yoyo inspects the module namespace)

from storage.db.migrate import ddl

__depends__ = {"0001.initial"}

steps = [
    ddl(
        """
        CREATE UNLOGGED TABLE <prefix>_cache_scan (
            scan_id uuid NOT NULL,
            file_id uuid,
            relpath text NOT NULL
        );
        CREATE INDEX idx_<prefix>_cache_scan ON <prefix>_cache_scan (scan_id, file_id);
        """,
        "DROP TABLE <prefix>_cache_scan",
    ),
]
