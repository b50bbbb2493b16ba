"""CI smoke run of bench/locustfile.py: headless Locust, a few users for ~10 s, against a
real ``python run.py``; it must end with zero failures.  Locust runs as a subprocess (it
monkey-patches with gevent, so it is never imported into the test process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_locust_smoke_run_has_zero_failures(server_env, server_factory, token, tmp_path):
    server = server_factory(server_env)
    env = {**os.environ, "STORAGE_TOKEN": token(), "LOCUST_UPLOAD_SIZES": "4k,300k"}
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"),
         "--headless", "-u", "4", "-r", "4", "-t", "10s", "--host", server.url, "--json",
         "--only-summary", "--stop-timeout", "5"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = {s["name"]: s for s in json.loads(proc.stdout)}
    failures = {name: s["num_failures"] for name, s in stats.items() if s["num_failures"]}
    assert failures == {}, proc.stderr[-3000:]
    for name in ("upload multipart 4k", "upload multipart 300k", "upload raw PUT 4k",
                 "upload raw PUT 300k", "download 4k", "download 300k", "metadata", "search"):
        assert stats[name]["num_requests"] > 0, sorted(stats)
    assert sum(s["num_requests"] for s in stats.values()) > 50
