"""Fault injection for the crash tests: die like a power cut at a named step.

``STORAGE_FAULT_POINT=<name>`` (read by :class:`~storage.config.Config` only) makes
the process SIGKILL itself when it reaches ``await faults.point(el, "<name>")``.
Unset in production, where each point costs one attribute comparison.

Points (see tests/test_crash.py): ``upload.after_intent``, ``upload.after_body``,
``upload.after_files`` (data and attr document in place), ``upload.after_commit``,
``update.after_intent``, ``update.after_attr``, ``update.after_commit``,
``delete.after_intent``, ``delete.after_files``, ``delete.after_commit``,
``recovery.resolved``; resumable uploads (tests/test_tus_process.py): ``tus.after_write``
(a PATCH's bytes written, not yet synced), ``tus.after_commit`` (offset recorded, not yet
acknowledged), ``tus.after_publish`` (the finished file's data and attr in place, no row
yet), ``tus.after_finish`` (row in, upload not yet marked complete).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger(__name__)


async def point(el, name: str) -> None:
    """SIGKILL this process if ``name`` is the configured fault point."""
    if el.config.fault_point == name:
        log.critical("fault injection: killing the process at %s", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
