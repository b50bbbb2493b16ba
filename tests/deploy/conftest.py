"""Session fixtures of the ``deploy`` tests: one Docker daemon, the stand-in base images
and the element's image, each made once per run (``dockerenv.py``).

Without Docker or debootstrap these tests skip with the reason, except in CI
(``CI=true``), where they fail: CI installs both (``.ci/run``).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import dockerenv
import pytest


@pytest.fixture(scope="session")
def docker() -> Iterator[dockerenv.Docker]:
    with dockerenv.daemon() as d:
        yield d


@pytest.fixture(scope="session")
def standins(docker) -> dockerenv.StandIns:
    return dockerenv.stand_ins(docker)


@pytest.fixture(scope="session")
def se_image(docker, standins) -> str:
    """The element's image, built from the repository's Dockerfile on the python stand-in."""
    return docker.build("storage-element:deploy-test", dockerenv.ROOT,
                        args={"BASE_IMAGE": standins.python, **dockerenv.pip_build_args()})


@pytest.fixture
def containers(docker) -> Iterator[list[str]]:
    """Names appended here are removed (with their anonymous volumes) after the test."""
    names: list[str] = []
    yield names
    for name in names:
        docker.run("rm", "-f", "-v", name, check=False)


@pytest.fixture(scope="session")
def container_pg(docker, standins) -> Iterator[str]:
    """A PostgreSQL over TCP for the containers (the suite's own listens on a socket in a
    root-only directory): the postgres stand-in on the host network; its libpq URI."""
    from deploykit import unique, wait_pg
    from server_proc import free_port

    port, password = free_port(), secrets.token_hex(8)
    name = unique("pg")
    docker.run("run", "-d", "--name", name, "--network", "host", "-e", f"PGPORT={port}",
               "-e", "POSTGRES_USER=artstore", "-e", f"POSTGRES_PASSWORD={password}",
               "-e", "POSTGRES_DB=artstore", standins.postgres)
    try:
        dsn = f"postgresql://artstore:{password}@127.0.0.1:{port}/artstore"
        wait_pg(docker, name, dsn)
        yield dsn
    finally:
        docker.run("rm", "-f", "-v", name, check=False)
