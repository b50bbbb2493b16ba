"""A wheel that serves: built from the checkout, installed in a fresh virtualenv outside
it, and run the way a new user runs it (``storage-element serve`` on the embedded
default).  Before the SQL and migrations were packaged, the server died at startup with
``no SQL statement named 'get_mode'``."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from deploykit import upload_download, wait_http
from server_proc import free_port

pytestmark = pytest.mark.deploy


def run(*cmd, **kwargs) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)  # noqa: S603
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_wheel_serves(wheel_bin, tmp_path):
    bindir, env_dir = wheel_bin, wheel_bin.parent
    home = tmp_path / "home"  # the user's working directory: nothing of the checkout
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "DATABASE_URL", "DB_", "STORAGE_", "JWT_"))}
    port = free_port()
    env.update(SERVER_PORT=str(port), SERVER_HOST="127.0.0.1", LOG_FORMAT="json",
               PATH=f"{bindir}:{env['PATH']}")
    where = run(str(bindir / "python"), "-c", "import storage; print(storage.__file__)",
                cwd=home, env=env)
    assert Path(where.strip()).is_relative_to(env_dir), where

    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(bindir / "storage-element"), "serve"], cwd=home,  # noqa: S603
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/ready", 120,
                  f"storage-element serve:\n{log.read_text(errors='replace')[-3000:]}",
                  lambda: server.poll() is None)
        token = run(str(bindir / "storage-element"), "token", cwd=home, env=env).strip()
        upload_download(f"http://127.0.0.1:{port}", token)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
    assert code == 0, log.read_text(errors="replace")[-3000:]
    assert (home / "data" / "storage").is_dir()
    # the ops commands find the migrations and the SQL in the installed copy too
    listing = run(str(bindir / "storage-element"), "migrate", "--list", cwd=home, env=env)
    assert "pending" not in listing and "applied  0001.initial" in listing, listing
