"""Fixtures of the reliability suite, and the results table printed after the session.

Every scenario runs in two sizes (``relharness.PROFILES``): ``slim`` (default run) and
``full`` (marked ``reliability``: ``pytest tests/reliability -m reliability``).  Each test adds
its counts to :data:`relharness.RESULTS` while it runs, so the table is printed (and,
with ``RELIABILITY_REPORT=<path>``, written as JSON) even when a test fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from relharness import RESULTS


@pytest.fixture
def results():
    return RESULTS


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS.rows:
        return
    terminalreporter.write_sep("=", "reliability results (issue 11)")
    for line in RESULTS.table():
        terminalreporter.write_line(line)
    target = os.environ.get("RELIABILITY_REPORT")
    if target:
        Path(target).write_text(json.dumps(RESULTS.as_json(), indent=2))
