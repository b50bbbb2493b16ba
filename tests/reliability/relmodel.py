"""The client-side model of what the store must hold after a fault.

A :class:`Chain` is the sequence of operations one client ran on one file (upload,
PATCHes, DELETE).  Each operation ends ``ack`` (the success status arrived), ``refused``
(a definite failure: nothing may have changed), ``unknown`` (no answer, or a 5xx:
it may have happened, but only as a whole) or ``not-run``.  :meth:`Chain.allowed` gives
the final states consistent with those answers; :func:`observe` reads the real state
through the API (metadata, full download hashed, listing).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
from dataclasses import dataclass, field

import aiohttp
from relharness import MIB

EXPECTED = {"upload": 201, "patch": 200, "delete": 204}


@dataclass(frozen=True)
class State:
    present: bool
    sha: str | None = None
    tag: str | None = None  # the description last set

    def show(self) -> str:
        return f"present(tag={self.tag}, sha={self.sha[:8]})" if self.present else "absent"


ABSENT = State(False)


@dataclass
class Op:
    kind: str  # upload | patch | delete
    fid: str
    tag: str | None = None
    size: int = 0
    method: str = ""  # multipart | put | chunked (uploads only)
    pause: float = 0.005  # between 64 KiB pieces of a chunked upload
    outcome: str = "not-run"  # ack | refused | unknown | not-run
    status: int | None = None
    body: dict | None = None

    def apply(self, state: State, sha: str | None) -> State:
        if self.kind == "upload":
            return State(True, sha, self.tag)
        if self.kind == "patch":
            return State(True, state.sha, self.tag) if state.present else state
        return ABSENT


@dataclass
class Chain:
    fid: str
    start: State
    ops: list[Op] = field(default_factory=list)
    sha: str | None = None  # of the upload in this chain

    def allowed(self) -> set[State]:
        """Final states consistent with the answers the client got."""
        state = self.start
        for op in self.ops:
            if op.outcome == "ack":
                state = op.apply(state, self.sha)
            elif op.outcome == "unknown":
                return {state, op.apply(state, self.sha)}
            elif op.outcome == "not-run":
                break
        return {state}

    def acked(self) -> int:
        return sum(op.outcome == "ack" for op in self.ops)

    def describe(self) -> str:
        return str([(o.kind, o.outcome, o.status) for o in self.ops])


def payload(fid: str, size: int) -> bytes:
    """The bytes uploaded for ``fid`` (seeded by the id, so never stored client-side)."""
    return random.Random(fid).randbytes(size)


def sha_of(fid: str, size: int) -> str:
    return hashlib.sha256(payload(fid, size)).hexdigest()


async def send(session: aiohttp.ClientSession, url: str, op: Op) -> None:
    """Run ``op``; sets ``status``/``body``; client errors propagate to the caller."""
    base = f"{url}/api/v1/files"
    if op.kind == "patch":
        body = {"description": op.tag, "metadata": {"tag": op.tag}}
        async with session.patch(f"{base}/{op.fid}", json=body) as resp:
            op.status, op.body = resp.status, await resp.json(content_type=None)
        return
    if op.kind == "delete":
        async with session.delete(f"{base}/{op.fid}") as resp:
            raw = await resp.read()
            op.status, op.body = resp.status, json.loads(raw) if raw else None
        return
    data = payload(op.fid, op.size)
    meta = json.dumps({"tag": op.tag})
    if op.method == "multipart":
        form = aiohttp.FormData()
        form.add_field("file_id", op.fid)
        form.add_field("description", op.tag)
        form.add_field("metadata", meta)
        form.add_field("file", io.BytesIO(data), filename=f"{op.tag}.bin",
                       content_type="application/octet-stream")
        async with session.post(f"{base}/upload", data=form) as resp:
            op.status, op.body = resp.status, await resp.json(content_type=None)
        return
    params = {"filename": f"{op.tag}.bin", "description": op.tag, "metadata": meta}
    if op.method == "put":
        body = io.BytesIO(data)
    else:
        async def body_gen():  # chunked and a little slow: often mid-body at a fault
            for i in range(0, len(data), 64 * 1024):
                yield data[i:i + 64 * 1024]
                await asyncio.sleep(op.pause)
        body = body_gen()
    async with session.put(f"{base}/{op.fid}", params=params, data=body) as resp:
        op.status, op.body = resp.status, await resp.json(content_type=None)


async def observe(url: str, headers: dict[str, str], fids: set[str]) -> tuple[
        dict[str, State], set[str], list[str]]:
    """(state per id, ids in the listing, problems) as the API shows them.

    A file is present when its metadata is 200 *and* a full download hashes to the
    checksum; a 200 whose download fails is reported as a problem.
    """
    states: dict[str, State] = {}
    problems: list[str] = []
    listed: set[str] = set()
    async with aiohttp.ClientSession(headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        skip = 0
        while True:
            async with session.get(f"{url}/api/v1/files",
                                   params={"limit": "100", "skip": str(skip)}) as resp:
                assert resp.status == 200, await resp.text()
                page = await resp.json()
            listed |= {f["file_id"] for f in page["files"]}
            skip += 100
            if skip >= page["total"] or not page["files"]:
                break

        async def one(fid: str) -> None:
            async with session.get(f"{url}/api/v1/files/{fid}") as resp:
                if resp.status == 404:
                    states[fid] = ABSENT
                    return
                if resp.status != 200:
                    problems.append(f"GET {fid}: {resp.status} {await resp.text()}")
                    return
                meta = await resp.json()
            digest = hashlib.sha256()
            async with session.get(f"{url}/api/v1/files/{fid}/download") as resp:
                if resp.status != 200:
                    problems.append(f"download {fid}: {resp.status} {await resp.text()}")
                    return
                async for chunk in resp.content.iter_chunked(MIB):
                    digest.update(chunk)
            if digest.hexdigest() != meta["checksum"]:
                problems.append(f"download {fid}: bytes differ from the checksum")
            states[fid] = State(True, digest.hexdigest(), meta["description"])

        gate = asyncio.Semaphore(16)

        async def bounded(fid: str) -> None:
            async with gate:
                await one(fid)

        await asyncio.gather(*(bounded(f) for f in fids | listed))
    return states, listed, problems


def judge(chains: list[Chain], observed: dict[str, State]) -> tuple[int, int, list[str]]:
    """(operations lost, phantom effects, descriptions) of chains whose outcome is wrong.

    Lost: a chain with acknowledged operations ended in a state its answers exclude.
    Phantom: a chain with nothing acknowledged left a visible effect.
    """
    lost = phantom = 0
    failures = []
    for chain in chains:
        got = observed.get(chain.fid, ABSENT)
        allowed = chain.allowed()
        if got in allowed:
            continue
        if chain.acked():
            lost += 1
        else:
            phantom += 1
        failures.append(f"{chain.fid}: {got.show()} not in {[s.show() for s in allowed]}; "
                        f"ops {chain.describe()}")
    return lost, phantom, failures


def half_patches(rows: dict[str, dict]) -> list[str]:
    """Rows whose description and metadata tag (always set together) disagree."""
    return [f"{fid}: half a PATCH: description {rec['description']} but metadata "
            f"{rec['metadata_json']}" for fid, rec in rows.items()
            if (rec["metadata_json"] or {}).get("tag") != rec["description"]]
