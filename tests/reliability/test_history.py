"""The randomized history checker with faults (issue 26): see ``history.py`` for the
workload, the faults, the history and the model.

- ``test_history_short``: one seed, local disk, two processes, about 40 s; in the default
  suite, and alone with ``pytest -m history``.
- ``test_history_seeds``: several seeds on local disk and on S3 (``pytest -m reliability``).
- The checker's own tests: it flags what it must (a stale read after an acknowledged
  DELETE, a 304 for a replaced file's old ETag, a lost acknowledged upload) and accepts
  what is legal (reads concurrent with a write, an unknown upload either way).

A failure prints the seed, the shortest window of the history that shows each
violation, and the command that replays the run.
"""

from __future__ import annotations

import pytest
from history import Checker, Settings, check, run_once

from tests.conftest import S3_BUCKET

SHORT = Settings(seed=2601, mode="edit", phases=2, phase_s=8.0)


@pytest.mark.history
async def test_history_short():
    result = await run_once(SHORT)
    print(result.line())
    assert result.ok, result.report()


@pytest.mark.reliability
@pytest.mark.parametrize(("seed", "storage_kind"), [
    (11, "local"), (12, "local"), (13, "local"), (21, "s3"), (22, "s3")],
    indirect=["storage_kind"])
async def test_history_seeds(seed, storage_kind, request):
    settings = Settings(seed=seed, storage=storage_kind, phases=3, phase_s=10.0,
                        max_size=(6 << 20) if storage_kind == "s3" else 256 << 10,
                        max_store=(40 << 20) if storage_kind == "s3" else 4 << 20)
    s3 = request.getfixturevalue("s3_endpoint") if storage_kind == "s3" else None
    result = await run_once(settings, s3, bucket=S3_BUCKET)
    print(result.line())
    assert result.ok, result.report()


# --- the checker itself (pure) ----------------------------------------------------------

FID = "f"


def ev(i, f, inv, done, type_="ok", **kw):
    return {"i": i, "f": f, "inv": inv, "done": done, "type": type_, "id": FID, **kw}


def test_a_read_after_an_acknowledged_delete_must_not_see_the_old_bytes():
    up = ev(0, "upload", 0, 1, status=201, sha="A", got_sha="A", size=1, tag="u0")
    rm = ev(1, "delete", 2, 3, status=204)
    stale = ev(2, "download", 4, 5, status=200, sha="A")
    assert [why for why, _ in Checker([up, rm, stale], 100).run()] == [
        "download returned content no write may have left: no write that may be current "
        "explains it"]
    concurrent = ev(2, "download", 2.5, 5, status=200, sha="A")  # overlaps the DELETE
    assert Checker([up, rm, concurrent], 100).run() == []


def test_a_304_for_the_old_etag_of_a_replaced_file_is_flagged():
    events = [ev(0, "upload", 0, 1, status=201, sha="A", got_sha="A", size=1, tag="u0"),
              ev(1, "gc", 2, 3, status=200, outcome="deleted"),
              ev(2, "put_reuse", 4, 5, status=201, sha="B", got_sha="B", size=1, tag="u2"),
              ev(3, "cond", 6, 7, status=304, if_none_match="A", etag_sha="A")]
    violations = check(events, 100)
    assert len(violations) == 1 and "304 for an ETag that is not current" in violations[0]
    assert '"f": "put_reuse"' in violations[0]  # the window shows the write that replaced it


def test_an_acknowledged_upload_must_stay_and_an_unknown_one_may_go_either_way():
    up = ev(0, "upload", 0, 1, status=201, sha="A", got_sha="A", size=1, tag="u0")
    gone = ev(1, "meta", 2, 3, status=404)
    assert len(Checker([up, gone], 100).run()) == 1
    unknown = ev(0, "upload", 0, None, "info", status=None, sha="A", size=1, tag="u0")
    for seen in (ev(1, "meta", 2, 3, status=404),
                 ev(1, "meta", 2, 3, status=200, sha="A", tag="u0")):
        checker = Checker([unknown, seen], 100)
        checker.faults = [{"inv": 0, "done": 1}]
        assert checker.run() == []
    other = ev(1, "meta", 2, 3, status=200, sha="B", tag="u9")  # bytes nobody uploaded
    checker = Checker([unknown, other], 100)
    checker.faults = [{"inv": 0, "done": 1}]
    assert [why.split(":")[0] for why, _ in checker.run()] == [
        "meta returned content no write may have left",
        "metadata shows a description no write may have left"]


def test_a_500_and_an_unexplained_503_are_violations():
    events = [ev(0, "list", 0, 1, "info", status=500), ev(1, "meta", 2, 3, "info", status=503)]
    assert [why for why, _ in Checker(events, 100).run()] == [
        "500", "503 outside any fault window"]


def _mode(i, target, inv, done):
    return {"i": i, "f": "mode", "inv": inv, "done": done, "type": "ok", "target": target}


def test_a_tus_400_that_kept_the_bytes_may_become_a_file_later_a_plain_one_may_not():
    """A last PATCH refused (400) because the element left the upload modes during its
    finish keeps its bytes (``upload_kept``): the file is made once uploads are allowed
    again, so the write is unsure (``info``), as the driver records it.  A plain 400
    (refused before any byte was taken) is a refusal: nothing of it may appear."""
    ro, rw = _mode(0, "ro", 0, 1), _mode(1, "rw", 5, 6)
    later = ev(4, "download", 8, 9, status=200, sha="A")
    kept = ev(2, "tus", 2, None, "info", status=400, kept=True, sha="A", size=1, tag="t0")
    assert Checker([ro, kept, rw, later], 100).run() == []
    plain = ev(2, "tus", 2, 3, "fail", status=400, sha="A", size=1, tag="t0")
    assert [why.split(":")[0] for why, _ in Checker([ro, plain, rw, later], 100).run()] == [
        "download returned content no write may have left"]
    # a tus 400, kept or not, only while a switch to ro could be in force
    for refused in (kept, plain):
        assert [why for why, _ in Checker([refused], 100).run()] == [
            "tus PATCH refused (400) while no ro switch could be in force"]
