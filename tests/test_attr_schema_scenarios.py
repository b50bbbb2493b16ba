"""The seed's DB-cache and template-schema scenarios (reference §13.1), through the API:
attr.json v2 creation, v1 → v2 migration, v2 → v1 export, version detection, custom
attributes, and a real-world mixed deployment."""

from __future__ import annotations

import argparse
import io
import json
import logging
import uuid
from pathlib import Path

from cache_helpers import ATTR, LOSSLESS, attr_files, check_store, connect, plant, rows
from helpers import upload

from storage import attrs
from storage.cli import ops
from storage.domain import attrmeta, naming
from storage.models import FileMeta, utcnow


def _attr_of(root: Path, file_id: str) -> Path:
    return next(p for p in attr_files(root) if file_id in p.name)


def _doc(root: Path, file_id: str) -> dict:
    return json.loads(_attr_of(root, file_id).read_text())


def _legacy(name: str, metadata: dict | None, **fields) -> FileMeta:
    now = utcnow()
    file_id = uuid.uuid4()
    return FileMeta(
        file_id=file_id, original_filename=name,
        storage_filename=naming.storage_filename(name, "ingester-module", now, file_id),
        file_size=0, content_type="application/pdf", created_at=now, updated_at=now,
        created_by_id="sa-1", created_by_username="ingester-module",
        storage_path=naming.storage_path(now), checksum="0" * 64, metadata_json=metadata,
        **fields)


async def _migrate(config, pg_dsn, dry_run=False) -> tuple[int, dict]:
    out = io.StringIO()
    args = argparse.Namespace(command="migrate-attrs", dry_run=dry_run)
    code = await ops.execute(config, pg_dsn, args, out=out, err=io.StringIO())
    return code, json.loads(out.getvalue())


# DB cache -----------------------------------------------------------------------------------


async def test_cache_entry_created_on_upload(client, auth, config, pg_dsn):
    body = await upload(client, auth(), b"cache me", "report.pdf", "application/pdf")
    file_id = body["file_id"]
    meta = await (await client.get(f"/api/v1/files/{file_id}", headers=auth())).json()
    assert meta["file_id"] == file_id and meta["original_filename"] == "report.pdf"
    assert meta["file_size"] == 8 and meta["checksum"] == body["checksum"]
    conn = await connect(pg_dsn)
    try:
        await check_store(conn, config.table_prefix, config.storage_local_base_path)
        assert (await client.delete(f"/api/v1/files/{file_id}", headers=auth())).status == 204
        assert (await client.get(f"/api/v1/files/{file_id}", headers=auth())).status == 404
        assert await check_store(conn, config.table_prefix, config.storage_local_base_path) == {}
    finally:
        await conn.close()


async def test_cache_consistent_with_attr_file_after_patch(client, auth, config, pg_dsn):
    root = config.storage_local_base_path
    file_id = (await upload(client, auth(), b"abc", "a.txt", description="before"))["file_id"]
    got = await (await client.get(f"/api/v1/files/{file_id}", headers=auth())).json()
    assert (got["original_filename"], got["file_size"], got["description"]) == (
        "a.txt", 3, "before")
    resp = await client.patch(f"/api/v1/files/{file_id}", headers=auth(),
                              json={"description": "after", "version": "2"})
    assert resp.status == 200 and (await resp.json())["description"] == "after"
    doc = _doc(root, file_id)
    assert (doc["description"], doc["version"]) == ("after", "2")
    conn = await connect(pg_dsn)
    try:
        found = await check_store(conn, config.table_prefix, root)  # row == attr, field by field
        assert found[file_id]["description"] == "after"
    finally:
        await conn.close()
    assert (await client.delete(f"/api/v1/files/{file_id}", headers=auth())).status == 204


# template schema ----------------------------------------------------------------------------


async def test_v2_attr_file_created_on_upload(client, auth, config):
    custom = {"project": "apollo", "tags": ["a", "b"], "pages": 12, "draft": False, "x": None}
    file_id = (await upload(client, auth(), b"%PDF", "r.pdf", "application/pdf",
                            metadata=json.dumps(custom)))["file_id"]
    path = _attr_of(config.storage_local_base_path, file_id)
    raw = path.read_bytes()
    doc = json.loads(raw)
    assert list(doc) == [*attrs.V1_KEYS, "schema_version", "custom_attributes"]
    assert doc["schema_version"] == "2.0" and doc["custom_attributes"] == custom
    assert doc["metadata"] == custom  # upstream's v1 model still finds it
    assert len(raw) <= attrs.MAX_ATTR_SIZE and "T" in doc["created_at"]
    assert doc["created_at"].endswith("+00:00") and doc["version"] is None


async def test_the_4096_byte_limit_is_a_400_naming_the_field_before_anything_is_written(
        client, auth, config, pg_dsn):
    root = config.storage_local_base_path
    big = json.dumps({"notes": "n" * 3000})
    resp = await client.post("/api/v1/files/upload", headers=auth(),
                             data=_form(b"data", metadata=big))
    body = await resp.json()
    assert resp.status == 400 and "metadata" in body["detail"] and "4096" in body["detail"]
    assert [p for p in root.rglob("*") if p.is_file()] == []
    file_id = (await upload(client, auth(), b"ok", "ok.txt"))["file_id"]
    before = _attr_of(root, file_id).read_bytes()
    resp = await client.patch(f"/api/v1/files/{file_id}", headers=auth(),
                              json={"description": "d" * 3900})
    body = await resp.json()
    assert resp.status == 400 and "description" in body["detail"]
    assert _attr_of(root, file_id).read_bytes() == before
    conn = await connect(pg_dsn)
    try:
        await check_store(conn, config.table_prefix, root)  # nothing half-done, WAL resolved
        wal = await conn.fetch(f"SELECT operation_type, status FROM {config.table_prefix}_wal")
        assert sorted((w["operation_type"], w["status"]) for w in wal) == [
            ("file_create", "committed"), ("file_update", "rolled_back")]
    finally:
        await conn.close()


def _form(data: bytes, **fields):
    from helpers import form

    return form(data, "f.txt", "text/plain", **fields)


async def test_v1_files_are_read_by_rebuild_and_migrated_by_migrate_attrs(
        client, auth, config, pg_dsn):
    root = config.storage_local_base_path
    legacy = [_legacy(f"old{i}.pdf", {"dept": i} if i else None, description=f"d{i}")
              for i in range(3)]
    for meta in legacy:
        plant(root, meta, f"legacy {meta.file_id}".encode(), v1=True,
              extra={"retention": "forever"})  # an unknown key: preserved on every rewrite
    new_id = (await upload(client, auth(), b"new", "new.txt"))["file_id"]
    resp = await client.post("/api/v1/cache/rebuild/incremental", headers=auth())
    assert (await resp.json())["result"]["statistics"]["entries_created"] == 3
    for meta in legacy:
        got = await (await client.get(f"/api/v1/files/{meta.file_id}", headers=auth())).json()
        assert got["description"] == meta.description
    versions = {p.name: attrs.detect_version(json.loads(p.read_text())) for p in attr_files(root)}
    assert sorted(versions.values()) == ["1.0", "1.0", "1.0", "2.0"]
    code, report = await _migrate(config, pg_dsn, dry_run=True)
    assert code == 0 and (report["v1"], report["v2"], report["migrated"]) == (3, 1, 0)
    assert all(attrs.detect_version(_doc(root, str(m.file_id))) == "1.0" for m in legacy)
    code, report = await _migrate(config, pg_dsn)
    assert code == 0 and (report["v1"], report["migrated"]) == (3, 3)
    for meta in legacy:
        doc = _doc(root, str(meta.file_id))
        assert doc["schema_version"] == "2.0"
        assert doc["custom_attributes"] == (meta.metadata_json or {})
        assert doc["retention"] == "forever"
        assert {k: doc[k] for k in attrs.V1_KEYS if k != "metadata"} == {
            k: v for k, v in attrmeta.to_doc(meta).to_dict().items()
            if k in attrs.V1_KEYS and k != "metadata"}
    assert _doc(root, new_id)["schema_version"] == "2.0"
    code, report = await _migrate(config, pg_dsn)  # idempotent
    assert (report["v1"], report["v2"], report["migrated"]) == (0, 4, 0)
    resp = await client.post("/api/v1/cache/rebuild", headers=auth())
    stats = (await resp.json())["result"]["statistics"]
    assert stats["entries_updated"] == 0 and stats["entries_created"] == 0
    conn = await connect(pg_dsn)
    try:
        await check_store(conn, config.table_prefix, root)
    finally:
        await conn.close()


async def test_a_v1_file_that_would_outgrow_4096_bytes_stays_v1(client, config, pg_dsn):
    root = config.storage_local_base_path
    meta = _legacy("big.pdf", {"notes": "x" * 2000})
    plant(root, meta, b"big", v1=True)
    before = Path(str(root / meta.relative_path) + ATTR).read_bytes()
    assert len(before) <= attrs.MAX_ATTR_SIZE
    code, report = await _migrate(config, pg_dsn)
    assert code == 1 and report["too_large"] == 1 and report["migrated"] == 0
    assert any(meta.storage_filename in p and "stays v1" in p for p in report["problems"])
    assert Path(str(root / meta.relative_path) + ATTR).read_bytes() == before


async def test_v2_to_v1_export_for_legacy_tools_is_lossy_and_says_so(
        client, auth, config, caplog):
    custom = {"k": "v"}
    file_id = (await upload(client, auth(), b"x", "x.txt", metadata=json.dumps(custom)))[
        "file_id"]
    path = _attr_of(config.storage_local_base_path, file_id)
    doc = {**json.loads(path.read_text()), "vendor_field": 1}
    with caplog.at_level(logging.WARNING, logger="storage.attrs"):
        v1 = attrs.export_v1(doc)
    assert list(v1) == list(attrs.V1_KEYS)
    assert "schema_version" not in v1 and "custom_attributes" not in v1
    assert "vendor_field" not in v1
    assert {k: v1[k] for k in attrs.V1_KEYS} == {k: doc[k] for k in attrs.V1_KEYS}
    assert any("drops" in r.getMessage() for r in caplog.records)
    assert attrs.detect_version(v1) == "1.0"
    assert attrs.from_dict(v1).custom_attributes == custom  # our reader still finds it


async def test_custom_attributes_persist_across_rewrites(client, auth, config, pg_dsn):
    root = config.storage_local_base_path
    file_id = (await upload(client, auth(), b"x", "x.txt", metadata='{"a": 1}'))["file_id"]
    path = _attr_of(root, file_id)
    planted = {**json.loads(path.read_text()), "added_by_other_tool": {"keep": [1, 2]}}
    path.write_text(json.dumps(planted))
    resp = await client.patch(f"/api/v1/files/{file_id}", headers=auth(),
                              json={"metadata": {"b": [True, None, 2.5]}})
    assert resp.status == 200
    doc = json.loads(path.read_text())
    assert doc["custom_attributes"] == {"b": [True, None, 2.5]} == doc["metadata"]
    assert doc["added_by_other_tool"] == {"keep": [1, 2]}
    resp = await client.patch(f"/api/v1/files/{file_id}", headers=auth(),
                              json={"description": "still here?"})
    doc = json.loads(path.read_text())
    assert doc["custom_attributes"] == {"b": [True, None, 2.5]}
    assert doc["added_by_other_tool"] == {"keep": [1, 2]}
    for bad in ('["not", "an", "object"]', '{"n": NaN}', '{"a": 1, "a": 2}', '"text"'):
        resp = await client.post("/api/v1/files/upload", headers=auth(),
                                 data=_form(b"y", metadata=bad))
        assert resp.status == 400, bad
    conn = await connect(pg_dsn)
    try:
        found = await check_store(conn, config.table_prefix, root)
        assert found[file_id]["metadata_json"] == {"b": [True, None, 2.5]}
    finally:
        await conn.close()


async def test_real_world_mixed_deployment_rebuilds_exactly(client, auth, config, pg_dsn):
    """Uploads from this service (v2), v1 files from upstream (one with S3-style space
    datetimes), then the database is lost: the rebuild restores every row exactly."""
    root = config.storage_local_base_path
    ours = [(await upload(client, auth(), f"ours {i}".encode(), f"ours{i}.txt",
                          metadata=json.dumps({"i": i})))["file_id"] for i in range(3)]
    theirs = [_legacy(f"theirs{i}.pdf", {"src": "upstream"}) for i in range(2)]
    for meta in theirs:
        plant(root, meta, b"theirs", v1=True)
    s3_style = theirs[1]
    doc = _doc(root, str(s3_style.file_id))
    doc["created_at"] = doc["created_at"].replace("T", " ")
    doc["updated_at"] = doc["updated_at"].replace("T", " ")
    _attr_of(root, str(s3_style.file_id)).write_text(json.dumps(doc, ensure_ascii=False))
    conn = await connect(pg_dsn)
    try:
        before = await rows(conn, config.table_prefix)
        await conn.execute(f"TRUNCATE {config.table_prefix}_files")
        resp = await client.post("/api/v1/cache/rebuild", headers=auth())
        result = (await resp.json())["result"]
        assert result["errors"] == [] and result["statistics"]["entries_created"] == 5
        after = await rows(conn, config.table_prefix)
        assert {k: after[k] for k in ours} == {k: before[k] for k in ours}
        for meta in theirs:
            assert after[str(meta.file_id)] == {k: getattr(meta, k) for k in LOSSLESS}
        await check_store(conn, config.table_prefix, root)
    finally:
        await conn.close()
    new_id = (await upload(client, auth(), b"fresh", "fresh.txt"))["file_id"]
    assert _doc(root, new_id)["schema_version"] == "2.0"
    # an upstream v1 reader ignores unknown keys: it finds all fifteen, typed as it expects
    v1_view = {k: _doc(root, new_id)[k] for k in attrs.V1_KEYS}
    assert isinstance(v1_view["file_size"], int) and len(v1_view["checksum"]) == 64
    assert isinstance(v1_view["metadata"], dict)
