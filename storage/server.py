"""Serving: one process, or N worker processes sharing the port with SO_REUSEPORT."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys

from . import lifecycle
from .app import make_app
from .config import Config

log = logging.getLogger("storage")


def _serve(config: Config, reuse_port: bool) -> None:
    # not web.run_app: it drops the body bytes of uploads in flight at SIGTERM
    lifecycle.serve(make_app(config), config, reuse_port=reuse_port)


def _worker(config: Config) -> None:  # pragma: no cover - runs in child processes
    from .logs import setup_logging

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
    procs = [ctx.Process(target=_worker, args=(config,), daemon=False) for _ in range(workers)]
    for proc in procs:
        proc.start()

    def forward(_signum, _frame):
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # each worker drains its requests on SIGTERM

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
    return max((p.exitcode or 0) for p in procs)
