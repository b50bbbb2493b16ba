"""The compose stack (``deploy/compose.yaml``), unmodified: only its variables change,
to the images built here (stand-ins of the official PostgreSQL and SeaweedFS) and free
host ports.  ``up`` until all is healthy, then use it, then ``down -v``."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time

import pytest
from deploykit import container_health, http, upload_download
from dockerenv import ROOT, unavailable
from server_proc import free_port

pytestmark = pytest.mark.deploy
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
ELEMENTS = {"se-01": ("edit", 100), "se-02": ("edit", 200), "se-03": ("rw", 300)}


def compose_command(docker) -> list[str]:
    """``docker compose`` (v2) when installed, else Debian's ``docker-compose`` (v1)."""
    if docker.run("compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    unavailable("neither 'docker compose' nor 'docker-compose' is installed")
    raise AssertionError  # unreachable


def test_compose_stack(docker, se_image, standins):
    project = "se-deploy-" + secrets.token_hex(3)
    ports = {name: free_port() for name in ELEMENTS}
    env = {**docker.env, "SE_IMAGE": se_image, "POSTGRES_IMAGE": standins.postgres,
           "S3_IMAGE": standins.seaweedfs,
           **{f"SE_{name[-2:]}_PORT": f"127.0.0.1:{port}" for name, port in ports.items()}}
    base = [*compose_command(docker), "-f", str(COMPOSE_FILE), "-p", project]

    def compose(*args: str, timeout: float = 300) -> str:
        started = time.monotonic()
        proc = subprocess.run([*base, *args], env=env, capture_output=True, text=True,  # noqa: S603
                              timeout=timeout)
        assert proc.returncode == 0, f"compose {args}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        if args[0] in ("up", "down"):
            print(f"compose {args[0]}: {time.monotonic() - started:.1f} s")
        return proc.stdout

    label = f"label=com.docker.compose.project={project}"

    def containers() -> dict[str, str]:
        """{service: container id} of the project (the docker CLI is faster than compose)."""
        out = docker.out("ps", "-a", "--filter", label, "--format",
                         '{{.Label "com.docker.compose.service"}} {{.ID}}')
        return dict(line.split() for line in out.splitlines())

    try:
        compose("up", "-d")
        ids = containers()
        deadline = time.monotonic() + 120
        while any(container_health(docker, ids[name]) != "healthy" for name in ELEMENTS):
            if time.monotonic() > deadline:
                pytest.fail(f"not healthy: {compose('ps')}\n{compose('logs', '--tail=20')}")
            time.sleep(1)
        print(f"elements healthy: {time.monotonic() - deadline + 120:.1f} s after up")
        for service in ("postgres", "s3"):
            assert container_health(docker, ids[service]) == "healthy"
        for job in ("keys", "create-bucket", "migrate"):
            state = docker.inspect(ids[job])["State"]
            assert (state["Status"], state["ExitCode"]) == ("exited", 0), job

        token = compose("exec", "-T", "se-01", "storage-element", "token", "--private-key",
                        "/keys/private_key.pem", "--role", "admin").strip()
        upload_download(f"http://127.0.0.1:{ports['se-01']}", token)
        for name, (mode, priority) in ELEMENTS.items():
            status, raw = http("GET", f"http://127.0.0.1:{ports[name]}/api/v1/info")
            info = json.loads(raw)
            assert status == 200
            assert (info["element_id"], info["mode"], info["priority"]) == (name, mode, priority)
            assert info["storage_type"] == "s3"
            assert info["file_count"] == (1 if name == "se-01" else 0)
    finally:
        compose("down", "-v", "--timeout", "5")  # weed takes >10 s to stop gracefully
    assert docker.out("ps", "-aq", "--filter", label) == ""
    assert docker.out("volume", "ls", "-q", "--filter", label) == ""
