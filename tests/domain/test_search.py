"""Search and listing (issue 7) against the real app and a real PostgreSQL."""

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import pytest
from helpers import upload
from yoyo import read_migrations

from storage.db import migrate, repo
from storage.domain import search, search_query
from storage.domain.element import element_key
from storage.errors import PROBLEM_JSON
from storage.models import FileMeta

SEARCH = "/api/v1/files/search"


async def find(client, auth, status=200, path=SEARCH, **params):
    resp = await client.get(path, params=params, headers=auth())
    body = await resp.json(content_type=None)
    assert resp.status == status, body
    return body


async def names(client, auth, **params) -> list[str]:
    return [f["original_filename"] for f in (await find(client, auth, **params))["files"]]


async def all_pages(client, auth, **params) -> list[dict]:
    """Follow next_cursor to the end; every page is checked for size and shape."""
    seen, cursor = [], None
    for _ in range(100):
        page = await find(client, auth, **params, **({"cursor": cursor} if cursor else {}))
        assert len(page["files"]) <= int(params.get("limit", 100))
        seen += page["files"]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen
        assert len(page["files"]) == int(params.get("limit", 100))
    raise AssertionError("pagination did not end")


@pytest.fixture
async def corpus(client, auth):
    """Seven files with distinct names, types, sizes, owners, texts and metadata."""
    files = [
        ("report-2025.pdf", "application/pdf", 300, "alice", "Annual report of the finance team",
         {"project": "apollo", "year": 2025, "tags": ["q4", "budget"]}),
        ("IMG_0042.JPG", "image/jpeg", 5000, "bob", "Holiday photo", {"project": "gemini"}),
        ("diagram.png", "image/png", 1200, "alice", "Network diagram draft",
         {"project": "apollo", "status": "draft"}),
        ("budget_final.v2.xlsx", "application/vnd.ms-excel", 800, "carol",
         "Budgets for running costs", {"year": "2024", "approved": True}),
        ("Отчёт_квартал.docx", "application/msword", 300, "bob", "Итоги года по отделу продаж",
         {"отдел": "продажи"}),
        ("notes.txt", "text/plain", 10, "carol", "meeting minutes, not a report draft", None),
        ("video.mp4", "video/mp4", 90000, "alice", None, {"project": "apollo", "year": 2024}),
    ]
    ids = {}
    for name, ctype, size, user, description, metadata in files:
        fields = {"description": description} if description else {}
        if metadata is not None:
            fields["metadata"] = json.dumps(metadata, ensure_ascii=False)
        body = await upload(client, auth(name=user), b"x" * size, name, ctype, **fields)
        ids[name] = body["file_id"]
    return ids


async def test_response_shape_and_rank_only_with_q(client, auth, corpus):
    body = await find(client, auth)
    assert set(body) == {"files", "next_cursor", "total", "total_is_estimate"}
    assert body["total"] == 7 and body["total_is_estimate"] is False
    assert body["next_cursor"] is None and len(body["files"]) == 7
    assert "search_rank" not in body["files"][0]
    assert set(body["files"][0]) >= {"file_id", "original_filename", "checksum", "cache_expired"}
    newest = await find(client, auth, q="report")  # newest first is the default, also with q
    assert [f["original_filename"] for f in newest["files"]] == ["notes.txt", "report-2025.pdf"]
    assert all(f["search_rank"] > 0 for f in newest["files"])
    ranked = await find(client, auth, q="report", sort="rank")
    ranks = [f["search_rank"] for f in ranked["files"]]
    assert ranks == sorted(ranks, reverse=True) and ranks[0] > ranks[1]
    assert ranked["files"][0]["original_filename"] == "report-2025.pdf"  # filename weighs most


async def test_filename_is_tokenised(client, auth, corpus):
    for q in ("report", "2025", "pdf", "report-2025", "report-2025.pdf", "report 2025"):
        assert "report-2025.pdf" in await names(client, auth, q=q), q
    for q in ("img", "0042", "IMG_0042", "budget_final", "final", "v2", "xlsx"):
        assert await names(client, auth, q=q), q
    assert await names(client, auth, q="0042") == ["IMG_0042.JPG"]
    assert await names(client, auth, q="budget_final.v2") == ["budget_final.v2.xlsx"]
    # a joined word is a phrase of its parts: adjacent and in order
    assert await names(client, auth, q="0042_IMG") == []
    assert await names(client, auth, q="report -report-2025") == ["notes.txt"]
    assert await names(client, auth, q='"2025.pdf"') == ["report-2025.pdf"]


async def test_websearch_syntax(client, auth, corpus):
    assert set(await names(client, auth, q="report")) == {"report-2025.pdf", "notes.txt"}
    assert await names(client, auth, q="report -draft") == ["report-2025.pdf"]
    assert await names(client, auth, q='"annual report"') == ["report-2025.pdf"]
    assert await names(client, auth, q='"report annual"') == []  # a phrase keeps its order
    assert set(await names(client, auth, q="holiday or network")) == {"IMG_0042.JPG",
                                                                     "diagram.png"}
    assert set(await names(client, auth, q="photo OR minutes")) == {"IMG_0042.JPG", "notes.txt"}
    assert await names(client, auth, q="running") == ["budget_final.v2.xlsx"]  # english stems
    assert await names(client, auth, q="reports -annual") == ["notes.txt"]
    # the words of the custom metadata values are searchable, the keys are not
    assert set(await names(client, auth, q="apollo")) == {"report-2025.pdf", "diagram.png",
                                                         "video.mp4"}
    assert await names(client, auth, q="q4") == ["report-2025.pdf"]
    assert await names(client, auth, q="project") == []


async def test_websearch_never_raises(client, auth):
    await upload(client, auth(), b"w", "the-a-an.txt", description="foo bar abs")
    for q in ("foo & (bar", "'abs", "a:*", '"unterminated', "report <-> x", "the a an",
              "!!!foo", "or or or", "-foo -bar", "x" * 1000, "(((foo", "foo\\bar"):
        body = await find(client, auth, q=q)
        assert isinstance(body["files"], list) and body["total"] >= 0, q
    assert await names(client, auth, q="the a an") == ["the-a-an.txt"]  # simple keeps them
    assert await names(client, auth, q="'abs") == ["the-a-an.txt"]


async def test_cyrillic(client, auth, corpus):
    assert await names(client, auth, q="отчёт") == ["Отчёт_квартал.docx"]
    assert await names(client, auth, q="Квартал") == ["Отчёт_квартал.docx"]
    assert await names(client, auth, q="итоги продаж") == ["Отчёт_квартал.docx"]
    assert await names(client, auth, q="продажи") == ["Отчёт_квартал.docx"]  # metadata value
    assert await names(client, auth, **{"metadata.отдел": "продажи"}) == ["Отчёт_квартал.docx"]


async def test_filters(client, auth, corpus):
    def ns(lst):
        return set(lst)

    assert await names(client, auth, content_type="image/png") == ["diagram.png"]
    assert ns(await names(client, auth, content_type="image/*")) == {"IMG_0042.JPG",
                                                                   "diagram.png"}
    assert await names(client, auth, content_type="image/gif") == []
    assert ns(await names(client, auth, created_by="bob")) == {"IMG_0042.JPG",
                                                             "Отчёт_квартал.docx"}
    assert await names(client, auth, created_by="nobody") == []
    assert ns(await names(client, auth, min_size="1200")) == {"IMG_0042.JPG", "diagram.png",
                                                            "video.mp4"}
    assert ns(await names(client, auth, max_size="300")) == {
        "report-2025.pdf", "Отчёт_квартал.docx", "notes.txt"}
    assert ns(await names(client, auth, min_size="300", max_size="800")) == {
        "report-2025.pdf", "Отчёт_квартал.docx", "budget_final.v2.xlsx"}
    assert ns(await names(client, auth, **{"metadata.project": "apollo"})) == {
        "report-2025.pdf", "diagram.png", "video.mp4"}
    # repeatable, AND; numbers match as numbers or strings; an array holds its elements
    both = await find(client, auth, **{"metadata.project": "apollo", "metadata.year": "2024"})
    assert [f["original_filename"] for f in both["files"]] == ["video.mp4"]
    assert ns(await names(client, auth, **{"metadata.year": "2024"})) == {
        "budget_final.v2.xlsx", "video.mp4"}
    assert await names(client, auth, **{"metadata.tags": "budget"}) == ["report-2025.pdf"]
    assert await names(client, auth, **{"metadata.approved": "true"}) == ["budget_final.v2.xlsx"]
    assert await names(client, auth, **{"metadata.project": "Apollo"}) == []  # exact
    assert await names(client, auth, **{"metadata.status": "draft"}) == ["diagram.png"]
    assert await names(client, auth, **{"metadata.status": "draft\" || $.status == \"x"}) == []
    assert await names(client, auth, **{"metadata.missing": "x"}) == []
    # combined with text and each other
    assert await names(client, auth, q="report", created_by="alice",
                       content_type="application/pdf") == ["report-2025.pdf"]


async def test_metadata_keys_and_values_are_literals(client, auth):
    odd = {'we"ird\\key $.x': 'va"l\\ue || $ == 1', "n": None, "neg": -3, "f": 1.5,
           "nested": {"inner": "deep"}}
    await upload(client, auth(), b"o", "odd.bin", metadata=json.dumps(odd))
    await upload(client, auth(), b"o", "plain.bin", metadata='{"n": "other", "neg": 3}')
    assert await names(client, auth, **{'metadata.we"ird\\key $.x': 'va"l\\ue || $ == 1'}) == [
        "odd.bin"]
    assert await names(client, auth, **{"metadata.n": "null"}) == ["odd.bin"]
    assert await names(client, auth, **{"metadata.neg": "-3"}) == ["odd.bin"]
    assert await names(client, auth, **{"metadata.f": "1.5"}) == ["odd.bin"]
    assert await names(client, auth, **{"metadata.inner": "deep"}) == []  # top level only
    assert await names(client, auth, **{"metadata.nested": "deep"}) == []


async def test_content_type_with_parameters_and_wildcards(client, auth):
    await upload(client, auth(), b"t", "a.txt", "text/plain; charset=utf-8")
    await upload(client, auth(), b"t", "b.txt", "text/plain")
    await upload(client, auth(), b"t", "c.csv", "text/csv")
    assert await names(client, auth, content_type="text/plain") == ["b.txt"]
    assert await names(client, auth, content_type="text/plain; charset=utf-8") == ["a.txt"]
    assert set(await names(client, auth, content_type="text/*")) == {"a.txt", "b.txt", "c.csv"}
    assert await names(client, auth, content_type="tex/*") == []


async def test_metadata_filter_repeats_are_and(client, auth, corpus):
    resp = await client.get(SEARCH + "?metadata.tags=q4&metadata.tags=budget", headers=auth())
    assert [f["original_filename"] for f in (await resp.json())["files"]] == ["report-2025.pdf"]
    resp = await client.get(SEARCH + "?metadata.tags=q4&metadata.tags=nope", headers=auth())
    assert (await resp.json())["files"] == []


async def test_date_range(client, auth):
    first = await upload(client, auth(), b"1", "one.txt")
    cut = datetime.now(UTC)
    second = await upload(client, auth(), b"2", "two.txt")
    after = await find(client, auth, created_after=cut.isoformat())
    assert [f["file_id"] for f in after["files"]] == [second["file_id"]]
    before = await find(client, auth, created_before=cut.isoformat())
    assert [f["file_id"] for f in before["files"]] == [first["file_id"]]
    zulu = cut.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert [f["file_id"] for f in (await find(client, auth, created_after=zulu))["files"]] == [
        second["file_id"]]
    # another offset, and the "+" that query-string decoding turns into a space
    moscow = cut.astimezone(timezone(timedelta(hours=3))).isoformat()
    resp = await client.get(f"{SEARCH}?created_before={moscow}", headers=auth())
    assert [f["file_id"] for f in (await resp.json())["files"]] == [first["file_id"]]
    window = await find(client, auth, created_after=(cut - timedelta(days=1)).isoformat(),
                        created_before=(cut + timedelta(days=1)).isoformat())
    assert window["total"] == 2


SORT_KEYS = {
    "-created_at": (lambda f: (f["created_at"], f["file_id"]), True),
    "created_at": (lambda f: (f["created_at"], f["file_id"]), False),
    "file_size": (lambda f: (f["file_size"], f["file_id"]), False),
    "-file_size": (lambda f: (f["file_size"], f["file_id"]), True),
    "original_filename": (lambda f: (f["original_filename"].encode(), f["file_id"]), False),
    "-original_filename": (lambda f: (f["original_filename"].encode(), f["file_id"]), True),
}


async def test_each_sort_pages_through_everything_in_order(client, auth, corpus):
    everything = (await find(client, auth, limit="1000"))["files"]
    for sort, (key, reverse) in SORT_KEYS.items():
        expected = sorted(everything, key=key, reverse=reverse)
        pages = await all_pages(client, auth, sort=sort, limit="2")
        assert [f["file_id"] for f in pages] == [f["file_id"] for f in expected], sort
        # ties (two files of 300 bytes) are broken by file_id in the sort's direction
        if "file_size" in sort:
            tied = [f["file_id"] for f in pages if f["file_size"] == 300]
            assert len(tied) == 2 and tied == sorted(tied, reverse=reverse), sort


async def test_rank_sort_pages_and_ties(client, auth):
    for i in range(5):  # equal documents: equal ranks, the cursor must break the tie
        await upload(client, auth(), b"r", f"same{i}.txt", description="shared words here")
    await upload(client, auth(), b"r", "shared-shared.txt", description="shared words")
    pages = await all_pages(client, auth, q="shared", sort="rank", limit="2")
    assert len(pages) == 6 and len({f["file_id"] for f in pages}) == 6
    keys = [(-f["search_rank"], uuid.UUID(f["file_id"])) for f in pages]
    assert keys == sorted(keys, key=lambda k: (k[0], [-b for b in k[1].bytes]))
    assert pages[0]["original_filename"] == "shared-shared.txt"


async def test_cursor_continuity_while_others_upload(client, auth):
    for i in range(9):
        await upload(client, auth(), b"c" * (i % 3), f"file{i}.txt", description="batch")
    for sort in ("-created_at", "created_at", "file_size", "original_filename"):
        existing = {f["file_id"] for f in (await find(client, auth, q="batch"))["files"]}
        seen, cursor, n = [], None, 0
        while True:
            params = {"q": "batch", "sort": sort, "limit": "2"}
            page = await find(client, auth, **params, **({"cursor": cursor} if cursor else {}))
            seen += [f["file_id"] for f in page["files"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
            n += 1  # others upload between pages, before and after the cursor
            assert n < 20, f"{sort}: pagination did not end"
            if n <= 3:
                await upload(client, auth(), b"c" * (n % 4), f"file{n}-{sort}.txt",
                             description="batch")
                await upload(client, auth(), b"", f"a{n}.txt", description="batch")
        assert len(seen) == len(set(seen)), f"{sort}: a row was repeated"
        assert existing <= set(seen), f"{sort}: a row was skipped"


async def test_patch_changes_what_search_finds(client, auth):
    body = await upload(client, auth(), b"p", "plain.bin", description="alpha centauri",
                        metadata='{"colour": "red"}')
    fid = body["file_id"]
    assert await names(client, auth, q="centauri") == ["plain.bin"]
    resp = await client.patch(f"/api/v1/files/{fid}", json={
        "description": "proxima", "version": "rc7", "metadata": {"colour": "blue"}},
        headers=auth())
    assert resp.status == 200, await resp.text()
    assert await names(client, auth, q="centauri") == []
    assert await names(client, auth, q="proxima") == ["plain.bin"]
    assert await names(client, auth, q="rc7") == ["plain.bin"]
    assert await names(client, auth, q="blue") == ["plain.bin"]
    assert await names(client, auth, **{"metadata.colour": "red"}) == []
    assert await names(client, auth, **{"metadata.colour": "blue"}) == ["plain.bin"]


async def test_cache_refresh_updates_the_document(client, auth):
    body = await upload(client, auth(), b"p", "refresh.bin", description="before")
    el = client.app[element_key]
    meta = await repo.get_file(el.db, uuid.UUID(body["file_id"]))
    meta.description = "afterwards"
    await repo.refresh_file(el.db.pool, el.db.q, meta, 24)
    assert await names(client, auth, q="before") == []
    assert await names(client, auth, q="afterwards") == ["refresh.bin"]


async def test_rebuild_restores_the_document_of_a_lost_row(client, auth):
    body = await upload(client, auth(), b"r", "rebuilt-2031.bin", description="phoenix",
                        metadata='{"site": "lagos"}')
    el = client.app[element_key]
    await el.db.pool.execute(f"DELETE FROM {el.config.table_prefix}_files WHERE file_id = $1",
                             uuid.UUID(body["file_id"]))
    assert await names(client, auth, q="phoenix") == []
    resp = await client.post("/api/v1/cache/rebuild", headers=auth())
    assert resp.status == 200, await resp.text()
    for q in ("phoenix", "2031", "lagos"):
        assert await names(client, auth, q=q) == ["rebuilt-2031.bin"], q


async def test_items_rendered_by_postgres_equal_the_metadata_endpoint(client, auth):
    """The search page's JSON is written by PostgreSQL: every key and value (timestamps
    with and without microseconds, nulls, Unicode, an expired cache entry) must read back
    exactly as the Python-rendered FileMetadataResponse of the same row."""
    a = await upload(client, auth(), b"x", "Отчёт \"2031\"\\tab\t.txt", description="ünï ☃")
    b = await upload(client, auth(), b"y", "plain-2031.bin")
    el = client.app[element_key]
    await el.db.pool.execute(  # whole seconds, and an entry expired long ago
        f"UPDATE {el.config.table_prefix}_files SET created_at = date_trunc('second', "
        "created_at), cache_updated_at = '2001-02-03 04:05:06+00' WHERE file_id = $1",
        uuid.UUID(b["file_id"]))
    legacy = {"path": "/api/v1/files", "skip": "0", "limit": "100"}  # skip/limit list
    for params in ({"q": "2031"}, {"created_by": "tester"}, {}, legacy):
        page = await find(client, auth, **params)
        if params is legacy:
            assert list(page) == ["total", "files"] and page["total"] == len(page["files"])
        assert {f["file_id"] for f in page["files"]} >= {a["file_id"], b["file_id"]}, params
        for item in page["files"]:
            # the row as the metadata endpoint renders it (without its lazy refresh)
            meta = await repo.get_file(el.db, uuid.UUID(item["file_id"]))
            expected = json.loads(json.dumps(meta.to_response()))
            if "q" in params:
                assert isinstance(item.pop("search_rank"), float)
            assert item == expected
    raw = await (await client.get(SEARCH, params={"q": "plain"}, headers=auth())).text()
    assert '"cache_expired" : true' in raw and ':06+00:00"' in raw


async def test_huge_texts_are_truncated_not_an_error(client, auth):
    # The API caps an attr document at 4 KiB; rows written by other paths (a rebuild from
    # old attr files, an import) are not, and must not fail on the 1 MiB tsvector limit.
    body = await upload(client, auth(), b"h", "huge.bin")
    el = client.app[element_key]
    words = " ".join(f"w{i:06d}" for i in range(110_000))  # ~880 KB of distinct words
    await el.db.pool.execute(
        f"UPDATE {el.prefix}_files SET description = $2, metadata_json = $3, updated_at = $4 "
        "WHERE file_id = $1", uuid.UUID(body["file_id"]), words,
        {"text": words, "more": [words]}, datetime.now(UTC))
    assert await names(client, auth, q="w000001") == ["huge.bin"]
    assert await names(client, auth, q="w100000") == []  # beyond the indexed 20,000 chars


async def test_the_custom_plan_setting_does_not_outlive_the_request(app_factory, auth):
    client = await app_factory(db_pool_size=1)  # one connection: the search's own
    await upload(client, auth(), b"s", "setting.txt")
    assert await names(client, auth, q="setting") == ["setting.txt"]
    pool = client.app[element_key].db.pool
    async with pool.acquire() as conn:
        assert await conn.fetchval("SHOW plan_cache_mode") == "auto"


async def test_two_prefixes_never_see_each_others_rows(app_factory, auth):
    a = await app_factory()
    b = await app_factory()
    await upload(a, auth(), b"a", "shared-name.txt", description="secret of a",
                 metadata='{"k": "v"}')
    await upload(b, auth(), b"b", "other.txt", description="of b")
    assert await names(a, auth, q="shared") == ["shared-name.txt"]
    assert await names(b, auth, q="shared") == []
    assert await names(b, auth, q="secret") == []
    assert await names(b, auth, **{"metadata.k": "v"}) == []
    assert (await find(b, auth, q="of"))["total"] == 1
    assert (await find(a, auth))["total"] == 1 and (await find(b, auth))["total"] == 1


async def test_legacy_list_unchanged_and_accepts_search_params(client, auth, corpus):
    legacy = await find(client, auth, path="/api/v1/files", skip="2", limit="3")
    assert set(legacy) == {"total", "files"} and legacy["total"] == 7
    assert len(legacy["files"]) == 3
    newest = await find(client, auth, path="/api/v1/files")
    assert [f["file_id"] for f in newest["files"]][2:5] == [
        f["file_id"] for f in legacy["files"]]
    assert len((await find(client, auth, path="/api/v1/files", limit="500"))["files"]) == 7
    for path in ("/api/v1/files", "/api/v1/files/"):
        body = await find(client, auth, path=path, q="report", content_type="application/pdf")
        assert set(body) == {"files", "next_cursor", "total", "total_is_estimate"}
        assert [f["original_filename"] for f in body["files"]] == ["report-2025.pdf"]
        paged = await find(client, auth, path=path, sort="file_size", limit="3")
        assert paged["next_cursor"] and paged["total"] == 7
    body = await find(client, auth, 400, path="/api/v1/files", q="report", skip="3")
    assert "cursor" in body["detail"]


async def test_totals_exact_counter_and_estimate(client, auth, corpus):
    page = await find(client, auth, limit="2")  # unfiltered: the O(1) counter
    assert page["total"] == 7 and page["total_is_estimate"] is False
    page = await find(client, auth, limit="1", **{"metadata.project": "apollo"})
    assert page["total"] == 3 and page["total_is_estimate"] is False
    db = client.app[element_key].db
    params = search_query.parse_params(_multidict({"metadata.project": "apollo", "limit": "1"}))
    result = await search.run(db, params, exact_limit=2)
    assert result.total_is_estimate is True and result.total >= 3
    result = await search.run(db, params, exact_limit=3)
    assert (result.total, result.total_is_estimate) == (3, False)


def _multidict(d):
    from multidict import MultiDict

    return MultiDict(d)


def _cursor(doc) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


GOOD_ID = str(uuid.uuid4())
BAD_INPUT = [
    ({"sort": "name"}, "sort must be one of"),
    ({"sort": "file_size;drop table x"}, "sort must be one of"),
    ({"sort": "rank"}, "needs a q"),
    ({"created_after": "yesterday"}, "ISO 8601"),
    ({"created_after": "2025-13-01T00:00:00Z"}, "ISO 8601"),
    ({"created_before": "2025-01-01T00:00:00"}, "UTC offset"),
    ({"created_after": "2025-02-01T00:00:00Z", "created_before": "2025-01-01T00:00:00Z"},
     "earlier than"),
    ({"min_size": "-1"}, "min_size must be >= 0"),
    ({"max_size": "lots"}, "max_size must be an integer"),
    ({"min_size": "10", "max_size": "5"}, "larger than max_size"),
    ({"limit": "0"}, "limit must be >= 1"),
    ({"limit": "1000000000"}, "limit must be <= 1000"),
    ({"limit": "-5"}, "limit must be >= 1"),
    ({"cursor": "!!!"}, "cursor is not valid"),
    ({"cursor": "eyJ9"}, "cursor is not valid"),
    ({"cursor": _cursor([1, 2])}, "cursor is not valid"),
    ({"cursor": _cursor({"s": "file_size", "k": 1, "i": GOOD_ID})}, "sort=file_size"),
    ({"cursor": _cursor({"s": "-created_at", "k": "yesterday", "i": GOOD_ID})}, "created_at"),
    ({"cursor": _cursor({"s": "-created_at", "k": "2025-01-01T00:00:00", "i": GOOD_ID})},
     "created_at"),
    ({"cursor": _cursor({"s": "file_size", "k": -1, "i": GOOD_ID}), "sort": "file_size"},
     "file_size"),
    ({"cursor": _cursor({"s": "file_size", "k": "1; drop", "i": GOOD_ID}), "sort": "file_size"},
     "file_size"),
    ({"cursor": _cursor({"s": "file_size", "k": 1, "i": "x"}), "sort": "file_size"},
     "file id"),
    ({"cursor": _cursor({"s": "rank", "k": 1e400, "i": GOOD_ID}), "q": "x"}, "cursor"),
    # beyond PostgreSQL's real (float32), and an int float() cannot convert (issue 19)
    *[({"cursor": _cursor({"s": "rank", "k": k, "i": GOOD_ID}), "q": "x", "sort": "rank"},
       "bad search_rank value") for k in (1e39, -1e39, 10**400)],
    # valid strings of instants that fall outside the years 1-9999 in UTC (issue 19)
    ({"created_after": "9999-12-31T23:59:59-23:59"}, "created_after is out of range"),
    ({"created_before": "0001-01-01T00:00:00+14:00"}, "created_before is out of range"),
    *[({"cursor": _cursor({"s": "-created_at", "k": k, "i": GOOD_ID})}, "bad created_at value")
      for k in ("9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+14:00")],
    ({"cursor": "A" * 2000}, "too long"),
    ({"q": "x" * 1001}, "q is too long"),
    ({"q": "!!! <-> & | ()"}, "no words"),
    ({"q": " ".join(["a or -b"] * 30)}, "words and operators"),
    ({"q": "nul\x00byte"}, "NUL"),
    ({"content_type": "image"}, "media type"),
    ({"content_type": "*/*"}, "media type"),
    ({"content_type": "image/*;x"}, "media type"),
    ({"created_by": "x" * 300}, "created_by is too long"),
    ({"metadata.": "x"}, "key is empty"),
]


async def test_bad_input_is_400_with_a_clear_detail(client, auth):
    for path in (SEARCH, "/api/v1/files"):
        for params, detail in BAD_INPUT:
            if path != SEARCH and not search_query.is_search(params):
                continue  # limit alone is the legacy list's, which clamps it
            resp = await client.get(path, params=params, headers=auth())
            body = await resp.json(content_type=None)
            assert resp.status == 400 and resp.content_type == PROBLEM_JSON, (params, body)
            assert detail in body["detail"], (params, body["detail"])


async def test_legacy_list_paging_is_bounded(client, auth):
    """skip is PostgreSQL's OFFSET, a bigint: one past it was a 500 (issue 19)."""
    for skip, detail in (("9223372036854775808", "skip must be <= 9223372036854775807"),
                         ("-1", "skip must be >= 0"), ("9" * 5000, "skip is out of range"),
                         ("x", "skip must be an integer")):
        resp = await client.get("/api/v1/files", params={"skip": skip}, headers=auth())
        body = await resp.json(content_type=None)
        assert (resp.status, resp.content_type) == (400, PROBLEM_JSON), body
        assert detail in body["detail"]
    resp = await client.get("/api/v1/files", params={"skip": str(2**63 - 1), "limit": 10**30},
                            headers=auth())
    assert resp.status == 200 and (await resp.json())["files"] == []


async def test_bad_input_more(client, auth):
    for query in ("q=a&q=b", "sort=file_size&sort=-file_size",
                  "&".join(f"metadata.k{i}=v" for i in range(17))):
        resp = await client.get(f"{SEARCH}?{query}", headers=auth())
        assert resp.status == 400, query
    resp = await client.get(f"{SEARCH}?q={'x' * 100_000}", headers=auth())
    assert resp.status == 414  # refused by the HTTP parser before any handler runs
    assert resp.content_type == PROBLEM_JSON and "request target" in (await resp.json())["detail"]
    resp = await client.get(SEARCH)
    assert resp.status == 401
    assert (await client.get(SEARCH, params={"q": "x", "typo_param": "1"},
                             headers=auth())).status == 200


async def test_0002_upgrades_an_existing_table_in_place_and_rolls_back(pg_dsn, prefix):
    with migrate.backend_for(pg_dsn, prefix) as backend, backend.lock():
        migs = read_migrations(str(migrate.MIGRATIONS_DIR))
        backend.apply_migrations(backend.to_apply(migs).filter(lambda m: m.id == "0001.initial"))
    conn = await asyncpg.connect(pg_dsn)
    try:
        now = datetime.now(UTC)
        meta = FileMeta(file_id=uuid.uuid4(), original_filename="legacy-2019.pdf",
                        storage_filename="s", file_size=1, content_type="application/pdf",
                        created_at=now, updated_at=now, created_by_id="u",
                        created_by_username="u", storage_path="2019/", checksum="0" * 64,
                        description="old row", metadata_json=None)
        await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                                  schema="pg_catalog")
        from storage.db.sql import queries

        await repo.insert_file(conn, queries(prefix), meta)
        migrate.apply(pg_dsn, prefix)
        found = await conn.fetchval(
            f"SELECT count(*) FROM {prefix}_files WHERE search_vector @@ "
            "websearch_to_tsquery('simple', '2019')")
        assert found == 1
        with migrate.backend_for(pg_dsn, prefix) as backend, backend.lock():
            migs = read_migrations(str(migrate.MIGRATIONS_DIR))
            # 0006 builds on 0002 (the search trigger): it goes first
            backend.rollback_migrations(backend.to_rollback(migs).filter(
                lambda m: m.id in ("0006.lean_writes", "0002.search")))
        columns = {r[0] for r in await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1",
            f"{prefix}_files")}
        assert "search_vector" not in columns and "original_filename" in columns
        leftovers = await conn.fetch(
            "SELECT relname FROM pg_class WHERE relname LIKE $1 UNION ALL "
            "SELECT proname FROM pg_proc WHERE proname LIKE $2",
            f"idx\\_{prefix}\\_files\\_%", f"{prefix}\\_search%")
        assert {r[0] for r in leftovers} == {f"idx_{prefix}_files_created"}
        assert await conn.fetchval(f"SELECT count(*) FROM {prefix}_files") == 1
    finally:
        migrate.rollback(pg_dsn, prefix)
        migrate.drop_bookkeeping(pg_dsn, prefix)
        await conn.close()
