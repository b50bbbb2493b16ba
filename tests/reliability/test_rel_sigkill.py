"""SIGKILL at random points during ~100 concurrent uploads, PATCHes and deletes (R1-R5).

Each round runs a seeded schedule against the real server process: chains of operations
per file (upload, then maybe PATCHes, then maybe a DELETE; or PATCHes and a DELETE of a
file kept from earlier rounds), all chains concurrent, uploads as multipart, raw PUT and
slow chunked PUT.  The server is SIGKILLed after a seeded number of acknowledgements or
a seeded delay, restarted (startup recovery runs before readiness), and checked:

- every upload that got a 201 is there with exactly its bytes (sha256 of a download);
  every PATCH that got a 200 shows its description; every DELETE that got a 204 is gone;
- an operation whose answer was lost in the crash may have happened or not, but only as
  a whole (never other bytes, never half a PATCH: description and metadata move together);
- nothing else is visible (the listing holds only files the schedule may have created);
- no temp file, no data or attr file without its row, no row without its files, every
  row equal to its attr.json, no pending WAL entry or capacity reservation
  (:func:`relharness.inspect_store`).

The next round continues on the restarted server with the state observed.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path

import aiohttp
from relharness import PROFILES, RESULTS, Timer, inspect_store
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

SCENARIO = "SIGKILL during uploads/PATCH/DELETE"
CONCURRENCY = 24
SEED = 1100


class Round:
    def __init__(self, url: str, headers: dict[str, str], rng: random.Random, number: int,
                 model: dict[str, State], ops: int, max_size: int) -> None:
        self.url, self.headers, self.rng, self.number = url, headers, rng, number
        self.chains = self._plan(model, ops, max_size)
        self.acks = 0
        self.kill_after = 10**9
        self.statuses_500 = 0
        self.unexpected: list[str] = []
        self.kill_now = asyncio.Event()

    # -- the schedule (all randomness is drawn here, before any request) -------------

    def _size(self, max_size: int) -> int:
        roll = self.rng.random()
        if roll < 0.1:
            return 0
        if roll < 0.8:
            return self.rng.randint(1, 16 * 1024)
        return self.rng.randint(16 * 1024, max_size)

    def _plan(self, model: dict[str, State], ops: int, max_size: int) -> list[Chain]:
        rng, chains, count = self.rng, [], 0
        present = sorted(fid for fid, st in model.items() if st.present)
        rng.shuffle(present)
        for fid in present[: ops // 4]:  # files kept from earlier rounds
            chain = Chain(fid, model[fid])
            for _ in range(rng.randint(1, 2)):
                chain.ops.append(Op("patch", fid, tag=self._tag(fid)))
            if rng.random() < 0.5:
                chain.ops.append(Op("delete", fid))
            chains.append(chain)
            count += len(chain.ops)
        while count < ops:
            fid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            size = self._size(max_size)
            method = rng.choice(("multipart", "put", "chunked"))
            chain = Chain(fid, ABSENT, [Op("upload", fid, self._tag(fid), size, method)],
                          sha=sha_of(fid, size))
            if rng.random() < 0.4:
                chain.ops.append(Op("patch", fid, tag=self._tag(fid)))
            if rng.random() < 0.3:
                chain.ops.append(Op("delete", fid))
            chains.append(chain)
            count += len(chain.ops)
        rng.shuffle(chains)
        return chains

    def _tag(self, fid: str) -> str:
        return f"r{self.number}-{fid[:8]}-{self.rng.getrandbits(24):06x}"

    # -- running it ------------------------------------------------------------------

    async def _run_op(self, session: aiohttp.ClientSession, op: Op, chain: Chain) -> bool:
        """Run one op; False ends the chain (the server is gone, or it failed).

        Any client error counts as "unknown", even a refused connection: aiohttp
        retries an idempotent request (PUT, DELETE) once on a new connection when its
        kept-alive one fails, so the first attempt may have been done already.
        """
        try:
            await send(session, self.url, op)
        except (TimeoutError, aiohttp.ClientError, ConnectionError, ValueError):
            op.outcome = "unknown"
            return False
        if op.status == EXPECTED[op.kind]:
            op.outcome = "ack"
            self.acks += 1
            if self.acks >= self.kill_after:
                self.kill_now.set()
            if op.kind == "upload" and op.body["checksum"] != chain.sha:
                self.unexpected.append(f"{op.fid}: 201 with checksum {op.body['checksum']}")
            return True
        self.statuses_500 += op.status == 500
        op.outcome = "unknown" if op.status >= 500 else "refused"
        self.unexpected.append(f"{op.kind} {op.fid}: {op.status} {op.body}")
        return False

    async def _run_chain(self, session, chain: Chain, gate: asyncio.Semaphore) -> None:
        async with gate:
            for op in chain.ops:
                if not await self._run_op(session, op, chain):
                    return

    async def run(self, kill) -> None:
        """Run every chain; ``kill()`` SIGKILLs the server at the seeded point."""
        total = sum(len(c.ops) for c in self.chains)
        by_acks = self.rng.random() < 0.6
        if by_acks:
            self.kill_after = self.rng.randint(1, max(2, int(total * 0.8)))
        delay = 60 if by_acks else self.rng.uniform(0.02, 1.0)
        gate = asyncio.Semaphore(CONCURRENCY)
        timeout = aiohttp.ClientTimeout(total=60)
        connector = aiohttp.TCPConnector(limit=CONCURRENCY + 8)
        async with aiohttp.ClientSession(headers=self.headers, timeout=timeout,
                                         connector=connector) as session:
            done = asyncio.gather(*(self._run_chain(session, c, gate) for c in self.chains))
            try:
                await asyncio.wait_for(self.kill_now.wait(), delay)
            except TimeoutError:
                pass
            kill()
            await done


async def _run(profile, server_factory, server_env, auth, pg_dsn):
    row = RESULTS.row(f"{SCENARIO} [{profile}]")
    env = {**server_env, "SHUTDOWN_TIMEOUT": "2"}
    root = Path(env["STORAGE_LOCAL_BASE_PATH"])
    headers = auth()
    rng = random.Random(SEED)
    model: dict[str, State] = {}
    failures: list[str] = []
    server = server_factory(env)
    with Timer(row):
        for number in range(profile.rounds):
            rnd = Round(server.url, headers, rng, number, model, profile.ops, profile.max_size)
            await rnd.run(server.kill)
            server = server_factory(env)  # restart: recovery runs before readiness
            fids = {c.fid for c in rnd.chains} | set(model)
            observed, listed, problems = await observe(server.url, headers, fids)
            residue = await inspect_store(pg_dsn, env["DB_TABLE_PREFIX"], root)
            problems += half_patches(residue.rows)
            lost, phantom, wrong = judge(rnd.chains, observed)
            stray = listed - fids
            row.rounds += 1
            row.acked += sum(c.acked() for c in rnd.chains)
            row.errors_500 += rnd.statuses_500
            row.lost += lost
            row.residue += residue.count + phantom + len(stray) + len(problems)
            failures += [f"round {number}: {w}" for w in wrong]
            if residue.count:
                failures.append(f"round {number}: residue: {residue.describe()}")
            if stray:
                failures.append(f"round {number}: listed but never created: {sorted(stray)}")
            failures += [f"round {number}: {p}" for p in problems + rnd.unexpected]
            model = {fid: st for fid, st in {**model, **observed}.items() if st.present}
            print(f"round {number}: {sum(len(c.ops) for c in rnd.chains)} ops, "
                  f"{sum(c.acked() for c in rnd.chains)} acked before the kill, "
                  f"{len(model)} files present, residue {residue.count}")
    assert not failures, "\n".join(failures[:40])


@PROFILES
async def test_sigkill_during_concurrent_traffic(profile, server_factory, server_env, auth,
                                                 pg_dsn):
    await _run(profile, server_factory, server_env, auth, pg_dsn)


def test_chain_model_allows_only_whole_outcomes():
    """The checker itself: an unknown op allows both sides, an ack only its result."""
    chain = Chain("f", ABSENT, [Op("upload", "f", "t1"), Op("patch", "f", "t2"),
                                Op("delete", "f")], sha="s")
    chain.ops[0].outcome, chain.ops[1].outcome = "ack", "unknown"
    assert chain.allowed() == {State(True, "s", "t1"), State(True, "s", "t2")}
    chain.ops[1].outcome, chain.ops[2].outcome = "ack", "ack"
    assert chain.allowed() == {ABSENT}
    chain.ops[2].outcome = "refused"
    assert chain.allowed() == {State(True, "s", "t2")}
    assert judge([chain], {"f": ABSENT})[:2] == (1, 0)  # the acked PATCH was lost
    fresh = Chain("g", ABSENT, [Op("upload", "g", "t")], sha="s")
    fresh.ops[0].outcome = "refused"
    assert judge([fresh], {"g": State(True, "s", "t")})[:2] == (0, 1)  # a phantom upload
