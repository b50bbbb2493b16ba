"""Hostile input (S1-S30) against the real process, over raw sockets.

Every case must get a 4xx with a problem+json ``detail`` (framing errors too: aiohttp's
HTTP parser answers them before any application code, through storage/web/protocol.py),
never a 500 and never a hang; after all of
them the server is the same process, ready, and the invariant check finds no residue:
no file, row, temp file or reservation left by a refused request, the files that exist
unchanged byte for byte and metadata for metadata.

Most rules also have in-process tests (tests/domain/test_upload.py, test_files_api.py,
test_auth.py); these run through the real parser, the real socket and the real process,
and add what only shows there: framing, header limits, Expect: 100-continue, symlinks
planted in the storage tree, and a seeded mutation fuzzer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from relharness import (
    PROFILES,
    RESULTS,
    RawResponse,
    Timer,
    http_request,
    inspect_store,
    raw_http,
)

FILES = "/api/v1/files"


@dataclass
class Case:
    name: str
    request: bytes
    statuses: tuple[int, ...] = tuple(range(400, 500))
    check: object = None  # extra check: callable(RawResponse) -> str | None


@dataclass
class Tally:
    seen: list[tuple[str, int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def judge(self, case: Case, resp: RawResponse | Exception) -> None:
        if isinstance(resp, Exception):
            self.failures.append(f"{case.name}: no answer ({resp!r})")
            return
        self.seen.append((case.name, resp.status))
        if resp.status not in case.statuses:
            self.failures.append(f"{case.name}: {resp.status} {resp.body[:200]!r}")
        elif not resp.is_problem_json and resp.status not in (200, 201, 206):
            self.failures.append(f"{case.name}: {resp.status} without a JSON detail: "
                                 f"{resp.body[:200]!r}")
        if case.check is not None:
            problem = case.check(resp)
            if problem:
                self.failures.append(f"{case.name}: {problem}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict, claims: dict) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


def _hs256_with_public_key(public_pem: bytes, claims: dict) -> str:
    import hmac

    head = _unsigned({"alg": "HS256", "typ": "JWT"}, claims)
    sig = hmac.new(public_pem, head.encode(), hashlib.sha256).digest()
    return f"{head}.{_b64(sig)}"


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZb0undary",
              close: bool = True) -> tuple[bytes, str]:
    """(body, content type) from (name, filename, data) parts; raw bytes, no escaping."""
    out = bytearray()
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode(
            "utf-8", "surrogateescape") + data + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


JSON_BOMBS = {
    "deep-array-100k": "[" * 100_000 + "]" * 100_000,
    "deep-object-5k": '{"a":' * 5000 + "1" + "}" * 5000,
    "deep-40": '{"a":' * 40 + "1" + "}" * 40,
    "huge-float": '{"n": 1e400}',
    "huge-negative-float": '{"n": -1e400}',
    "huge-int-400-digits": '{"n": ' + "9" * 400 + "}",
    "huge-int-5000-digits": '{"n": ' + "9" * 5000 + "}",
    "int-over-2^53": '{"n": 9007199254740993}',
    "nan": '{"n": NaN}',
    "infinity": '{"n": Infinity}',
    "minus-infinity": '{"n": -Infinity}',
    "duplicate-keys": '{"a": 1, "a": 2}',
    "nul-in-value": '{"a": "x\\u0000y"}',
    "nul-in-key": '{"a\\u0000": 1}',
    "lone-surrogate-value": '{"a": "\\ud800"}',
    "lone-surrogate-key": '{"\\udfff": 1}',
    "top-level-array": "[1, 2, 3]",
    "top-level-string": '"metadata"',
    "ten-thousand-keys": json.dumps({f"k{i}": i for i in range(10_000)}),
    "truncated": '{"a": [1, 2',
    "bom": "\ufeff{}",
}


def _json_cases(fid: str, token: str) -> list[Case]:
    cases = []
    for name, doc in JSON_BOMBS.items():
        raw = doc.encode("utf-8", "surrogatepass")
        patch_body = b'{"metadata": ' + raw + b"}" if not name.startswith("top") else raw
        cases.append(Case(f"PATCH metadata {name}", http_request(
            "PATCH", f"{FILES}/{fid}", {"Authorization": token,
                                        "Content-Type": "application/json"}, patch_body)))
        body, ctype = multipart([("metadata", None, raw), ("file", "m.bin", b"data")])
        cases.append(Case(f"upload metadata field {name}", http_request(
            "POST", f"{FILES}/upload", {"Authorization": token, "Content-Type": ctype}, body)))
    cases.append(Case("PATCH invalid UTF-8", http_request(
        "PATCH", f"{FILES}/{fid}", {"Authorization": token, "Content-Type": "application/json"},
        b'{"description": "\xff\xfe"}')))
    cases.append(Case("PATCH 2 MB body", http_request(
        "PATCH", f"{FILES}/{fid}", {"Authorization": token, "Content-Type": "application/json"},
        b'{"metadata": {"a": "' + b"x" * 2_000_000 + b'"}}')))
    body, ctype = multipart([("metadata", None, b'{"a": "' + b"x" * 70_000 + b'"}'),
                             ("file", "m.bin", b"data")])
    cases.append(Case("upload metadata field 70 KB", http_request(
        "POST", f"{FILES}/upload", {"Authorization": token, "Content-Type": ctype}, body)))
    for name in ("nan", "deep-40", "nul-in-value", "duplicate-keys"):
        from urllib.parse import quote

        cases.append(Case(f"raw PUT ?metadata= {name}", http_request(
            "PUT", f"{FILES}/{uuid.uuid4()}?filename=a&metadata={quote(JSON_BOMBS[name])}",
            {"Authorization": token}, b"data")))
    return cases


def _path_cases(token: str) -> list[Case]:
    auth = {"Authorization": token}
    targets = [
        "/..%2F..%2Fetc%2Fpasswd", "/..%2F..%2Fetc%2Fpasswd/download", "/%2e%2e/download",
        "/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/./download", "/abc%5C..%5Cx/download",
        "/%2Fetc%2Fpasswd/download", "//etc/passwd", "/a%00b", "/%00/download",
        "/" + "a" * 5000, "/%C0%AE%C0%AE%2Fetc", "/..;/etc/passwd",
    ]
    cases = []
    for t in targets:
        cases.append(Case(f"GET {t[:40]}", http_request("GET", FILES + t, auth)))
    for method in ("PATCH", "DELETE"):
        cases.append(Case(f"{method} ..%2F", http_request(method, f"{FILES}/..%2F..%2Ftmp",
                                                          auth, b"{}")))
    cases.append(Case("PUT ..%2F id", http_request(
        "PUT", f"{FILES}/..%2F..%2Ftmp%2Fevil?filename=x", auth, b"evil")))
    cases.append(Case("GET ../../ (normalised)", http_request(
        "GET", "/api/v1/files/../../../etc/passwd", auth)))
    cases.append(Case("absolute-form target", http_request(
        "GET", "http://evil.example/etc/passwd", auth)))
    return cases


def _framing_cases(token: str) -> list[Case]:
    auth = {"Authorization": token}
    fid = uuid.uuid4()
    cases = [
        Case("30 KB header value", http_request("GET", f"{FILES}", {**auth, "X-Big": "a" * 30_000}),
             statuses=(431,)),
        Case("200 headers", http_request("GET", f"{FILES}", [("Authorization", token)] + [
            (f"X-H{i}", "v") for i in range(200)]), statuses=(431,)),
        Case("20 KB request target", http_request("GET", f"{FILES}?q={'a' * 20_000}", auth),
             statuses=(414,)),
        Case("header name with space", http_request("GET", FILES, {**auth, "Bad Name": "x"}),
             statuses=(400,)),
        Case("Content-Length and Transfer-Encoding", http_request(
            "PUT", f"{FILES}/{fid}?filename=a", {**auth, "Content-Length": "4",
                                                 "Transfer-Encoding": "chunked"},
            b"0\r\n\r\n"), statuses=(400,)),
        Case("negative Content-Length", http_request(
            "PUT", f"{FILES}/{fid}?filename=a", {**auth, "Content-Length": "-1"}),
            statuses=(400,)),
        Case("bad chunk size", http_request(
            "PUT", f"{FILES}/{uuid.uuid4()}?filename=a", {**auth, "Transfer-Encoding": "chunked"},
            b"zz\r\nhello\r\n0\r\n\r\n"), statuses=(400,)),
        Case("truncated chunked body then garbage", http_request(
            "PUT", f"{FILES}/{uuid.uuid4()}?filename=a", {**auth, "Transfer-Encoding": "chunked"},
            b"5\r\nhello\r\n3\r\nab"), statuses=(400, 408)),
        Case("Content-Length over the cap, Expect 100-continue", http_request(
            "PUT", f"{FILES}/{uuid.uuid4()}?filename=a",
            {**auth, "Content-Length": str(2**62), "Expect": "100-continue"}),
            statuses=(413, 507)),
        Case("Content-Length over the cap", http_request(
            "PUT", f"{FILES}/{uuid.uuid4()}?filename=a", {**auth, "Content-Length": str(2**62)}),
            statuses=(413, 507)),
        Case("Content-Length 2^70", http_request(
            "PUT", f"{FILES}/{uuid.uuid4()}?filename=a", {**auth, "Content-Length": str(2**70)}),
            statuses=(400, 413, 507)),
        Case("unknown method", http_request("BREW", FILES, auth), statuses=(405, 400, 501)),
        Case("bad content type on raw PUT", http_request(
            "PUT", f"{FILES}/{uuid.uuid4()}?filename=a", {**auth, "Content-Type": "a/b; c=\"\x01"},
            b"x"), statuses=(400,)),
        Case("content type not a media type", http_request(
            "PUT", f"{FILES}/{uuid.uuid4()}?filename=a", {**auth, "Content-Type": "a/b; c=\"d"},
            b"x")),
        Case("Content-Digest mismatch", http_request(
            "PUT", f"{FILES}/{uuid.uuid4()}?filename=a",
            {**auth, "Content-Digest": f"sha-256=:{base64.b64encode(b'0' * 32).decode()}:"},
            b"hello")),
        Case("malformed Content-Digest", http_request(
            "PUT", f"{FILES}/{uuid.uuid4()}?filename=a", {**auth, "Content-Digest": "sha-256=:!!:"},
            b"hello")),
        Case("raw PUT filename with NUL", http_request(
            "PUT", f"{FILES}/{uuid.uuid4()}?filename=a%00b", auth, b"x")),
        Case("raw PUT Content-Disposition invalid UTF-8", http_request(
            "PUT", f"{FILES}/{uuid.uuid4()}", [*auth.items(),
                                               ("Content-Disposition",
                                                'attachment; filename="\udcff\udcfe.txt"')],
            b"x"), statuses=(400, 201)),
    ]
    return cases


def _multipart_cases(token: str) -> list[Case]:
    auth = {"Authorization": token}
    many = [("f", None, b"x")] * 20_000 + [("file", "a.bin", b"data")]
    two = [("file", "a.bin", b"one"), ("file", "b.bin", b"two")]
    cases = []
    for name, parts, close in [("20000 parts", many, True), ("two file parts", two, True),
                               ("no closing boundary", [("file", "a.bin", b"x" * 70_000)], False),
                               ("no file part", [("description", None, b"d")], True),
                               ("field before file 70 KB", [("description", None, b"d" * 70_000),
                                                            ("file", "a", b"x")], True),
                               ("filename invalid UTF-8", [("file", "\udcff\udcfe.bin", b"x")],
                                True),
                               ("filename NUL", [("file", "a\x00b", b"x")], True),
                               ("file_id after the file", [("file", "a", b"x"),
                                                           ("file_id", None,
                                                            str(uuid.uuid4()).encode())], True),
                               ("file_id traversal", [("file_id", None, b"../../etc/passwd"),
                                                      ("file", "a", b"x")], True)]:
        body, ctype = multipart(parts, close=close)
        cases.append(Case(f"multipart {name}", http_request(
            "POST", f"{FILES}/upload", {**auth, "Content-Type": ctype}, body),
            statuses=(400, 422) if name != "filename invalid UTF-8" else (400, 422, 201)))
    body, _ = multipart([("file", "a", b"x")])
    cases += [
        Case("multipart without boundary", http_request(
            "POST", f"{FILES}/upload", {**auth, "Content-Type": "multipart/form-data"}, body)),
        Case("multipart with an empty boundary", http_request(
            "POST", f"{FILES}/upload", {**auth, "Content-Type": "multipart/form-data; boundary="},
            body)),
        Case("JSON to the multipart route", http_request(
            "POST", f"{FILES}/upload", {**auth, "Content-Type": "application/json"}, b"{}")),
        Case("multipart 20 KB part header", http_request(
            "POST", f"{FILES}/upload", {**auth, "Content-Type": "multipart/form-data; boundary=q"},
            b"--q\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + b"a" * 20_000
            + b"\"\r\n\r\nx\r\n--q--\r\n"), statuses=(400, 413, 422)),
        Case("nested multipart", http_request(
            "POST", f"{FILES}/upload", {**auth, "Content-Type": "multipart/form-data; boundary=q"},
            b"--q\r\nContent-Type: multipart/mixed; boundary=r\r\nContent-Disposition: form-data;"
            b" name=\"file\"\r\n\r\n--r\r\n\r\nx\r\n--r--\r\n--q--\r\n")),
    ]
    return cases


def _jwt_cases(public_pem: bytes, good_claims: dict) -> list[Case]:
    cases = []
    tokens = {
        "alg none": _unsigned({"alg": "none", "typ": "JWT"}, good_claims) + ".",
        "HS256 with the public key": _hs256_with_public_key(public_pem, good_claims),
        "garbage": "not-a-jwt",
        "bad base64": "eyJ!!!.e30.@@@",
        "header is an array": f"{_b64(b'[]')}.{_b64(b'{}')}.{_b64(b'x')}",
        "header not JSON": f"{_b64(b'nope')}.{_b64(b'{}')}.{_b64(b'x')}",
        "four parts": "a.b.c.d",
        "9 KB": "a" * 9000,
        "kid traversal": _unsigned({"alg": "RS256", "kid": "../../dev/null"}, good_claims) + ".x",
        "jku elsewhere": _unsigned({"alg": "RS256", "jku": "http://127.0.0.1:9/jwks"},
                                   good_claims) + ".x",
        "exp as a string": _unsigned({"alg": "none"}, {**good_claims, "exp": "never"}) + ".",
        "unicode": "\u00e9\u00e9.\u00e9.\u00e9",
    }
    for name, tok in tokens.items():
        for target, method, extra in ((f"{FILES}/{uuid.uuid4()}/download", "GET", {}),
                                      (f"{FILES}/{uuid.uuid4()}?filename=a", "PUT",
                                       {"Content-Length": "5", "Expect": "100-continue"})):
            headers = {"Authorization": f"Bearer {tok}", **extra}
            cases.append(Case(f"JWT {name} {method}", http_request(method, target, headers),
                              statuses=(401,)))
    for value in ("Basic dXNlcjpwdw==", "Bearer", "Bearer    ", "bearer", "Token abc"):
        cases.append(Case(f"Authorization {value!r}", http_request(
            "GET", FILES, {"Authorization": value}), statuses=(401,)))
    cases.append(Case("JWT 17 KB (over the token cap)", http_request(
        "GET", FILES, {"Authorization": "Bearer " + "a" * 17_000}), statuses=(401,)))
    return cases


def _range_cases(fid: str, size: int, token: str) -> list[Case]:
    auth = {"Authorization": token}
    url = f"{FILES}/{fid}/download"

    def bounded(limit: int):
        def check(resp: RawResponse) -> str | None:
            if len(resp.body) > limit:
                return f"{len(resp.body)} bytes for a {size}-byte file (amplification)"
            return None
        return check

    thousand = ",".join(f"{i}-{i}" for i in range(0, 2000, 2))
    overlapping = ",".join(["0-"] * 150)
    sixteen = ",".join(f"{i * 100}-{i * 100}" for i in range(16))
    return [
        Case("Range 1000 ranges", http_request("GET", url, {**auth, "Range": f"bytes={thousand}"}),
             statuses=(200, 206), check=bounded(size)),
        Case("Range 150 overlapping", http_request(
            "GET", url, {**auth, "Range": f"bytes={overlapping}"}), statuses=(200, 206),
            check=bounded(size)),
        Case("Range 16 tiny ranges", http_request(
            "GET", url, {**auth, "Range": f"bytes={sixteen}"}), statuses=(200, 206),
            check=bounded(size + 16 * 200)),
        Case("Range 15 KB header", http_request(
            "GET", url, {**auth, "Range": "bytes=" + "0-0," * 3700 + "0-0"}), statuses=(200, 206),
            check=bounded(size)),
        Case("Range bytes=-0", http_request("GET", url, {**auth, "Range": "bytes=-0"}),
             statuses=(416,), check=lambda r: None if r.header("Content-Range") ==
             f"bytes */{size}" else f"Content-Range {r.header('Content-Range')}"),
        Case("Range beyond the end", http_request(
            "GET", url, {**auth, "Range": f"bytes={size}-"}), statuses=(416,)),
        Case("Range 5-2", http_request("GET", url, {**auth, "Range": "bytes=5-2"}),
             statuses=(200,), check=bounded(size)),
        Case("Range items=0-5", http_request("GET", url, {**auth, "Range": "items=0-5"}),
             statuses=(200,), check=bounded(size)),
        Case("Range huge numbers", http_request(
            "GET", url, {**auth, "Range": "bytes=" + "9" * 500 + "-" + "9" * 600}),
            statuses=(200, 416), check=bounded(size)),
        Case("If-Range garbage", http_request(
            "GET", url, {**auth, "Range": "bytes=0-9", "If-Range": '"nope", W/"x"'}),
            statuses=(200,), check=bounded(size)),
    ]


FUZZ_TEMPLATES = [
    ("PATCH", "{files}/{fid}", {"Content-Type": "application/json"},
     b'{"description": "d", "metadata": {"a": [1, 2.5, "x", null, true]}}'),
    ("PUT", "{files}/{new}?filename=f.txt&description=d&metadata=%7B%22a%22%3A1%7D", {},
     b"fuzz body"),
    ("GET", "{files}/{fid}/download", {"Range": "bytes=0-10,20-30"}, b""),
    ("GET", "{files}?limit=10&skip=0", {}, b""),
    ("DELETE", "{files}/{new}", {}, b""),
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            del data[pos:pos + rng.randint(1, 8)]
        elif op == 1:
            data[pos:pos] = rng.choice([b"\x00", b"\xff", b"\\u0000", b"\\ud800", b"{", b"[",
                                        b'"', b"%00", b"%2F..", b"\r\n", b"NaN", b"1e999",
                                        b",", b":", "é".encode(), b"\xc0\xae"])
        elif op == 2 and data:
            data[pos % len(data)] = rng.randrange(256)
        elif op == 3:
            data[pos:pos] = data[pos:pos + rng.randint(1, 16)] * rng.randint(2, 50)
        else:
            data = data[:pos]
    return bytes(data)


def _fuzz_cases(rng: random.Random, n: int, fid: str, token: str) -> tuple[list[Case], set]:
    """Seeded mutations of valid requests; also the ids they may legitimately create."""
    cases, ids = [], set()
    for i in range(n):
        method, target, headers, body = rng.choice(FUZZ_TEMPLATES)
        new = uuid.UUID(int=rng.getrandbits(128))
        ids.add(str(new))
        target = target.format(files=FILES, fid=fid, new=new)
        where = rng.choice(("target", "body", "header"))
        if where == "target":
            target = _mutate(rng, target.encode()).decode("latin-1").replace(" ", "%20")
            target = target.replace("\r", "").replace("\n", "") or "/"
        elif where == "body" and body:
            body = _mutate(rng, body)
        else:
            headers = {k: _mutate(rng, v.encode()).decode("latin-1").replace("\r", "")
                       .replace("\n", "") for k, v in headers.items()} or {
                "X-Fuzz": _mutate(rng, b"value").decode("latin-1").replace("\r", "")
                .replace("\n", "")}
        req = (f"{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n".encode(
            "latin-1") + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        # any status but a 5xx is fine here: the fuzzer hunts crashes, not contracts
        cases.append(Case(f"fuzz #{i} {method} {where}", req,
                          statuses=tuple(range(200, 500))))
    return cases, ids


async def _expect_checks(port: int, token: str) -> list[str]:
    """Expect: 100-continue refused before the body: no ``100 Continue`` on the wire."""
    import asyncio

    problems = []
    for name, method, target, headers in [
        ("bad token", "PUT", f"{FILES}/{uuid.uuid4()}?filename=a",
         {"Authorization": "Bearer nope"}),
        ("no token", "POST", f"{FILES}/upload", {}),
        ("too large", "PUT", f"{FILES}/{uuid.uuid4()}?filename=a",
         {"Authorization": token, "Content-Length": str(2**62)}),
        ("too large, multipart", "POST", f"{FILES}/upload",
         {"Authorization": token, "Content-Length": str(2**62),
          "Content-Type": "multipart/form-data; boundary=b"}),
    ]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        hdrs = {"Content-Length": "100", "Expect": "100-continue", **headers}
        writer.write(http_request(method, target, hdrs))
        await writer.drain()
        first = await asyncio.wait_for(reader.readline(), 10)
        writer.transport.abort()
        if b" 100 " in first or first.startswith(b"HTTP/1.1 2"):
            problems.append(f"Expect with {name}: got {first!r} before any refusal")
    return problems


@pytest.fixture
def public_pem(keypair) -> bytes:
    return keypair[1].read_bytes()


async def _upload(port: int, token: str, data: bytes, name: str = "a.bin",
                  fid: str | None = None) -> dict:
    fid = fid or str(uuid.uuid4())
    from urllib.parse import quote

    resp = await raw_http(port, http_request(
        "PUT", f"{FILES}/{fid}?filename={quote(name)}", {"Authorization": token}, data))
    assert resp.status == 201, resp.body
    return resp.json()


@PROFILES
async def test_hostile_input(profile, server_factory, server_env, auth, token, public_pem,
                             tmp_path):
    row = RESULTS.row(f"hostile input S1-S30 [{profile}]")
    env = {**server_env, "UPLOAD_READ_TIMEOUT": "2"}
    root = Path(env["STORAGE_LOCAL_BASE_PATH"])
    server = server_factory(env)
    bearer = auth()["Authorization"]
    tally = Tally()
    with Timer(row):
        # the files that must come through untouched
        data = os.urandom(5000)
        victim = (await _upload(server.port, bearer, data))["file_id"]
        before = await inspect_store(env["DATABASE_URL"], env["DB_TABLE_PREFIX"], root)
        attr_before = {p: p.read_bytes() for p in root.rglob("*.attr.json")}
        good = json.loads(base64.urlsafe_b64decode(token().split(".")[1] + "=="))
        fuzz_target = (await _upload(server.port, bearer, b"fuzz me"))["file_id"]
        fuzzed, fuzz_ids = _fuzz_cases(random.Random(3011), profile.fuzz_cases, fuzz_target,
                                       bearer)
        attr_before = {p: b for p, b in attr_before.items() if fuzz_target not in p.name}
        cases = (_path_cases(bearer) + _framing_cases(bearer) + _multipart_cases(bearer)
                 + _json_cases(victim, bearer) + _jwt_cases(public_pem, good)
                 + _range_cases(victim, len(data), bearer) + fuzzed)
        for case in cases:
            try:
                resp = await raw_http(server.port, case.request, timeout=20)
            except (TimeoutError, ConnectionError, ValueError) as exc:
                resp = exc
            tally.judge(case, resp)
            row.rounds += 1
        tally.failures += await _expect_checks(server.port, bearer)
        # names that could escape if a path were built from them: stored under the root
        created = []
        for name in ("../../../../tmp/evil-escape.txt", "/etc/passwd", "C:\\temp\\x.txt",
                     "..", ".", "a\r\nSet-Cookie: x=1", "résumé €.pdf", "\u202etxt.exe"):
            resp = await raw_http(server.port, http_request(
                "PUT", f"{FILES}/{uuid.uuid4()}?filename={_pct(name)}", {"Authorization": bearer},
                b"named"))
            tally.seen.append((f"name {name!r}", resp.status))
            if resp.status == 201:
                created.append(resp.json()["file_id"])
                row.acked += 1
                got = await raw_http(server.port, http_request(
                    "GET", f"{FILES}/{resp.json()['file_id']}/download",
                    {"Authorization": bearer}))
                dispo = got.header_all("Content-Disposition")
                if len(dispo) != 1 or got.header("Set-Cookie") or got.body != b"named":
                    tally.failures.append(f"name {name!r}: download headers {got.headers}")
            elif resp.status >= 500 or not resp.is_problem_json:
                tally.failures.append(f"name {name!r}: {resp.status} {resp.body[:200]!r}")
        if Path("/tmp/evil-escape.txt").exists():
            tally.failures.append("a file name escaped the storage root")
        # health after all of it
        ready = await raw_http(server.port, http_request("GET", "/health/ready", {}))
        if ready.status != 200 or server.proc.poll() is not None:
            tally.failures.append(f"server not healthy afterwards: {ready.status}")
        after = await inspect_store(env["DATABASE_URL"], env["DB_TABLE_PREFIX"], root)
        attr_after = {p: p.read_bytes() for p in root.rglob("*.attr.json")}
        stray = set(after.rows) - set(before.rows) - set(created) - fuzz_ids - {fuzz_target}
        changed = [str(p) for p, b in attr_before.items() if attr_after.get(p) != b]
        if before.rows[victim] != after.rows[victim] or changed:
            tally.failures.append(f"the victim file changed: attr {changed}")
        got = await raw_http(server.port, http_request(
            "GET", f"{FILES}/{victim}/download", {"Authorization": bearer}))
        if got.body != data:
            row.lost += 1
            tally.failures.append("the victim file's bytes changed")
        row.residue += after.count + len(stray)
        if after.count or stray:
            tally.failures.append(f"residue: {after.describe()}; stray files {stray}")
        row.errors_500 += sum(s >= 500 for _n, s in tally.seen)
        row.acked += 1
        row.note(f"{len(cases)} hostile requests ({profile.fuzz_cases} fuzzed); statuses "
                 f"{sorted({s for _n, s in tally.seen})}")
    assert not tally.failures, "\n".join(tally.failures[:60])


def _pct(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _paths(root: Path, meta: dict) -> tuple[Path, Path]:
    data = root / meta["storage_path"] / meta["storage_filename"]
    return data, data.with_name(data.name + ".attr.json")


async def _meta(port: int, token: str, fid: str) -> dict:
    resp = await raw_http(port, http_request("GET", f"{FILES}/{fid}", {"Authorization": token}))
    assert resp.status == 200, resp.body
    return resp.json()


@PROFILES
async def test_symlinks_planted_in_the_tree(profile, server_factory, server_env, auth, tmp_path):
    """S29: symlinks planted in the storage tree never make the server read, serve, write
    or delete anything outside its root, nor serve one file's bytes for another."""
    row = RESULTS.row(f"symlinks planted in the tree [{profile}]")
    env = {**server_env}
    root = Path(env["STORAGE_LOCAL_BASE_PATH"])
    server = server_factory(env)
    bearer = auth()["Authorization"]
    outside = tmp_path / "outside"
    outside.mkdir()
    failures, statuses = [], []
    secret = b"S" * 4000

    async def call(method: str, target: str, body: bytes = b"", **headers) -> RawResponse:
        resp = await raw_http(server.port, http_request(
            method, target, {"Authorization": bearer, **headers}, body))
        statuses.append(resp.status)
        return resp

    def refused(resp: RawResponse, what: str) -> None:
        if resp.status < 400 or resp.status == 500 and b"internal_error" in resp.body:
            failures.append(f"{what}: {resp.status} {resp.body[:120]!r}")
        if secret[:64] in resp.body:
            failures.append(f"{what}: served bytes from outside the root")

    with Timer(row):
        for _ in range(max(1, profile.rounds // 10)):
            row.rounds += 1
            # (a) a data file replaced by a symlink to a same-sized file outside the root
            a = (await _upload(server.port, bearer, os.urandom(len(secret))))["file_id"]
            a_data, a_attr = _paths(root, await _meta(server.port, bearer, a))
            (outside / "secret.bin").write_bytes(secret)
            a_data.unlink()
            a_data.symlink_to(outside / "secret.bin")
            refused(await call("GET", f"{FILES}/{a}/download"), "data symlink -> outside")
            refused(await call("GET", f"{FILES}/{a}/download", Range="bytes=0-99"),
                    "data symlink -> outside, ranged")
            # (b) a data file replaced by a symlink to another stored file of the same size
            b_bytes = os.urandom(3000)
            b = (await _upload(server.port, bearer, b_bytes))["file_id"]
            c = (await _upload(server.port, bearer, os.urandom(3000)))["file_id"]
            b_data, _ = _paths(root, await _meta(server.port, bearer, b))
            c_data, _ = _paths(root, await _meta(server.port, bearer, c))
            c_data.unlink()
            c_data.symlink_to(b_data)
            got = await call("GET", f"{FILES}/{c}/download")
            if got.status == 200 and got.body == b_bytes:
                failures.append("data symlink -> another stored file: served its bytes")
            elif got.status < 400:
                failures.append(f"data symlink -> another stored file: {got.status}")
            # (c) an attr.json replaced by a symlink to a file outside: PATCH must not write
            #     through it, a read must not take metadata from it
            target = outside / "victim.json"
            target.write_bytes(b'{"keep": "me"}')
            a_attr.unlink()
            a_attr.symlink_to(target)
            resp = await call("PATCH", f"{FILES}/{a}", b'{"description": "through the link"}',
                              **{"Content-Type": "application/json"})
            if resp.status == 500 and b"internal_error" in resp.body:
                failures.append(f"PATCH through an attr symlink: {resp.status}")
            if target.read_bytes() != b'{"keep": "me"}':
                failures.append("PATCH wrote through an attr.json symlink outside the root")
            # (d) the current hour directory replaced by a symlink to a directory outside:
            #     uploads, PATCHes and deletes must not create, change or remove files there
            d = (await _upload(server.port, bearer, b"hour dir"))["file_id"]
            d_meta = await _meta(server.port, bearer, d)
            hour = root / d_meta["storage_path"]
            elsewhere = outside / f"hour-{uuid.uuid4().hex[:6]}"
            hour.rename(elsewhere)
            hour.symlink_to(elsewhere, target_is_directory=True)
            before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
            refused(await call("GET", f"{FILES}/{d}/download"), "hour dir symlink, GET")
            resp = await call("PATCH", f"{FILES}/{d}", b'{"description": "x"}',
                              **{"Content-Type": "application/json"})
            resp_put = await call("PUT", f"{FILES}/{uuid.uuid4()}?filename=new.bin", b"new")
            resp_del = await call("DELETE", f"{FILES}/{d}")
            now = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
            if now != before:
                added = set(now) - set(before)
                removed = set(before) - set(now)
                changed = {n for n in set(now) & set(before) if now[n] != before[n]}
                failures.append(f"through the hour-dir symlink (PATCH {resp.status}, PUT "
                                f"{resp_put.status}, DELETE {resp_del.status}): added "
                                f"{sorted(added)}, removed {sorted(removed)}, changed "
                                f"{sorted(changed)} outside the root")
            for r, what in ((resp, "PATCH"), (resp_put, "PUT"), (resp_del, "DELETE")):
                if r.status == 500 and b"internal_error" in r.body:
                    failures.append(f"hour dir symlink, {what}: unhandled 500")
            hour.unlink()  # the operator repairs the tree
            elsewhere.rename(hour)
            row.acked += 4
        ready = await raw_http(server.port, http_request("GET", "/health/ready", {}))
        if ready.status != 200:
            failures.append(f"not ready afterwards: {ready.status}")
        row.errors_500 += sum(s == 500 for s in statuses)
        row.residue += len(failures)
        row.note(f"statuses seen {sorted(set(statuses))}")
    assert not failures, "\n".join(failures)
