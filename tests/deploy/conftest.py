"""Session fixtures of the ``deploy`` tests: one Docker daemon, the stand-in base images,
the element's image and the wheel's virtualenv, each made once per run
(``dockerenv.py``), in the background from the end of collection on; the deploy tests
run last, so the rest of the suite runs meanwhile.

Without Docker or debootstrap these tests skip with the reason, except in CI
(``CI=true``), where they fail: CI installs both (``.ci/run``).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import dockerenv
import pytest

PREP = dockerenv.Preparation()


def is_deploy(item: pytest.Item) -> bool:
    return item.get_closest_marker("deploy") is not None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=is_deploy)  # stable: the deploy tests last, in their order


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start making what the selected tests will ask for."""
    if session.config.option.collectonly:
        return
    wanted = set().union(*(getattr(item, "fixturenames", ()) for item in session.items))
    for part, fixture in (("images", "images"), ("wheel", "wheel_bin")):
        if fixture in wanted:
            PREP.start(part)


def pytest_sessionfinish() -> None:
    PREP.close()  # stops the daemon if it is ours


@pytest.fixture(scope="session")
def images() -> dockerenv.Images:
    return PREP.get("images")


@pytest.fixture(scope="session")
def docker(images) -> dockerenv.Docker:
    return images.docker


@pytest.fixture(scope="session")
def standins(images) -> dockerenv.StandIns:
    return images.standins


@pytest.fixture(scope="session")
def se_image(images) -> str:
    """The element's image, built from the repository's Dockerfile on the python stand-in."""
    return images.element


@pytest.fixture(scope="session")
def wheel_bin() -> Path:
    """bin/ of a fresh virtualenv (outside the checkout) with the checkout's wheel."""
    return PREP.get("wheel")


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
