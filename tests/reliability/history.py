"""A randomized history checker with faults (issue 26, after Jepsen): workload, faults on
a seeded schedule, a JSON-lines history, and a model check at quiescent points and at
the end.  Run it from the command line::

    python -m tests.reliability.history --seed 7                 # one run, local disk
    python -m tests.reliability.history --seed 7 --storage s3    # on SeaweedFS
    python -m tests.reliability.history --soak --hours 8         # new seed per round

or through pytest (``tests/reliability/test_history.py``: the short run is marked
``history`` and runs in the default suite; ``-m reliability`` runs several seeds, local
and S3).  A failure prints the seed, the shortest window of the history that shows the
violation, and the command that replays it.

The system under test
---------------------
``--procs`` (2) real ``python run.py`` processes of one element (one table prefix, one
storage root or S3 app folder, one PostgreSQL of the run's own, so it can be stopped),
each on its own port.  ``--clients`` (4) asyncio clients, each with its own connection
pool, pick a process at random for every request.  Each run's element is either in
``edit`` mode (DELETE allowed, no mode changes: ``edit`` is isolated) or in ``rw`` mode
with a task switching it ``rw -> ro -> rw`` (confirm); the seed decides.

The workload (weights in :data:`MIX`) works on a small pool of file ids, so operations on
one id overlap: multipart and raw-PUT uploads of 0 B .. ``max_size`` (some with a correct
``Content-Digest``, some with a wrong one), raw PUTs that reuse the id of a file just
deleted with the same name and size (the same storage path when within the same second),
downloads (full, ranged, HEAD, ``If-None-Match``), metadata reads, PATCH, DELETE, GC
delete, list, search, capacity, ``cache/rebuild/incremental``, tus uploads (chunks sent
to random processes, some abandoned, some terminated), and uploads whose client
disconnects mid-body.

Faults (seeded schedule per phase, :data:`FAULTS`): SIGKILL of a process (restarted),
SIGSTOP/SIGCONT of a process, PostgreSQL stopped and started, and at a quiescent point a
data object removed behind the element's back (its attr document left).  Disk full is
not injected here (it needs a tmpfs mount: ``test_rel_diskfull.py``).

The history
-----------
One JSON object per line (``history.jsonl`` in the run directory): every operation's
invocation and completion on one monotonic clock (``inv``, ``done``; ``done`` is null
for a write whose outcome is unknown), its process, client, file id, ``type`` (``ok``:
the success status arrived; ``fail``: a definite refusal, nothing may have changed;
``info``: unknown, no answer or a 5xx: it may have happened, but only as a whole), the
status and what was observed (``sha`` of the bytes, headers).  Faults, mode changes and
the checker's own reads at quiescent points are events of the same history.

The model
---------
Each file id is two registers: its *content* (absent, or the sha256 of the bytes of one
upload; written by uploads, the last PATCH of a tus upload, DELETE and GC delete) and its
*description* (written by uploads, PATCH and deletes).  A write is *effective* if ``ok``
or ``info``; ``fail`` writes never happen.  A read that returned value ``v`` during
``[inv, done]`` is legal when some effective write ``W`` of ``v`` (or the value observed
at the last quiescent point) has ``W.inv < R.done`` and is not *superseded* before the
read began: no ``ok`` write ``W2`` with ``W.done < W2.inv`` and ``W2.done < R.inv`` (an
``info`` write is never superseded: it may still land, e.g. by recovery).  A tus upload's
last PATCH refused with ``400`` because the element left the upload modes during its
finish, whose body says ``"upload_kept": true``, is ``info`` too: by design its bytes are
kept and the file is made by the next HEAD or PATCH, or the recovery pass, once uploads
are allowed again (README, resumable uploads); a ``400`` without it (refused before any
byte was taken) is a ``fail``, and a tus ``400`` of either kind is legal only while a
switch to ``ro`` could be in force.  This checks,
per id, that every read linearizes against the writes (not the read-read order):

- every acknowledged upload is downloadable with exactly its bytes until a later write;
  a download, ranged download, HEAD, 304 or metadata read that started after an
  acknowledged DELETE returns nothing of the old bytes, from every process (so the
  per-process download cache is covered); the headers of a download describe its bytes
  (ETag, Content-Length, Repr-Digest, Content-Range) and a 304 is only given for the
  current content's ETag;
- nothing refused becomes visible; an unacknowledged upload may appear, only whole;
- statuses are reads too: a PATCH 200, DELETE 204 and GC ``deleted`` say the file was
  present, their 404 (or ``already_deleted``) that it was absent, an upload 201 that it
  was absent and 409 that it was present or another write of the id was in flight;
- no 500 anywhere; every other status must be one the model allows: 503 and client
  errors only while a fault is active (or just healed), 400 only for a wrong digest or a
  write refused by the ``ro`` mode while a switch could be in force, 507 only when the
  upload could not fit (the sizes of every file that may be present, plus every
  reservation that may be in flight, plus the upload, exceed ``STORAGE_MAX_SIZE`` less
  a 64 KiB allowance per upload in flight);
- mode: no write invoked after a switch to ``ro`` was acknowledged (and before the switch
  back began) is acknowledged;
- capacity: every sampled ``used`` is at most ``STORAGE_MAX_SIZE``.

At each quiescent point (clients stopped, faults healed) the checker reads every id from
every process (metadata and the full download), then checks: the listing and the search
equal the set of present ids, ``used`` equals the sum of their sizes plus the open tus
reservations.  What it observed becomes the new base value of each register.

At the end: all processes are stopped (SIGTERM), ``run.py recover`` resolves what is
left, the processes are started again, the quiescent check runs once more, then a full
``cache/rebuild``; the listing must still equal the model (a file whose data object was
removed behind the element's back must not come back), ``run.py check`` must report
exactly those files as missing their data and nothing else, ``scrub --quarantine`` must
move them aside, after which ``check`` is consistent, and there are no temp files, no
staged tus bytes but those of abandoned uploads, no open multipart uploads (S3) and no
pending WAL rows.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
for _p in (HERE, HERE.parent, ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
from server_proc import ServerProcess, free_port  # noqa: E402

from storage.auth.devkeys import ensure_dev_keys, mint_token  # noqa: E402
from storage.db.embedded import EmbeddedPostgres  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
ALLOWANCE = 64 * KIB  # per upload in flight: multipart framing, attr document
GRACE = 3.0  # seconds after a fault heals during which 503s and client errors are fine
MODE_LAG = 1.0  # a mode change reaches every process within a second (storage.domain.modes)
FAULTS = ("kill", "pause", "pg")
# operation -> weight
MIX = {"upload": 14, "put_reuse": 6, "download": 14, "range": 6, "head": 4, "cond": 4,
       "meta": 8, "patch": 8, "delete": 6, "gc": 4, "list": 2, "search": 2, "capacity": 2,
       "rebuild_inc": 1, "tus": 4, "abort": 2}
CONTENT_WRITES = {"upload", "put_reuse", "delete", "gc", "tus", "base"}
DESC_WRITES = {"upload", "put_reuse", "patch", "delete", "gc", "tus", "base"}


@dataclass
class Settings:
    seed: int
    storage: str = "local"
    procs: int = 2
    clients: int = 4
    phases: int = 2
    phase_s: float = 10.0
    ids: int = 10
    max_size: int = 256 * KIB
    max_store: int = 4 * MIB
    faults: tuple[str, ...] = FAULTS
    fault_rate: float = 0.3  # faults per second of workload, roughly
    mode: str = ""  # edit | rw; chosen by the seed when empty
    damage: bool = True  # remove one data object behind the element's back
    workdir: Path | None = None
    keep: bool = False

    def command(self) -> str:
        args = [sys.executable, "-m", "tests.reliability.history", "--seed", str(self.seed),
                "--storage", self.storage, "--procs", str(self.procs), "--clients",
                str(self.clients), "--phases", str(self.phases), "--phase-s",
                str(self.phase_s), "--ids", str(self.ids), "--max-size", str(self.max_size),
                "--max-store", str(self.max_store), "--faults", ",".join(self.faults) or "none",
                "--mode", self.mode]
        if not self.damage:
            args.append("--no-damage")
        return f"cd {ROOT} && " + shlex.join(args)


def payload(seed: int, op: int, size: int) -> bytes:
    """The bytes of upload ``op`` of run ``seed`` (never kept: regenerated to compare)."""
    return random.Random(f"{seed}:{op}").randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Violation(AssertionError):
    pass


# --- history ----------------------------------------------------------------------------


class History:
    """Events in invocation order; each is written as a JSON line when it completes."""

    def __init__(self, path: Path | None, t0: float | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.t0 = time.monotonic() if t0 is None else t0
        self._file = open(path, "w") if path else None  # noqa: SIM115

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    def invoke(self, f: str, **fields: Any) -> dict[str, Any]:
        ev = {"i": len(self.events), "f": f, "inv": self.now(), "done": None,
              "type": None, **fields}
        self.events.append(ev)
        return ev

    def complete(self, ev: dict[str, Any], type_: str, **fields: Any) -> dict[str, Any]:
        ev.update(fields, type=type_)
        ev["done"] = None if type_ == "info" and ev["f"] in CONTENT_WRITES | DESC_WRITES \
            else self.now()
        if self._file:
            self._file.write(json.dumps(ev, default=str) + "\n")
            self._file.flush()
        return ev

    def close(self) -> None:
        if self._file:
            self._file.close()


# --- the model check (pure: a list of events in, violations out) ------------------------


def _done(ev: dict) -> float:
    return float("inf") if ev["done"] is None else ev["done"]


def _content_value(ev: dict) -> str | None:
    """The content an effective write leaves: a sha256, or None (absent)."""
    return None if ev["f"] in ("delete", "gc") else ev.get("sha")


def _desc_value(ev: dict) -> str | None:
    return None if ev["f"] in ("delete", "gc") else ev.get("tag")


def _effective(ev: dict) -> bool:
    return ev["type"] in ("ok", "info")


class Checker:
    """Checks a history against the model (see the module docstring)."""

    def __init__(self, events: list[dict], max_store: int) -> None:
        self.events = events
        self.max_store = max_store
        self.by_id: dict[str, list[dict]] = {}
        for ev in events:
            if ev.get("id"):
                self.by_id.setdefault(ev["id"], []).append(ev)
        self.faults = [ev for ev in events if ev["f"] == "fault"]
        self.modes = [ev for ev in events if ev["f"] == "mode"]
        self.violations: list[tuple[str, list[dict]]] = []
        self.initial = {"i": -1, "f": "base", "inv": -1.0, "done": -1.0, "type": "ok",
                        "sha": None, "tag": None, "size": 0}

    def fail(self, why: str, *evs: dict) -> None:
        self.violations.append((why, list(evs)))

    # registers ---------------------------------------------------------------------------

    def _writes(self, fid: str, kinds: set[str], exclude: dict | None = None) -> list[dict]:
        out = [self.initial]  # every id starts absent
        for ev in self.by_id.get(fid, ()):
            if ev is exclude or ev["f"] not in kinds or not _effective(ev):
                continue
            if ev["f"] == "patch" and 400 <= (ev.get("status") or 0) < 500:
                continue
            out.append(ev)
        return out

    def candidates(self, fid: str, read: dict, kinds: set[str], value_of: Callable,
                   pred: Callable[[Any], bool], exclude: dict | None = None) -> list[dict]:
        """Effective writes whose value satisfies ``pred`` and that may be current at
        some instant of the read."""
        writes = self._writes(fid, kinds, exclude)
        acked = [w for w in writes if w["type"] == "ok"]
        out = []
        for w in writes:
            if w["inv"] >= _done(read) or not pred(value_of(w)):
                continue
            if any(w2 is not w and _done(w) < w2["inv"] and _done(w2) < read["inv"]
                   for w2 in acked):
                continue  # superseded before the read began
            out.append(w)
        return out

    def check_content(self, read: dict, pred: Callable[[Any], bool], what: str,
                      exclude: dict | None = None) -> list[dict]:
        found = self.candidates(read["id"], read, CONTENT_WRITES, _content_value, pred,
                                exclude)
        if not found:
            self.fail(f"{what}: no write that may be current explains it", read)
        return found

    # per operation -----------------------------------------------------------------------

    def in_fault(self, ev: dict) -> bool:
        lo, hi = ev["inv"], _done(ev)
        for f in self.faults:
            end = (f["done"] if f["done"] is not None else float("inf")) + GRACE
            if f["inv"] <= hi and lo <= end:
                return True
        return False

    def mode_ro_possible(self, ev: dict) -> bool:
        lo, hi = ev["inv"], _done(ev)
        for i, m in enumerate(self.modes):
            if m.get("target") != "ro" or m["type"] == "fail":
                continue
            back = next((n for n in self.modes[i + 1:] if n.get("target") == "rw"
                         and n["type"] == "ok"), None)
            # each process polls the mode (MODE_REFRESH_INTERVAL, 0.25 s): one that has
            # not seen the switch back yet still refuses a write it starts; one that cannot
            # poll (PostgreSQL stopped, or the process paused) keeps the mode it last saw
            end = _done(back) + MODE_LAG if back else float("inf")
            for f in sorted(self.faults, key=lambda f: f["inv"]):
                if f.get("kind") in ("pg", "pause") and f["inv"] <= end:
                    fend = f["done"] if f["done"] is not None else float("inf")
                    if fend + MODE_LAG > (back["inv"] if back else float("inf")):
                        end = max(end, fend + MODE_LAG)
            if m["inv"] <= hi and lo <= end:
                return True
        return False

    def mode_forbids_ack(self, ev: dict) -> bool:
        for i, m in enumerate(self.modes):
            if m.get("target") != "ro" or m["type"] != "ok":
                continue
            back = next((n for n in self.modes[i + 1:] if n.get("target") == "rw"
                         and n["type"] != "fail"), None)
            start = back["inv"] if back else float("inf")
            if m["done"] < ev["inv"] < start:
                return True
        return False

    def upper_used(self, ev: dict) -> int:
        """The most the element can have had stored or reserved during ``ev``."""
        total = 0
        for fid in self.by_id:
            if fid == ev.get("id"):
                continue
            sizes = [w.get("size", 0) for w in self.candidates(
                fid, ev, CONTENT_WRITES, _content_value, lambda v: v is not None)]
            total += max(sizes, default=0)
        for other in self.events:
            if other is ev or other["f"] not in ("upload", "put_reuse", "tus", "abort"):
                continue
            if other["inv"] <= _done(ev) and ev["inv"] <= _done(other):
                total += other.get("size", 0) + ALLOWANCE
        total += sum(t.get("size", 0) for t in self.events
                     if t["f"] == "tus_open" and t["inv"] <= _done(ev))
        return total

    def check_status(self, ev: dict, allowed: set[int]) -> bool:
        """True when the status is a definite one the op may get; records the rest."""
        status = ev.get("status")
        if status == 500:
            self.fail("500", ev)
            return False
        if status is None or status == 503:
            if not self.in_fault(ev):
                self.fail(f"{status or ev.get('error')} outside any fault window", ev)
            return False
        if status not in allowed:
            self.fail(f"unexpected status {status}", ev)
            return False
        return True

    def check_event(self, ev: dict) -> None:
        f, st = ev["f"], ev.get("status")
        if st == 500:
            self.fail("500", ev)
            return
        if f in ("fault", "mode", "base", "tus_open", "abort"):
            if f == "mode" and st not in (200, None, 503):
                self.fail(f"mode change answered {st}", ev)
            return
        if f in ("upload", "put_reuse", "tus"):
            return self._check_upload(ev)
        if f in ("download", "range", "head", "cond", "meta"):
            return self._check_read(ev)
        if f == "patch":
            if not self.check_status(ev, {200, 404, 400}):
                return
            if st == 400 and not self.mode_ro_possible(ev):
                self.fail("PATCH refused (400) while no ro switch could be in force", ev)
            elif st == 200:
                if self.mode_forbids_ack(ev):
                    self.fail("PATCH acknowledged after the switch to ro", ev)
                self.check_content(ev, lambda v: v is not None, "PATCH 200 on an absent file")
            elif st == 404:
                self.check_content(ev, lambda v: v is None, "PATCH 404 on a present file")
            return
        if f in ("delete", "gc"):
            ok = {204, 404, 400} if f == "delete" else {200, 400}
            if not self.check_status(ev, ok):
                return
            present = st == 204 or (f == "gc" and ev.get("outcome") == "deleted")
            if st == 400:
                if f == "delete" and ev.get("mode") == "rw":
                    return  # DELETE is refused in rw: expected
                self.fail(f"{f} refused (400)", ev)
                return
            if present and self.mode_forbids_ack(ev) and f == "delete":
                self.fail("DELETE acknowledged after the switch to ro", ev)
            self.check_content(ev, (lambda v: v is not None) if present else
                               (lambda v: v is None),
                               f"{f} {'removed a file' if present else 'found none'}",
                               exclude=ev)
            return
        if f in ("list", "search", "rebuild_inc"):
            self.check_status(ev, {200, 409} if f == "rebuild_inc" else {200})
            return
        if f == "capacity":
            if self.check_status(ev, {200}) and ev.get("used", 0) > self.max_store:
                self.fail(f"capacity used {ev['used']} > STORAGE_MAX_SIZE", ev)

    def _check_upload(self, ev: dict) -> None:
        st = ev.get("status")
        if ev["f"] == "tus":
            if ev.get("kept") and st != 400:
                self.fail(f"tus upload_kept with status {st}", ev)
            if st == 400 and not self.mode_ro_possible(ev):
                self.fail("tus PATCH refused (400) while no ro switch could be in force", ev)
            if st is None or ev["type"] == "info":
                return
            if st in (500,):
                self.fail("500", ev)
            if ev["type"] == "ok":
                self.check_content(ev, lambda v: v is None, "tus upload finished on a "
                                   "present id", exclude=ev)
            return
        if not self.check_status(ev, {201, 400, 409, 507}):
            return
        if st == 201:
            if ev.get("digest") == "wrong":
                self.fail("upload with a wrong digest acknowledged", ev)
            if self.mode_forbids_ack(ev):
                self.fail("upload acknowledged after the switch to ro", ev)
            if ev.get("got_sha") != ev.get("sha"):
                self.fail("201 with another checksum than the bytes sent", ev)
            self.check_content(ev, lambda v: v is None, "upload 201 on a present id",
                               exclude=ev)
        elif st == 409:
            reserved = [w for w in self.by_id[ev["id"]] if w is not ev and w["f"] in
                        ("upload", "put_reuse", "tus", "abort", "tus_open")
                        and w["inv"] < _done(ev) and ev["inv"] < _done(w) + GRACE]
            if not reserved:
                self.check_content(ev, lambda v: v is not None, "upload 409 on an absent id",
                                   exclude=ev)
        elif st == 400:
            if ev.get("digest") != "wrong" and not self.mode_ro_possible(ev):
                self.fail("upload refused (400) with a right digest and no ro switch", ev)
        elif st == 507:
            need = self.upper_used(ev) + ev.get("size", 0) + ALLOWANCE
            if need <= self.max_store:
                self.fail(f"507 although the upload fits: at most {need} bytes of "
                          f"{self.max_store} stored or reserved", ev)

    def _check_read(self, ev: dict) -> None:
        f, st = ev["f"], ev.get("status")
        ok = {"download": {200, 404}, "range": {200, 206, 404, 416}, "head": {200, 404},
              "cond": {200, 304, 404}, "meta": {200, 404}}[f]
        if not self.check_status(ev, ok):
            return
        if st == 416:
            found = self.candidates(ev["id"], ev, CONTENT_WRITES, _content_value,
                                    lambda v: v is not None)
            if not any(w.get("size", 0) <= ev["range"][0] for w in found):
                self.fail("416 although the range starts inside the file", ev)
            return
        if st == 404:
            self.check_content(ev, lambda v: v is None, f"{f} 404 while the file exists")
            return
        if ev.get("header_problem"):
            self.fail(f"{f}: headers do not describe the bytes: {ev['header_problem']}", ev)
        if f == "range" and st == 206:
            found = self.check_content(ev, lambda v: v == ev.get("etag_sha"),
                                       "ranged download of bytes no write may have left")
            if found and not any(w.get("size") == ev.get("total") for w in found):
                self.fail("Content-Range total is not the size of that content", ev)
            if found and ev.get("slice_ok") is False:
                self.fail("ranged download: bytes differ from the content its ETag names",
                          ev)
            return
        if f == "head":
            found = self.check_content(ev, lambda v: v == ev.get("etag_sha"),
                                       "HEAD names content no write may have left")
            if found and not any(w.get("size") == ev.get("length") for w in found):
                self.fail("HEAD Content-Length is not the size of the content", ev)
            return
        if f == "cond" and st == 304:
            if ev.get("etag_sha") != ev.get("if_none_match"):
                self.fail("304 under another ETag than the one asked for", ev)
            self.check_content(ev, lambda v: v == ev.get("if_none_match"),
                               "304 for an ETag that is not current")
            return
        self.check_content(ev, lambda v: v == ev.get("sha"),
                           f"{f} returned content no write may have left")
        if f == "meta" and ev.get("tag") is not None:
            found = self.candidates(ev["id"], ev, DESC_WRITES, _desc_value,
                                    lambda v: v == ev["tag"])
            if not found:
                self.fail("metadata shows a description no write may have left", ev)
        if f == "cond" and ev.get("sha") == ev.get("if_none_match"):
            self.fail("200 with the very ETag sent in If-None-Match (a 304 was due)", ev)

    def run(self) -> list[tuple[str, list[dict]]]:
        for ev in self.events:
            if ev["type"] is not None:
                self.check_event(ev)
        return self.violations

    def window(self, why: str, evs: list[dict], limit: int = 12) -> list[dict]:
        """The shortest stretch of the history showing a violation: the offending
        event(s) and the effective writes on the same id that overlap or precede them
        (newest few), in order."""
        if not evs:
            return []
        fid = evs[0].get("id")
        lo = min(e["inv"] for e in evs)
        related = [w for w in self.by_id.get(fid, ()) if w["f"] in CONTENT_WRITES | DESC_WRITES
                   | {"patch"} and w["inv"] <= max(_done(e) for e in evs) and w not in evs]
        before = [w for w in related if _done(w) < lo][-4:]
        during = [w for w in related if _done(w) >= lo]
        faults = [f for f in self.faults if f["inv"] <= max(_done(e) for e in evs)
                  and lo - 5 <= _done(f)]
        out = sorted({id(e): e for e in [*before, *during, *faults, *evs]}.values(),
                     key=lambda e: e["inv"])
        return out[-limit:]


# --- the run ----------------------------------------------------------------------------


class Database:
    """The run's own embedded PostgreSQL (so it can be stopped and started)."""

    def __init__(self, workdir: Path) -> None:
        self.pg = EmbeddedPostgres(workdir / "pg")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.dsn = self.pg.start()

    def stop(self) -> None:
        self.pg.stop()

    def start(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.pg.start()


class Element:
    """The processes of one element, each restartable."""

    def __init__(self, env: dict[str, str], workdir: Path, count: int) -> None:
        self.env = env
        self.workdir = workdir
        self.ports = [free_port() for _ in range(count)]
        self.procs: list[ServerProcess | None] = [None] * count
        self.starts = 0
        self.paused: set[int] = set()

    def start(self, k: int) -> None:
        self.starts += 1
        server = ServerProcess({**self.env, "SERVER_PORT": str(self.ports[k])},
                               self.workdir / f"server-{k}.log")
        self.procs[k] = server.start(timeout=90)

    def url(self, k: int) -> str:
        return f"http://127.0.0.1:{self.ports[k]}"

    def kill(self, k: int) -> None:
        proc = self.procs[k]
        if proc is not None:
            if k in self.paused:
                os.kill(proc.pid, signal.SIGCONT)
                self.paused.discard(k)
            proc.kill()

    def pause(self, k: int) -> None:
        proc = self.procs[k]
        if proc is not None and proc.proc and proc.proc.poll() is None:
            os.kill(proc.pid, signal.SIGSTOP)
            self.paused.add(k)

    def resume(self, k: int) -> None:
        proc = self.procs[k]
        if proc is not None and k in self.paused:
            os.kill(proc.pid, signal.SIGCONT)
            self.paused.discard(k)

    def stop_all(self) -> None:
        for k in range(len(self.procs)):
            self.resume(k)
            if self.procs[k] is not None:
                self.procs[k].stop(timeout=20)

    def run_cli(self, *args: str) -> tuple[int, dict]:
        done = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT,
                              env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=300)
        try:
            body = json.loads(done.stdout) if done.stdout.strip() else {}
        except ValueError:
            body = {"stdout": done.stdout[-2000:]}
        if done.returncode not in (0, 1):
            raise RuntimeError(f"run.py {' '.join(args)} exited {done.returncode}: "
                               f"{done.stderr[-2000:]}")
        return done.returncode, body


@dataclass
class State:
    """What the workload knows while it runs (not the model: only to pick operations)."""

    ids: list[str]
    damaged: dict[str, int] = field(default_factory=dict)  # id -> size
    recently_deleted: list[tuple[str, dict]] = field(default_factory=list)
    seen_etags: dict[str, list[str]] = field(default_factory=dict)
    tus_open: dict[str, int] = field(default_factory=dict)  # id -> declared length
    tus_ids: list[str] = field(default_factory=list)
    tus_maybe: dict[str, int] = field(default_factory=dict)  # creation answer lost


class Run:
    def __init__(self, s: Settings, workdir: Path, s3: Any = None, log: Callable = print,
                 bucket: str = "se-history") -> None:
        self.s, self.workdir, self.s3, self.log = s, workdir, s3, log
        self.s3_bucket = bucket
        rng = random.Random(f"{s.seed}:setup")
        if not s.mode:
            s.mode = rng.choice(("edit", "rw"))
        self.state = State([str(uuid.UUID(int=rng.getrandbits(128), version=4))
                            for _ in range(s.ids)])
        self.history = History(workdir / "history.jsonl")
        self.counter = 0
        self.stop = asyncio.Event()
        self.headers: dict[str, str] = {}
        self.phase = 0
        self.notes: list[str] = []  # oddities that are not violations, for the report
        self.pending_seen = 0  # most pending intents (of killed processes) at a quiescent point
        self.summary: dict[str, Any] = {}

    # setup ------------------------------------------------------------------------------

    def _env(self, dsn: str, public_key: Path) -> dict[str, str]:
        env = {
            "DATABASE_URL": dsn, "DB_TABLE_PREFIX": "h" + uuid.uuid4().hex[:8],
            "APP_MODE": self.s.mode, "STORAGE_LOCAL_BASE_PATH": str(self.workdir / "store"),
            "DATA_DIR": str(self.workdir / "data"), "JWT_PUBLIC_KEY_PATH": str(public_key),
            "STORAGE_DISK_RESERVE": "0", "STORAGE_MAX_SIZE": str(self.s.max_store),
            "SHUTDOWN_TIMEOUT": "3", "LOG_LEVEL": "warning",
        }
        if self.s3 is not None:
            env.update(self.s3.element_env(self.s3_bucket, "hist-" + uuid.uuid4().hex[:10]))
        return env

    # operations -------------------------------------------------------------------------

    def _op_number(self) -> int:
        self.counter += 1
        return self.counter

    async def _request(self, ev: dict, session: aiohttp.ClientSession, method: str, url: str,
                       *, read_body: bool = True, **kw: Any) -> tuple[int | None, dict, bytes]:
        try:
            async with session.request(method, url, **kw) as resp:
                body = await resp.read() if read_body else b""
                return resp.status, resp.headers.copy(), body
        except (TimeoutError, aiohttp.ClientError, ConnectionError, OSError) as exc:
            ev["error"] = type(exc).__name__
            return None, {}, b""

    def _finish(self, ev: dict, status: int | None, ok: set[int], *, unsure: bool = False,
                **fields: Any) -> None:
        if status in ok:
            type_ = "ok"
        elif unsure or status is None or status in (500, 502, 503, 504):  # 507: refused
            type_ = "info"
        else:
            type_ = "fail"
        self.history.complete(ev, type_, status=status, **fields)

    async def op_upload(self, rng: random.Random, session, base: str, proc: int,
                        client: int, kind: str = "upload",
                        reuse: tuple[str, dict] | None = None) -> None:
        st = self.state
        same = None
        if kind == "put_reuse" and (reuse or st.recently_deleted):
            fid, same = reuse or st.recently_deleted[rng.randrange(len(st.recently_deleted))]
        else:
            fid = rng.choice(st.ids)
            kind = "upload"
        n = self._op_number()
        size = same["size"] if same else self._size(rng)
        data = payload(self.s.seed, n, size)
        digest = rng.choice(("none", "none", "right", "wrong"))
        tag = f"u{n}"
        name = same["name"] if same else f"f{n}.bin"
        method = "put" if kind == "put_reuse" else rng.choice(("multipart", "put"))
        headers = {}
        if digest != "none":
            d = hashlib.sha256(data if digest == "right" else data + b"x").digest()
            headers["Content-Digest"] = f"sha-256=:{base64.b64encode(d).decode()}:"
        ev = self.history.invoke(kind, id=fid, proc=proc, client=client, size=size,
                                 sha=sha(data), tag=tag, name=name, digest=digest,
                                 method=method, n=n)
        meta = json.dumps({"tag": tag})
        body_of = (lambda: io.BytesIO(data)) if size > MIB else (lambda: data)
        if method == "multipart":
            form = aiohttp.FormData()
            form.add_field("file_id", fid)
            form.add_field("description", tag)
            form.add_field("metadata", meta)
            form.add_field("file", body_of(), filename=name,
                           content_type="application/octet-stream")
            status, _, body = await self._request(ev, session, "POST",
                                                  f"{base}/api/v1/files/upload", data=form,
                                                  headers=headers)
        else:
            params = {"filename": name, "description": tag, "metadata": meta}
            status, _, body = await self._request(ev, session, "PUT",
                                                  f"{base}/api/v1/files/{fid}",
                                                  data=body_of(), params=params,
                                                  headers=headers)
        got = None
        if status == 201:
            with contextlib.suppress(ValueError):
                got = json.loads(body).get("checksum")
        self._finish(ev, status, {201}, got_sha=got, detail=_detail(status, body))

    async def op_abort(self, rng, session, base, proc, client) -> None:
        """A raw PUT whose client disconnects mid-body: must never become visible."""
        fid = rng.choice(self.state.ids)
        n = self._op_number()
        size = rng.randint(64 * KIB, max(64 * KIB, self.s.max_size))
        data = payload(self.s.seed, n, size)
        ev = self.history.invoke("abort", id=fid, proc=proc, client=client, size=size,
                                 sha=sha(data), n=n)
        port = int(base.rsplit(":", 1)[1])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = (f"PUT /api/v1/files/{fid}?filename=a{n}.bin HTTP/1.1\r\n"
                    f"Host: 127.0.0.1\r\nAuthorization: {self.headers['Authorization']}\r\n"
                    f"Content-Length: {size}\r\n\r\n").encode()
            writer.write(head + data[: size // 2])
            await asyncio.wait_for(writer.drain(), 5)
            await asyncio.sleep(rng.uniform(0, 0.2))
            writer.transport.abort()
        except (OSError, TimeoutError) as exc:
            ev["error"] = type(exc).__name__
        self.history.complete(ev, "fail", status=None, note="client disconnected mid-body")

    def _size(self, rng: random.Random) -> int:
        roll = rng.random()
        if roll < 0.1:
            return 0
        if roll < 0.6:
            return rng.randint(1, 16 * KIB)
        return rng.randint(16 * KIB, self.s.max_size)

    async def op_read(self, rng, session, base, proc, client, kind: str,
                      fid: str | None = None) -> None:
        fid = fid or rng.choice(self.state.ids + self.state.tus_ids[-5:])
        if fid in self.state.damaged:
            return
        ev = self.history.invoke(kind, id=fid, proc=proc, client=client)
        url = f"{base}/api/v1/files/{fid}"
        if kind == "meta":
            status, _, body = await self._request(ev, session, "GET", url)
            fields: dict[str, Any] = {}
            if status == 200:
                doc = json.loads(body)
                fields = {"sha": doc.get("checksum"), "tag": doc.get("description"),
                          "size": doc.get("file_size")}
            return self._finish(ev, status, {200, 404}, **fields)
        headers = {}
        if kind == "range":
            a = rng.randint(0, 4 * KIB)
            b = a + rng.randint(0, 64 * KIB)
            headers["Range"] = f"bytes={a}-{b}"
            ev["range"] = [a, b]
        if kind == "cond":
            known = self.state.seen_etags.get(fid) or [sha(b"")]
            inm = known[-1] if rng.random() < 0.7 else rng.choice(known)
            headers["If-None-Match"] = f'"{inm}"'
            ev["if_none_match"] = inm
        method = "HEAD" if kind == "head" else "GET"
        status, h, body = await self._request(ev, session, method, f"{url}/download",
                                              headers=headers)
        fields = {}
        etag = (h.get("ETag") or "").strip('"')
        if status in (200, 206, 304):
            fields["etag_sha"] = etag
        if status == 200 and kind not in ("head",):
            fields["sha"] = sha(body)
            self.state.seen_etags.setdefault(fid, []).append(fields["sha"])
            problems = []
            if etag != fields["sha"]:
                problems.append(f"ETag {etag[:12]} != sha of body {fields['sha'][:12]}")
            if int(h.get("Content-Length", -1)) != len(body):
                problems.append(f"Content-Length {h.get('Content-Length')} != {len(body)}")
            digest = base64.b64encode(bytes.fromhex(fields["sha"])).decode()
            if h.get("Repr-Digest") != f"sha-256=:{digest}:":
                problems.append("Repr-Digest is not the body's")
            if problems:
                fields["header_problem"] = "; ".join(problems)
        if status == 200 and kind == "head":
            fields["length"] = int(h.get("Content-Length", -1))
        if status == 206:
            a, b = ev["range"]
            total = int((h.get("Content-Range") or "/-1").rsplit("/", 1)[1])
            fields["total"] = total
            writes = [w for w in self.history.events if w.get("id") == fid and
                      w.get("sha") == etag and w["f"] in ("upload", "put_reuse", "tus")]
            if writes:
                w = writes[-1]
                full = payload(self.s.seed, w["n"], w["size"])
                fields["slice_ok"] = body == full[a:b + 1]
        ok = {"download": {200, 404}, "range": {200, 206, 404, 416}, "head": {200, 404},
              "cond": {200, 304, 404}}[kind]
        self._finish(ev, status, ok, **fields)

    async def op_patch(self, rng, session, base, proc, client) -> None:
        fid = rng.choice(self.state.ids)
        if fid in self.state.damaged:
            return
        n = self._op_number()
        tag = f"p{n}"
        ev = self.history.invoke("patch", id=fid, proc=proc, client=client, tag=tag)
        status, _, body = await self._request(
            ev, session, "PATCH", f"{base}/api/v1/files/{fid}",
            json={"description": tag, "metadata": {"tag": tag}})
        self._finish(ev, status, {200}, detail=_detail(status, body))

    async def op_delete(self, rng, session, base, proc, client, kind: str) -> None:
        fid = rng.choice(self.state.ids)
        if fid in self.state.damaged:
            return
        others = [k for k in range(self.s.procs) if k != proc]
        other = rng.choice(others) if others else proc
        if rng.random() < 0.5:  # another process serves it first (its download cache)
            await self.op_read(rng, session, self.element.url(other), other, client,
                               "download", fid)
        ev = self.history.invoke(kind, id=fid, proc=proc, client=client, mode=self.s.mode)
        # what the file was (for a reuse with the same name and size), read first
        prior = None
        with contextlib.suppress(Exception):
            async with session.get(f"{base}/api/v1/files/{fid}") as resp:
                if resp.status == 200:
                    prior = await resp.json()
        if kind == "delete":
            status, _, body = await self._request(ev, session, "DELETE",
                                                  f"{base}/api/v1/files/{fid}")
            self._finish(ev, status, {204}, detail=_detail(status, body))
            gone = status == 204
        else:
            status, _, body = await self._request(ev, session, "DELETE",
                                                  f"{base}/api/v1/gc/{fid}")
            outcome = None
            if status == 200:
                outcome = json.loads(body).get("status")
            self._finish(ev, status, {200}, outcome=outcome, detail=_detail(status, body))
            gone = outcome == "deleted"
        if gone and prior:
            self.state.recently_deleted.append(
                (fid, {"name": prior["original_filename"], "size": prior["file_size"]}))
            del self.state.recently_deleted[:-4]
        if gone and prior and rng.random() < 0.5:
            # uploaded anew at once, same name and size: often the very same storage path
            await self.op_upload(rng, session, base, proc, client, "put_reuse",
                                 self.state.recently_deleted[-1])
        if gone:
            # straight away, ask another process (whose download cache may hold the file)
            await self.op_read(rng, session, self.element.url(other), other, client,
                               rng.choice(("cond", "download", "range", "head")), fid)

    async def op_tus(self, rng, session, client) -> None:
        fid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        n = self._op_number()
        size = max(1, self._size(rng))
        data = payload(self.s.seed, n, size)
        tus = {"Tus-Resumable": "1.0.0"}
        meta = ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in
                        {"filename": f"t{n}.bin", "file_id": fid, "description": f"t{n}"}
                        .items())
        proc = rng.randrange(self.s.procs)
        opened = self.history.invoke("tus_open", id=fid, proc=proc, client=client, size=size)
        status, h, body = await self._request(
            opened, session, "POST", f"{self.element.url(proc)}/api/v1/uploads",
            headers={**tus, "Upload-Length": str(size), "Upload-Metadata": meta})
        self._finish(opened, status, {201}, detail=_detail(status, body))
        if status is None or status >= 500:
            self.state.tus_maybe[fid] = size  # it may exist (a reservation until expiry)
        if status != 201:
            return
        self.state.tus_ids.append(fid)
        self.state.tus_open[fid] = size
        path = f"/api/v1/uploads/{fid}"
        abandon = rng.random() < 0.2
        chunk = rng.choice((16 * KIB, 64 * KIB, 256 * KIB))
        offset, tries = 0, 0
        while offset < size:
            if abandon and offset > 0 and rng.random() < 0.5:
                break
            end = min(size, offset + chunk)
            last = end == size
            proc = rng.randrange(self.s.procs)
            base = self.element.url(proc)
            ev = self.history.invoke("tus" if last else "tus_patch", id=fid, proc=proc,
                                     client=client, size=size, sha=sha(data), tag=f"t{n}",
                                     n=n, offset=offset)
            status, h, body = await self._request(
                ev, session, "PATCH", base + path, data=data[offset:end],
                headers={**tus, "Content-Type": "application/offset+octet-stream",
                         "Upload-Offset": str(offset)})
            kept = last and status == 400 and _kept(body)
            self._finish(ev, status, {204}, detail=_detail(status, body), kept=kept or None,
                         unsure=kept)
            if kept:  # a file once uploads are allowed: the quiescent point's HEAD makes it
                self.state.tus_maybe[fid] = size
            if status == 204:
                offset = end
                if last:
                    self.state.tus_open.pop(fid, None)
                    return
                continue
            tries += 1
            if tries > 6 or self.stop.is_set():
                break
            await asyncio.sleep(0.3)
            # where is it? (a lost answer may have been applied)
            probe = self.history.invoke("tus_head", id=fid, proc=proc, client=client)
            status, h, body = await self._request(probe, session, "HEAD", base + path,
                                                  headers=tus)
            self._finish(probe, status, {200})
            if status == 200:
                offset = int(h.get("Upload-Offset", offset))
                if offset == size and size > 0:
                    ev["type"], ev["done"] = "info", None  # finished, answer lost
                    self.state.tus_open.pop(fid, None)
                    # (or full but not a file yet: HEAD in ro does not make it)
                    self.state.tus_maybe[fid] = size
                    return
            elif status == 404:
                # finished by the lost PATCH and already a file? leave it to the model
                self.state.tus_open.pop(fid, None)
                return
        if abandon and rng.random() < 0.5:
            ev = self.history.invoke("tus_delete", id=fid, proc=0, client=client)
            status, _, _ = await self._request(ev, session, "DELETE",
                                               self.element.url(0) + path, headers=tus)
            self._finish(ev, status, {204})
            if status == 204:
                self.state.tus_open.pop(fid, None)

    async def op_misc(self, rng, session, base, proc, client, kind: str) -> None:
        ev = self.history.invoke(kind, proc=proc, client=client)
        if kind == "list":
            status, _, _ = await self._request(ev, session, "GET", f"{base}/api/v1/files",
                                               params={"limit": "50"})
            self._finish(ev, status, {200})
        elif kind == "search":
            status, _, _ = await self._request(ev, session, "GET",
                                               f"{base}/api/v1/files/search",
                                               params={"q": "bin", "limit": "20"})
            self._finish(ev, status, {200})
        elif kind == "capacity":
            status, _, body = await self._request(ev, session, "GET",
                                                  f"{base}/api/v1/capacity")
            used = json.loads(body)["capacity"]["used"] if status == 200 else None
            self._finish(ev, status, {200}, used=used)
        else:
            status, _, body = await self._request(ev, session, "POST",
                                                  f"{base}/api/v1/cache/rebuild/incremental")
            self._finish(ev, status, {200, 409}, detail=_detail(status, body))

    async def client(self, c: int) -> None:
        rng = random.Random(f"{self.s.seed}:client:{c}:{self.phase}")
        kinds, weights = zip(*self.mix.items(), strict=True)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(headers=self.headers, timeout=timeout) as session:
            while not self.stop.is_set():
                kind = rng.choices(kinds, weights)[0]
                proc = rng.randrange(self.s.procs)
                base = self.element.url(proc)
                if kind in ("upload", "put_reuse"):
                    await self.op_upload(rng, session, base, proc, c, kind)
                elif kind == "abort":
                    await self.op_abort(rng, session, base, proc, c)
                elif kind in ("download", "range", "head", "cond", "meta"):
                    await self.op_read(rng, session, base, proc, c, kind)
                elif kind == "patch":
                    await self.op_patch(rng, session, base, proc, c)
                elif kind in ("delete", "gc"):
                    await self.op_delete(rng, session, base, proc, c, kind)
                elif kind == "tus":
                    await self.op_tus(rng, session, c)
                else:
                    await self.op_misc(rng, session, base, proc, c, kind)

    @property
    def mix(self) -> dict[str, int]:
        mix = dict(MIX)
        if self.s.mode == "rw":
            mix["delete"] = 1  # refused in rw (checked); GC deletes instead
            mix["gc"] = 8
        return mix

    # faults -----------------------------------------------------------------------------

    async def faults(self, rng: random.Random, seconds: float) -> None:
        if not self.s.faults:
            return
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end - 1.5 and not self.stop.is_set():
            await asyncio.sleep(rng.expovariate(self.s.fault_rate) + 0.5)
            if time.monotonic() > t_end - 1.5 or self.stop.is_set():
                return
            kind = rng.choice(self.s.faults)
            k = rng.randrange(self.s.procs)
            ev = self.history.invoke("fault", kind=kind, proc=k)
            if kind == "kill":
                self.element.kill(k)
                await asyncio.sleep(rng.uniform(0.1, 1.0))
                await asyncio.to_thread(self.element.start, k)
            elif kind == "pause":
                self.element.pause(k)
                await asyncio.sleep(rng.uniform(1.0, 3.0))
                self.element.resume(k)
            elif kind == "pg":
                await asyncio.to_thread(self.db.stop)
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                await asyncio.to_thread(self.db.start)
            self.history.complete(ev, "ok")

    async def moder(self, rng: random.Random) -> None:
        """rw -> ro -> rw (confirm), repeatedly, through random processes."""
        if self.s.mode != "rw":
            return
        async with aiohttp.ClientSession(headers=self.headers,
                                         timeout=aiohttp.ClientTimeout(total=30)) as session:
            while not self.stop.is_set():
                await asyncio.sleep(rng.uniform(1.0, 3.0))
                for target in ("ro", "rw"):
                    for _attempt in range(100):
                        proc = rng.randrange(self.s.procs)
                        ev = self.history.invoke("mode", target=target, proc=proc)
                        status, _, body = await self._request(
                            ev, session, "POST", f"{self.element.url(proc)}/api/v1/mode",
                            json={"target_mode": target, "confirm": True})
                        if status == 400 and b"already" in body:
                            self._finish(ev, 200, {200}, detail=_detail(status, body))
                            break
                        self._finish(ev, status, {200}, detail=_detail(status, body))
                        if status == 200:
                            break
                        await asyncio.sleep(0.3)
                    if target == "ro":
                        await asyncio.sleep(rng.uniform(0.5, 1.5))

    # quiescent points and the end -------------------------------------------------------

    async def ready(self) -> None:
        for k in range(self.s.procs):
            if self.element.procs[k] is None or self.element.procs[k].proc.poll() is not None:
                await asyncio.to_thread(self.element.start, k)
        async with aiohttp.ClientSession() as session:
            for k in range(self.s.procs):
                for _ in range(300):
                    with contextlib.suppress(aiohttp.ClientError, OSError):
                        async with session.get(f"{self.element.url(k)}/health/ready") as r:
                            if r.status == 200:
                                break
                    await asyncio.sleep(0.1)

    async def quiescent(self, label: str) -> list[str]:
        """Read every id from every process; compare listing, search and capacity."""
        await self.ready()
        problems: list[str] = []
        await self._resolve_tus()
        ids = [i for i in self.state.ids + self.state.tus_ids if i not in self.state.damaged]
        observed: dict[str, dict | None] = {}
        async with aiohttp.ClientSession(headers=self.headers,
                                         timeout=aiohttp.ClientTimeout(total=60)) as session:
            for fid in ids:
                for k in range(self.s.procs):
                    base = self.element.url(k)
                    ev = self.history.invoke("meta", id=fid, proc=k, client="checker")
                    status, _, body = await self._request(ev, session, "GET",
                                                          f"{base}/api/v1/files/{fid}")
                    fields: dict[str, Any] = {}
                    if status == 200:
                        doc = json.loads(body)
                        fields = {"sha": doc["checksum"], "tag": doc["description"],
                                  "size": doc["file_size"]}
                    self._finish(ev, status, {200, 404}, **fields)
                    ev2 = self.history.invoke("download", id=fid, proc=k, client="checker")
                    status2, h, data = await self._request(ev2, session, "GET",
                                                           f"{base}/api/v1/files/{fid}/download")
                    f2: dict[str, Any] = {}
                    if status2 == 200:
                        f2["sha"] = sha(data)
                        if (h.get("ETag") or "").strip('"') != f2["sha"]:
                            f2["header_problem"] = "ETag is not the sha of the body"
                    self._finish(ev2, status2, {200, 404}, **f2)
                    if k == 0:
                        observed[fid] = fields if status == 200 else None
            listed = await self._all(session, "/api/v1/files", "skip")
            searched = await self._all(session, "/api/v1/files/search", None)
            async with session.get(f"{self.element.url(0)}/api/v1/capacity") as r:
                used = (await r.json())["capacity"]["used"]
        present = {i for i, v in observed.items() if v is not None}
        expected_listed = present | set(self.state.damaged)
        if listed != expected_listed:
            problems.append(f"{label}: listing differs from the model: extra "
                            f"{sorted(listed - expected_listed)}, missing "
                            f"{sorted(expected_listed - listed)}")
        if searched != expected_listed:
            problems.append(f"{label}: search differs from the model: extra "
                            f"{sorted(searched - expected_listed)}, missing "
                            f"{sorted(expected_listed - searched)}")
        # Pending intents of a SIGKILLed process, or of a write that PostgreSQL's outage
        # caught after its intent committed, stay (with their reservations) while another
        # process of the element runs: recovery in shared mode leaves an upload's for
        # 24 h, a PATCH's or DELETE's for 5 min (storage.domain.recovery: STALE_*).  Open
        # tus uploads have a pending row by design.
        pending = [] if label.startswith("end") else await self._pending()
        faulted = any(e["f"] == "fault" and e.get("kind") in ("kill", "pg")
                      for e in self.history.events)
        stray = [p for p in pending if str(p["file_id"]) not in self.state.tus_open]
        if stray and not faulted:
            problems.append(f"{label}: pending WAL rows but no process was killed and "
                            f"PostgreSQL never stopped: {stray}")
        self.pending_seen = max(self.pending_seen, len(stray))
        want = (sum(v["size"] for v in observed.values() if v) + sum(self.state.damaged.values())
                + sum(self.state.tus_open.values())
                + sum(p["reserved_bytes"] for p in pending
                      if str(p["file_id"]) not in self.state.tus_open))
        if used != want:
            problems.append(f"{label}: pending WAL rows: {pending}")
            problems.append(f"{label}: capacity used {used} != {want} (live files "
                            f"{sum(v['size'] for v in observed.values() if v)}, damaged "
                            f"{sum(self.state.damaged.values())}, open tus "
                            f"{sum(self.state.tus_open.values())})")
        for fid, v in observed.items():
            self.history.complete(self.history.invoke(
                "base", id=fid, sha=v["sha"] if v else None, tag=v["tag"] if v else None,
                size=v["size"] if v else 0), "ok")
        return problems

    async def _resolve_tus(self) -> None:
        """Which tus uploads are open (reserving their length) at a quiescent point: those
        the clients left, and those whose creation answer was lost (HEAD says)."""
        async with aiohttp.ClientSession(headers=self.headers) as session:
            for fid, size in [*self.state.tus_maybe.items(), *self.state.tus_open.items()]:
                async with session.head(f"{self.element.url(0)}/api/v1/uploads/{fid}",
                                        headers={"Tus-Resumable": "1.0.0"}) as r:
                    offset = int(r.headers.get("Upload-Offset", -1))
                finished = False
                if r.status == 200 and offset == size:  # all bytes in: a file yet?
                    async with session.get(f"{self.element.url(0)}/api/v1/files/{fid}") as g:
                        finished = g.status == 200
                if r.status == 200 and not finished:
                    self.state.tus_open[fid] = size
                else:
                    self.state.tus_open.pop(fid, None)
                self.state.tus_maybe.pop(fid, None)

    async def _pending(self) -> list[dict]:
        conn = await asyncpg.connect(self.db.dsn)
        try:
            return [dict(r) for r in await conn.fetch(
                f"SELECT operation_type, file_id, reserved_bytes, started_at "
                f"FROM {self.env['DB_TABLE_PREFIX']}_wal WHERE status = 'pending'")]
        finally:
            await conn.close()

    async def _all(self, session, path: str, paging: str | None) -> set[str]:
        found: set[str] = set()
        if paging == "skip":
            skip = 0
            while True:
                async with session.get(f"{self.element.url(0)}{path}",
                                       params={"limit": "100", "skip": str(skip)}) as r:
                    page = await r.json()
                found |= {f["file_id"] for f in page["files"]}
                skip += 100
                if not page["files"] or skip >= page["total"]:
                    return found
        cursor = None
        while True:
            params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
            async with session.get(f"{self.element.url(0)}{path}", params=params) as r:
                page = await r.json()
            found |= {f["file_id"] for f in page["files"]}
            cursor = page.get("next_cursor")
            if not cursor:
                return found

    async def damage(self, rng: random.Random) -> str | None:
        """Remove one present file's data object behind the element's back."""
        candidates = []
        unsure = {e["id"] for e in self.history.events if e["type"] == "info" and e.get("id")}
        for ev in reversed(self.history.events):  # (an unknown write might still land)
            if ev["f"] == "base" and ev["sha"] and ev["id"] not in self.state.damaged \
                    and ev["id"] in self.state.ids and ev["id"] not in unsure:
                candidates.append(ev)
        seen, picks = set(), []
        for ev in candidates:
            if ev["id"] not in seen:
                seen.add(ev["id"])
                picks.append(ev)
        if not picks:
            return None
        target = picks[rng.randrange(len(picks))]
        fid = target["id"]
        conn = await asyncpg.connect(self.db.dsn)
        try:
            rel = await conn.fetchval(
                f"SELECT storage_path || storage_filename FROM {self.env['DB_TABLE_PREFIX']}"
                "_files WHERE file_id = $1", uuid.UUID(fid))
        finally:
            await conn.close()
        if rel is None:
            return None
        if self.s3 is None:
            (Path(self.env["STORAGE_LOCAL_BASE_PATH"]) / rel).unlink()
        else:
            async with _s3_client(self.s3) as s3:
                await s3.delete_object(Bucket=self.s3_bucket,
                                       Key=self.env["STORAGE_S3_APP_FOLDER"] + "/" + rel)
        self.state.damaged[fid] = target["size"]
        self.state.ids.remove(fid)
        self.state.recently_deleted = [r for r in self.state.recently_deleted if r[0] != fid]
        self.history.complete(self.history.invoke("fault", kind="lose_data", id=fid,
                                                  path=rel), "ok")
        return fid

    async def finish(self) -> list[str]:
        """Recovery, then the end-of-run checks (module docstring)."""
        problems: list[str] = []
        await asyncio.to_thread(self.element.stop_all)
        code, rec = await asyncio.to_thread(self.element.run_cli, "recover", "--force")
        if code:
            problems.append(f"end: recover --force exited {code}: {rec}")
        problems += await self.quiescent("end, after recovery")
        async with aiohttp.ClientSession(headers=self.headers,
                                         timeout=aiohttp.ClientTimeout(total=120)) as session:
            async with session.post(f"{self.element.url(0)}/api/v1/cache/rebuild") as r:
                rebuilt = await r.json()
            if r.status != 200:
                problems.append(f"end: full rebuild answered {r.status}: {rebuilt}")
            else:
                errors = rebuilt["result"]["errors"]
                for fid in self.state.damaged:
                    if not any(fid in e and "data object is missing" in e for e in errors):
                        problems.append(f"end: the full rebuild does not report {fid}, whose "
                                        f"data object was removed: {errors}")
            listed = await self._all(session, "/api/v1/files", "skip")
            for fid in self.state.damaged:
                async with session.get(f"{self.element.url(0)}/api/v1/files/{fid}") as r:
                    if r.status != 404:
                        problems.append(f"end: after the rebuild, {fid} (data removed) "
                                        f"answers {r.status}, not 404")
        back = listed & set(self.state.damaged)
        if back:
            problems.append(f"end: the rebuild published rows for files whose data is gone: "
                            f"{sorted(back)}")
        await asyncio.to_thread(self.element.stop_all)
        code, report = await asyncio.to_thread(self.element.run_cli, "check")
        damaged = len(self.state.damaged)
        if report.get("missing_data_count") != damaged or report.get("orphan_cache_count"):
            problems.append(f"end: check reports {report}, expected {damaged} attr "
                            "file(s) without data and nothing else")
        orphans = set(report.get("details", {}).get("orphan_attr_files", []))
        if orphans - set(self.state.damaged):
            problems.append(f"end: check finds orphan attr files: {sorted(orphans)}")
        code, scrubbed = await asyncio.to_thread(self.element.run_cli, "scrub",
                                                 "--quarantine")
        if scrubbed.get("quarantine_failed"):  # a store error: an operator runs it again
            self.notes.append(f"scrub --quarantine failed once: {scrubbed.get('problems')}")
            first = scrubbed.get("quarantined", 0)
            code, scrubbed = await asyncio.to_thread(self.element.run_cli, "scrub",
                                                     "--quarantine")
            scrubbed["quarantined"] = scrubbed.get("quarantined", 0) + first
        if scrubbed.get("quarantined") != damaged or scrubbed.get("corrupt") or \
                scrubbed.get("size_mismatch"):
            problems.append(f"end: scrub --quarantine: {scrubbed}")
        code, report = await asyncio.to_thread(self.element.run_cli, "check")
        if not report.get("is_consistent"):
            problems.append(f"end: check after scrub is not consistent: {report}")
        problems += await self.residue()
        return problems

    async def residue(self) -> list[str]:
        """No pending WAL rows, temp files, staged bytes of finished tus uploads or open
        multipart uploads (processes stopped, recovery done)."""
        problems = []
        prefix = self.env["DB_TABLE_PREFIX"]
        conn = await asyncpg.connect(self.db.dsn)
        try:
            pending = await conn.fetch(f"SELECT operation_type, file_id FROM {prefix}_wal "
                                       "WHERE status = 'pending'")
            uploads = {str(r["file_id"]) for r in await conn.fetch(
                f"SELECT file_id FROM {prefix}_uploads WHERE completed_at IS NULL")}
        finally:
            await conn.close()
        stray = [dict(r) for r in pending if str(r["file_id"]) not in self.state.tus_open]
        if stray:
            problems.append(f"end: pending WAL rows left: {stray[:5]}")
        if uploads - set(self.state.tus_open):
            # (a last PATCH that met a PostgreSQL outage between the finish and the mark
            # left one so, even after recover --force: the recovery sweep marks them now)
            problems.append(f"end: unfinished tus rows of finished or removed uploads: "
                            f"{sorted(uploads - set(self.state.tus_open))[:5]}")
        if self.s3 is None:
            root = Path(self.env["STORAGE_LOCAL_BASE_PATH"])
            temps = [str(p.relative_to(root)) for p in root.rglob(".tmp*")]
            if temps:
                problems.append(f"end: temp files left: {temps[:5]}")
            staged = {p.name.split(".")[0] for p in (root / ".resumable").glob("*")} \
                if (root / ".resumable").exists() else set()
            extra = staged - set(self.state.tus_open)
            if extra:
                problems.append(f"end: staged tus bytes of finished or removed uploads: "
                                f"{sorted(extra)[:5]}")
        else:
            folder = self.env["STORAGE_S3_APP_FOLDER"] + "/"
            async with _s3_client(self.s3) as s3:
                mp = await s3.list_multipart_uploads(Bucket=self.s3_bucket, Prefix=folder)
                open_mp = [u["Key"] for u in mp.get("Uploads", [])]
                staged_keys = []
                pages = s3.get_paginator("list_objects_v2").paginate(
                    Bucket=self.s3_bucket, Prefix=folder + "_resumable/")
                async for page in pages:
                    staged_keys += [o["Key"] for o in page.get("Contents", [])]
            if open_mp:
                problems.append(f"end: open multipart uploads: {open_mp[:5]}")
            staged = {k[len(folder + "_resumable/"):].split("/")[0] for k in staged_keys}
            if staged - set(self.state.tus_open):
                problems.append(f"end: staged tus objects of finished or removed uploads: "
                                f"{sorted(staged - set(self.state.tus_open))[:5]}")
        return problems

    async def main(self) -> dict[str, Any]:
        s = self.s
        keys = ensure_dev_keys(self.workdir / "keys")
        self.headers = {"Authorization": "Bearer " + mint_token(
            keys[0].read_bytes(), role="admin", token_type="service_account",
            name="history")}
        self.db = await asyncio.to_thread(Database, self.workdir)
        try:
            if self.s3 is not None:
                from s3server import create_bucket
                await create_bucket(self.s3, self.s3_bucket)
            self.env = self._env(self.db.dsn, keys[1])
            self.element = Element(self.env, self.workdir, s.procs)
            for k in range(s.procs):
                await asyncio.to_thread(self.element.start, k)
            return await self._phases()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.element.stop_all)
            with contextlib.suppress(Exception):
                self.db.stop()
            self.history.close()

    async def _phases(self) -> dict[str, Any]:
        s = self.s
        frng = random.Random(f"{s.seed}:faults")
        problems: list[str] = []
        for phase in range(s.phases):
            self.phase = phase
            self.stop.clear()
            clients = [asyncio.create_task(self.client(c)) for c in range(s.clients)]
            moder = asyncio.create_task(self.moder(random.Random(f"{s.seed}:mode:{phase}")))
            await asyncio.gather(self.faults(frng, s.phase_s), asyncio.sleep(s.phase_s))
            self.stop.set()
            await asyncio.gather(*clients, moder)
            problems += await self.quiescent(f"quiescent point {phase}")
            if s.damage and phase == 0:
                await self.damage(frng)
        problems += await self.finish()
        events = self.history.events
        self.summary = {
            "seed": s.seed, "storage": s.storage, "mode": s.mode,
            "ops": sum(1 for e in events if e["f"] not in ("fault", "base")),
            "ok": sum(1 for e in events if e["type"] == "ok" and e["f"] not in
                      ("fault", "base")),
            "fail": sum(1 for e in events if e["type"] == "fail"),
            "info": sum(1 for e in events if e["type"] == "info"),
            "faults": sum(1 for e in events if e["f"] == "fault"),
            "restarts": self.element.starts - s.procs,
            "damaged": len(self.state.damaged),
            "pending_after_kill": self.pending_seen,
            "notes": self.notes,
        }
        return {"problems": problems}


def _kept(body: bytes) -> bool:
    """A tus last PATCH's 400 that kept the bytes (``upload_kept``: the element left the
    upload modes during the finish; the file is made once uploads are allowed again)."""
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(body).get("upload_kept") is True
    return False


def _detail(status: int | None, body: bytes) -> str | None:
    if status is None or status < 400:
        return None
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(body).get("detail"))[:160]
    return body[:160].decode("utf-8", "replace")


@contextlib.asynccontextmanager
async def _s3_client(endpoint):
    from s3server import client
    async with client(endpoint) as s3:
        yield s3


# --- entry points -----------------------------------------------------------------------


@dataclass
class Result:
    settings: Settings
    summary: dict[str, Any]
    violations: list[str]
    workdir: Path
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.violations

    def line(self) -> str:
        sm = self.summary
        return (f"seed {self.settings.seed} {self.settings.storage}/{sm.get('mode')}: "
                f"{'OK' if self.ok else 'FAIL'} in {self.seconds:.0f} s, {sm.get('ops')} ops "
                f"({sm.get('ok')} ok, {sm.get('fail')} refused, {sm.get('info')} unknown), "
                f"{sm.get('faults')} faults, {sm.get('restarts')} restarts, "
                f"{sm.get('pending_after_kill')} intents left pending by a kill or outage, "
                f"{len(self.violations)} violation(s)"
                + "".join(f"\n  note: {n}" for n in sm.get("notes", ())))

    def report(self) -> str:
        if self.ok:
            return self.line()
        return "\n".join([self.line(), *self.violations[:8],
                          f"history: {self.workdir / 'history.jsonl'}",
                          f"replay: {self.settings.command()}"])


def check(events: list[dict], max_store: int) -> list[str]:
    """The model check of a finished history: violations, each with its window."""
    checker = Checker(events, max_store)
    out = []
    for why, evs in checker.run():
        window = checker.window(why, evs)
        lines = "\n".join("    " + json.dumps(e, default=str) for e in window)
        out.append(f"VIOLATION: {why} (event {evs[0]['i'] if evs else '?'})\n  shortest "
                   f"window ({len(window)} events):\n{lines}")
    return out


async def run_once(s: Settings, s3: Any = None, log: Callable = print,
                   bucket: str = "se-history") -> Result:
    """One run: the workload and faults, the end-of-run checks, the model check."""
    t0 = time.monotonic()
    base = s.workdir or Path(tempfile.mkdtemp(prefix=f"history-{s.seed}-"))
    base.mkdir(parents=True, exist_ok=True)
    run = Run(s, base, s3, log, bucket)
    out = await run.main()
    violations = check(run.history.events, s.max_store)
    violations = [*(f"VIOLATION: {p}" for p in out["problems"]), *violations]
    result = Result(s, run.summary, violations, base, time.monotonic() - t0)
    if result.ok and not s.keep:
        shutil.rmtree(base, ignore_errors=True)
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.reliability.history",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--storage", choices=("local", "s3"), default="local")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--phases", type=int, default=3)
    p.add_argument("--phase-s", type=float, default=15.0)
    p.add_argument("--ids", type=int, default=10)
    p.add_argument("--max-size", type=int, default=256 * KIB)
    p.add_argument("--max-store", type=int, default=4 * MIB)
    p.add_argument("--faults", default=",".join(FAULTS),
                   help=f"comma-separated subset of {','.join(FAULTS)}, or none")
    p.add_argument("--mode", choices=("", "edit", "rw"), default="")
    p.add_argument("--no-damage", action="store_true")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the run directory when it passes")
    p.add_argument("--soak", action="store_true",
                   help="run rounds with a new seed each, one summary line per round")
    p.add_argument("--hours", type=float, default=8.0, help="how long --soak runs")
    return p.parse_args(argv)


def _settings(a: argparse.Namespace, seed: int) -> Settings:
    faults = () if a.faults == "none" else tuple(f for f in a.faults.split(",") if f)
    return Settings(seed=seed, storage=a.storage, procs=a.procs, clients=a.clients,
                    phases=a.phases, phase_s=a.phase_s, ids=a.ids, max_size=a.max_size,
                    max_store=a.max_store, faults=faults, mode=a.mode,
                    damage=not a.no_damage, workdir=a.workdir, keep=a.keep)


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(10**6)

    async def go() -> int:
        endpoint, stack = None, contextlib.ExitStack()
        try:
            if a.storage == "s3":
                from s3server import start_seaweedfs
                endpoint = stack.enter_context(start_seaweedfs(
                    Path(tempfile.mkdtemp(prefix="history-s3-"))))
            if not a.soak:
                result = await run_once(_settings(a, seed), endpoint)
                print(result.report(), flush=True)
                return 0 if result.ok else 1
            deadline, failures, rounds = time.monotonic() + a.hours * 3600, 0, 0
            round_seed = seed
            while time.monotonic() < deadline:
                rounds += 1
                result = await run_once(_settings(a, round_seed), endpoint)
                failures += not result.ok
                print(f"round {rounds}: " + result.report(), flush=True)
                round_seed = random.SystemRandom().randrange(10**6)
            print(f"soak: {rounds} rounds, {failures} failed", flush=True)
            return 1 if failures else 0
        finally:
            stack.close()

    return asyncio.run(go())


if __name__ == "__main__":
    sys.exit(main())
