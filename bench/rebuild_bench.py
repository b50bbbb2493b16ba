"""Cache rebuild benchmark: rebuild files/s and peak RSS for N attr files (issue 6).

    python -m bench.rebuild_bench --files 100000 [--dsn postgresql://…] [--dir /tmp/rb]

1. plants N data files with their attr documents (schema v2, every 10th one v1, the
   shape upstream writes) in a child process, so its memory does not count;
2. runs a full rebuild into an empty cache table, in this process, through the same
   code as ``POST /api/v1/cache/rebuild``;
3. prints files/s, the process's peak RSS (``ru_maxrss``) and the RSS before the rebuild,
   and checks that every row was created.

Without ``--dsn`` an embedded PostgreSQL is started under the working directory.
The generator (:func:`make_meta`, :func:`plant_many`) is shared with
tests/domain/test_cache_api.py, which compares the rebuilt rows with it column by column.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from storage import attrs
from storage.domain import attrmeta, naming
from storage.models import FileMeta

BASE = datetime(2026, 3, 1, tzinfo=UTC)
TYPES = ("application/pdf", "text/plain; charset=utf-8", "image/png", "application/json",
         "application/octet-stream")
NAMES = ("report {i}.pdf", "отчёт {i}.txt", "scan_{i}.png", "data-{i}.json", "blob{i}")
_LOW = (1 << 64) - 1


def file_id_of(seed: int, i: int) -> uuid.UUID:
    return uuid.UUID(int=(seed << 64) | i)


def index_of(file_id: uuid.UUID) -> int:
    return file_id.int & _LOW


def make_meta(seed: int, i: int) -> tuple[FileMeta, bytes]:
    """The i-th generated file: its original metadata row and its bytes (deterministic)."""
    file_id = file_id_of(seed, i)
    created = BASE + timedelta(seconds=i, microseconds=(i * 7919) % 1_000_000)
    user = ("ingester-module", "Иван Петров", "svc")[i % 3]
    name = NAMES[i % len(NAMES)].format(i=i)
    data = f"file {i} of seed {seed}\n".encode() * (1 + i % 4)
    meta = FileMeta(
        file_id=file_id, original_filename=name,
        storage_filename=naming.storage_filename(name, user, created, file_id),
        file_size=len(data), content_type=TYPES[i % len(TYPES)], created_at=created,
        updated_at=created + timedelta(minutes=i % 5), created_by_id=f"sub-{i % 3}",
        created_by_username=user, storage_path=naming.storage_path(created),
        checksum=hashlib.sha256(data).hexdigest(),
        created_by_fullname="Full Name" if i % 7 == 0 else None,
        description=None if i % 2 else f"description {i}",
        version=None if i % 3 else f"v{i % 5}",
        metadata_json=None if i % 4 else {"i": i, "tags": ["x", str(i % 10)], "ok": True},
    )
    return meta, data


def _document(meta: FileMeta, i: int) -> bytes:
    doc = attrmeta.to_doc(meta).to_dict()
    if i % 10 == 0:  # what upstream's writer produces: the fifteen v1 keys only
        doc = {k: doc[k] for k in attrs.V1_KEYS}
    return json.dumps(doc, indent=2, ensure_ascii=False).encode()


def plant_many(root: Path, count: int, seed: int, start: int = 0) -> None:
    """Write files ``start..count-1`` (data + attr) under ``root``, like another writer."""
    made: set[Path] = set()
    for i in range(start, count):
        meta, data = make_meta(seed, i)
        directory = root / meta.storage_path
        if directory not in made:
            directory.mkdir(parents=True, exist_ok=True)
            made.add(directory)
        path = directory / meta.storage_filename
        path.write_bytes(data)
        Path(str(path) + ".attr.json").write_bytes(_document(meta, i))


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _rebuild(root: Path, dsn: str, prefix: str, count: int) -> dict:
    from storage.cli import ops
    from storage.config import Config
    from storage.db import migrate
    from storage.domain import cache

    config = Config(database_url=dsn, table_prefix=prefix, storage_local_base_path=root,
                    app_mode="edit")
    await asyncio.to_thread(migrate.apply, dsn, prefix)
    async with ops.open_element(config, dsn) as el:
        rss_before = _rss_kib()
        started = time.perf_counter()
        outcome = await cache.full_rebuild(el)
        elapsed = time.perf_counter() - started
    stats = outcome.statistics
    assert stats.entries_created == count and not outcome.errors.count, outcome.to_dict()
    return {
        "files": count,
        "seconds": round(elapsed, 2),
        "files_per_second": round(count / elapsed),
        "rss_before_rebuild_mib": round(rss_before / 1024, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rebuild_bench")
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--dir", type=Path, default=None, help="working directory (kept)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plant-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.dir or Path(tempfile.mkdtemp(prefix="rebuild-bench-"))
    root = work / "store"
    if args.plant_only:
        plant_many(root, args.files, args.seed)
        return 0
    if not root.exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.rebuild_bench", "--plant-only",
                        "--files", str(args.files), "--dir", str(work), "--seed",
                        str(args.seed)], check=True)
        print(f"planted {args.files} files in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    embedded = None
    dsn = args.dsn
    if not dsn:
        from storage.db.embedded import EmbeddedPostgres

        embedded = EmbeddedPostgres(work / "data")
        dsn = embedded.start()
    try:
        prefix = "rb" + secrets.token_hex(4)
        print(json.dumps(asyncio.run(_rebuild(root, dsn, prefix, args.files)), indent=2))
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
