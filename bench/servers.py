"""Start, pin, probe and stop the servers under test (subprocesses of the harness)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent

# exec()s the real command with its CPU affinity set, so the PID we hold is the server's.
_PIN = (
    "import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


def can_pin() -> bool:
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def pinned(cmd: list[str], cpus: set[int] | None) -> list[str]:
    if not cpus:
        return cmd
    return [sys.executable, "-c", _PIN, ",".join(str(c) for c in sorted(cpus)), *cmd]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


class ServerProcess:
    """A server subprocess with its output in ``log``; started in its own session so a
    last-resort kill can reach helpers it spawned (e.g. an embedded PostgreSQL)."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        *,
        log: Path,
        env: Mapping[str, str] | None,
        cwd: Path = REPO_ROOT,
        base_url: str,
        ready_path: str = "/health/ready",
        cpus: set[int] | None = None,
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.log = log
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.base_url = base_url
        self.ready_url = base_url + ready_path
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                pinned(self.cmd, self.cpus),
                cwd=self.cwd,
                env=self.env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_ready(self, timeout: float) -> None:
        """Poll the readiness URL until 200; raise RuntimeError on exit or timeout."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            while time.monotonic() < deadline:
                if not self.alive():
                    code = self.proc.returncode if self.proc else None
                    raise RuntimeError(
                        f"{self.name} exited with code {code} before it was ready; "
                        f"log tail:\n{tail(self.log)}"
                    )
                try:
                    async with s.get(self.ready_url) as resp:
                        if resp.status == 200:
                            return
                        last = f"HTTP {resp.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = type(exc).__name__
                await asyncio.sleep(0.2)
        raise RuntimeError(
            f"{self.name} not ready after {timeout:.0f}s ({last}); log tail:\n{tail(self.log)}"
        )

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the process (and its session) as a last resort."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def ceiling_server(workdir: Path, cpus: set[int] | None) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        "ceiling",
        [
            sys.executable,
            "-m",
            "bench.ceiling",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(workdir / "ceiling"),
        ],
        log=workdir / "ceiling.log",
        env=None,
        base_url=f"http://127.0.0.1:{port}",
        cpus=cpus,
    )


def ours_env(
    workdir: Path, port: int, *, s3: bool = False, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(
        SERVER_HOST="127.0.0.1",
        SERVER_PORT=str(port),
        SERVER_WORKERS="1",
        DATA_DIR=str(workdir / "ours"),
        STORAGE_LOCAL_BASE_PATH=str(workdir / "ours" / "storage"),
        STORAGE_MAX_SIZE=str(200 << 30),
        APP_MODE="edit",
    )
    if s3:
        env["STORAGE_TYPE"] = "s3"
    return env


def ours_server(workdir: Path, cpus: set[int] | None, *, s3: bool = False) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        "ours",
        [sys.executable, "run.py"],
        log=workdir / "ours.log",
        env=ours_env(workdir, port, s3=s3),
        base_url=f"http://127.0.0.1:{port}",
        cpus=cpus,
    )


def mint_token(env: Mapping[str, str] | None, timeout: float = 120.0) -> str:
    """``python run.py token --role admin --type service_account --name bench``; the token
    is the last non-empty line of its stdout."""
    cmd = [
        sys.executable,
        "run.py",
        "token",
        "--role",
        "admin",
        "--type",
        "service_account",
        "--name",
        "bench",
    ]
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell
            cmd,
            cwd=REPO_ROOT,
            env=dict(env) if env is not None else None,
            timeout=timeout,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"`{' '.join(cmd[1:])}` timed out after {timeout:.0f}s") from exc
    lines = [ln.strip() for ln in done.stdout.splitlines() if ln.strip()]
    if done.returncode != 0 or not lines:
        err = (done.stderr or done.stdout).strip().splitlines()[-8:]
        raise RuntimeError(
            f"`{' '.join(cmd[1:])}` failed (exit {done.returncode}): " + " | ".join(err)
        )
    return lines[-1].split()[-1]
