"""Durability at the syscall level (issue 19): the real server under ``strace -f``.

A SIGKILL test cannot reveal a missing fsync (the page cache survives a killed
process), and mocking ``os.fsync`` proves only that a function was called.  Here the
real ``python run.py`` is traced (every thread: the event loop writes the responses,
executor threads do the file work) while clients upload, PATCH and DELETE
concurrently, and for each request the trace must show, before the first byte of its
response is written to its socket:

- upload: the temp data file fsynced, then linked to its name; the attr document's
  temp file fsynced, then renamed into place; then an fsync of the directory that
  starts after both and ends before the response;
- PATCH: the new attr document's temp file fsynced, renamed into place, then the
  directory fsync;
- DELETE: data and attr unlinked, then the directory fsync.

The directory fsync may come from any thread and may be shared by several requests
(one fsync covers every rename that completed before it started), so what is checked
is exactly that: *some* fsync of the directory starts after this request's last
link/rename/unlink completed and ends before this request's response write.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(STRACE is None, reason="strace is not installed (Debian "
                                                       "package strace)")
SYSCALLS = ("openat,fsync,fdatasync,link,linkat,rename,renameat,renameat2,unlink,unlinkat,"
            "write,writev,send,sendto,sendmsg")
SENDS = {"write", "writev", "send", "sendto", "sendmsg"}
SYNCS = {"fsync", "fdatasync"}
CONCURRENT = 4


# --- the trace ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    pid: int
    name: str
    args: str
    result: str
    start: float
    end: float

    @property
    def fd_path(self) -> str | None:
        """The path (or socket) strace -yy annotates the first argument's fd with."""
        m = re.match(r"\d+<(.*?)>(?=, |$)", self.args)  # a socket's has "->" in it
        return m[1] if m else None

    def at_dir(self, n: int) -> tuple[str, str] | None:
        """(directory, name) of the ``n``-th (dirfd, "name") pair of a *at() call."""
        pairs = re.findall(r'\d+<([^>]*)>, "((?:[^"\\]|\\.)*)"', self.args)
        return pairs[n] if len(pairs) > n else None


_LINE = re.compile(r"(\d+) +(\d+\.\d+) (.*)")
_DONE = re.compile(r"(\w+)\((.*)\) += (.*?) <(\d+\.\d+)>")
_UNFINISHED = re.compile(r"(\w+)\((.*) <unfinished \.\.\.>")
_RESUMED = re.compile(r"<\.\.\. (\w+) resumed>(.*)\) += (.*?) <(\d+\.\d+)>")


def parse(text: str) -> list[Call]:
    """Calls of an ``strace -f -ttt -T -yy`` log, interleaved threads joined up
    (``<unfinished ...>`` with its ``<... resumed>``), ordered by start."""
    calls, open_calls = [], {}
    for line in text.splitlines():
        m = _LINE.fullmatch(line)
        if m is None:
            continue
        pid, ts, rest = int(m[1]), float(m[2]), m[3]
        if done := _DONE.fullmatch(rest):
            calls.append(Call(pid, done[1], done[2], done[3], ts, ts + float(done[4])))
        elif unfinished := _UNFINISHED.fullmatch(rest):
            open_calls[pid] = (unfinished[1], unfinished[2], ts)
        elif (resumed := _RESUMED.fullmatch(rest)) and pid in open_calls:
            name, head, start = open_calls.pop(pid)
            calls.append(Call(pid, name, head + resumed[2], resumed[3], start,
                              max(ts, start + float(resumed[4]))))
    return sorted(calls, key=lambda c: c.start)


class Trace:
    def __init__(self, calls: list[Call]) -> None:
        self.calls = [c for c in calls if not c.result.startswith("-1")]

    def response_start(self, client_port: int) -> float:
        """When the server began writing the response to the client on ``client_port``."""
        ends = f":{client_port}]"
        writes = [c for c in self.calls if c.name in SENDS and (c.fd_path or "").endswith(ends)]
        assert writes, f"no response write to port {client_port} in the trace"
        return writes[0].start

    def one(self, names: set[str], pair: int, where: Path, since: float,
            before: float) -> Call:
        """The single successful call of ``names`` whose ``pair``-th path is ``where``,
        made after ``since`` (the previous request on the file was answered) and done
        before ``before`` (this request's response): none in there fails the check."""
        found = [c for c in self.calls if c.name in names and since <= c.start
                 and c.end <= before and c.at_dir(pair) == (str(where.parent), where.name)]
        assert len(found) == 1, (names, where, found)
        return found[0]

    def synced_before(self, path: Path, moment: float) -> None:
        """``path`` (a temp file) was fsynced, and that ended before ``moment``."""
        syncs = [c for c in self.calls if c.name in SYNCS and c.fd_path == str(path)]
        assert syncs and syncs[0].end <= moment, (path, syncs, moment)

    def dir_synced_between(self, directory: Path, after: float, before: float) -> None:
        """Some fsync of ``directory`` (any thread) starts after ``after`` and ends before
        ``before``: it covers every name change that completed by ``after``."""
        syncs = [c for c in self.calls if c.name in SYNCS and c.fd_path == str(directory)]
        assert any(after <= c.start and c.end <= before for c in syncs), (
            directory, after, before, syncs)


def check_upload(trace: Trace, final: Path, response: float) -> None:
    link = trace.one({"link", "linkat"}, 1, final, 0.0, response)
    trace.synced_before(final.parent / link.at_dir(0)[1], link.start)
    rename = check_attr_replaced(trace, final, 0.0, response)
    trace.dir_synced_between(final.parent, max(link.end, rename.end), response)


def check_attr_replaced(trace: Trace, final: Path, since: float, response: float) -> Call:
    attr = final.with_name(final.name + ".attr.json")
    rename = trace.one({"rename", "renameat", "renameat2"}, 1, attr, since, response)
    trace.synced_before(attr.parent / rename.at_dir(0)[1], rename.start)
    return rename


def check_patch(trace: Trace, final: Path, since: float, response: float) -> None:
    rename = check_attr_replaced(trace, final, since, response)
    trace.dir_synced_between(final.parent, rename.end, response)


def check_delete(trace: Trace, final: Path, since: float, response: float) -> None:
    unlinks = [trace.one({"unlink", "unlinkat"}, 0, path, since, response)
               for path in (final, final.with_name(final.name + ".attr.json"))]
    trace.dir_synced_between(final.parent, max(u.end for u in unlinks), response)


# --- the server and its clients ----------------------------------------------------------


class Strace:
    """``strace -f -p <pid>``: attached to a running server (all its threads, and any
    it starts), detached again with SIGINT, which leaves the server running."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out, self.err = out, out.with_suffix(".err")
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [STRACE, "-f", "-p", str(pid), "-ttt", "-T", "-yy", "-s", "48",
                 "-e", f"trace={SYSCALLS}", "-o", str(out)], stderr=err)
        deadline = time.monotonic() + 10
        while "attached" not in self.err.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.skip(f"strace cannot attach here: {self.err.read_text().strip()}")
            time.sleep(0.05)

    def detach(self) -> Trace:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        return Trace(parse(self.out.read_text(errors="replace")))


def _request(port: int, headers: dict, method: str, path: str,
             body: bytes | None = None) -> tuple[int, int, dict | None]:
    """(client port, status, JSON body) of one request on its own connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.connect()
        client_port = conn.sock.getsockname()[1]
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return client_port, resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def _concurrently(calls) -> list:
    with ThreadPoolExecutor(CONCURRENT) as pool:
        return list(pool.map(lambda c: _request(*c), calls))


def test_fsyncs_and_renames_precede_every_response(server_factory, server_env, auth,
                                                   tmp_path):
    server = server_factory(server_env)
    root = Path(server_env["STORAGE_LOCAL_BASE_PATH"]).resolve()
    headers = auth()
    ids = [str(uuid.uuid4()) for _ in range(CONCURRENT)]
    strace = Strace(server.pid, tmp_path / "strace.log")
    try:
        uploads = _concurrently([(server.port, headers, "PUT", f"/api/v1/files/{i}?filename=d.bin",
                                  b"%d" % n * 50_000) for n, i in enumerate(ids)])
        finals = []
        for file_id in ids:
            _port, status, meta = _request(server.port, headers, "GET", f"/api/v1/files/{file_id}")
            assert status == 200
            finals.append(root / meta["storage_path"] / meta["storage_filename"])
        patch_headers = {**headers, "Content-Type": "application/json"}
        patches = _concurrently([(server.port, patch_headers, "PATCH", f"/api/v1/files/{i}",
                                  json.dumps({"description": "patched"}).encode())
                                 for i in ids])
        deletes = _concurrently([(server.port, headers, "DELETE", f"/api/v1/files/{i}")
                                 for i in ids])
    finally:
        trace = strace.detach()
    assert [s for _p, s, _b in uploads] == [201] * CONCURRENT
    assert [s for _p, s, _b in patches] == [200] * CONCURRENT
    assert [s for _p, s, _b in deletes] == [204] * CONCURRENT
    for final, (up, patch, delete) in zip(finals, zip(uploads, patches, deletes,
                                                      strict=True), strict=True):
        answered = [trace.response_start(port) for port, _s, _b in (up, patch, delete)]
        check_upload(trace, final, answered[0])
        check_patch(trace, final, answered[0], answered[1])
        check_delete(trace, final, answered[1], answered[2])


# --- the checker itself ------------------------------------------------------------------

_GOOD = "\n".join([
    '7 100.000000 openat(5</s/d>, ".tmp_a", O_WRONLY|O_CREAT, 0644) = 9</s/d/.tmp_a> <0.00001>',
    "7 100.000100 fsync(9</s/d/.tmp_a>) = 0 <0.000100>",
    "7 100.000300 fsync(10</s/d/.tmp_attr_b.json> <unfinished ...>",
    '8 100.000350 sendto(11<TCP:[127.0.0.1:8000->127.0.0.1:5000]>, "HTTP/1.1 200 OK", 15, 0, '
    "NULL, 0) = 15 <0.000010>",
    "7 100.000400 <... fsync resumed>) = 0 <0.000100>",
    '7 100.000500 linkat(5</s/d>, ".tmp_a", 5</s/d>, "f.bin", 0) = 0 <0.000010>',
    '7 100.000600 renameat(5</s/d>, ".tmp_attr_b.json", 5</s/d>, "f.bin.attr.json") = 0 '
    "<0.000010>",
    "9 100.000700 fsync(12</s/d>) = 0 <0.000100>",
    '8 100.000900 sendto(13<TCP:[127.0.0.1:8000->127.0.0.1:5001]>, "HTTP/1.1 201 Created", 20, '
    "0, NULL, 0) = 20 <0.000010>",
])


def test_the_checker_sees_what_it_must():
    """The parser joins interleaved calls, and each missing or late step fails the check."""
    calls = parse(_GOOD)
    assert [c.name for c in calls][:3] == ["openat", "fsync", "fsync"]
    assert calls[2].end == pytest.approx(100.0004) and calls[2].fd_path == "/s/d/.tmp_attr_b.json"
    final = Path("/s/d/f.bin")
    trace = Trace(calls)
    response = trace.response_start(5001)
    check_upload(trace, final, response)
    with pytest.raises(AssertionError):  # the response to port 5000 came before all of it
        check_upload(trace, final, trace.response_start(5000))
    broken = {
        "no data fsync": _GOOD.replace("fsync(9</s/d/.tmp_a>)", "write(9</s/d/.tmp_a>)"),
        "no directory fsync": _GOOD.replace("fsync(12</s/d>)", "write(12</s/d>)"),
        "directory fsync before the rename": _GOOD.replace("9 100.000700", "9 100.000550"),
        "link before the data fsync": _GOOD.replace(
            "fsync(9</s/d/.tmp_a>) = 0 <0.000100>", "fsync(9</s/d/.tmp_a>) = 0 <0.000500>"),
    }
    for why, text in broken.items():
        with pytest.raises(AssertionError):
            check_upload(Trace(parse(text)), final, response)
            pytest.fail(f"not caught: {why}")
