"""Big transfers through the real server process: memory stays flat, bytes stay exact.

The default run streams 256 MiB; ``pytest -m heavy`` streams 2 GiB as the issue asks.
"""

import asyncio
import hashlib
import os
import time
import uuid

import aiohttp
import pytest
from server_proc import rss_kib

MIB = 1024 * 1024
CHUNK = bytes(os.urandom(MIB))


async def _body(total: int, digest):
    sent = 0
    view = memoryview(CHUNK)
    while sent < total:
        piece = view[: min(MIB, total - sent)]
        digest.update(piece)
        sent += len(piece)
        yield piece


async def _sample(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_kib(pid))
        await asyncio.sleep(0.05)


async def _transfer(server, headers, size: int) -> dict:
    base = rss_kib(server.pid)
    peak, stop = [base], asyncio.Event()
    sampler = asyncio.create_task(_sample(server.pid, peak, stop))
    fid = str(uuid.uuid4())
    digest = hashlib.sha256()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.monotonic()
        async with session.put(f"{server.url}/api/v1/files/{fid}?filename=big.bin",
                               data=_body(size, digest),
                               headers={**headers, "Content-Length": str(size)}) as resp:
            body = await resp.json()
            assert resp.status == 201, body
        up_s = time.monotonic() - t0
        peak_up = peak[0]
        got = hashlib.sha256()
        t0 = time.monotonic()
        async with session.get(f"{server.url}/api/v1/files/{fid}/download",
                               headers=headers) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_chunked(MIB):
                got.update(chunk)
        down_s = time.monotonic() - t0
    stop.set()
    await sampler
    assert body["file_size"] == size and body["checksum"] == digest.hexdigest()
    assert got.hexdigest() == digest.hexdigest()
    return {"up_mib_s": size / MIB / up_s, "down_mib_s": size / MIB / down_s,
            "rss_growth_up_mib": (peak_up - base) / 1024,
            "rss_growth_mib": (peak[0] - base) / 1024, "peak_rss_mib": peak[0] / 1024}


async def _run(server_factory, server_env, auth, size):
    server = server_factory(server_env)
    stats = await _transfer(server, auth(), size)
    print(f"\n{size // MIB} MiB: upload {stats['up_mib_s']:.0f} MiB/s, download "
          f"{stats['down_mib_s']:.0f} MiB/s, server RSS peak {stats['peak_rss_mib']:.0f} MiB "
          f"(+{stats['rss_growth_mib']:.1f} MiB)")
    assert stats["rss_growth_up_mib"] < 30, stats
    assert stats["rss_growth_mib"] < 30, stats


async def test_256_mib_streams_in_flat_memory(server_factory, server_env, auth):
    await _run(server_factory, server_env, auth, 256 * MIB)


@pytest.mark.heavy
async def test_2_gib_streams_in_flat_memory(server_factory, server_env, auth):
    await _run(server_factory, server_env, auth, 2048 * MIB)
