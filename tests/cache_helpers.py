"""Helpers shared by the cache, GC, recovery and crash tests (issue 6)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import asyncpg
from helpers import s3_client, s3_folder, stored_objects, temp_files

from storage import attrs
from storage.config import Config
from storage.domain import attrmeta
from storage.domain.element import element_key
from storage.models import FileMeta

ATTR = ".attr.json"
# Every column a rebuild must reproduce exactly (all but the cache bookkeeping).
LOSSLESS = ("file_id", "original_filename", "storage_filename", "file_size", "content_type",
            "created_at", "updated_at", "created_by_id", "created_by_username",
            "created_by_fullname", "description", "version", "storage_path", "checksum",
            "metadata_json")


def element(client):
    return client.server.app[element_key]


async def connect(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads,
                                  schema="pg_catalog")
    return conn


async def rows(conn: asyncpg.Connection, prefix: str) -> dict[str, dict[str, Any]]:
    """Every cache row by file id, lossless columns only."""
    recs = await conn.fetch(f"SELECT * FROM {prefix}_files")
    return {str(r["file_id"]): {k: r[k] for k in LOSSLESS} for r in recs}


async def totals(conn: asyncpg.Connection, prefix: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(config totals, actual count/sum) — equal when the triggers and rebuild agree."""
    cfg = await conn.fetchrow(f"SELECT total_files, total_size_bytes FROM {prefix}_config")
    real = await conn.fetchrow(
        f"SELECT count(*) AS n, COALESCE(sum(file_size), 0) AS b FROM {prefix}_files")
    return (cfg["total_files"], cfg["total_size_bytes"]), (real["n"], real["b"])


def attr_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*" + ATTR) if ".quarantine" not in p.parts
                  and not p.name.startswith(".tmp"))


def plant(root: Path, meta: FileMeta, data: bytes, *, v1: bool = False,
          extra: dict | None = None) -> Path:
    """Write a data file and its attr document straight to disk (as another tool would):
    schema v2 as we write it, or with ``v1`` the fifteen keys upstream writes."""
    meta.file_size, meta.checksum = len(data), hashlib.sha256(data).hexdigest()
    path = root / meta.relative_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    body = v1_document(meta) if v1 else attrmeta.to_doc(meta).to_dict()
    Path(str(path) + ATTR).write_text(json.dumps({**body, **(extra or {})}, indent=2,
                                                 ensure_ascii=False))
    return path


def v1_document(meta: FileMeta) -> dict[str, Any]:
    """The fifteen-key document upstream's writer produces (no schema_version)."""
    doc = attrmeta.to_doc(meta).to_dict()
    return {k: doc[k] for k in attrs.V1_KEYS}


async def check_s3_store(conn: asyncpg.Connection, config: Config) -> dict[str, Any]:
    """:func:`check_store` for an element on S3: every row has its data object (size,
    sha256) and an attr object equal to it; no object without a row or its partner; no
    multipart upload in progress; no pending WAL row; totals right."""
    prefix, found = config.table_prefix, await rows(conn, config.table_prefix)
    objects = await stored_objects(config)
    assert not [o for o in objects if o.startswith("upload:")], objects
    data = {o for o in objects if not o.endswith(ATTR)}
    assert {o[: -len(ATTR)] for o in objects if o.endswith(ATTR)} == data, objects
    in_store = {}
    async with s3_client(config) as s3:
        for relpath in sorted(data):
            blobs = []
            for key in (relpath + ATTR, relpath):
                resp = await s3.get_object(Bucket=config.s3_bucket_name,
                                           Key=s3_folder(config) + key)
                async with resp["Body"] as body:
                    blobs.append(await body.read())
            doc = attrs.loads(blobs[0], relpath)
            in_store[str(doc.file_id)] = (doc, blobs[1])
    assert set(in_store) == set(found), (set(in_store) ^ set(found))
    for file_id, row in found.items():
        doc, blob = in_store[file_id]
        assert row == {k: getattr(attrmeta.to_meta(doc), k) for k in LOSSLESS}, file_id
        assert len(blob) == row["file_size"] and hashlib.sha256(blob).hexdigest() == row[
            "checksum"]
    assert await conn.fetchval(f"SELECT count(*) FROM {prefix}_wal WHERE status = 'pending'") == 0
    config_totals, real = await totals(conn, prefix)
    assert config_totals == real
    return found


async def check_store(conn: asyncpg.Connection, prefix: str, root: Path) -> dict[str, Any]:
    """The crash invariant: every row has its data (size, sha256) and an attr file equal
    to it; no attr file without a row; no temp file; no pending WAL row; totals right.
    Returns the rows by id."""
    found = await rows(conn, prefix)
    on_disk = {}
    for attr in attr_files(root):
        doc = attrs.loads(attr.read_bytes(), str(attr))
        on_disk[str(doc.file_id)] = (attr, doc)
    assert set(on_disk) == set(found), (set(on_disk) ^ set(found))
    for file_id, row in found.items():
        attr, doc = on_disk[file_id]
        expected = {k: getattr(attrmeta.to_meta(doc), k) for k in LOSSLESS}
        assert row == expected, (file_id, row, expected)
        data = Path(str(attr)[: -len(ATTR)]).read_bytes()
        assert len(data) == row["file_size"]
        assert hashlib.sha256(data).hexdigest() == row["checksum"]
    assert temp_files(root) == []
    data_files = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(ATTR)
                  and ".quarantine" not in p.parts]
    assert all(Path(str(p) + ATTR).exists() for p in data_files), data_files
    assert await conn.fetchval(f"SELECT count(*) FROM {prefix}_wal WHERE status = 'pending'") == 0
    config_totals, real = await totals(conn, prefix)
    assert config_totals == real
    return found
