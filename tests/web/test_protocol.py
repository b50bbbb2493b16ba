"""Errors of aiohttp's HTTP parser are problem+json too (storage/web/protocol.py), over raw
sockets, against the app as the test client serves it and as ``python run.py`` does."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from helpers import stored_objects

from storage.web.protocol import MAX_HEADER_LINE, MAX_REQUEST_LINE, classify

SEARCH = "/api/v1/files/search"


async def raw(host: str, port: int, request: bytes, *, then: bytes = b"",
              pause: float = 0.0) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the answer to ``request`` (and ``then`` after ``pause``)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        if then:
            await asyncio.sleep(pause)
            writer.write(then)
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *lines = head.decode("latin-1").strip().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    finally:
        writer.close()
    return int(status_line.split()[1]), headers, body


def request(method: str, target: str, headers: dict[str, str] | None = None,
            body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: x",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def cases(token: str) -> dict[str, tuple[bytes, int, str]]:
    auth = {"Authorization": token}
    put = f"/api/v1/files/{uuid.uuid4()}"
    return {
        "60,000-char q": (request("GET", f"{SEARCH}?q={'a' * 60_000}", auth), 414,
                          f"longer than {MAX_REQUEST_LINE} bytes"),
        "request target one over": (
            request("GET", "/" + "a" * MAX_REQUEST_LINE, auth), 414, "request target"),
        "header line too long": (request("GET", SEARCH, {**auth, "X-Big": "b" * 30_000}), 431,
                                 f"longer than {MAX_HEADER_LINE} bytes"),
        "too many headers": (request("GET", SEARCH, {**auth, **{f"X-H{i}": "v"
                                                                for i in range(200)}}),
                             431, "Too many request headers"),
        "Content-Length with Transfer-Encoding": (
            request("PUT", put, {**auth, "Content-Length": "5", "Transfer-Encoding": "chunked"},
                    b"0\r\n\r\n"), 400, "Transfer-Encoding can't be present with Content-Length"),
        "bad chunk size": (request("PUT", put, {**auth, "Transfer-Encoding": "chunked"},
                                   b"zz\r\nhello\r\n0\r\n\r\n"), 400, "chunk size"),
        "bad request line": (b"GARBAGE\r\n\r\n", 400, "Invalid method"),
        "bad HTTP version": (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400, "Invalid HTTP version"),
        "negative Content-Length": (request("PUT", put, {**auth, "Content-Length": "-1"}), 400,
                                    "Content-Length"),
    }


def assert_problem(status: int, headers: dict[str, str], body: bytes, expected: int,
                   words: str) -> None:
    assert status == expected, body
    assert headers["content-type"].startswith("application/problem+json")
    doc = json.loads(body)
    assert doc["status"] == expected and isinstance(doc["detail"], str)
    assert words in doc["detail"], doc
    assert headers["connection"] == "close"
    assert len(headers["x-request-id"]) == 32  # a fresh id: the request's own was never read


@pytest.mark.parametrize("name", list(cases("t")))
async def test_framing_errors_are_problem_json(client, auth, config, name):
    payload, expected, words = cases(auth()["Authorization"])[name]
    status, headers, body = await raw(client.server.host, client.server.port, payload)
    assert_problem(status, headers, body, expected, words)
    assert await stored_objects(config) == []
    resp = await client.get("/health/live")  # the server itself is unharmed
    assert resp.status == 200


async def test_a_bad_chunk_after_the_upload_started_ends_it_cleanly(app_factory, auth, pg_dsn):
    """A framing error in a later packet, while the handler streams the body: aiohttp's
    parser drops that body without telling its reader, so the upload's read deadline
    (UPLOAD_READ_TIMEOUT) ends it: a problem+json 408, and the upload is undone."""
    from helpers import config_of, wal_outcomes

    client = await app_factory(upload_read_timeout=1)
    head = request("PUT", f"/api/v1/files/{uuid.uuid4()}",
                   {**auth(), "Transfer-Encoding": "chunked"}, b"5\r\nhello\r\n")
    status, headers, body = await raw(client.server.host, client.server.port, head,
                                      then=b"zz\r\nworld\r\n0\r\n\r\n", pause=0.3)
    assert status == 408 and headers["content-type"].startswith("application/problem+json")
    assert "too slow" in json.loads(body)["detail"]
    config = config_of(client)
    assert await wal_outcomes(pg_dsn, config) == [("rolled_back", 0)]
    assert await stored_objects(config) == []


async def test_a_long_header_below_the_limit_still_reaches_the_app(client, auth):
    """Limits are the parser's only: a 20 KB header value under the 24 KiB line limit is
    an ordinary request (and the app's own answers keep their request id and CORS)."""
    resp = await client.get(SEARCH, headers={**auth(), "X-Big": "b" * 20_000,
                                             "X-Request-ID": "mine"})
    assert resp.status == 200 and resp.headers["X-Request-ID"] == "mine"


def test_python_run_py_answers_framing_errors_as_problem_json(server_env, server_factory,
                                                              token):
    """The real process (storage/cli/lifecycle.py's runner), not only the test client."""
    server = server_factory(server_env)

    async def probe():
        for payload, expected, words in cases(f"Bearer {token()}").values():
            status, headers, body = await raw("127.0.0.1", server.port, payload)
            assert_problem(status, headers, body, expected, words)

    asyncio.run(probe())


def test_errors_that_escape_the_middlewares_are_classified_without_a_parser_error():
    """handle_error is also aiohttp's last resort for a handler error outside the
    middlewares (none should happen) and a handler timeout: 500 / 504, never a trace."""
    limits = {"max_line": MAX_REQUEST_LINE, "max_field": MAX_HEADER_LINE}
    assert classify(RuntimeError("boom"), 500, **limits) == (
        500, "internal_error", "Internal server error")
    assert classify(None, 504, **limits)[0] == 504
