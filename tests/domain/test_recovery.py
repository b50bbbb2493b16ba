"""WAL crash recovery (in-process): every state a crash can leave, resolved at startup;
the multi-process rule; WAL retention; scrub and quarantine; the ops commands."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from cache_helpers import (
    ATTR,
    LOSSLESS,
    check_store,
    connect,
    element,
    plant,
    rows,
)
from helpers import temp_files, upload

from storage import attrs
from storage.cli import ops
from storage.db import locks, repo
from storage.domain import naming, recovery, recovery_passes
from storage.models import FileMeta, utcnow

ROOT = Path(__file__).resolve().parents[2]


def _meta(name: str = "a.txt", when=None) -> FileMeta:
    now = when or utcnow()
    file_id = uuid.uuid4()
    return FileMeta(
        file_id=file_id, original_filename=name,
        storage_filename=naming.storage_filename(name, "tester", now, file_id), file_size=0,
        content_type="text/plain", created_at=now, updated_at=now, created_by_id="sub",
        created_by_username="tester", storage_path=naming.storage_path(now), checksum="0" * 64)


async def _intent(el, op: str, meta: FileMeta, *, age: timedelta = timedelta(0),
                  data: dict | None = None) -> uuid.UUID:
    """A pending WAL row as the create/update/delete code writes it, ``age`` old."""
    txid = uuid.uuid4()
    if data is None:
        data = {"original_filename": meta.original_filename,
                "storage_filename": meta.storage_filename, "storage_path": meta.storage_path,
                "relative_path": meta.relative_path, "content_type": meta.content_type}
    await repo.insert_wal(el.db.pool, el.db.q, txid=txid, op=op, file_id=meta.file_id,
                          data=data, user_id="sub", started_at=utcnow() - age)
    return txid


async def _wal(conn, prefix: str, txid: uuid.UUID) -> tuple[str, str | None]:
    rec = await conn.fetchrow(f"SELECT status, error_message FROM {prefix}_wal "
                              "WHERE transaction_id = $1", txid)
    return rec["status"], rec["error_message"]


async def _restart(app_factory, config, client=None, **overrides):
    """Stop ``client`` (its serve lock goes with it) and start a new app on the element."""
    if client is not None:
        await client.close()
    return await app_factory(table_prefix=config.table_prefix,
                             storage_local_base_path=config.storage_local_base_path,
                             **overrides)


async def test_every_upload_state_is_completed_or_undone(app_factory, auth, config, pg_dsn):
    a = await _restart(app_factory, config)
    el, root = element(a), config.storage_local_base_path
    nothing, temp_only, data_only = _meta("n.txt"), _meta("t.txt"), _meta("d.txt")
    complete, short, attr_only = _meta("c.txt"), _meta("s.txt"), _meta("o.txt")
    tx = {m.file_id: await _intent(el, "file_create", m)
          for m in (nothing, temp_only, data_only, complete, short, attr_only)}
    (root / temp_only.storage_path).mkdir(parents=True, exist_ok=True)
    (root / temp_only.storage_path / f".tmp_{uuid.uuid4().hex}").write_bytes(b"partial")
    (root / data_only.relative_path).write_bytes(b"data, no attr")
    plant(root, complete, b"complete upload")
    plant(root, short, b"will be truncated")
    (root / short.relative_path).write_bytes(b"will be")  # shorter than the attr says
    plant(root, attr_only, b"gone").unlink()
    b = await _restart(app_factory, config, a)
    conn = await connect(pg_dsn)
    try:
        for meta in (nothing, temp_only, data_only, short, attr_only):
            status, why = await _wal(conn, config.table_prefix, tx[meta.file_id])
            assert status == "rolled_back" and why.startswith("recovery:"), (meta, why)
        assert await _wal(conn, config.table_prefix, tx[complete.file_id]) == ("committed", None)
        found = await check_store(conn, config.table_prefix, root)
        assert list(found) == [str(complete.file_id)]
        assert found[str(complete.file_id)] == {k: getattr(complete, k) for k in LOSSLESS}
    finally:
        await conn.close()
    resp = await b.get(f"/api/v1/files/{complete.file_id}/download", headers=auth())
    assert resp.status == 200 and await resp.read() == b"complete upload"
    assert (await b.get("/health/ready")).status == 200


async def test_update_and_delete_states(app_factory, auth, config, pg_dsn):
    a = await _restart(app_factory, config)
    el, root = element(a), config.storage_local_base_path
    ids = [(await upload(a, auth(), f"f{i}".encode(), f"f{i}.txt", description="old"))["file_id"]
           for i in range(5)]
    conn = await connect(pg_dsn)
    try:
        by_id = await rows(conn, config.table_prefix)
    finally:
        await conn.close()
    metas = {i: FileMeta(**by_id[i]) for i in ids}
    attr_of = {i: root / (metas[i].relative_path + ATTR) for i in ids}
    # PATCH that reached the attr file (then died before the row)
    applied = await _intent(el, "file_update", metas[ids[0]],
                            data={"description": "new", "version": None, "metadata": None})
    doc = json.loads(attr_of[ids[0]].read_text())
    attr_of[ids[0]].write_text(json.dumps({**doc, "description": "new"}))
    # PATCH that died before touching the attr file
    lost = await _intent(el, "file_update", metas[ids[1]],
                         data={"description": "never", "version": None, "metadata": None})
    # deletes: nothing done yet / data gone / data and attr gone
    deletes = [await _intent(el, "file_delete", metas[i]) for i in ids[2:]]
    (root / metas[ids[3]].relative_path).unlink()
    (root / metas[ids[4]].relative_path).unlink()
    attr_of[ids[4]].unlink()
    await _restart(app_factory, config, a)
    conn = await connect(pg_dsn)
    try:
        prefix = config.table_prefix
        assert (await _wal(conn, prefix, applied))[0] == "committed"
        assert (await _wal(conn, prefix, lost))[0] == "rolled_back"
        for txid in deletes:
            assert (await _wal(conn, prefix, txid))[0] == "committed"
        found = await check_store(conn, prefix, root)
        assert set(found) == set(ids[:2])
        assert found[ids[0]]["description"] == "new"
        assert found[ids[1]]["description"] == "old"
    finally:
        await conn.close()


async def test_stray_temps_are_swept_and_old_wal_rows_purged(app_factory, config, pg_dsn):
    a = await _restart(app_factory, config)
    el, root = element(a), config.storage_local_base_path
    for rel in ("2026/01/01/00/.tmp_" + "a" * 32, "2026/01/01/00/.tmp_attr_x.json",
                "deep/er/.tmp_zzz"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"junk")
    prefix = config.table_prefix
    old, recent = uuid.uuid4(), uuid.uuid4()
    for txid, hours in ((old, 200), (recent, 1)):
        await repo.insert_wal(el.db.pool, el.db.q, txid=txid, op="file_create", file_id=None,
                              data={}, user_id=None, started_at=utcnow() - timedelta(hours=hours))
        await repo.commit_wal(el.db.pool, el.db.q, txid, {},
                              utcnow() - timedelta(hours=hours))
    await _restart(app_factory, config, a)
    assert temp_files(root) == []
    conn = await connect(pg_dsn)
    try:
        left = {r["transaction_id"] for r in await conn.fetch(
            f"SELECT transaction_id FROM {prefix}_wal")}
    finally:
        await conn.close()
    assert recent in left and old not in left


async def test_live_siblings_keep_their_young_rows(app_factory, config, pg_dsn):
    """A second process starting while the first serves must not touch its in-flight work."""
    a = await _restart(app_factory, config)
    el, root = element(a), config.storage_local_base_path
    young_create, old_create = _meta("y.txt"), _meta("o.txt")
    young = await _intent(el, "file_create", young_create, age=timedelta(minutes=30))
    ancient = await _intent(el, "file_create", old_create, age=timedelta(hours=30))
    plant(root, young_create, b"still uploading?")
    b = await _restart(app_factory, config)  # a keeps running
    conn = await connect(pg_dsn)
    try:
        assert (await _wal(conn, config.table_prefix, young))[0] == "pending"
        assert (await _wal(conn, config.table_prefix, ancient))[0] == "rolled_back"
        assert (root / young_create.relative_path).exists()
        report = await recovery.recover(element(b), alone=False)
        assert report.mode == "shared" and report.completed == report.rolled_back == 0
    finally:
        await conn.close()
    # once every server is gone the next start owns everything
    await a.close()
    await _restart(app_factory, config, b)
    conn = await connect(pg_dsn)
    try:
        assert (await _wal(conn, config.table_prefix, young))[0] == "committed"
        await check_store(conn, config.table_prefix, root)
    finally:
        await conn.close()


async def test_a_row_locked_by_a_live_operation_is_skipped(client, auth, config, pg_dsn):
    el = element(client)
    file_id = (await upload(client, auth(), b"x", "x.txt"))["file_id"]
    meta = await repo.get_file(el.db, uuid.UUID(file_id))
    txid = await _intent(el, "file_update", meta, age=timedelta(hours=1),
                         data={"description": None, "version": None, "metadata": None})
    conn = await connect(pg_dsn)
    try:
        async with conn.transaction():
            await conn.execute(f"SELECT 1 FROM {config.table_prefix}_files WHERE file_id = $1 "
                               "FOR UPDATE", meta.file_id)
            report = await recovery.recover(el, alone=True)
            assert report.skipped == 1 and "live operation" in report.actions[0]
        report = await recovery.recover(el, alone=True)
        assert report.completed == 1
        assert (await _wal(conn, config.table_prefix, txid))[0] == "committed"
        again = await recovery.recover(el, alone=True)  # idempotent: nothing left to do
        assert (again.completed, again.rolled_back, again.skipped) == (0, 0, 0)
    finally:
        await conn.close()


async def test_unknown_operations_are_left_pending_and_reported(client, config, pg_dsn):
    el = element(client)
    txid = await _intent(el, "mode_change", _meta(), data={"to": "ro"})
    report = await recovery.recover(el, alone=True)
    assert report.skipped == 1 and "unknown operation" in report.actions[0]
    conn = await connect(pg_dsn)
    try:
        assert (await _wal(conn, config.table_prefix, txid))[0] == "pending"
    finally:
        await conn.close()


async def test_a_second_process_waits_for_recovery_in_progress(client, config, pg_dsn):
    el = element(client)
    conn = await connect(pg_dsn)
    try:
        await locks.set_label(conn, el.db.q, locks.label("recovery"))
        assert await locks.try_lock(conn, el.db.q, locks.key(config.table_prefix,
                                                             locks.RECOVERY))
        other = await connect(pg_dsn)
        task = asyncio.create_task(recovery_passes.startup(el, other, serve=False))
        await asyncio.sleep(0.5)
        assert not task.done()  # blocked behind the recovery lock
        await conn.close()
        report = await asyncio.wait_for(task, 10)
        assert report.mode == "shared"  # the client's app is alive and serving
        await other.close()
    finally:
        if not conn.is_closed():
            await conn.close()


# ops commands ------------------------------------------------------------------------------


def _args(command: str, **kw) -> argparse.Namespace:
    defaults = {"incremental": False, "force": False, "dry_run": False, "quarantine": False,
                "max_mib_per_second": 0.0}
    return argparse.Namespace(command=command, **{**defaults, **kw})


async def _ops(config, pg_dsn, command: str, **kw) -> tuple[int, dict, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await ops.execute(config, pg_dsn, _args(command, **kw), out=out, err=err)
    return code, json.loads(out.getvalue()) if out.getvalue() else {}, err.getvalue()


async def test_recover_command_respects_live_servers_unless_forced(client, config, pg_dsn):
    el = element(client)
    meta = _meta()
    txid = await _intent(el, "file_create", meta, age=timedelta(minutes=10))
    code, body, _ = await _ops(config, pg_dsn, "recover")
    assert code == 0 and body["mode"] == "shared" and body["rolled_back"] == 0
    code, body, _ = await _ops(config, pg_dsn, "recover", force=True)
    assert code == 0 and body["rolled_back"] == 1 and str(meta.file_id) in body["actions"][0]
    conn = await connect(pg_dsn)
    try:
        assert (await _wal(conn, config.table_prefix, txid))[0] == "rolled_back"
    finally:
        await conn.close()


async def test_scrub_finds_and_quarantines_corrupt_files(client, auth, config, pg_dsn):
    ids = [(await upload(client, auth(), f"content {i}".encode() * 100, f"f{i}.txt"))["file_id"]
           for i in range(5)]
    root = config.storage_local_base_path
    data = {str(naming.extract_file_id(p.name)): p for p in root.rglob("*")
            if p.is_file() and not p.name.endswith(ATTR)}
    flipped = bytearray(data[ids[0]].read_bytes())
    flipped[10] ^= 0xFF
    data[ids[0]].write_bytes(bytes(flipped))  # bit rot: same size, other bytes
    data[ids[1]].write_bytes(b"short")  # truncated
    data[ids[2]].unlink()  # lost
    (Path(str(data[ids[3]]) + ATTR)).write_text("{broken")
    code, body, err = await _ops(config, pg_dsn, "scrub")
    assert code == 1
    assert {k: body[k] for k in ("scanned", "ok", "corrupt", "size_mismatch", "missing_data",
                                 "unreadable_attr", "quarantined")} == {
        "scanned": 5, "ok": 1, "corrupt": 1, "size_mismatch": 1, "missing_data": 1,
        "unreadable_attr": 1, "quarantined": 0}
    assert any(data[ids[0]].name in p for p in body["problems"])
    assert err.startswith("scrub: ") and "B/s" in err  # a plain progress line (not a TTY)
    code, body, _ = await _ops(config, pg_dsn, "scrub", quarantine=True)
    assert body["quarantined"] == 3
    for file_id in ids[:3]:  # gone from the API as a whole, kept aside for inspection
        assert (await client.get(f"/api/v1/files/{file_id}", headers=auth())).status == 404
        moved = sorted(p.name for p in (root / ".quarantine").rglob("*") if p.is_file()
                       and data[file_id].name in p.name)
        kept = [data[file_id].name] if file_id != ids[2] else []  # the lost one: attr only
        assert moved == [*kept, data[file_id].name + ".attr-quarantined.json"]
    conn = await connect(pg_dsn)
    try:
        wal = await conn.fetch(f"SELECT status FROM {config.table_prefix}_wal "
                               "WHERE operation_type = 'file_quarantine'")
        assert [w["status"] for w in wal] == ["committed"] * 3
        assert set(await rows(conn, config.table_prefix)) == set(ids[3:])
    finally:
        await conn.close()
    code, body, _ = await _ops(config, pg_dsn, "scrub")
    assert (body["corrupt"], body["size_mismatch"], body["missing_data"],
            body["quarantined"]) == (0, 0, 0, 0)
    resp = await client.post("/api/v1/cache/rebuild", headers=auth())  # quarantine is ignored
    assert resp.status == 200


async def test_rebuild_and_check_commands(client, auth, config, pg_dsn):
    ids = [(await upload(client, auth(), f"f{i}".encode(), f"f{i}.txt"))["file_id"]
           for i in range(3)]
    conn = await connect(pg_dsn)
    try:
        await conn.execute(f"DELETE FROM {config.table_prefix}_files WHERE file_id = $1", ids[0])
        code, body, _ = await _ops(config, pg_dsn, "check")
        assert code == 1 and body["orphan_attr_count"] == 1 and not body["is_consistent"]
        code, body, _ = await _ops(config, pg_dsn, "rebuild", incremental=True)
        assert code == 0 and body["statistics"]["entries_created"] == 1
        code, body, _ = await _ops(config, pg_dsn, "rebuild")
        assert code == 0 and body["operation_type"] == "full"
        code, body, _ = await _ops(config, pg_dsn, "check")
        assert code == 0 and body["is_consistent"]
        el = element(client)
        await locks.set_label(conn, el.db.q, locks.label("someone else"))
        await locks.try_lock(conn, el.db.q, locks.key(config.table_prefix, locks.MAINTENANCE))
        code, body, err = await _ops(config, pg_dsn, "rebuild")
        assert code == 3 and "someone else" in err
    finally:
        await conn.close()


def test_run_py_recover_in_a_real_process(config, pg_dsn, keypair):
    """The command line as an operator runs it (server down): JSON summary, exit 0."""
    root = config.storage_local_base_path
    root.mkdir(parents=True, exist_ok=True)
    (root / ".tmp_leftover").write_bytes(b"x")
    env = {**os.environ, "DATABASE_URL": pg_dsn, "DB_TABLE_PREFIX": config.table_prefix,
           "STORAGE_LOCAL_BASE_PATH": str(root), "JWT_PUBLIC_KEY_PATH": str(keypair[1]),
           "LOG_FORMAT": "text", "DATA_DIR": str(config.data_dir)}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "recover"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert body["mode"] == "exclusive" and body["temps_removed"] == 1
    assert not (root / ".tmp_leftover").exists()


def test_progress_without_a_terminal_is_a_plain_line_every_few_seconds():
    """Not a TTY (a log file, a pipe): plain lines with the rate and the ETA, at most one
    per ``every`` seconds, never a carriage return; the JSON summary alone on stdout."""
    out, err = io.StringIO(), io.StringIO()
    con = ops.Console(out, err, every=3600)
    for done in range(1, 6):
        con.progress("check", done, 10, f", {done} error(s)")
    assert err.getvalue().count("\n") == 1  # the first call shows; the rest are throttled
    con = ops.Console(out, err := io.StringIO(), every=0)
    for done in (1, 5, 12):
        con.progress("rebuild", done, 10)
    con.progress("scrub", 3 << 20, 8 << 20, unit="B")
    con.progress("migrate-attrs", 7, None, ", 2 migrated")
    con.result({"ok": True})
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue() and len(lines) == 5
    assert lines[0].startswith("rebuild:  10% 1/~10 [") and "<" in lines[0]  # elapsed<ETA
    assert lines[2].startswith("rebuild: 12 [")  # past the estimated total: no percentage
    assert lines[3].startswith("scrub:  38% 3.00M/~8.00M [") and "B/s" in lines[3]
    assert lines[4].startswith("migrate-attrs: 7 [") and lines[4].endswith(", 2 migrated]")
    assert all("file/s" in line for line in lines[:3])
    body = json.loads(out.getvalue().split("\n}\n")[-2] + "}")  # the second summary
    assert body["ok"] is True and "elapsed_seconds" in body


async def test_run_py_check_on_a_terminal_draws_a_bar_with_rate_and_eta(client, auth, config,
                                                                        pg_dsn, keypair):
    """``python run.py check`` with stderr on a terminal (a pty): a redrawn tqdm bar with
    the rate and the ETA; stdout (a pipe) still carries exactly the JSON summary."""
    import fcntl
    import pty
    import re
    import struct
    import termios

    for i in range(3):
        await upload(client, auth(), f"f{i}".encode(), f"f{i}.txt")
    env = {**os.environ, "DATABASE_URL": pg_dsn, "DB_TABLE_PREFIX": config.table_prefix,
           "STORAGE_LOCAL_BASE_PATH": str(config.storage_local_base_path),
           "JWT_PUBLIC_KEY_PATH": str(keypair[1]), "LOG_FORMAT": "text",
           "DATA_DIR": str(config.data_dir)}
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "run.py"), "check", cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        stdout, _ = await asyncio.wait_for(proc.communicate(), 120)
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0, shown
    text = shown.decode("utf-8", "replace")
    assert "\r" in text  # redrawn in place
    assert re.search(r"check: 100%\|.+\| 3/3 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+file/s\]", text), text
    body = json.loads(stdout)
    assert body["is_consistent"] is True and body["total_attr_files"] == 3
    assert set(body) >= {"total_cache_entries", "orphan_cache_count", "elapsed_seconds"}


@pytest.mark.parametrize("bad", [b"", b"{", b'{"file_id": 1}'])
async def test_recovery_never_trusts_a_bad_attr_file(app_factory, config, pg_dsn, bad):
    a = await _restart(app_factory, config)
    root, meta = config.storage_local_base_path, _meta()
    txid = await _intent(element(a), "file_create", meta)
    plant(root, meta, b"data")
    Path(str(root / meta.relative_path) + ATTR).write_bytes(bad)
    await _restart(app_factory, config, a)
    conn = await connect(pg_dsn)
    try:
        status, why = await _wal(conn, config.table_prefix, txid)
        assert status == "rolled_back" and "attr file unusable" in why
        await check_store(conn, config.table_prefix, root)
    finally:
        await conn.close()
    with pytest.raises(attrs.AttrError):
        attrs.loads(bad)


async def test_rolled_back_upload_removes_its_own_young_temp_file(app_factory, config, pg_dsn):
    """The intent names its temp file, so a shared-mode recovery (which leaves young
    stray temps alone) still removes the partial data of the upload it rolls back."""
    a = await _restart(app_factory, config)
    el = element(a)
    meta = _meta("crashed.bin")
    writer = el.backend.create(meta.relative_path)
    await writer.write(b"partial")  # opens the temp file beside the target
    temp = Path(writer.temp_name)
    other = temp.with_name(".tmp_someone_elses")
    other.write_bytes(b"live upload of another process")
    data = {"original_filename": meta.original_filename, "storage_path": meta.storage_path,
            "storage_filename": meta.storage_filename, "relative_path": meta.relative_path,
            "content_type": meta.content_type, "temp_path": writer.temp_name}
    txid = await _intent(el, "file_create", meta, age=timedelta(hours=30), data=data)
    writer._fd, fd = None, writer._fd  # simulate the crash: the process never closes it
    os.close(fd)
    await _restart(app_factory, config)  # a keeps running: a shared pass
    conn = await connect(pg_dsn)
    try:
        assert (await _wal(conn, config.table_prefix, txid))[0] == "rolled_back"
    finally:
        await conn.close()
    # the intent's own temp is gone; the young stray one proves the pass was shared (an
    # exclusive one sweeps every temp file)
    assert not temp.exists() and other.exists()
