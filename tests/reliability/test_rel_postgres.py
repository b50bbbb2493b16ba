"""PostgreSQL dies or restarts under traffic (R6).

A SEPARATE embedded PostgreSQL (never the shared test database) backs one server
process.  Client chains (slow chunked uploads, PATCHes, downloads, DELETEs) run
continuously while the database is stopped (fast shutdown) or SIGKILLed, stays down for
a moment, and comes back on the same socket.  Checked:

- while it is down every request that needs it gets a 503 problem+json with a detail
  (never a 500, never a hang); liveness stays 200, readiness turns 503;
- the same server process (no restart) becomes ready again by itself: the asyncpg pool
  reconnects on new acquires, and requests succeed again;
- after a restart of the server (startup recovery), every acknowledged operation is
  there, nothing unacknowledged is half done, and the invariant check finds no data file
  without its row, no temp file, no pending WAL entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import random
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import pytest
from relharness import PROFILES, RESULTS, Timer, inspect_store, wait_until
from relmodel import (
    ABSENT,
    EXPECTED,
    Chain,
    Op,
    State,
    half_patches,
    judge,
    observe,
    send,
    sha_of,
)

from storage.db.embedded import EmbeddedPostgres

SCENARIO = "PostgreSQL stop/kill -9 mid-traffic"
WORKERS = 10


class Database:
    """An embedded PostgreSQL that can be stopped, SIGKILLed and started again."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="se-rel-pg-"))
        self.pg = EmbeddedPostgres(self.dir)
        self.dsn = self._start()

    def _start(self) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.pg.start()

    def stop(self) -> None:
        """Fast shutdown: sessions are terminated (57P01), then the server exits."""
        self.pg.stop()

    def kill(self) -> None:
        """SIGKILL the postmaster and its children: a crash, recovery at next start."""
        postmaster = self.pg._server.get_postmaster_info().process
        procs = [postmaster, *postmaster.children(recursive=True)]
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(procs, timeout=10)
        self.pg.stop()  # forgets the dead instance (pg_ctl finds nothing running)

    def start(self) -> None:
        assert self._start() == self.dsn  # same socket, same DSN: clients can reconnect

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pg.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def database():
    db = Database()
    yield db
    db.close()


class Traffic:
    """Client chains that keep running until told to stop; every answer is recorded."""

    def __init__(self, url: str, headers: dict[str, str], seed: int,
                 present: list[str]) -> None:
        self.url, self.headers, self.seed = url, headers, seed
        self.present = present  # files uploaded before the fault, handed out to chains
        self.chains: list[Chain] = []
        self.statuses: list[tuple[float, str, int]] = []  # (time, kind, status)
        self.bad: list[str] = []
        self.stop = asyncio.Event()

    def _record(self, kind: str, status: int, body) -> None:
        detail = body.get("detail") if isinstance(body, dict) else None
        self.statuses.append((time.monotonic(), kind, status))
        if status >= 500 and (status != 503 or not isinstance(detail, str) or not detail):
            self.bad.append(f"{kind}: {status} {body}")

    async def _read(self, session: aiohttp.ClientSession, fid: str) -> None:
        async with session.get(f"{self.url}/api/v1/files/{fid}/download") as resp:
            body = await resp.read()
            if resp.status != 200:
                self._record("download", resp.status, await resp.json(content_type=None))
                if resp.status not in (503,):
                    self.bad.append(f"download {fid}: {resp.status} {body[:200]!r}")
            else:
                self._record("download", 200, None)

    async def _chain(self, session: aiohttp.ClientSession, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        while not self.stop.is_set():
            if self.present and rng.random() < 0.4:
                fid = self.present.pop()
                chain = Chain(fid, self.start_states[fid])
            else:
                fid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                size = rng.randint(64 * 1024, 320 * 1024)
                chain = Chain(fid, ABSENT, [Op("upload", fid, f"u-{fid[:8]}", size,
                                               rng.choice(("chunked", "multipart")),
                                               pause=0.05)], sha=sha_of(fid, size))
            self.chains.append(chain)
            pending = list(chain.ops)  # the upload of a new file
            for _step in range(7):
                if self.stop.is_set():
                    break
                if pending:
                    op = pending.pop()
                else:
                    roll = rng.random()
                    kind = "delete" if roll < 0.15 else "patch" if roll < 0.6 else "read"
                    if kind == "read":
                        await self._read(session, fid)
                        continue
                    op = Op(kind, fid, tag=f"p-{fid[:8]}-{len(chain.ops)}")
                    chain.ops.append(op)
                try:
                    await send(session, self.url, op)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    op.outcome = "unknown"
                    self.bad.append(f"{op.kind} {fid}: no answer ({exc!r})")
                    break
                self._record(op.kind, op.status, op.body)
                if op.status == EXPECTED[op.kind]:
                    op.outcome = "ack"
                    if op.kind == "delete":
                        break
                    continue
                # 503: not done, though part of it may linger until recovery; leave the file
                op.outcome = "unknown" if op.status >= 500 else "refused"
                if op.status != 503:
                    self.bad.append(f"{op.kind} {fid}: {op.status} {op.body}")
                break
            await asyncio.sleep(0.02)

    async def run(self, start_states) -> None:
        self.start_states = start_states
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(headers=self.headers, timeout=timeout) as session:
            await asyncio.gather(*(self._chain(session, n) for n in range(WORKERS)))


def _form(data: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", io.BytesIO(data), filename="a.bin")
    return form


async def _status(session, url: str) -> int:
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError:
        return 0


async def _down_checks(url: str, headers: dict[str, str], fid: str,
                       served: str) -> list[str]:
    """Every kind of request while the database is down: 503 + detail, health split.
    A download of a file served in the last minute (``served``) needs no database and
    keeps working (guide R6), byte for byte."""
    problems = []
    async with aiohttp.ClientSession(headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=20)) as session:
        base = f"{url}/api/v1/files"
        async with session.get(f"{base}/{served}/download") as resp:
            data = await resp.read()
        if resp.status != 200 or hashlib.sha256(data).hexdigest() != sha_of(served, 50_000):
            problems.append(f"download of {served}, served a moment ago: {resp.status} "
                            "while PG is down")
        calls = [
            ("GET", f"{base}/{fid}", {}), ("GET", f"{base}/{fid}/download", {}),
            ("GET", base, {}), ("PATCH", f"{base}/{fid}", {"json": {"description": "x"}}),
            ("DELETE", f"{base}/{uuid.uuid4()}", {}),
            ("PUT", f"{base}/{uuid.uuid4()}", {"data": b"x" * 1000}),
            ("POST", f"{base}/upload", {"data": _form(b"abc")}),
        ]
        for method, target, kwargs in calls:
            t0 = time.monotonic()
            async with session.request(method, target, **kwargs) as resp:
                body = await resp.json(content_type=None)
            took = time.monotonic() - t0
            if resp.status != 503 or not (isinstance(body, dict) and body.get("detail")):
                problems.append(f"{method} {target}: {resp.status} {body} while PG is down")
            if took > 10:
                problems.append(f"{method} {target}: took {took:.1f}s while PG is down")
        if (live := await _status(session, f"{url}/health/live")) != 200:
            problems.append(f"/health/live is {live} while PG is down")
        if (ready := await _status(session, f"{url}/health/ready")) != 503:
            problems.append(f"/health/ready is {ready} while PG is down")
    return problems


@PROFILES
async def test_postgres_dies_mid_traffic(profile, database, server_factory, server_env, auth,
                                         tmp_path):
    row = RESULTS.row(f"{SCENARIO} [{profile}]")
    env = {**server_env, "DATABASE_URL": database.dsn, "DB_POOL_TIMEOUT": "5",
           "SHUTDOWN_TIMEOUT": "2"}
    root = Path(env["STORAGE_LOCAL_BASE_PATH"])
    headers = auth()
    server = server_factory(env)
    failures: list[str] = []
    model = {}
    rounds = max(2, profile.rounds // 4)
    with Timer(row):
        for number in range(rounds):
            # files the chains will PATCH, read and delete
            seed_chains = []
            async with aiohttp.ClientSession(headers=headers) as session:
                for _ in range(4):
                    fid = str(uuid.uuid4())
                    op = Op("upload", fid, f"s-{fid[:8]}", 50_000, "put")
                    await send(session, server.url, op)
                    assert op.status == 201, op.body
                    op.outcome = "ack"
                    seed_chains.append(Chain(fid, ABSENT, [op], sha=sha_of(fid, 50_000)))
            # two files the traffic never touches: one never downloaded, one downloaded
            # now (in the process's memory during the outage)
            cold, warm = (Op("upload", str(uuid.uuid4()), tag, 50_000, "put")
                          for tag in ("cold", "warm"))
            async with aiohttp.ClientSession(headers=headers) as session:
                for spare in (cold, warm):
                    await send(session, server.url, spare)
                    assert spare.status == 201, spare.body
                    model[spare.fid] = State(True, sha_of(spare.fid, 50_000), spare.tag)
                async with session.get(f"{server.url}/api/v1/files/{warm.fid}/download") as r:
                    assert r.status == 200
                    await r.read()
            start_states = {c.fid: next(iter(c.allowed())) for c in seed_chains}
            traffic = Traffic(server.url, headers, 611 + number, list(start_states))
            runner = asyncio.create_task(traffic.run(start_states))
            await asyncio.sleep(0.6)
            crash = number % 2 == 1
            await asyncio.to_thread(database.kill if crash else database.stop)
            await asyncio.sleep(0.5)
            failures += await _down_checks(server.url, headers, cold.fid, warm.fid)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(database.start)
            pid, url = server.pid, server.url
            async with aiohttp.ClientSession() as session:
                back = await wait_until(lambda u=url: _ready(session, u), timeout=20,
                                        interval=0.2)
            if not back or server.proc.poll() is not None or server.pid != pid:
                failures.append(f"round {number}: the pool did not reconnect by itself")
            back_at = time.monotonic()
            await asyncio.sleep(1.5)  # traffic on the reconnected pool
            traffic.stop.set()
            await runner
            after = [s for t, _k, s in traffic.statuses if t > back_at]
            row.note("pool reconnected without a server restart" if back else "NO reconnect")
            # a restart runs startup recovery over whatever the outage left behind
            server.stop()
            server = server_factory(env)
            taken = {c.fid for c in traffic.chains}
            chains = [c for c in seed_chains if c.fid not in taken] + traffic.chains + [
                Chain(fid, state) for fid, state in model.items() if fid not in taken]
            fids = {c.fid for c in chains}
            observed, listed, problems = await observe(server.url, headers, fids)
            residue = await inspect_store(database.dsn, env["DB_TABLE_PREFIX"], root)
            problems += half_patches(residue.rows)
            lost, phantom, wrong = judge(chains, observed)
            n503 = sum(s == 503 for _t, _k, s in traffic.statuses)
            row.rounds += 1
            row.acked += sum(c.acked() for c in chains)
            row.lost += lost
            row.errors_500 += sum(s == 500 for _t, _k, s in traffic.statuses)
            row.residue += residue.count + phantom + len(problems) + len(listed - fids)
            row.note(f"round {number} ({'kill -9' if crash else 'stop'}): {n503} answers "
                     f"were 503 while PG was away")
            failures += [f"round {number}: {w}" for w in wrong + problems + traffic.bad]
            if residue.count:
                failures.append(f"round {number}: residue: {residue.describe()}")
            if listed - fids:
                failures.append(f"round {number}: stray files {listed - fids}")
            if not n503:
                failures.append(f"round {number}: the outage was never seen (no 503)")
            if not any(s < 500 for s in after):
                failures.append(f"round {number}: nothing succeeded after the reconnect: {after}")
            model = {f: s for f, s in {**model, **observed}.items() if s.present}
    assert not failures, "\n".join(failures[:40])


async def _ready(session: aiohttp.ClientSession, url: str) -> bool:
    return await _status(session, f"{url}/health/ready") == 200


@PROFILES
async def test_delete_whose_commit_fails_is_finished_not_abandoned(profile, server_factory,
                                                                   server_env, auth, pg_dsn):
    """A DELETE whose database half fails *after* its files are gone (here: another
    session holds the element's totals row longer than the statement timeout) must not
    be recorded as rolled back: recovery has to finish it, or the row stays for ever
    without its data (a 200 on metadata, a 404 on download)."""
    row = RESULTS.row(f"DB statement fails after the files changed [{profile}]")
    env = {**server_env, "DB_POOL_TIMEOUT": "1", "SHUTDOWN_TIMEOUT": "2"}
    prefix, root = env["DB_TABLE_PREFIX"], Path(env["STORAGE_LOCAL_BASE_PATH"])
    server = server_factory(env)
    headers = auth()
    outcomes = []
    with Timer(row):
        for _ in range(1 if profile.name == "slim" else 5):
            async with aiohttp.ClientSession(headers=headers) as session:
                op = Op("upload", str(uuid.uuid4()), "t", 10_000, "put")
                await send(session, server.url, op)
                assert op.status == 201, op.body
                row.acked += 1
                blocker = await asyncpg.connect(pg_dsn)
                try:
                    async with blocker.transaction():
                        await blocker.execute(
                            f"SELECT 1 FROM {prefix}_config WHERE id = 1 FOR UPDATE")
                        async with session.delete(f"{server.url}/api/v1/files/{op.fid}") as r:
                            status, body = r.status, await r.json(content_type=None)
                finally:
                    await blocker.close()
            outcomes.append((status, body))
            row.rounds += 1
            row.errors_500 += status == 500
            server.stop()
            server = server_factory(env)  # startup recovery
            observed, _listed, problems = await observe(server.url, headers, {op.fid})
            residue = await inspect_store(pg_dsn, prefix, root)
            row.residue += residue.count + len(problems)
            row.note(f"DELETE answered {status} while the totals row was locked; after "
                     f"recovery the file is {observed.get(op.fid, ABSENT).show()}")
            assert not problems and not residue.count, f"{problems} {residue.describe()}"
    for status, body in outcomes:
        assert status == 503 and isinstance(body, dict) and body.get("detail"), (status, body)
