"""Runtime mode changes: one row per transition (goartstore §4 audit, kept and listed).

Touches only its own table, so it applies the same with or without 0002.
"""

from yoyo import step  # noqa: F401  (yoyo inspects the module namespace)

from storage.db.migrate import ddl

__depends__ = {"0001.initial"}

steps = [
    ddl(
        """
        CREATE TABLE <prefix>_mode_history (
            id              bigserial    PRIMARY KEY,
            from_mode       varchar(10)  NOT NULL,
            to_mode         varchar(10)  NOT NULL,
            changed_by      varchar(255) NOT NULL,
            changed_by_name varchar(255),
            changed_at      timestamptz  NOT NULL DEFAULT now()
        );
        CREATE INDEX idx_<prefix>_mode_history_at
            ON <prefix>_mode_history (changed_at DESC, id DESC);
        """,
        "DROP TABLE <prefix>_mode_history",
    ),
]
