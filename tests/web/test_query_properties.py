"""Property-based tests over every query parameter of the list and the search (issue 19).

Each example sends one parameter under test, hostile or not, to ``GET /api/v1/files``
or ``GET /api/v1/files/search`` of the real app on a real PostgreSQL (with only the
companions it needs: a cursor its sort, a rank sort its q).  Whatever the value, the
answer is never a 5xx: a 200 of the right shape, or a ``400 application/problem+json``
whose detail names the parameter.  Where a value's validity is certain (an integer in
or out of its range, an instant inside or outside the years 1-9999 in UTC) the answer
is exactly that one.

The strategies mix arbitrary text with the boundary values of each type: integers
around the int64 and float32 limits and past what ``float()`` converts, instants a
day from either end of ``datetime``'s range with offsets up to ±23:59, cursors whose
keys are any of those.  The example count is the ``suite`` profile's (tests/conftest.py);
``HYPOTHESIS_PROFILE=explore`` runs many more.
"""

from __future__ import annotations

import base64
import json
import secrets
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import quote

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from helpers import upload
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from storage.auth.devkeys import mint_token
from storage.config import Config
from storage.db.search_sql import SORTS
from storage.errors import PROBLEM_JSON
from storage.web.app import make_app

LIST, SEARCH = "/api/v1/files", "/api/v1/files/search"
INT64 = 2**63
EDGE_INTS = [0, 1, -1, 100, 101, 1000, 1001, INT64 - 1, INT64, -INT64, -INT64 - 1, 2**64,
             10**30, 10**400, -10**400]
EDGE_FLOATS = [1e39, -1e39, 3.4028234663852886e38, 3.4028235e38, 5e-324, -0.0, 1e308,
               float("inf"), float("-inf"), float("nan")]

# --- values --------------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=60)  # URL-encodable
# long, but short enough as a URL for aiohttp's 8 KiB request line once percent-encoded
long_text = st.text(st.characters(codec="ascii"), min_size=200, max_size=1100)
junk = st.one_of(text, st.binary(max_size=30))  # bytes: any octets, percent-encoded
websearch = st.text(st.sampled_from('ab1 -"|&!():*<>\\\'._/'), max_size=80)
integers = st.one_of(st.integers(), st.sampled_from(EDGE_INTS),
                     st.integers(min_value=-INT64 * 4, max_value=INT64 * 4))
digits = st.integers(min_value=19, max_value=5000).map(lambda n: "9" * n)  # past int()


def in_range(value: int, lo: int, hi: int | None) -> bool:
    return lo <= value and (hi is None or value <= hi)


def int_values(lo: int, hi: int | None) -> st.SearchStrategy[tuple[str, bool | None]]:
    """(raw, valid): integers whose validity is known, digit runs and text whose is not."""
    return st.one_of(integers.map(lambda n: (str(n), in_range(n, lo, hi))),
                     digits.map(lambda d: (d, None)), junk.map(lambda t: (t, None)))


MAX_OFFSET = 24 * 60 - 1  # minutes: ±23:59, the widest offset ISO 8601 strings carry
OFFSET = st.one_of(st.sampled_from([MAX_OFFSET, -MAX_OFFSET, 14 * 60, -12 * 60, 0]),
                   st.integers(min_value=-MAX_OFFSET, max_value=MAX_OFFSET))
DAY = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=1))
# The wall-clock time of a string, held as a UTC datetime: a day from either end of
# datetime's range, or anywhere.
WALL_MIN, WALL_MAX = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
INSTANT = st.one_of(st.datetimes(timezones=st.just(UTC)), DAY.map(lambda d: WALL_MAX - d),
                    DAY.map(lambda d: WALL_MIN + d))


def iso(wall: datetime, minutes: int) -> tuple[str, bool]:
    """The ISO 8601 string of ``wall`` at UTC offset ``minutes``, and whether that
    instant lies within the years 1-9999 in UTC (computed without ``astimezone``)."""
    in_range = (WALL_MIN + timedelta(minutes=max(minutes, 0)) <= wall
                <= WALL_MAX + timedelta(minutes=min(minutes, 0)))
    return wall.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat(), in_range


instants = st.builds(iso, INSTANT, OFFSET)
dates = st.one_of(instants, st.datetimes().map(lambda d: (d.isoformat(), False)),  # no offset
                  junk.map(lambda t: (t, None)))


def encode_cursor(doc) -> str:
    raw = json.dumps(doc, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()


any_key = st.one_of(
    st.sampled_from(EDGE_INTS + EDGE_FLOATS), st.integers(), st.floats(), text,
    instants.map(lambda v: v[0]), st.none(), st.booleans(), st.lists(st.integers(), max_size=2))
KEYS = {  # the keys a cursor of each sort column carries, boundaries first
    "created_at": instants.map(lambda v: v[0]),
    "file_size": integers,
    "original_filename": text,
    "search_rank": st.one_of(st.sampled_from(EDGE_FLOATS + EDGE_INTS), st.floats(),
                             st.integers()),
}


def cursors(sort: str) -> st.SearchStrategy:
    """A cursor for ``sort`` (JSON with a key of its column's type or of any other; or
    any text), sent with that sort (and a q for rank)."""
    doc = st.fixed_dictionaries({
        "s": st.one_of(st.just(sort), text),
        "k": st.one_of(KEYS[SORTS[sort].column], any_key),
        "i": st.one_of(st.uuids().map(str), text),
    }).map(encode_cursor)
    companions = [("sort", sort)] + ([("q", "report")] if sort == "rank" else [])
    return st.one_of(doc, junk).map(lambda c: ([("cursor", c), *companions], None))


def single(name: str, values) -> st.SearchStrategy:
    return values.map(lambda v: ([(name, v[0])], v[1]) if isinstance(v, tuple)
                      else ([(name, v)], None))


media_types = st.one_of(st.sampled_from(["image/*", "text/plain", "*/*", "image/",
                                         "application/pdf; charset=utf-8", "a/b/c"]), junk)
PARAMETERS = {
    "skip": single("skip", int_values(0, INT64 - 1)),
    "limit": single("limit", int_values(0, None)),  # the legacy list clamps, never refuses
    "q": single("q", st.one_of(junk, websearch, long_text)),
    "content_type": single("content_type", media_types),
    "created_by": single("created_by", st.one_of(junk, long_text)),
    "min_size": single("min_size", int_values(0, INT64 - 1)),
    "max_size": single("max_size", int_values(0, INT64 - 1)),
    "created_after": single("created_after", dates),
    "created_before": single("created_before", dates),
    "sort": single("sort", st.one_of(st.sampled_from(sorted(SORTS)), junk)),
    **{f"cursor:{sort}": cursors(sort) for sort in sorted(SORTS)},
    "metadata": st.tuples(text, st.one_of(junk, st.sampled_from(
        ["1", "-0", "1.5", "1e400", "true", "null", "9" * 20]))).map(
        lambda kv: ([("metadata." + kv[0], kv[1])], None)),
}


def query_string(params: list[tuple[str, str | bytes]]) -> str:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params)


# One app for the whole module (its start, with the migrations of a fresh prefix, costs
# more than fifty examples), on the module's event loop.
@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app(pg_dsn, keypair, tmp_path_factory):
    """(client, admin headers) of an app holding three files."""
    base = tmp_path_factory.mktemp("query-properties")
    config = Config(database_url=pg_dsn, table_prefix="hq" + secrets.token_hex(4),
                    storage_local_base_path=base / "store", data_dir=base / "data",
                    jwt_public_key_path=keypair[1], app_mode="edit", storage_disk_reserve=0,
                    log_format="text")
    config.check()
    headers = {"Authorization": "Bearer " + mint_token(
        keypair[0].read_bytes(), role="admin", token_type="service_account", name="hq")}
    async with TestClient(TestServer(make_app(config))) as client:
        for n, name in enumerate(("report-2025.pdf", "photo.jpg", "notes.txt")):
            await upload(client, headers, b"x" * (n + 1), name, metadata=json.dumps({"n": n}))
        yield client, headers


async def check(client, headers, path: str, params: list[tuple[str, str]], name: str,
                valid: bool | None) -> None:
    url = URL.build(path=path, query_string=query_string(params), encoded=True)
    resp = await client.get(url, headers=headers)
    body = await resp.json(content_type=None)
    assert resp.status < 500, (params, body)
    if resp.status == 200:
        expected = {"total", "files"} if path == LIST and {k for k, _ in params} <= {
            "skip", "limit"} else {"files", "next_cursor", "total", "total_is_estimate"}
        assert set(body) == expected, body
    else:
        assert (resp.status, resp.content_type) == (400, PROBLEM_JSON), (params, body)
        assert isinstance(body["detail"], str) and name in body["detail"], (params, body)
    if valid is not None:
        assert (resp.status == 200) is valid, (params, body)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("name", sorted(PARAMETERS))
@given(data=st.data())
async def test_every_query_parameter_is_answered_without_a_server_error(app, name, data):
    client, headers = app
    params, valid = data.draw(PARAMETERS[name], label="params")
    path = data.draw(st.sampled_from([LIST, SEARCH]), label="path")
    if name == "skip" and path == SEARCH:
        valid = None if valid is None else params[0][1] in ("0", "")  # no skip with search
    if name == "limit" and path == SEARCH and valid is not None:
        valid = 1 <= int(params[0][1]) <= 1000
    if data.draw(st.booleans(), label="repeated"):  # the same name twice
        params = params + params[:1]
        if name not in ("skip", "limit", "metadata") or (name, path) == ("limit", SEARCH):
            valid = False  # a search parameter may be given only once
        # (the legacy list reads the first skip/limit, as artStore did; metadata.<key>
        # filters may repeat, each must hold)
    await check(client, headers, path, params, name.partition(":")[0], valid)


def test_the_instants_know_their_range():
    """``iso`` decides validity on its own; the values that once were 500s are invalid."""
    last, first = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC), WALL_MIN
    assert iso(last, -MAX_OFFSET) == ("9999-12-31T23:59:59-23:59", False)
    assert iso(first, 14 * 60) == ("0001-01-01T00:00:00+14:00", False)
    assert iso(last, 1)[1] is True
    assert iso(first, -1)[1] is True
