"""Serving one process with a graceful SIGTERM (used by ``storage/cli/server.py``).

``web.run_app`` closes every connection *before* the shutdown wait, and aiohttp
then drops the bytes still arriving on it, so an upload in flight could never
finish during ``shutdown_timeout``.  Here the sequence is:

1. SIGTERM/SIGINT: stop listening; readiness turns 503; requests that arrive on
   kept-alive connections get 503 + ``Connection: close``.
2. Wait up to ``SHUTDOWN_TIMEOUT`` for the requests in flight (uploads keep
   reading their bodies meanwhile).
3. ``runner.cleanup()``: requests still running are cancelled (an upload removes
   its temp file and rolls back its WAL row), then the cleanup contexts close the
   pool, the storage client and the embedded PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from ..config import Config
from ..domain.element import runtime_key
from ..web.protocol import Runner

log = logging.getLogger("storage")
CANCEL_GRACE = 2.0  # for cancelled handlers to clean up after the drain timed out
# aiohttp's default listen backlog is 128: a burst of connections beyond it is dropped
# and retried by the clients' TCP after 1 s, 3 s, ... (the kernel caps it at somaxconn)
LISTEN_BACKLOG = 2048


async def drain(app: web.Application, timeout: float) -> int:
    """Wait until no request is in flight or ``timeout`` passed; return how many remain."""
    runtime = app.get(runtime_key)
    if runtime is None:
        return 0
    try:
        await asyncio.wait_for(runtime.idle.wait(), timeout)
    except TimeoutError:
        pass
    return runtime.active_requests


async def _serve(app: web.Application, config: Config, reuse_port: bool) -> None:
    loop = asyncio.get_running_loop()
    # Writes, fsyncs and renames wait on the disk, not the CPU: the default pool
    # (cores + 4 threads) queued fsyncs behind each other under concurrent uploads.
    loop.set_default_executor(ThreadPoolExecutor(config.io_threads, thread_name_prefix="io"))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before startup: an early SIGTERM is kept
        loop.add_signal_handler(sig, stop.set)
    runner = Runner(  # aiohttp's own HTTP errors as problem+json too
        app, handle_signals=False, access_log=None, handler_cancellation=False,
        shutdown_timeout=CANCEL_GRACE,
        keepalive_timeout=getattr(config, "keepalive_timeout", 75.0),
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.server_host, config.server_port,
                           reuse_port=reuse_port or None, backlog=LISTEN_BACKLOG)
        await site.start()
        log.info("serving on http://%s:%d", config.server_host, config.server_port)
        await stop.wait()
        await site.stop()
        runtime = app.get(runtime_key)
        if runtime is not None:
            runtime.stopping = True
        busy = runtime.active_requests if runtime is not None else 0
        log.info("stopping: no longer listening; waiting up to %gs for %d request(s)",
                 config.shutdown_timeout, busy)
        left = await drain(app, config.shutdown_timeout)
        if left:
            log.warning("shutdown timeout: cancelling %d request(s) still running", left)
    finally:
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped")


def serve(app: web.Application, config: Config, *, reuse_port: bool = False) -> None:
    """Run ``app`` until SIGTERM/SIGINT, then shut down as described above."""
    # The default asyncio loop, measured against uvloop (issue 10, 4 KiB and 1 MiB, pinned):
    # uploads equal within noise; downloads 925 vs 1,500-1,620 MiB/s at 1 MiB and
    # 1,650-2,090 vs 2,430-2,500 req/s at 4 KiB, since aiohttp's FileResponse cannot use
    # sendfile on uvloop.
    asyncio.run(_serve(app, config, reuse_port))
