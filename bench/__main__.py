"""``python -m bench``: start our server and the ceiling, run the scenarios, write reports.

See bench/README.md. Exit status: 0 = ran (targets may still FAIL - read the report),
1 = some requests failed, 2 = a server could not be started / no token (the rest still ran).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench import load as L
from bench import scaleout
from bench.pgstat import Cluster, commits
from bench.plan import build_plan, select, warmup_of
from bench.procstat import ProcSampler
from bench.report import Cell, compare_rows, machine_facts, make_chart, render_markdown, write_json
from bench.servers import REPO_ROOT, ServerProcess, can_pin, ceiling_server, mint_token, ours_server

SERVER_CPU = 0
CLIENT_CPU = 1


class Progress:
    """Live line on stderr: scenario, server, repeat, requests done, current MiB/s."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()

    def _write(self, text: str, final: bool) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + text + ("\n" if final else ""))
        elif final:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self._write(text, True)

    async def watch(self, label: str, live: L.LiveCounters, planned: int) -> None:
        last_b, last_t = 0, time.perf_counter()
        for _ in range(10**7):  # bounded; cancelled when the run ends
            await asyncio.sleep(0.5)
            now = time.perf_counter()
            rate = (live.bytes - last_b) / L.MIB / max(now - last_t, 1e-9)
            last_b, last_t = live.bytes, now
            self._write(
                f"{label}  {live.done}/{planned} req  {live.errors} err  {rate:8.1f} MiB/s now",
                False,
            )


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.progress = Progress(not args.quiet)
        self.body = L.BodySource()
        self.targets: list[tuple[L.Target, ServerProcess | None]] = []
        self.servers: list[ServerProcess] = []
        self.notes: list[str] = []
        self.failed_start = False
        self.ours_status = "not run (--ceiling-only)" if args.ceiling_only else "?"
        self.client_pid = os.getpid()
        self._noted_delete = False
        self.ours_pg: Cluster | None = None

    # ------------------------------------------------------------------ servers

    async def start_servers(self, workdir: Path, server_cpus: set[int] | None) -> None:
        a = self.args
        if not a.ceiling_only:
            if a.ours_url:
                if not a.token:
                    self.fail_ours("--ours-url needs --token")
                else:
                    self.targets.append((L.Target("ours", a.ours_url, "ours", a.token), None))
                    self.ours_status = f"external at {a.ours_url} (no RSS/CPU sampling)"
            elif not (REPO_ROOT / "run.py").exists():
                self.fail_ours(f"{REPO_ROOT / 'run.py'} does not exist yet")
            else:
                await self._start_ours(workdir, server_cpus)
        ceiling = ceiling_server(workdir, server_cpus)
        ceiling.start()
        self.servers.append(ceiling)
        await ceiling.wait_ready(a.start_timeout)
        self.targets.append((L.Target("ceiling", ceiling.base_url, "ceiling"), ceiling))

    async def _start_ours(self, workdir: Path, server_cpus: set[int] | None) -> None:
        a = self.args
        srv = ours_server(workdir, server_cpus, s3=a.s3)
        self.progress.note(
            f"starting ours: python run.py on {srv.base_url} (data in {workdir / 'ours'})"
        )
        srv.start()
        self.servers.append(srv)
        try:
            await srv.wait_ready(a.start_timeout)
        except RuntimeError as exc:
            self.fail_ours(str(exc))
            return
        token = a.token
        if not token:
            try:
                token = await asyncio.get_running_loop().run_in_executor(None, mint_token, srv.env)
            except RuntimeError as exc:
                self.fail_ours(f"could not mint a token ({exc}); pass --token")
                return
        self.targets.insert(0, (L.Target("ours", srv.base_url, "ours", token), srv))
        self.ours_status = "python run.py" + (" with STORAGE_TYPE=s3" if a.s3 else "")
        pgdata = workdir / "ours" / "pg"
        if (pgdata / "postmaster.pid").exists():  # the embedded default: measure it too
            self.ours_pg = Cluster.of(pgdata)

    def fail_ours(self, why: str) -> None:
        self.failed_start = True
        self.ours_status = "not run"
        self.notes.append(f"ours was not benchmarked: {why}")
        self.progress.note(f"ours: {why}")

    def stop_servers(self) -> None:
        for srv in reversed(self.servers):
            code = srv.stop()
            if srv.name == "ours" and code not in (0, None, -15):
                self.notes.append(f"ours exited with code {code} on SIGTERM (log: {srv.log})")

    # ------------------------------------------------------------------ runs

    async def _one_run(
        self,
        target: L.Target,
        srv: ServerProcess | None,
        sc: L.Scenario,
        session: aiohttp.ClientSession,
        ids: list[str],
        label: str,
    ) -> tuple[L.LoadResult, dict[str, Any]]:
        live = L.LiveCounters()
        pg = self.ours_pg if target.kind == "ours" and srv is not None else None
        if pg is not None:  # what the element's PostgreSQL spends on the run
            xacts0, pg_cpu0 = await commits(pg.dsn()), pg.cpu_seconds()
        watcher = asyncio.create_task(self.progress.watch(label, live, sc.requests))
        server_s = ProcSampler(srv.pid, interval=0.05) if srv and srv.pid else None
        client_s = ProcSampler(self.client_pid, interval=0.25)
        if server_s:
            server_s.start()
        client_s.start()
        try:
            res = await L.run_load(
                target,
                sc,
                body=self.body,
                session=session,
                file_ids=ids,
                live=live,
                request_timeout=self.args.request_timeout,
            )
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            cstats = await client_s.stop()
            sstats = await server_s.stop() if server_s else None
        res_d = res.as_dict()
        res_d["client"] = cstats.as_dict()
        res_d["server"] = sstats.as_dict() if sstats else None
        if pg is not None:
            res_d["pg"] = {"cpu_s": pg.cpu_seconds() - pg_cpu0,
                           "xacts": await commits(pg.dsn()) - xacts0}
        self.progress.note(
            f"{label}: {res.requests_ok}/{res.requests_planned} ok, {res.errors} err, "
            f"{res.req_s:.1f} req/s, {res.mib_s:.1f} MiB/s, p50 {res.p50_ms:.2f} ms, "
            f"p99 {res.p99_ms:.2f} ms"
            + (f", server RSS +{sstats.rss_growth_mib:.1f} MiB" if sstats else "")
        )
        return res, res_d

    async def _cleanup(
        self, target: L.Target, session: aiohttp.ClientSession, sc: L.Scenario, ids: list[str]
    ) -> None:
        """Delete big uploads between runs so the disk does not fill (best effort)."""
        if ids and sc.size >= L.MIB:
            deleted = await L.delete_files(target, ids, session=session)
            if deleted < len(ids) and target.kind == "ours" and not self._noted_delete:
                self._noted_delete = True
                self.notes.append(
                    f"ours acknowledged only {deleted}/{len(ids)} DELETEs "
                    "between runs; its disk usage grew during the bench"
                )

    async def run_scenario(self, sc: L.Scenario) -> list[Cell]:
        a = self.args
        todo = [(t, s) for t, s in self.targets if t.supports(sc.op)]
        cells = {t.name: Cell(sc, t.name) for t, _ in todo}
        sessions = {t.name: L.make_session(sc.concurrency, a.request_timeout) for t, _ in todo}
        prepared: dict[str, list[str]] = {}
        try:
            for t, _ in todo:
                try:
                    prepared[t.name] = await self._prepare(t, sc, sessions[t.name])
                except (L.RequestError, aiohttp.ClientError, TimeoutError) as exc:
                    cells[t.name].note = f"preparation failed: {exc}"
            live_targets = [(t, s) for t, s in todo if t.name in prepared]
            warm = warmup_of(sc) if a.warmup else None
            if warm is not None:
                for t, s in live_targets:
                    r, _ = await self._one_run(
                        t,
                        s,
                        warm,
                        sessions[t.name],
                        prepared[t.name],
                        f"{sc.name} {t.name} warm-up",
                    )
                    await self._cleanup(t, sessions[t.name], sc, r.file_ids)
            for rep in range(a.repeats):
                order = live_targets if rep % 2 == 0 else live_targets[::-1]
                for t, s in order:
                    r, rd = await self._one_run(
                        t,
                        s,
                        sc,
                        sessions[t.name],
                        prepared[t.name],
                        f"{sc.name} {t.name} {rep + 1}/{a.repeats}",
                    )
                    cells[t.name].runs.append(rd)
                    await self._cleanup(t, sessions[t.name], sc, r.file_ids)
            for t, _ in live_targets:
                await self._cleanup(t, sessions[t.name], sc, prepared[t.name])
        finally:
            for s in sessions.values():
                await s.close()
        return list(cells.values())

    async def _prepare(
        self, t: L.Target, sc: L.Scenario, session: aiohttp.ClientSession
    ) -> list[str]:
        if sc.op == "get":
            n = 1 if sc.role == "big" else min(sc.concurrency, 8)
            return await L.prepare_files(
                t,
                sc.size,
                n,
                body=self.body,
                session=session,
                concurrency=min(n, 4),
                max_seconds=sc.max_seconds,
            )
        if sc.op == "meta":
            return await L.prepare_files(
                t, 4 * L.KIB, 16, body=self.body, session=session, concurrency=4
            )
        if sc.op == "list":
            # a full page of 100 files to list
            n = 10 if self.args.quick else 100
            return await L.prepare_files(
                t, 4 * L.KIB, n, body=self.body, session=session, concurrency=4
            )
        return []


def _disk_check(workdir: Path, plan: list[L.Scenario], repeats: int, notes: list[str]) -> None:
    need = 0
    for sc in plan:
        if sc.is_upload:
            # per server: ours may not delete; biggest single scenario kept on disk
            need = max(need, sc.size * sc.requests * (repeats + 1))
    free = shutil.disk_usage(workdir).free
    if need * 2 > free:
        notes.append(
            f"WARNING: {L.human_bytes(free)} free under {workdir}; "
            f"the largest scenario may write {L.human_bytes(need * 2)}"
        )


def write_reports(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Markdown (always, also printed), PNG chart (if matplotlib), JSON (with --json)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (
        report["date"]
        + ("-quick" if args.quick else "")
        + ("-ceiling-only" if args.ceiling_only else "")
        + ("-s3" if args.s3 else "")
    )
    md_path, png_path = out / f"{stem}.md", out / f"{stem}.png"
    if not args.no_chart:
        note = make_chart(report, png_path)
        if note:
            print(note, file=sys.stderr)
            report["notes"].append(note)
        else:
            report["chart"] = png_path.name
    md = render_markdown(report)
    md_path.write_text(md)
    print(md)
    written = [md_path]
    if args.json:
        write_json(report, out / f"{stem}.json")
        written.append(out / f"{stem}.json")
    if report.get("chart"):
        written.append(png_path)
    print("written: " + ", ".join(str(p) for p in written), file=sys.stderr)


async def amain(args: argparse.Namespace) -> int:
    big = L.parse_size(args.big_size) if args.big_size else None
    plan = select(build_plan(args.quick, big, args.max_seconds), args.scenarios)
    if not plan and not (args.scenarios and "scaleout" in args.scenarios):
        print("no scenario matches --scenarios", file=sys.stderr)
        return 2
    if args.requests_scale != 1.0:
        plan = [
            replace(sc, requests=max(1, round(sc.requests * args.requests_scale))) for sc in plan
        ]
    base = Path(args.workdir) if args.workdir else None
    if base:
        base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=base))
    h = Harness(args)
    pin = can_pin() and not args.no_pin
    if pin:
        os.sched_setaffinity(0, {CLIENT_CPU})
        pinning = f"servers on CPU {SERVER_CPU}, load client on CPU {CLIENT_CPU}"
    else:
        pinning = "none" + (" (--no-pin)" if args.no_pin else " (fewer than 2 CPUs)")
    _disk_check(workdir, plan, args.repeats, h.notes)
    started = datetime.now(UTC).astimezone()
    load_before = os.getloadavg()[0]
    cells: list[Cell] = []
    try:
        try:
            await h.start_servers(workdir, {SERVER_CPU} if pin else None)
        except RuntimeError as exc:
            h.failed_start = True
            h.notes.append(f"the ceiling could not be started: {exc}")
            print(exc, file=sys.stderr)
            return 2
        for sc in plan:
            if not any(t.supports(sc.op) for t, _ in h.targets):
                continue
            cells.extend(await h.run_scenario(sc))
    finally:
        h.stop_servers()
        if args.keep:
            h.notes.append(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    scaleout_md = None
    if not (args.no_scaleout or args.ceiling_only or args.ours_url or args.s3) and (
            args.scenarios is None or "scaleout" in args.scenarios):
        so_args = scaleout.parse_args(
            ["--repeats", str(args.repeats), *(["--quick"] if args.quick else []),
             *(["--no-pin"] if args.no_pin else []),
             *(["--workdir", args.workdir] if args.workdir else [])])
        so_dir = Path(tempfile.mkdtemp(prefix="scaleout-", dir=base))
        h.progress.note("scale-out: four elements on one PostgreSQL")
        try:
            runs, so_notes = await scaleout.run_scaleout(so_args, so_dir)
            scaleout_md = scaleout.render(runs, so_args, so_notes)
            if any(r.errors for r in runs):
                h.notes.append("scale-out: some uploads failed (see its table)")
        except (RuntimeError, OSError) as exc:
            h.notes.append(f"scale-out not measured: {exc}")
        finally:
            shutil.rmtree(so_dir, ignore_errors=True)
    for c in cells:
        missing = sum(int(r.get("checksums_missing", 0)) for r in c.runs)
        if missing:
            h.notes.append(
                f"{c.target} / {c.scenario.name}: {missing} upload answers had no "
                "`checksum` field, so they were not verified"
            )
    cell_map = {(c.scenario.name, c.target): c for c in cells}
    ran = [sc for sc in plan if any(k[0] == sc.name for k in cell_map)]
    h.notes += [
        "ceiling = bench/ceiling.py: same durability (temp file, sha256, fsync, rename, "
        "fsync dir; GET via FileResponse/sendfile) without auth, DB or metadata; default "
        "asyncio loop",
        "MiB/s counts body bytes of successful requests over the wall time of the run; "
        "req/s likewise; latency = request start to response fully read",
        "bodies are slices of one random buffer (identical content for a given size); "
        "upload checksums are verified against the server's answer",
        "RSS/CPU: the server process only (an embedded PostgreSQL is a separate process and "
        "not counted); RSS growth = peak during the run minus RSS at its start",
        "server CPU / client CPU = CPU seconds per wall second of the run (100% = one core "
        "busy); a client near 100% means the client, not the server, was the bottleneck",
        f"the run took {(datetime.now(UTC) - started).total_seconds():.0f} s; 1-min load "
        f"average {load_before:.2f} before it, {os.getloadavg()[0]:.2f} at its end",
    ]
    if load_before > 0.5:
        h.notes.append(
            f"WARNING: the machine was busy before the run (load average {load_before:.2f} "
            f"on {os.cpu_count()} CPUs): other processes competed with the servers and the "
            "client, so the numbers are noisy"
        )
    if (
        pin
        and any(t.name == "ours" for t, srv in h.targets if srv is not None)
        and not (os.environ.get("DATABASE_URL") or os.environ.get("DB_HOST"))
    ):
        h.notes.append(
            "ours ran with its embedded PostgreSQL, which inherits the CPU 0 pinning: "
            "its DB work shares the one server core with its HTTP work"
        )
    if args.s3:
        h.notes.append(
            "--s3: ours stored to S3 (STORAGE_TYPE=s3, STORAGE_S3_* from the "
            "environment); the ceiling still writes to local disk"
        )
    report: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d"),
        "started": started.isoformat(timespec="seconds"),
        "machine": machine_facts(workdir.parent),
        "config": {
            "quick": args.quick,
            "ceiling_only": args.ceiling_only,
            "repeats": args.repeats,
            "warmup": "yes" if args.warmup else "no",
            "pinning": pinning,
            "storage": "s3" if args.s3 else "local disk",
            "ours_status": h.ours_status,
            "big_size": big,
            "scenarios": args.scenarios,
        },
        "rows": compare_rows(ran, cell_map),
        "cells": [c.as_dict() for c in cells],
        "scaleout": scaleout_md,
        "notes": h.notes,
    }
    write_reports(args, report)
    if h.failed_start:
        return 2
    return 1 if any(c.errors for c in cells) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and counts (seconds; used by CI); numbers are meaningless",
    )
    p.add_argument(
        "--ceiling-only",
        action="store_true",
        help="do not start our server; measure the ceiling alone",
    )
    p.add_argument(
        "--s3",
        action="store_true",
        help="run our server with STORAGE_TYPE=s3 (needs STORAGE_S3_* in the env)",
    )
    p.add_argument("--json", action="store_true", help="also write <out>/<date>.json")
    p.add_argument(
        "--out",
        default=str(REPO_ROOT / "bench" / "results"),
        help="report directory (default: bench/results)",
    )
    p.add_argument(
        "--scenarios",
        default=None,
        help="comma list of names/globs/ops/roles, e.g. put-1m,get or small,big",
    )
    p.add_argument(
        "--big-size",
        default=None,
        help="size of the single big transfer (default 2g; 8m with --quick)",
    )
    p.add_argument("--repeats", type=int, default=3, help="measured runs per cell (default 3)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up run")
    p.add_argument(
        "--requests-scale",
        type=float,
        default=1.0,
        help="multiply every scenario's request count (e.g. 0.2 for a faster run)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop starting requests after this long in one run",
    )
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument(
        "--start-timeout", type=float, default=180.0, help="seconds to wait for /health/ready"
    )
    p.add_argument(
        "--token",
        default=os.environ.get("BENCH_TOKEN"),
        help="bearer token for ours (default: mint one with `run.py token`)",
    )
    p.add_argument(
        "--ours-url",
        default=None,
        help="benchmark an already running deployment instead of starting run.py",
    )
    p.add_argument("--workdir", default=None, help="where the temp data dirs go")
    p.add_argument("--keep", action="store_true", help="keep the temp data dirs and logs")
    p.add_argument("--no-pin", action="store_true", help="do not pin servers/client to CPUs")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument("--no-scaleout", action="store_true",
                   help="skip the scale-out section (four elements on one PostgreSQL)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
