"""Fault injection for the crash tests: die like a power cut at a named step.

``STORAGE_FAULT_POINT=<name>`` (read by :class:`~storage.config.Config` only) makes
the process SIGKILL itself when it reaches ``await faults.point(el, "<name>")``.
Unset in production, where each point costs one attribute comparison.

Points (see tests/domain/test_crash.py): ``upload.after_intent``, ``upload.after_body``,
``upload.after_files`` (data and attr document in place), ``upload.after_commit``,
``update.after_intent``, ``update.after_attr``, ``update.after_commit``,
``delete.after_intent``, ``delete.after_files``, ``delete.after_commit``,
``recovery.resolved``, ``commit.before_batch`` (a group commit about to be sent: earlier
batches are acknowledged, its members are not), ``commit.after_batch`` (committed, its
members not yet told), ``commit.retry_member`` (a refused batch retried one member
at a time, before each); resumable uploads (tests/web/test_tus_process.py): ``tus.after_write``
(a PATCH's bytes written, not yet synced), ``tus.after_commit`` (offset recorded, not yet
acknowledged), ``tus.after_publish`` (the finished file's data and attr in place, no row
yet), ``tus.after_finish`` (row in, upload not yet marked complete).
``<name>@<n>`` fires at the n-th time the point is reached.  Recovery (issue 22):
``recovery.claimed`` (an intent claimed), ``recovery.checked`` (an upload's files
examined), ``recovery.removed`` (an incomplete upload's files removed, not yet rolled back).

In-process tests can also *pause* at a point: :data:`HOOKS` maps a point's name to a
coroutine function awaited there (tests/domain/test_fence.py forces interleavings so).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)
_hits: collections.Counter[str] = collections.Counter()
HOOKS: dict[str, Callable[[], Awaitable[None]]] = {}  # tests only; empty in production


async def point(el, name: str) -> None:
    """SIGKILL this process if ``name`` is the configured fault point (``el`` is anything
    with the element's ``config``); first await the point's test hook, if any."""
    if HOOKS and (hook := HOOKS.get(name)) is not None:
        await hook()
    fault = el.config.fault_point
    if fault is None or not fault.startswith(name):
        return
    if fault != name:
        at, _, nth = fault.partition("@")
        if at != name or not nth.isdigit():
            return
        _hits[name] += 1
        if _hits[name] != int(nth):
            return
    log.critical("fault injection: killing the process at %s", fault)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
