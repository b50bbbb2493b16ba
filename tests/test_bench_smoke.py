"""CI smoke test of the benchmark harness (bench/): tiny sizes, a few seconds, no storage
server needed. The ceiling server runs in-process (and once as ``python -m bench``)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from bench import ceiling
from bench import load as L
from bench.plan import build_plan, rule_of, select
from bench.procstat import ProcSampler, read_cpu_seconds, read_rss

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def ceiling_target(aiohttp_server, tmp_path):
    server = await aiohttp_server(ceiling.make_app(str(tmp_path / "files"), batch=64 * 1024))
    return L.Target("ceiling", str(server.make_url("/")), kind="ceiling"), tmp_path / "files"


def _assert_sane(res: L.LoadResult, n: int, size: int) -> None:
    assert res.errors == 0, res.error_kinds
    assert res.requests_ok == n
    assert res.bytes == n * size
    assert len(res.latencies_s) == n
    assert 0 < res.p50_ms <= res.p90_ms <= res.p99_ms
    assert res.elapsed_s > 0 and res.req_s > 0
    assert res.mib_s == pytest.approx(res.bytes / L.MIB / res.elapsed_s)


@pytest.mark.parametrize(
    ("op", "size", "chunked"),
    [("put", 4096, False), ("put", 300_000, True), ("post", 200_000, False)],
)
async def test_uploads_to_ceiling_are_durable_and_verified(ceiling_target, op, size, chunked):
    target, files = ceiling_target
    body = L.BodySource(buffer_size=128 * 1024, chunk_size=32 * 1024, seed=b"smoke")
    sc = L.Scenario(op=op, size=size, concurrency=3, requests=7, max_seconds=15, chunked=chunked)
    live = L.LiveCounters()
    res = await L.run_load(target, sc, body=body, live=live)
    _assert_sane(res, 7, size)
    assert res.checksums_verified == 7
    assert live.bytes == 7 * size and live.done == 7
    assert len(set(res.file_ids)) == 7
    expected = body.checksum(size)
    for fid in res.file_ids:
        data = (files / fid).read_bytes()
        assert len(data) == size
        assert hashlib.sha256(data).hexdigest() == expected
    assert not [p for p in files.iterdir() if p.name.endswith(".tmp")]


async def test_downloads_count_and_hash_every_byte(ceiling_target):
    target, _ = ceiling_target
    body = L.BodySource(buffer_size=64 * 1024, chunk_size=16 * 1024, seed=b"dl")
    size = 150_001
    ids = await L.prepare_files(target, size, 2, body=body)
    sc = L.Scenario(op="get", size=size, concurrency=2, requests=6, max_seconds=15)
    res = await L.run_load(target, sc, body=body, file_ids=ids, verify_download=True)
    _assert_sane(res, 6, size)
    assert res.checksums_verified == 6
    assert await L.delete_files(target, ids) == 2


async def test_bad_checksum_and_missing_file_are_errors(aiohttp_server, tmp_path):
    async def lying_put(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"file_id": "x", "checksum": "sha256:" + "0" * 64}, status=201)

    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    app.router.add_put("/files/{file_id}", lying_put)
    app.router.add_get("/files/{file_id}", missing)
    server = await aiohttp_server(app)
    target = L.Target("liar", str(server.make_url("/")), kind="ceiling")
    res = await L.run_load(target, L.Scenario(op="put", size=1000, requests=3))
    assert (res.requests_ok, res.errors) == (0, 3)
    assert res.error_kinds == {"checksum mismatch": 3}
    res = await L.run_load(target, L.Scenario(op="get", size=10, requests=2), file_ids=["a"])
    assert res.errors == 2 and res.bytes == 0
    assert next(iter(res.error_kinds)).startswith("HTTP 404")


async def test_ours_adapter_paths_and_token(aiohttp_server, tmp_path):
    """A stand-in with our API's paths (backed by the ceiling's writer) checks the `ours`
    target adapter, the bearer token and the meta/list scenarios."""
    seen: list[str] = []

    @web.middleware
    async def auth(request: web.Request, handler):
        seen.append(f"{request.method} {request.path}")
        if request.headers.get("Authorization") != "Bearer T0K":
            raise web.HTTPUnauthorized()
        return await handler(request)

    async def meta(request: web.Request) -> web.Response:
        return web.json_response({"file_id": request.match_info["file_id"]})

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"items": [], "limit": int(request.query["limit"])})

    app = ceiling.make_app(str(tmp_path / "f"))
    app.middlewares.append(auth)
    app.router.add_put("/api/v1/files/{file_id}", ceiling.put_file)
    app.router.add_post("/api/v1/files/upload", ceiling.post_upload)
    app.router.add_get("/api/v1/files/{file_id}/download", ceiling.get_file)
    app.router.add_get("/api/v1/files/{file_id}", meta)
    app.router.add_get("/api/v1/files", listing)
    server = await aiohttp_server(app)
    ours = L.Target("ours", str(server.make_url("/")), kind="ours", token="T0K")
    ids = await L.prepare_files(ours, 5000, 2)
    for sc in ("post-5000", "get-5000", "meta", "list"):
        res = await L.run_load(ours, L.Scenario.parse(sc, concurrency=2, requests=4), file_ids=ids)
        assert res.errors == 0 and res.requests_ok == 4, (sc, res.error_kinds)
    assert any(s.startswith("PUT /api/v1/files/") for s in seen)
    assert f"GET /api/v1/files/{ids[0]}/download" in seen
    assert "GET /api/v1/files" in seen
    nobody = L.Target("ours", ours.base_url, kind="ours", token="wrong")
    res = await L.run_load(nobody, L.Scenario(op="list", requests=1))
    assert res.errors == 1 and "HTTP 401" in next(iter(res.error_kinds))


async def test_body_source_streams_slices_of_one_buffer():
    body = L.BodySource(buffer_size=4096, chunk_size=1000, seed=b"x")
    chunks = [c async for c in body.chunks(10_000)]
    assert all(isinstance(c, memoryview) and c.obj is chunks[0].obj for c in chunks)
    assert max(len(c) for c in chunks) <= 1000
    data = b"".join(bytes(c) for c in chunks)
    assert len(data) == 10_000
    assert hashlib.sha256(data).hexdigest() == body.checksum(10_000)


def test_helpers():
    assert [L.parse_size(s) for s in ("4k", "1m", "1MiB", "2g", "512")] == [
        4096,
        1 << 20,
        1 << 20,
        2 << 30,
        512,
    ]
    assert L.size_label(64 << 20) == "64m" and L.size_label(1000) == "1000"
    assert L.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert L.percentile([5.0], 99) == 5.0
    assert L.normalize_checksum("SHA256:AB") == "ab" and L.normalize_checksum(None) is None
    plan = build_plan(quick=True)
    assert [s.name for s in select(plan, "put-1m,big")] == ["put-1m", "put-8m", "get-8m"]
    assert [rule_of(select(plan, n)[0]).threshold for n in ("put-4k", "post-64k", "get-4k")] == [
        0.35, 0.75, 0.50]
    assert L.Target("o", "http://h/", kind="ours").download_url("f") == (
        "http://h/api/v1/files/f/download"
    )


async def test_procstat_samples_this_process():
    assert read_rss(os.getpid()) > 0
    assert read_cpu_seconds(os.getpid()) >= 0
    async with ProcSampler(os.getpid(), interval=0.01) as s:
        hashlib.sha256(b"x" * (8 << 20)).hexdigest()
    r = s.result
    assert r is not None and r.samples >= 1 and r.peak_rss >= r.start_rss > 0
    assert r.cpu_s >= 0 and r.rss_growth >= 0 and r.wall_s > 0
    assert read_rss(2**22 + 12345) is None


def test_quick_ceiling_only_end_to_end(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(  # noqa: S603 - fixed argv
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--ceiling-only",
            "--json",
            "--no-chart",
            "--quiet",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
            "--scenarios",
            "small,medium,big",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (md,) = out.glob("*-quick-ceiling-only.md")
    assert "| scenario | ours | ceiling | ours/ceiling | target | pass/fail |" in md.read_text()
    report = json.loads(next(out.glob("*.json")).read_text())
    assert report["machine"]["cores"] >= 1
    cells = {c["scenario"]: c for c in report["cells"]}
    assert set(cells) == {
        "put-4k",
        "get-4k",
        "post-4k",
        "put-64k",
        "get-64k",
        "post-64k",
        "put-8m",
        "get-8m",
    }
    for c in cells.values():
        assert c["target"] == "ceiling" and c["errors"] == 0
        assert c["min"] <= c["median"] <= c["max"]
        assert c["p50_ms"] <= c["p90_ms"] <= c["p99_ms"]
        assert len(c["runs"]) == 3
        for r in c["runs"]:
            assert r["bytes"] == r["requests_ok"] * c["size"]
            assert r["server"]["peak_rss_mib"] > 0
    assert cells["put-8m"]["rss_growth_mib"] < 50
    assert not list((tmp_path / "work").iterdir())  # temp data removed


def test_search_bench_runs_against_a_small_table(pg_dsn, tmp_path):
    """bench/search_bench.py end to end (issue 7's benchmark), tiny, so it never rots:
    loads rows through the repository layer, times every query and prints the table."""
    prefix = f"sb_{os.getpid()}_{os.urandom(3).hex()}"
    out = tmp_path / "search.md"
    proc = subprocess.run(  # noqa: S603 - fixed argv
        [sys.executable, "-m", "bench.search_bench", "--rows", "400", "--requests", "8",
         "--dsn", pg_dsn, "--prefix", prefix, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = out.read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "/" in line]
    names = {line.split("|")[1].strip() for line in rows}
    assert {"list", "text", "text_rank", "metadata", "deep_page"} <= names, report
    assert all(" ms, " in line and "buffers" in line for line in rows)  # a plan for each


def test_scaleout_bench_runs_two_elements_on_one_postgres(tmp_path):
    """bench/scaleout.py end to end (issue 16), tiny: its own PostgreSQL, two elements,
    uploads at once; PostgreSQL CPU and transactions are counted per upload."""
    out = tmp_path / "scaleout.md"
    proc = subprocess.run(  # noqa: S603 - fixed argv
        [sys.executable, "-m", "bench.scaleout", "--quick", "--elements", "2", "--no-pin",
         "--workdir", str(tmp_path), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = [line for line in out.read_text().splitlines() if line.startswith("| this build")]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    uploads_s, pg_ms, xacts = (float(cells[i].split()[0].replace(",", "")) for i in (1, 2, 3))
    assert uploads_s > 0 and pg_ms > 0 and 0 < xacts < 3
    assert cells[-1] == "0"  # errors
    assert [p for p in tmp_path.iterdir() if p.name.startswith("scaleout-")] == []
