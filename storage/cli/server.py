"""Serving: one process, or N worker processes sharing the port with SO_REUSEPORT.

With N workers the parent only supervises: SIGTERM/SIGINT are forwarded, a worker
that dies takes the others down with it (exit code non-zero, so the service manager
restarts the element whole instead of leaving it silently short of workers), and the
workers die with the parent even when it is SIGKILLed (no orphans left holding the port).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from multiprocessing.connection import wait

from ..config import Config
from ..web.app import make_app
from . import lifecycle

log = logging.getLogger("storage")


def _serve(config: Config, reuse_port: bool) -> None:
    # not web.run_app: it drops the body bytes of uploads in flight at SIGTERM
    lifecycle.serve(make_app(config), config, reuse_port=reuse_port)


def _die_with_parent(parent: int) -> None:  # pragma: no cover - runs in child processes
    """Linux: get SIGTERM when the supervisor dies, however it dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(config: Config, parent: int) -> None:  # pragma: no cover - runs in children
    from ..observability.logs import setup_logging

    _die_with_parent(parent)
    setup_logging(config)
    try:
        _serve(config, reuse_port=True)
    except Exception as exc:
        print(f"worker failed to start: {exc}", file=sys.stderr)
        sys.exit(1)


def run(config: Config, workers: int = 1) -> int:
    """Serve until SIGINT/SIGTERM; return the process exit code."""
    if workers <= 1:
        _serve(config, reuse_port=False)
        return 0
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(config, os.getpid()), daemon=False)
             for _ in range(workers)]
    stopping = False

    def forward(_signum=None, _frame=None):
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # each worker drains its requests on SIGTERM

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.start()
    if stopping:  # a signal came while the workers were being started
        forward()
    code, running = 0, list(procs)
    while running:
        ended = wait([p.sentinel for p in running])
        for proc in [p for p in running if p.sentinel in ended]:
            proc.join()
            running.remove(proc)
            if not stopping:
                log.error("worker %d exited unexpectedly (exit code %s); stopping the element",
                          proc.pid, proc.exitcode)
                code = proc.exitcode if proc.exitcode and proc.exitcode > 0 else 1
                forward()
            elif proc.exitcode and proc.exitcode > 0:
                code = max(code, proc.exitcode)
    return code
