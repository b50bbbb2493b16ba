"""Schema migrations with yoyo, one set of bookkeeping tables per prefix.

yoyo shares ``_yoyo_log``, ``_yoyo_version`` and ``yoyo_lock`` between every
migration table in a schema, so a second prefix in the same database collides
(style guide §5.2).  :class:`PrefixedPsycopgBackend` renames all four tables to
``<prefix>_yoyo_*``; it is registered under the ``yoyo.backends`` entry point as
``storage+psycopg`` so the plain ``yoyo`` CLI uses it too.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from yoyo import read_migrations, step
from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
from yoyo.connections import parse_uri

from ..config import Config, validate_prefix
from .sql import bundled, render

MIGRATIONS_DIR = bundled("migrations")
log = logging.getLogger(__name__)
_prefix: contextvars.ContextVar[str | None] = contextvars.ContextVar("yoyo_prefix", default=None)


def current_prefix() -> str:
    """The prefix being migrated: set by :func:`using_prefix`, else from the config env."""
    prefix = _prefix.get()
    if prefix is None:  # the plain `yoyo` CLI: same env var and validation as the server
        prefix = Config.from_env(os.environ).table_prefix
    return validate_prefix(prefix)


@contextlib.contextmanager
def using_prefix(prefix: str) -> Iterator[str]:
    token = _prefix.set(validate_prefix(prefix))
    try:
        yield prefix
    finally:
        _prefix.reset(token)


def ddl(apply: str, rollback: str | None = None):
    """A yoyo step whose SQL has ``<prefix>`` filled in for the prefix being migrated."""
    prefix = current_prefix()
    return step(render(apply, prefix), render(rollback, prefix) if rollback else None)


class PrefixedPsycopgBackend(PostgresqlPsycopgBackend):
    """psycopg 3 backend whose four bookkeeping tables all carry the prefix."""

    def __init__(self, dburi, migration_table=None):
        prefix = current_prefix()
        self.log_table = f"{prefix}_yoyo_log"
        self.version_table = f"{prefix}_yoyo_version"
        self.lock_table = f"{prefix}_yoyo_lock"
        super().__init__(dburi, f"{prefix}_yoyo_migration")


def yoyo_uri(dsn: str) -> str:
    """Turn any libpq URI (``postgresql://``, ``postgres://``) into our yoyo scheme."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres", "storage+psycopg"):
        raise ValueError(f"unsupported database URI scheme {parts.scheme!r}")
    return urlunsplit(("storage+psycopg", *parts[1:]))


@contextlib.contextmanager
def backend_for(dsn: str, prefix: str) -> Iterator[PrefixedPsycopgBackend]:
    """An open, initialised backend for ``prefix``; closed on exit."""
    with using_prefix(prefix):
        backend = PrefixedPsycopgBackend(parse_uri(yoyo_uri(dsn)))
        try:
            # One session advisory lock per prefix serialises every yoyo step,
            # including yoyo's own internal-schema upgrade, across processes.
            backend.execute(f"SELECT pg_advisory_lock(hashtext('{prefix}_yoyo'))")
            backend.init_database()
            yield backend
        finally:
            backend.connection.close()


def _migrations():
    return read_migrations(str(MIGRATIONS_DIR))


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    applied: tuple[str, ...]
    pending: tuple[str, ...]


def status(dsn: str, prefix: str) -> MigrationStatus:
    with backend_for(dsn, prefix) as backend:
        migrations = _migrations()
        pending = {m.id for m in backend.to_apply(migrations)}
        return MigrationStatus(
            applied=tuple(m.id for m in migrations if m.id not in pending),
            pending=tuple(m.id for m in migrations if m.id in pending),
        )


def apply(dsn: str, prefix: str) -> list[str]:
    """Apply pending migrations for ``prefix`` under yoyo's lock; return their ids."""
    with backend_for(dsn, prefix) as backend, backend.lock():
        todo = backend.to_apply(_migrations())
        backend.apply_migrations(todo)
        for m in todo:
            log.info("migration applied: %s (prefix %s)", m.id, prefix)
        return [m.id for m in todo]


def rollback(dsn: str, prefix: str, count: int | None = None) -> list[str]:
    """Roll back the last ``count`` migrations (all when None) for ``prefix``."""
    with backend_for(dsn, prefix) as backend, backend.lock():
        todo = backend.to_rollback(_migrations())
        if count is not None:
            todo = todo[:count]
        backend.rollback_migrations(todo)
        return [m.id for m in todo]


def drop_bookkeeping(dsn: str, prefix: str) -> None:
    """Drop the four ``<prefix>_yoyo_*`` tables (after a full rollback)."""
    with backend_for(dsn, prefix) as backend:
        for table in ("migration", "log", "version", "lock"):
            backend.execute(f"DROP TABLE IF EXISTS {prefix}_yoyo_{table}")
