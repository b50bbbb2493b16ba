"""Helpers of the ``deploy`` tests: HTTP with the standard library (the same calls a
healthcheck or an operator's script makes), uploads, container health."""

from __future__ import annotations

import contextlib
import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import dockerenv


def unique(name: str) -> str:
    return f"se-{name}-{secrets.token_hex(3)}"


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(url: str, timeout: float = 90, what: str = "",
              alive: Callable[[], bool] = lambda: True) -> float:
    """Poll ``url`` until it answers 200; return the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not alive():
            raise AssertionError(f"{what or url}: gave up, the process is gone")
        with contextlib.suppress(OSError):
            if http("GET", url, timeout=2)[0] == 200:
                return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"{what or url} not 200 after {timeout} s")


def multipart(filename: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = secrets.token_hex(12)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def upload_download(base: str, token: str, data: bytes | None = None) -> str:
    """Upload a file through ``base``, download it, check the bytes; return its id."""
    data = data or secrets.token_bytes(100_000)
    body, headers = multipart("deploy.bin", data)
    auth = {"Authorization": f"Bearer {token}"}
    status, raw = http("POST", f"{base}/api/v1/files/upload", body, {**headers, **auth})
    assert status == 201, raw[:500]
    file_id = json.loads(raw)["file_id"]
    status, got = http("GET", f"{base}/api/v1/files/{file_id}/download", headers=auth)
    assert status == 200
    assert got == data
    return file_id


def container_health(docker: dockerenv.Docker, name: str) -> str:
    return docker.out("inspect", "--format", "{{.State.Health.Status}}", name)


def wait_healthy(docker: dockerenv.Docker, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = container_health(docker, name)
        if status == "healthy":
            return
        if docker.out("inspect", "--format", "{{.State.Running}}", name) != "true":
            break
        time.sleep(0.5)
    logs = docker.run("logs", "--tail", "40", name, check=False)
    raise AssertionError(f"{name} not healthy ({container_health(docker, name)}):\n"
                         f"{logs.stdout.decode(errors='replace')}"
                         f"{logs.stderr.decode(errors='replace')}")


def exec_out(docker: dockerenv.Docker, name: str, *cmd: str) -> str:
    return docker.out("exec", name, *cmd)




def wait_pg(docker: dockerenv.Docker, name: str, dsn: str, timeout: float = 60) -> None:
    """Poll until ``dsn`` accepts a query (the container ``name`` must keep running)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
                return
        except psycopg.OperationalError:
            if docker.out("inspect", "--format", "{{.State.Running}}", name) != "true":
                break
            time.sleep(0.3)
    logs = docker.run("logs", "--tail", "30", name, check=False)
    raise AssertionError(f"PostgreSQL {name} not up:\n{logs.stdout.decode()}"
                         f"{logs.stderr.decode()}")
