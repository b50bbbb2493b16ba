"""A slow client cannot lock everyone out (issue 19): ``UPLOAD_MIN_RATE``.

A client that declares a body as large as the free capacity and then keeps every
``UPLOAD_READ_TIMEOUT`` window's 64 KiB coming, but no more, passes the per-window
check while holding the whole reservation.  The average-rate floor ends it with a 408
once the first window has passed, and releases its reservation and partial data, so
another client's small upload succeeds within seconds.  (The per-window check itself
is exercised against the real process in tests/reliability/test_rel_slow_clients.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

import pytest
from helpers import config_of, stored_objects, wal_outcomes

from storage.config import Config
from storage.errors import PROBLEM_JSON

MIB = 1024 * 1024
CAPACITY = 4 * MIB
READ_TIMEOUT = 1.0
MIN_RATE = 256 * 1024
PIECE, PACE = 64 * 1024, 0.4  # 160 KiB/s: a full window's worth, well below the floor
BOUNDARY = "trickle0boundary"


def _request(kind: str, token: str) -> tuple[bytes, bytes]:
    """(head, body) of an upload whose body is exactly CAPACITY bytes long."""
    if kind == "put":
        target, ctype, body = f"/api/v1/files/{uuid.uuid4()}?filename=slow.bin", None, b""
    else:
        target, ctype = "/api/v1/files/upload", f"multipart/form-data; boundary={BOUNDARY}"
        body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="slow.bin"\r\n\r\n').encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode() if kind == "multipart" else b""
    body += b"s" * (CAPACITY - len(body) - len(tail)) + tail
    lines = [f"{'PUT' if kind == 'put' else 'POST'} {target} HTTP/1.1", "Host: test",
             f"Authorization: {token}", f"Content-Length: {len(body)}"]
    if ctype:
        lines.append(f"Content-Type: {ctype}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), body


async def _trickle(port: int, token: str, kind: str) -> tuple[int, str, dict]:
    """Send the body PIECE bytes every PACE seconds until the server answers; return
    (status, content type, JSON body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head, body = _request(kind, token)

    async def drip() -> None:
        writer.write(head)
        with contextlib.suppress(ConnectionError):
            for at in range(0, len(body), PIECE):
                writer.write(body[at:at + PIECE])
                await writer.drain()
                await asyncio.sleep(PACE)

    dripping = asyncio.create_task(drip())
    try:
        async with asyncio.timeout(60):
            status_line, *header_lines = (await reader.readuntil(b"\r\n\r\n")).decode(
                "latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in header_lines if ": " in line)
            data = await reader.readexactly(int(headers["Content-Length"]))
    finally:
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dripping
        writer.transport.abort()
    return int(status_line.split()[1]), headers["Content-Type"], json.loads(data)


@pytest.mark.parametrize("kind", ["put", "multipart"])
async def test_a_trickling_upload_cannot_hold_the_capacity(app_factory, auth, pg_dsn, kind):
    client = await app_factory(storage_max_size=CAPACITY, upload_read_timeout=READ_TIMEOUT,
                               upload_min_rate=MIN_RATE)
    config, headers = config_of(client), auth()
    started = time.monotonic()
    slow = asyncio.create_task(_trickle(client.server.port, headers["Authorization"], kind))
    while ("pending", CAPACITY) not in await wal_outcomes(pg_dsn, config):
        assert not slow.done() and time.monotonic() - started < 10, "never reserved"
        await asyncio.sleep(0.02)
    refused = 0
    while True:  # the trickler holds every byte of capacity: small uploads get 507 ...
        resp = await client.put(f"/api/v1/files/{uuid.uuid4()}?filename=small.txt",
                                data=b"small", headers=headers)
        if resp.status == 201:
            break
        assert resp.status == 507, await resp.text()
        refused += 1
        # ... for seconds, not for the 25 s the trickler would need to finish
        assert time.monotonic() - started < 10, "the trickler still holds the capacity"
        await asyncio.sleep(0.05)
    assert refused, "the trickler never held the capacity (the test proves nothing)"
    status, ctype, body = await slow
    assert (status, ctype.split(";")[0]) == (408, PROBLEM_JSON), body
    assert f"less than the {MIN_RATE} bytes per second required" in body["detail"]
    assert len(await stored_objects(config)) == 2  # the small file and its attr: no temp
    assert sorted(await wal_outcomes(pg_dsn, config)) == [
        ("committed", 0), ("rolled_back", 0)]


def test_upload_min_rate_is_64_kib_per_second_and_0_disables_it():
    assert Config.from_env({}).upload_min_rate == 64 * 1024
    assert Config.from_env({"UPLOAD_MIN_RATE": "0"}).upload_min_rate == 0
