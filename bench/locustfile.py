"""Locust load test of the storage element: uploads (multipart and raw PUT) of configurable
sizes, downloads, metadata and search, mixed in one user class.  See bench/README.md.

    TOKEN=$(python run.py token --role admin --type service_account --name locust)
    STORAGE_TOKEN=$TOKEN locust -f bench/locustfile.py --host http://127.0.0.1:8000

Settings (environment):

- ``STORAGE_TOKEN``: the bearer token; without it, ``python run.py token --role admin
  --type service_account --name locust`` is run once (works on the embedded default,
  where ``python run.py`` signs with its development key);
- ``LOCUST_UPLOAD_SIZES``: comma list of upload sizes, ``k``/``m``/``g`` = KiB/MiB/GiB
  (default ``4k,1m``); each size's body is made once per process and kept in memory;
- ``LOCUST_KEEP_IDS``: how many uploaded file ids each user keeps for its downloads and
  metadata reads (default 50);
- ``LOCUST_WAIT_MAX``: each user waits a random 0 to this many seconds between its
  requests (default 0.2; 0 for a closed loop as fast as the server answers).

Every upload's ``checksum`` and every download's length and sha256 are checked; a
mismatch is a failure in Locust's statistics.  Uploaded files are not deleted.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

from locust import HttpUser, between, events, task

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
WORDS = ("report", "invoice", "scan", "draft", "archive", "photo", "contract", "minutes")


def parse_size(text: str) -> int:
    text = text.strip().lower().removesuffix("ib").removesuffix("b") or "0"
    unit = text[-1] if text[-1] in UNITS else ""
    return int(float(text[: len(text) - len(unit)]) * UNITS[unit])


def size_label(size: int) -> str:
    for unit, factor in (("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


class Body:
    """One random body per size, made once, with its sha256."""

    def __init__(self, size: int) -> None:
        self.size, self.label = size, size_label(size)
        self.data = os.urandom(size)
        self.sha256 = hashlib.sha256(self.data).hexdigest()


def bearer_token() -> str:
    token = os.environ.get("STORAGE_TOKEN", "").strip()
    if not token:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "run.py"), "token", "--role", "admin", "--type",
             "service_account", "--name", "locust"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise SystemExit("no token: set STORAGE_TOKEN, or make `python run.py token` "
                             f"work here: {proc.stderr.strip()}")
        token = proc.stdout.strip()
    return token.removeprefix("Bearer ").strip()


SIZES = [parse_size(s) for s in os.environ.get("LOCUST_UPLOAD_SIZES", "4k,1m").split(",")
         if s.strip()]
KEEP_IDS = int(os.environ.get("LOCUST_KEEP_IDS", "50"))
WAIT_MAX = float(os.environ.get("LOCUST_WAIT_MAX", "0.2"))
BODIES: list[Body] = []
HEADERS: dict[str, str] = {}


@events.init.add_listener
def _setup(environment, **_kwargs) -> None:
    """Once per Locust process: the token and the bodies."""
    HEADERS["Authorization"] = f"Bearer {bearer_token()}"
    BODIES.extend(Body(size) for size in SIZES)


class StorageUser(HttpUser):
    """A client of the element: mostly reads, some uploads of each configured size."""

    wait_time = between(0.0, WAIT_MAX)

    def on_start(self) -> None:
        self.files: list[tuple[str, Body]] = []  # (file id, body) this user uploaded
        self.upload_raw()  # something to read from the first task on

    def _name(self) -> str:
        return f"{random.choice(WORDS)} {uuid.uuid4().hex[:8]}.bin"

    def _stored(self, resp, body: Body) -> None:
        if resp.status_code != 201:
            resp.failure(f"{resp.status_code}: {resp.text[:200]}")
            return
        doc = resp.json()
        if doc.get("checksum") != body.sha256 or doc.get("file_size") != body.size:
            resp.failure(f"stored {doc.get('file_size')} bytes, checksum {doc.get('checksum')}")
            return
        self.files.append((doc["file_id"], body))
        del self.files[:-KEEP_IDS]

    @task(2)
    def upload_multipart(self) -> None:
        body = random.choice(BODIES)
        with self.client.post(
                "/api/v1/files/upload", name=f"upload multipart {body.label}",
                headers=HEADERS, catch_response=True,
                data={"description": f"locust {body.label} multipart"},
                files={"file": (self._name(), body.data, "application/octet-stream")},
        ) as resp:
            self._stored(resp, body)

    @task(2)
    def upload_raw(self) -> None:
        body = random.choice(BODIES)
        with self.client.put(
                f"/api/v1/files/{uuid.uuid4()}", name=f"upload raw PUT {body.label}",
                params={"filename": self._name(), "description": "locust raw"},
                headers={**HEADERS, "Content-Type": "application/octet-stream"},
                data=body.data, catch_response=True) as resp:
            self._stored(resp, body)

    @task(4)
    def download(self) -> None:
        if not self.files:
            return
        file_id, body = random.choice(self.files)
        with self.client.get(f"/api/v1/files/{file_id}/download", headers=HEADERS,
                             name=f"download {body.label}", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
            elif hashlib.sha256(resp.content).hexdigest() != body.sha256:
                resp.failure(f"got {len(resp.content)} bytes, not the {body.size} uploaded")

    @task(3)
    def metadata(self) -> None:
        if not self.files:
            return
        file_id, body = random.choice(self.files)
        with self.client.get(f"/api/v1/files/{file_id}", headers=HEADERS,
                             name="metadata", catch_response=True) as resp:
            if resp.status_code != 200 or resp.json().get("file_size") != body.size:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")

    @task(2)
    def search(self) -> None:
        with self.client.get("/api/v1/files/search", headers=HEADERS, name="search",
                             params={"q": random.choice(WORDS), "limit": 20},
                             catch_response=True) as resp:
            if resp.status_code != 200 or "files" not in resp.json():
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
