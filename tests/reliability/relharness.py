"""Machinery shared by the reliability suite (issue 11).

- :class:`Results`: the closing-note table (scenario, rounds, operations acknowledged,
  operations lost, 500s seen, residue found), filled by the tests as they go and printed
  by ``conftest.py`` at the end of the session (also when a test fails).
- :func:`inspect_store`: the invariant check after a fault.  It reads the metadata rows
  and the WAL straight from PostgreSQL and walks the storage tree, so it does not trust
  the code under test: every row has its data (size and sha256 match) and its attr.json
  (which agrees with the row), no data or attr file without a row, no temp files, no
  pending WAL entry and no capacity reservation left.
- :func:`raw_http`: one request over a raw socket, for input a well-behaved client
  library refuses to send, with a parser that tolerates a server closing early.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

MIB = 1024 * 1024
ATTR_SUFFIX = ".attr.json"
TEMP_PREFIX = ".tmp"


@dataclass(frozen=True)
class Profile:
    name: str
    rounds: int  # SIGKILL rounds / fault repetitions
    ops: int  # operations per round
    max_size: int  # largest upload in the randomized workloads
    idle_connections: int
    fuzz_cases: int  # extra seeded hostile-input cases

    def __str__(self) -> str:
        return self.name


SLIM = Profile("slim", rounds=3, ops=100, max_size=256 * 1024, idle_connections=1000,
               fuzz_cases=30)
FULL = Profile("full", rounds=20, ops=100, max_size=2 * 1024 * 1024, idle_connections=1000,
               fuzz_cases=400)
PROFILES = pytest.mark.parametrize(
    "profile", [SLIM, pytest.param(FULL, marks=pytest.mark.reliability)], ids=str)



# --- the results table ------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    rounds: int = 0
    acked: int = 0
    lost: int = 0
    errors_500: int = 0
    residue: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


class Results:
    """Rows keyed by scenario name; tests add to them while they run."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def row(self, scenario: str) -> Row:
        return self.rows.setdefault(scenario, Row(scenario))

    def table(self) -> list[str]:
        head = ("scenario", "rounds", "acked", "lost", "500s", "residue", "secs")
        rows = [(r.scenario, str(r.rounds), str(r.acked), str(r.lost), str(r.errors_500),
                 str(r.residue), f"{r.seconds:.1f}") for r in self.rows.values()]
        widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]

        def fmt(cells):
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        lines = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += [fmt(r) for r in rows]
        notes = [f"- {r.scenario}: {n}" for r in self.rows.values() for n in r.notes]
        return lines + (["", "notes:", *notes] if notes else [])

    def as_json(self) -> list[dict[str, Any]]:
        return [vars(r) for r in self.rows.values()]


RESULTS = Results()


class Timer:
    """``with Timer(row):`` adds the elapsed wall time to the row."""

    def __init__(self, row: Row) -> None:
        self.row = row

    def __enter__(self) -> Timer:
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.row.seconds += time.monotonic() - self.t0


# --- the invariant check ----------------------------------------------------------------


@dataclass
class Residue:
    """What the store holds that it should not (every list empty when healthy)."""

    temp_files: list[str] = field(default_factory=list)
    orphan_data: list[str] = field(default_factory=list)
    orphan_attrs: list[str] = field(default_factory=list)
    rows_without_data: list[str] = field(default_factory=list)
    rows_without_attr: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    pending_wal: list[str] = field(default_factory=list)
    reserved_bytes: int = 0
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # file_id -> row

    @property
    def count(self) -> int:
        return (len(self.temp_files) + len(self.orphan_data) + len(self.orphan_attrs)
                + len(self.rows_without_data) + len(self.rows_without_attr)
                + len(self.mismatches) + len(self.pending_wal) + (self.reserved_bytes > 0))

    def describe(self) -> str:
        parts = []
        for name in ("temp_files", "orphan_data", "orphan_attrs", "rows_without_data",
                     "rows_without_attr", "mismatches", "pending_wal"):
            items = getattr(self, name)
            if items:
                parts.append(f"{name} ({len(items)}): {items[:5]}")
        if self.reserved_bytes:
            parts.append(f"reserved_bytes: {self.reserved_bytes}")
        return "; ".join(parts) or "clean"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _iso(value: Any) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(str(value).replace(" ", "T"))
    except ValueError:
        return None


def _compare_attr(row: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    """Differences between a metadata row and its attr document."""
    diffs = []
    for key in ("original_filename", "storage_filename", "file_size", "content_type",
                "checksum", "created_by_id", "created_by_username", "description", "version",
                "storage_path"):
        if doc.get(key) != row[key]:
            diffs.append(f"{key}: row {row[key]!r:.60} != attr {doc.get(key)!r:.60}")
    if str(doc.get("file_id")) != str(row["file_id"]):
        diffs.append(f"file_id: {doc.get('file_id')!r}")
    custom = doc.get("custom_attributes", doc.get("metadata")) or None
    if custom != (row["metadata_json"] or None):
        diffs.append(f"metadata: row {row['metadata_json']!r:.80} != attr {custom!r:.80}")
    for key in ("created_at", "updated_at"):
        if _iso(doc.get(key)) != row[key]:
            diffs.append(f"{key}: row {row[key]} != attr {doc.get(key)}")
    return diffs


async def _db_state(dsn: str, prefix: str) -> tuple[list[dict], list[dict]]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                                  schema="pg_catalog")
        rows = [dict(r) for r in await conn.fetch(f"SELECT * FROM {prefix}_files")]
        wal = [dict(r) for r in await conn.fetch(
            f"SELECT transaction_id, operation_type, file_id, status, reserved_bytes "
            f"FROM {prefix}_wal WHERE status = 'pending'")]
    finally:
        await conn.close()
    return rows, wal


def _scan_tree(root: Path) -> tuple[list[Path], set[Path], set[Path]]:
    """(temp files, data files, attr files) under ``root``."""
    temps, data, attrs = [], set(), set()
    if not root.exists():
        return temps, data, attrs
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if name.startswith(TEMP_PREFIX):
                temps.append(path)
            elif name.endswith(ATTR_SUFFIX):
                attrs.add(path)
            else:
                data.add(path)
    return temps, data, attrs


async def inspect_store(dsn: str, prefix: str, root: Path, *, hash_data: bool = True,
                        ignore: set[Path] | frozenset = frozenset()) -> Residue:
    """The invariant check (see the module docstring); ``ignore`` skips planted files."""
    rows, wal = await _db_state(dsn, prefix)
    temps, data, attrs = await asyncio.to_thread(_scan_tree, root)
    res = Residue()
    res.temp_files = [str(p.relative_to(root)) for p in temps if p not in ignore]
    res.pending_wal = [f"{w['operation_type']} {w['file_id']} ({w['reserved_bytes']} B)"
                       for w in wal]
    res.reserved_bytes = sum(w["reserved_bytes"] for w in wal)
    claimed: set[Path] = set()
    for row in rows:
        fid = str(row["file_id"])
        res.rows[fid] = row
        data_path = root / row["storage_path"] / row["storage_filename"]
        attr_path = data_path.with_name(data_path.name + ATTR_SUFFIX)
        claimed |= {data_path, attr_path}
        if not data_path.is_file() or data_path.is_symlink():
            res.rows_without_data.append(fid)
        else:
            size = data_path.stat().st_size
            if size != row["file_size"]:
                res.mismatches.append(f"{fid}: data is {size} bytes, row says "
                                      f"{row['file_size']}")
            elif hash_data and await asyncio.to_thread(_sha256_file, data_path) != \
                    row["checksum"]:
                res.mismatches.append(f"{fid}: data sha256 differs from the row")
        if not attr_path.is_file():
            res.rows_without_attr.append(fid)
            continue
        try:
            doc = json.loads(attr_path.read_bytes())
        except ValueError as exc:
            res.mismatches.append(f"{fid}: attr.json unreadable: {exc}")
            continue
        res.mismatches += [f"{fid}: {d}" for d in _compare_attr(row, doc)]
    res.orphan_data = sorted(str(p.relative_to(root)) for p in data - claimed - ignore)
    res.orphan_attrs = sorted(str(p.relative_to(root)) for p in attrs - claimed - ignore)
    return res


# --- raw HTTP ---------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def is_problem_json(self) -> bool:
        ctype = self.header("Content-Type") or ""
        if not ctype.startswith(("application/problem+json", "application/json")):
            return False
        try:
            doc = self.json()
        except ValueError:
            return False
        return isinstance(doc, dict) and isinstance(doc.get("detail"), str) and bool(
            doc["detail"])


async def read_response(reader: asyncio.StreamReader, *, head: bool = False,
                        timeout: float = 15) -> RawResponse:
    """Parse one HTTP/1.1 response (Content-Length, chunked, or until EOF)."""
    async with asyncio.timeout(timeout):
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("connection closed before a response")
            status_line = line.decode("latin-1").rstrip("\r\n")
            headers = []
            while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                key, _, value = h.decode("latin-1").partition(":")
                headers.append((key.strip(), value.strip()))
            _version, code, *reason = status_line.split(" ", 2)
            status = int(code)
            if status != 100:
                break
        resp = RawResponse(status, reason[0] if reason else "", headers, b"")
        if head or status in (204, 304):
            return resp
        length = resp.header("Content-Length")
        if (resp.header("Transfer-Encoding") or "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await reader.readline()
                    break
                body += await reader.readexactly(size)
                await reader.readline()
            resp.body = bytes(body)
        elif length is not None:
            resp.body = await reader.readexactly(int(length))
        else:
            resp.body = await reader.read()
        return resp


async def raw_http(port: int, request: bytes, *, timeout: float = 15,
                   head: bool = False) -> RawResponse:
    """Send ``request`` bytes as they are and read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the server may answer and close before reading everything
        return await read_response(reader, head=head, timeout=timeout)
    finally:
        writer.transport.abort()


def http_request(method: str, target: str, headers: dict[str, str] | list[tuple[str, str]],
                 body: bytes = b"") -> bytes:
    """The bytes of a request; ``Host`` is added, ``Content-Length`` when a body is given."""
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    names = {k.lower() for k, _ in items}
    if "host" not in names:
        items.insert(0, ("Host", "127.0.0.1"))
    if body and "content-length" not in names and "transfer-encoding" not in names:
        items.append(("Content-Length", str(len(body))))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in items)
    return head.encode("utf-8", "surrogateescape") + b"\r\n" + body


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def open_files(pid: int) -> int:
    """File descriptors of ``pid`` on files (not sockets, pipes or event fds)."""
    return sum(t.startswith("/") for t in _fd_targets(pid))


def tcp_connections(pid: int, port: int) -> int:
    """Client connections ``pid`` holds on its listening ``port`` (the database pool,
    on a Unix socket, does not count)."""
    inodes = {t[8:-1] for t in _fd_targets(pid) if t.startswith("socket:[")}
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == port and state != "0A" and inode in inodes:
                count += 1
    return count


async def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll a sync or async predicate until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
