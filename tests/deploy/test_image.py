"""The container image (``Dockerfile``), run the ways operators run it.

Containers use the host network (the tests' daemon has no bridge), so each gets its own
``SERVER_PORT`` instead of ``-p 8000:8000``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path

import psycopg
import pytest
from deploykit import http, multipart, unique, upload_download, wait_healthy, wait_http
from server_proc import free_port

from storage.auth.devkeys import mint_token

pytestmark = pytest.mark.deploy
S3_BUCKET = "se-tests"  # created by tests/conftest.py's s3_endpoint


def test_image_metadata(docker, se_image):
    """Non-root, /data volume, port 8000, a python HEALTHCHECK, the console script."""
    config = docker.inspect(se_image)["Config"]
    assert config["User"] == "10001:10001"
    assert list(config["Volumes"]) == ["/data"]
    assert list(config["ExposedPorts"]) == ["8000/tcp"]
    assert config["Entrypoint"] == ["storage-element"]
    assert config["Cmd"] == ["serve"]
    check = config["Healthcheck"]["Test"]
    assert check[:2] == ["CMD", "python"] and "/health/live" in check[-1]
    # nothing to compile with, no pip left in the runtime stage
    missing = docker.run("run", "--rm", "--network", "host", "--entrypoint", "sh", se_image,
                         "-c", "command -v gcc cc make curl wget pip pip3", check=False)
    assert missing.stdout.decode().strip() == ""


def test_embedded_default(docker, se_image, containers):
    """``docker run -p 8000:8000 IMAGE`` alone: the embedded PostgreSQL, dev keys under
    /data, a token from ``docker exec``; upload, download, healthy, not root."""
    network = unique("net")  # the tests' daemon has no default bridge: a network of ours
    docker.run("network", "create", network)
    port = free_port()
    name = unique("embedded")
    containers.append(name)
    try:
        started = time.monotonic()
        docker.run("run", "-d", "--name", name, "--network", network,
                   "-p", f"127.0.0.1:{port}:8000", se_image)
        running = lambda: docker.out("inspect", "--format", "{{.State.Running}}", name) == "true"  # noqa: E731
        wait_http(f"http://127.0.0.1:{port}/health/ready", 120, name, running)
        print(f"docker run -> ready: {time.monotonic() - started:.1f} s")
        token = docker.out("exec", name, "storage-element", "token", "--role", "admin")
        upload_download(f"http://127.0.0.1:{port}", token)
        assert docker.out("exec", name, "id", "-u") == "10001"
        uid_line = docker.out("exec", name, "grep", "^Uid:", "/proc/1/status")
        assert uid_line.split()[1:] == ["10001"] * 4
        wait_healthy(docker, name, 30)
        # the volume holds what it should: files, the embedded cluster, the dev keys
        assert set(docker.out("exec", name, "ls", "/data").split()) >= {"storage", "pg", "keys"}
    finally:
        docker.run("rm", "-f", "-v", name, check=False)
        docker.run("network", "rm", network, check=False)


@pytest.fixture
def public_key_dir(keypair, tmp_path) -> Path:
    """The test public key, readable by the image's user (uid 10001)."""
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copyfile(keypair[1], keys / "public.pem")
    keys.chmod(0o755)
    (keys / "public.pem").chmod(0o644)
    return keys


def joined_env(dsn: str, s3_endpoint, keys: Path, port: int) -> list[str]:
    env = {"DATABASE_URL": dsn, "DB_TABLE_PREFIX": "d" + secrets.token_hex(5),
           "STORAGE_TYPE": "s3", "STORAGE_S3_ENDPOINT_URL": s3_endpoint.endpoint_url,
           "STORAGE_S3_ACCESS_KEY_ID": s3_endpoint.access_key,
           "STORAGE_S3_SECRET_ACCESS_KEY": s3_endpoint.secret_key,
           "STORAGE_S3_BUCKET_NAME": S3_BUCKET, "STORAGE_S3_REGION": s3_endpoint.region,
           "STORAGE_S3_APP_FOLDER": "img-" + secrets.token_hex(4),
           "JWT_PUBLIC_KEY_PATH": str(keys / "public.pem"), "SERVER_PORT": str(port),
           "APP_MODE": "edit"}
    return [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]


def test_read_only_joins_a_deployment(docker, se_image, containers, container_pg, s3_endpoint,
                                      keypair, public_key_dir):
    """``--read-only`` (writable /data and /tmp only), PostgreSQL and S3 from outside."""
    port = free_port()
    name = unique("joined")
    containers.append(name)
    docker.run("run", "-d", "--name", name, "--network", "host", "--read-only",
               "--tmpfs", "/tmp", "-v", f"{public_key_dir}:{public_key_dir}:ro",  # noqa: S108
               *joined_env(container_pg, s3_endpoint, public_key_dir, port), se_image)
    running = lambda: docker.out("inspect", "--format", "{{.State.Running}}", name) == "true"  # noqa: E731
    wait_http(f"http://127.0.0.1:{port}/health/ready", 60, name, running)
    token = mint_token(keypair[0].read_bytes(), role="admin", token_type="service_account",
                       name="deploy")
    upload_download(f"http://127.0.0.1:{port}", token)
    info = json.loads(http("GET", f"http://127.0.0.1:{port}/api/v1/info")[1])
    assert info["storage_type"] == "s3"
    # nothing was written outside the volumes: the root filesystem is read-only
    denied = docker.run("exec", name, "touch", "/opt/venv/x", check=False)
    assert denied.returncode != 0 and b"Read-only file system" in denied.stderr


def _slow_upload(port: int, token: str, data: bytes, first: int, release: threading.Event,
                 result: dict) -> None:
    """Send the headers and ``first`` body bytes, wait for ``release``, send the rest."""
    body, headers = multipart("drain.bin", data)
    head = (f"POST /api/v1/files/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: {headers['Content-Type']}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(head + body[:first])
            result["sent_first"] = True
            if not release.wait(60):
                return
            if result.get("stall"):
                time.sleep(30)  # past SHUTDOWN_TIMEOUT: the server gives up on it
                return
            sock.sendall(body[first:])
            answer = sock.recv(65536)
            result["status"] = int(answer.split()[1]) if answer else None
    except OSError as exc:
        result["error"] = repr(exc)


def test_stop_drains(docker, se_image, containers, container_pg, keypair, public_key_dir):
    """``docker stop`` with two uploads in flight: the one whose body keeps coming is
    committed (201), the one that stalls past SHUTDOWN_TIMEOUT is rolled back; no
    partial file, no row, no pending WAL intent; exit code 0."""
    port = free_port()
    name = unique("drain")
    containers.append(name)
    prefix = "d" + secrets.token_hex(5)
    docker.run("run", "-d", "--name", name, "--network", "host",
               "-v", f"{public_key_dir}:{public_key_dir}:ro",
               "-e", f"DATABASE_URL={container_pg}", "-e", f"DB_TABLE_PREFIX={prefix}",
               "-e", f"JWT_PUBLIC_KEY_PATH={public_key_dir / 'public.pem'}",
               "-e", f"SERVER_PORT={port}", "-e", "APP_MODE=edit", se_image)
    running = lambda: docker.out("inspect", "--format", "{{.State.Running}}", name) == "true"  # noqa: E731
    wait_http(f"http://127.0.0.1:{port}/health/ready", 60, name, running)
    token = mint_token(keypair[0].read_bytes(), role="admin", token_type="service_account",
                       name="deploy")
    finishing, stalling = {}, {"stall": True}
    release = threading.Event()
    threads = [threading.Thread(target=_slow_upload, args=(port, token, os.urandom(300_000),
                                                           100_000, release, result))
               for result in (finishing, stalling)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while not (finishing.get("sent_first") and stalling.get("sent_first")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # the server is reading both bodies
    stopper = threading.Thread(target=docker.run, args=("stop", name), daemon=True)
    stopper.start()
    time.sleep(1.0)  # SIGTERM delivered: draining
    release.set()
    stopper.join(60)
    threads[0].join(30)
    assert finishing.get("status") == 201, finishing
    state = docker.inspect(name)["State"]
    assert state["ExitCode"] == 0, docker.run("logs", name).stderr.decode()[-2000:]
    with psycopg.connect(container_pg) as conn:
        files = conn.execute(f"SELECT count(*) FROM {prefix}_files").fetchone()[0]  # noqa: S608
        pending = conn.execute(
            f"SELECT count(*) FROM {prefix}_wal WHERE status = 'pending'").fetchone()[0]  # noqa: S608
    assert (files, pending) == (1, 0)
    # on disk: exactly one file and its attr document, no temp file
    listing = docker.out("run", "--rm", "--network", "host", "--volumes-from", name,
                         "--entrypoint", "find", se_image, "/data/storage", "-type", "f")
    names = sorted(Path(p).name for p in listing.split())
    assert len(names) == 2 and names[1] == names[0] + ".attr.json", names
