"""Slow and hostile clients against the real process (S8-S10, R18, R19).

- slowloris: many connections sending their request headers a byte at a time are
  closed at ``SERVER_KEEPALIVE_TIMEOUT`` while health, upload and download stay fast;
- a body trickled slowly (1 byte/s, and the same pace scaled to the short test
  timeout) is ended by ``UPLOAD_READ_TIMEOUT`` with a 408, and its capacity
  reservation and temp file are gone; raw PUT and multipart alike;
- a client that announces a body and then stops sending, or closes midway, leaves nothing;
- 1000 idle connections: the server stays responsive and closes them at the timeout,
  and its fd count comes back;
- a client that stops reading a large download (plain and multi-range): the server's
  RSS stays flat and it keeps serving others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import socket
import time
import uuid
from pathlib import Path

import aiohttp
from relharness import (
    MIB,
    PROFILES,
    RESULTS,
    Timer,
    http_request,
    inspect_store,
    open_files,
    read_response,
    tcp_connections,
    wait_until,
)
from server_proc import rss_kib

KEEPALIVE = 2.0
READ_TIMEOUT = 1.0


def _env(server_env):
    return {**server_env, "SERVER_KEEPALIVE_TIMEOUT": str(KEEPALIVE),
            "UPLOAD_READ_TIMEOUT": str(READ_TIMEOUT)}


async def _latency(url: str, headers, n: int = 10) -> float:
    """Worst latency of ``n`` liveness probes plus one upload+download round trip."""
    worst = 0.0
    async with aiohttp.ClientSession(headers=headers) as session:
        for _ in range(n):
            t0 = time.monotonic()
            async with session.get(f"{url}/health/live") as resp:
                assert resp.status == 200
            worst = max(worst, time.monotonic() - t0)
            await asyncio.sleep(0.05)
        data = os.urandom(200_000)
        fid = str(uuid.uuid4())
        t0 = time.monotonic()
        async with session.put(f"{url}/api/v1/files/{fid}", data=io.BytesIO(data)) as resp:
            assert resp.status == 201, await resp.text()
        async with session.get(f"{url}/api/v1/files/{fid}/download") as resp:
            assert await resp.read() == data
        worst = max(worst, time.monotonic() - t0)
    return worst


async def _closed_by_server(reader: asyncio.StreamReader, timeout: float) -> float | None:
    """Seconds until the server closes (EOF or reset), None if it did not within timeout."""
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic() - t0


@PROFILES
async def test_slowloris_headers(profile, server_factory, server_env, auth):
    row = RESULTS.row(f"slowloris headers [{profile}]")
    server = server_factory(_env(server_env))
    count = 100 if profile.name == "slim" else 500
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with Timer(row):
        conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(count)]
        stop = asyncio.Event()

        async def trickle(writer):
            with contextlib.suppress(ConnectionError):
                for byte in head:
                    if stop.is_set() or writer.is_closing():
                        return
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.3)

        t0 = time.monotonic()
        tricklers = [asyncio.create_task(trickle(w)) for _r, w in conns]
        waiters = [asyncio.create_task(_closed_by_server(r, KEEPALIVE + 8)) for r, _w in conns]
        worst = await _latency(server.url, auth())
        closed_after = await asyncio.gather(*waiters)
        stop.set()
        await asyncio.gather(*tricklers)
        for _r, w in conns:
            w.transport.abort()
        row.rounds += 1
        row.acked += count
        still_open = sum(c is None for c in closed_after)
        latest = max((c for c in closed_after if c is not None), default=0)
        row.note(f"{count} slowloris connections closed after at most "
                 f"{time.monotonic() - t0 if still_open else latest:.1f}s "
                 f"(keepalive {KEEPALIVE}s); worst probe latency {worst * 1000:.0f} ms")
    assert worst < 1.0, f"health/upload took {worst:.2f}s under slowloris"
    assert still_open == 0, f"{still_open} of {count} slowloris connections never closed"
    assert latest < KEEPALIVE + 6


async def _reserved(env) -> tuple[int, int]:
    res = await inspect_store(env["DATABASE_URL"], env["DB_TABLE_PREFIX"],
                              Path(env["STORAGE_LOCAL_BASE_PATH"]))
    return res.reserved_bytes, len(res.temp_files)


async def _trickle(port: int, token: str, kind: str, pace: float, length: int = 200_000):
    """Send headers and then one body byte every ``pace`` seconds; return (response,
    seconds until the server ended it).  The announced length is above the 64 KiB a
    multipart body gets for its envelope, so capacity is reserved up front."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    fid = uuid.uuid4()
    if kind == "put":
        head = http_request("PUT", f"/api/v1/files/{fid}?filename=slow.bin",
                            {"Authorization": token, "Content-Length": str(length)})
        body = b"x" * length
    else:
        boundary = "slowboundary0123456789"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="slow.bin"\r\n\r\n').encode() + b"x" * length + \
            f"\r\n--{boundary}--\r\n".encode()
        head = http_request("POST", "/api/v1/files/upload", {
            "Authorization": token, "Content-Length": str(len(body)),
            "Content-Type": f"multipart/form-data; boundary={boundary}"})
    writer.write(head + body[:120])
    await writer.drain()
    t0 = time.monotonic()

    async def drip():
        with contextlib.suppress(ConnectionError):
            for i in range(120, len(body)):
                writer.write(body[i:i + 1])
                await writer.drain()
                await asyncio.sleep(pace)

    dripper = asyncio.create_task(drip())
    try:
        resp = await read_response(reader, timeout=30)
    except (ConnectionError, TimeoutError) as exc:
        resp = exc
    took = time.monotonic() - t0
    dripper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await dripper
    writer.transport.abort()
    return resp, took


@PROFILES
async def test_trickled_body_is_ended_and_frees_its_reservation(profile, server_factory,
                                                                 server_env, auth):
    row = RESULTS.row(f"trickled upload body [{profile}]")
    env = _env(server_env)
    server = server_factory(env)
    token = auth()["Authorization"]
    # 1 byte/s literally, and "1 byte/s at the default 60 s timeout" scaled to the 1 s
    # used here (60 bytes/s): a pure per-read idle timeout never fires on either.
    paces = [1.0, READ_TIMEOUT / 60]
    failures = []
    with Timer(row):
        for kind in ("put", "multipart"):
            for pace in paces * (1 if profile.name == "slim" else 3):
                probe = asyncio.create_task(_trickle(server.port, token, kind, pace))
                held = 0
                while not probe.done():  # the reservation exists while it trickles
                    held = max(held, (await _reserved(env))[0])
                    await asyncio.sleep(0.05)
                resp, took = await probe
                row.rounds += 1
                if isinstance(resp, Exception):
                    failures.append(f"{kind} at {pace:.3f}s/byte: no answer after {took:.1f}s "
                                    f"({resp!r})")
                    continue
                row.errors_500 += resp.status == 500
                if resp.status != 408 or not resp.is_problem_json:
                    failures.append(f"{kind} at {pace:.3f}s/byte: {resp.status} "
                                    f"{resp.body[:200]!r} after {took:.1f}s")
                if took > 3 * READ_TIMEOUT + 2:
                    failures.append(f"{kind} at {pace:.3f}s/byte: ended only after {took:.1f}s")
                if held <= 0:
                    failures.append(f"{kind}: no capacity was reserved while it trickled")
                ok = await wait_until(lambda: _is_clean(env), timeout=5)
                if not ok:
                    reserved, temps = await _reserved(env)
                    row.residue += 1
                    failures.append(f"{kind}: after the timeout {reserved} bytes still "
                                    f"reserved, {temps} temp files")
        row.note(f"UPLOAD_READ_TIMEOUT={READ_TIMEOUT}s; paces {paces} s/byte")
    assert not failures, "\n".join(failures)


async def _is_clean(env) -> bool:
    reserved, temps = await _reserved(env)
    return reserved == 0 and temps == 0


@PROFILES
async def test_stalled_and_abandoned_bodies_leave_nothing(profile, server_factory, server_env,
                                                          auth):
    """S8/S9: announced 1 MiB, sent 1000 bytes then stalled or closed: nothing stays."""
    row = RESULTS.row(f"stalled/abandoned upload body [{profile}]")
    env = _env(server_env)
    server = server_factory(env)
    token = auth()["Authorization"]
    base_files = open_files(server.pid)
    failures = []
    repeats = 20 if profile.name == "slim" else 200
    part = b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
    variants = [  # (method, target, multipart?, the part of the body that is sent)
        ("PUT", "/api/v1/files/{fid}?filename=a.bin", False, b"y" * 1000),
        ("POST", "/api/v1/files/upload", True, part + b"y" * 1000),
        ("POST", "/api/v1/files/upload", True, b"--zz\r\nContent-Disposition: form-da"),
        ("POST", "/api/v1/files/upload", True,
         b'--zz\r\nContent-Disposition: form-data; name="description"\r\n\r\nabc'),
    ]
    with Timer(row):
        for i in range(repeats):
            method, target, multipart, body = variants[i % len(variants)]
            stall = (i // len(variants)) % 2 == 0  # else: vanish right away
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            hdrs = {"Authorization": token, "Content-Length": str(MIB)}
            if multipart:
                hdrs["Content-Type"] = "multipart/form-data; boundary=zz"
            writer.write(http_request(method, target.format(fid=uuid.uuid4()), hdrs) + body)
            await writer.drain()
            if stall:  # the read timeout answers 408
                t0 = time.monotonic()
                try:
                    resp = await read_response(reader, timeout=10)
                except (TimeoutError, ConnectionError) as exc:
                    failures.append(f"stalled {method} {body[:40]!r}: no answer ({exc!r})")
                else:
                    row.errors_500 += resp.status == 500
                    if resp.status != 408 or time.monotonic() - t0 > READ_TIMEOUT + 3:
                        failures.append(f"stalled {method} {body[:40]!r}: {resp.status} "
                                        f"after {time.monotonic() - t0:.1f}s")
            writer.transport.abort()
            row.rounds += 1
        ok = await wait_until(lambda: _is_clean(env), timeout=10)
        res = await inspect_store(env["DATABASE_URL"], env["DB_TABLE_PREFIX"],
                                  Path(env["STORAGE_LOCAL_BASE_PATH"]))
        row.residue += res.count
        fds_ok = await wait_until(lambda: tcp_connections(server.pid, server.port) == 0
                                  and open_files(server.pid) <= base_files, timeout=10)
    assert ok and not res.count, res.describe()
    assert fds_ok, (f"connections left {tcp_connections(server.pid, server.port)}, open "
                    f"files {base_files} -> {open_files(server.pid)}")
    assert not failures, "\n".join(failures)


@PROFILES
async def test_a_thousand_idle_connections(profile, server_factory, server_env, auth):
    """A burst of 1000 connections that never send a byte: all accepted at once (the
    listen backlog holds the burst, no SYN retransmits), the server stays fast while
    they are open, closes them at the keepalive timeout, and its fds come back."""
    row = RESULTS.row(f"idle connections [{profile}]")
    keepalive = 5.0
    server = server_factory({**_env(server_env), "SERVER_KEEPALIVE_TIMEOUT": str(keepalive)})
    count = profile.idle_connections
    with Timer(row):
        t0 = time.monotonic()
        socks = []
        for _ in range(count):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", server.port))
            socks.append(s)
        probe = asyncio.create_task(_latency(server.url, auth(), n=5))
        opened = await wait_until(lambda: tcp_connections(server.pid, server.port) >= count,
                                  timeout=keepalive - 1, interval=0.02)
        accepted_in = time.monotonic() - t0
        peak = tcp_connections(server.pid, server.port)
        worst = await probe
        closed = await wait_until(lambda: tcp_connections(server.pid, server.port) == 0,
                                  timeout=keepalive + 10, interval=0.2)
        closed_in = time.monotonic() - t0
        left = tcp_connections(server.pid, server.port)
        for s in socks:
            s.close()
        row.rounds += 1
        row.acked += count
        row.note(f"{count} idle connections accepted in {accepted_in:.2f}s (peak {peak} open), "
                 f"worst probe {worst * 1000:.0f} ms, all closed {closed_in:.1f}s after the "
                 f"burst (keepalive {keepalive}s)")
    assert opened, f"only {peak} of {count} connections were open at once"
    assert worst < 1.0, f"probe took {worst:.2f}s with {count} idle connections"
    assert closed, f"{left} idle connections not closed"


@PROFILES
async def test_reader_that_stops_reading_a_large_download(profile, server_factory, server_env,
                                                          auth):
    row = RESULTS.row(f"stalled download reader [{profile}]")
    server = server_factory(_env(server_env))
    headers = auth()
    size = (64 if profile.name == "slim" else 256) * MIB
    data = os.urandom(MIB)
    fid = str(uuid.uuid4())

    async def body():
        for _ in range(size // MIB):
            yield data

    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.put(f"{server.url}/api/v1/files/{fid}", data=body(),
                               headers={"Content-Length": str(size)}) as resp:
            assert resp.status == 201, await resp.text()
    token = headers["Authorization"]
    failures = []
    half = size // 2
    variants = {
        "plain": {},
        "multi-range": {"Range": f"bytes=0-{half - 1},{half + 10}-"},
    }
    with Timer(row):
        for name, extra in variants.items():
            base_rss = rss_kib(server.pid)
            base_files = open_files(server.pid)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            sock.connect(("127.0.0.1", server.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(http_request("GET", f"/api/v1/files/{fid}/download",
                                      {"Authorization": token, **extra}))
            await writer.drain()
            got = await reader.read(64 * 1024)  # headers and a little body, then nothing
            peak = base_rss
            t_end = time.monotonic() + (3 if profile.name == "slim" else 10)
            while time.monotonic() < t_end:
                peak = max(peak, rss_kib(server.pid))
                await asyncio.sleep(0.1)
            worst = await _latency(server.url, headers, n=3)
            writer.transport.abort()
            fds_back = await wait_until(
                lambda b=base_files: open_files(server.pid) <= b
                and tcp_connections(server.pid, server.port) == 0, timeout=10)
            growth = (peak - base_rss) / 1024
            row.rounds += 1
            row.note(f"{name}: {size // MIB} MiB download stalled after {len(got)} bytes: "
                     f"server RSS +{growth:.1f} MiB, probe {worst * 1000:.0f} ms")
            if not got.startswith(b"HTTP/1.1 20"):
                failures.append(f"{name}: {got[:100]!r}")
            if growth > 16:
                failures.append(f"{name}: server RSS grew {growth:.1f} MiB while stalled")
            if worst > 1.0:
                failures.append(f"{name}: other requests took {worst:.2f}s")
            if not fds_back:
                failures.append(f"{name}: open files {base_files} -> "
                                f"{open_files(server.pid)}, connections "
                                f"{tcp_connections(server.pid, server.port)}")
        # the file itself is intact
        digest = hashlib.sha256()
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(f"{server.url}/api/v1/files/{fid}/download") as resp:
                async for chunk in resp.content.iter_chunked(MIB):
                    digest.update(chunk)
        expected = hashlib.sha256(data * (size // MIB)).hexdigest()
        if digest.hexdigest() != expected:
            row.lost += 1
            failures.append("the stalled file does not download intact afterwards")
    assert not failures, "\n".join(failures)
