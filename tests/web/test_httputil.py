"""Pure unit tests for storage.web.ranges, storage.web.httputil (validators, dates, filenames)
and storage.web.digests."""

from __future__ import annotations

import base64
import email
import hashlib
import random
import re
import string
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import unquote

import pytest
from multidict import CIMultiDict

from storage.web.digests import (
    BadDigest,
    expected_digests,
    parse_content_digest,
    parse_content_md5,
    parse_legacy_digest,
)
from storage.web.httputil import (
    content_disposition,
    etag_for,
    http_date,
    if_match,
    if_modified_since,
    if_none_match,
    if_range_allows,
    parse_http_date,
)
from storage.web.ranges import RangeNotSatisfiable, content_range, multipart_byteranges, parse_range

SHA = hashlib.sha256(b"hello").hexdigest()
ETAG = f'"{SHA}"'
OTHER = f'"{hashlib.sha256(b"other").hexdigest()}"'
LAST_MODIFIED = datetime(2024, 3, 5, 10, 20, 30, 456789, tzinfo=UTC)
LM_TEXT = "Tue, 05 Mar 2024 10:20:30 GMT"


def sf(raw: bytes) -> str:
    return ":" + base64.b64encode(raw).decode() + ":"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# --------------------------------------------------------------------------- parse_range


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", [(0, 9)]),
        ("bytes=10-19", [(10, 19)]),
        ("bytes=0-0", [(0, 0)]),
        ("bytes=999-999", [(999, 999)]),
        ("bytes=990-", [(990, 999)]),
        ("bytes=0-", [(0, 999)]),
        ("bytes=-10", [(990, 999)]),
        ("bytes=-1", [(999, 999)]),
        ("bytes=-1000", [(0, 999)]),
        ("bytes=-5000", [(0, 999)]),  # suffix larger than size: whole representation
        ("bytes=995-2000", [(995, 999)]),  # end past EOF clamped
        ("bytes=0-99999999999999999999999", [(0, 999)]),
        ("Bytes=0-9", [(0, 9)]),  # range units are case-insensitive
        ("  bytes = 0 - 9 ,  20-29 ", [(0, 9), (20, 29)]),
        ("bytes=0-9,,20-29,", [(0, 9), (20, 29)]),  # empty list elements ignored
    ],
)
def test_parse_range_forms(header, expected):
    assert parse_range(header, 1000) == expected


def test_parse_range_multiple_keeps_request_order():
    assert parse_range("bytes=500-599,0-9,-10", 1000) == [(500, 599), (0, 9), (990, 999)]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9,5-19", [(0, 19)]),  # overlapping
        ("bytes=0-9,10-19", [(0, 19)]),  # adjacent
        ("bytes=10-19,0-9", [(0, 19)]),  # adjacent, reversed order
        ("bytes=0-99,10-19,20-29", [(0, 99)]),  # contained
        ("bytes=0-999,0-999,0-999", [(0, 999)]),
        ("bytes=-100,900-", [(900, 999)]),  # suffix and open range of the same bytes
        ("bytes=50-59,0-9,5-14", [(50, 59), (0, 14)]),  # merged part takes the earliest slot
    ],
)
def test_parse_range_coalesces(header, expected):
    assert parse_range(header, 1000) == expected


def test_parse_range_overlap_cannot_amplify():
    header = "bytes=" + ",".join(["0-999"] * 150)
    assert len(header) <= 1024
    assert parse_range(header, 1000) == [(0, 999)]


def test_parse_range_many_disjoint_ranges_are_ignored():
    header = "bytes=" + ",".join(f"{i}-{i}" for i in range(0, 34, 2))  # 17 ranges
    assert len(header) <= 1024
    assert parse_range(header, 1000) is None
    assert parse_range(header, 1000, max_ranges=17) == [(i, i) for i in range(0, 34, 2)]


def test_parse_range_exactly_max_ranges_is_served():
    header = "bytes=" + ",".join(f"{i}-{i}" for i in range(0, 32, 2))  # 16 ranges
    assert len(parse_range(header, 1000)) == 16


def test_parse_range_thousand_ranges_bounded():
    header = "bytes=" + ",".join(f"{i}-{i}" for i in range(1000))
    assert len(header) > 1024
    assert parse_range(header, 1000) is None  # too long: ignored, full 200


def test_parse_range_header_length_limit():
    padded = "bytes=0-9" + "," * (1024 - len("bytes=0-9"))
    assert len(padded) == 1024
    assert parse_range(padded, 1000) == [(0, 9)]
    assert parse_range(padded + ",", 1000) is None


@pytest.mark.parametrize(
    "header",
    [
        "bytes=1000-",
        "bytes=1000-2000",
        "bytes=5000-5001",
        "bytes=-0",
        "bytes=1000-,-0,2000-3000",
    ],
)
def test_parse_range_unsatisfiable(header):
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, 1000)
    assert info.value.size == 1000
    assert info.value.content_range == "bytes */1000"


def test_parse_range_drops_unsatisfiable_members():
    assert parse_range("bytes=2000-3000,0-4,-0", 1000) == [(0, 4)]


@pytest.mark.parametrize("header", ["bytes=0-0", "bytes=0-", "bytes=-1", "bytes=-0"])
def test_parse_range_zero_size_is_unsatisfiable(header):
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, 0)
    assert info.value.content_range == "bytes */0"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes",
        "bytes=",
        "bytes=,",
        "bytes=5-2",  # reversed: ignored (200), not 416
        "bytes=0-1,5-2",  # one invalid spec invalidates the header
        "bytes=-",
        "bytes=a-b",
        "bytes=1-2-3",
        "bytes=+1-2",
        "bytes=1_0-20",
        "bytes=１-２",  # non-ASCII digits
        "bytes=0x10-0x20",
        "bytes=0-9;q=1",
        "bytes 0-9",
        "bytes:0-9",
        "items=0-5",  # other unit: MUST ignore
        "none",
        "bytesx=0-5",
        "=0-5",
    ],
)
def test_parse_range_ignored(header):
    assert parse_range(header, 1000) is None


def test_parse_range_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        parse_range("bytes=0-1", -1)
    with pytest.raises(ValueError, match="max_ranges"):
        parse_range("bytes=0-1", 10, max_ranges=0)


def test_parse_range_fuzz_invariants():
    rng = random.Random(1234)
    for _ in range(2000):
        size = rng.choice([0, 1, 2, 10, 1000, 2**40])
        specs = []
        for _ in range(rng.randint(1, 30)):
            a, b = rng.randint(0, size + 5), rng.randint(0, size + 5)
            specs.append(rng.choice([f"{min(a, b)}-{max(a, b)}", f"{a}-", f"-{b}"]))
        try:
            result = parse_range("bytes=" + ",".join(specs), size)
        except RangeNotSatisfiable as exc:
            assert exc.size == size
            continue
        if result is None:
            continue
        assert 1 <= len(result) <= 16
        assert sum(end - start + 1 for start, end in result) <= size
        assert all(0 <= start <= end < size for start, end in result)
        ordered = sorted(result)
        assert all(a[1] + 1 < b[0] for a, b in zip(ordered, ordered[1:], strict=False))


# --------------------------------------------------------------------------- content_range


def test_content_range():
    assert content_range(0, 9, 100) == "bytes 0-9/100"
    assert content_range(99, 99, 100) == "bytes 99-99/100"


@pytest.mark.parametrize(("start", "end", "size"), [(5, 4, 10), (0, 10, 10), (-1, 2, 10)])
def test_content_range_rejects_invalid(start, end, size):
    with pytest.raises(ValueError, match="invalid range"):
        content_range(start, end, size)


# --------------------------------------------------------------------------- multipart/byteranges


def _assemble(plan, data: bytes) -> bytes:
    body = b"".join(header + data[start : end + 1] for header, start, end in plan.parts)
    return body + plan.trailer


def test_multipart_byteranges_length_matches_body_and_parses():
    data = (string.ascii_letters * 40).encode()
    ranges = [(0, 9), (100, 199), (len(data) - 5, len(data) - 1)]
    plan = multipart_byteranges(ranges, len(data), "text/plain; charset=utf-8")
    body = _assemble(plan, data)
    assert len(body) == plan.content_length
    assert re.fullmatch(r"[0-9a-f]{32}", plan.boundary)
    assert plan.content_type == f"multipart/byteranges; boundary={plan.boundary}"

    head = f"Content-Type: {plan.content_type}\r\n\r\n".encode()
    message = email.message_from_bytes(head + body)
    assert message.is_multipart()
    parts = message.get_payload()
    assert len(parts) == len(ranges)
    for part, (start, end) in zip(parts, ranges, strict=True):
        assert part["Content-Type"] == "text/plain; charset=utf-8"
        assert part["Content-Range"] == f"bytes {start}-{end}/{len(data)}"
        assert part.get_payload(decode=True) == data[start : end + 1]


def test_multipart_byteranges_binary_layout():
    data = bytes(range(256)) * 8
    ranges = [(0, 0), (10, 500), (2047, 2047)]
    plan = multipart_byteranges(ranges, len(data), "application/octet-stream", boundary="SEP")
    body = _assemble(plan, data)
    assert len(body) == plan.content_length
    assert body.startswith(b"--SEP\r\nContent-Type: application/octet-stream\r\n")
    assert body.endswith(b"\r\n--SEP--\r\n")
    chunks = body[: -len(b"\r\n--SEP--\r\n")].split(b"\r\n--SEP\r\n")
    chunks[0] = chunks[0].removeprefix(b"--SEP\r\n")
    for chunk, (start, end) in zip(chunks, ranges, strict=True):
        headers, payload = chunk.split(b"\r\n\r\n", 1)
        assert f"Content-Range: bytes {start}-{end}/2048".encode() in headers
        assert payload == data[start : end + 1]


def test_multipart_byteranges_without_content_type():
    plan = multipart_byteranges([(0, 1), (4, 5)], 10, "", boundary="b")
    assert all(b"Content-Type" not in header for header, _, _ in plan.parts)
    assert len(_assemble(plan, b"0123456789")) == plan.content_length


def test_multipart_byteranges_random_boundaries_differ():
    first = multipart_byteranges([(0, 0)], 1, "text/plain").boundary
    second = multipart_byteranges([(0, 0)], 1, "text/plain").boundary
    assert first != second


@pytest.mark.parametrize(
    ("ranges", "content_type", "boundary"),
    [
        ([], "text/plain", "b"),
        ([(0, 10)], "text/plain", "b"),  # past the end
        ([(0, 1)], "text/plain\r\nX-Evil: 1", "b"),
        ([(0, 1)], "text/plain", "bad\r\nboundary"),
        ([(0, 1)], "text/plain", ""),
        ([(0, 1)], "text/plain", "x" * 71),
        ([(0, 1)], "text/plain", "ends-with-space "),
    ],
)
def test_multipart_byteranges_rejects(ranges, content_type, boundary):
    with pytest.raises(ValueError):
        multipart_byteranges(ranges, 10, content_type, boundary=boundary)


# --------------------------------------------------------------------------- ETag and conditionals


def test_etag_for():
    assert etag_for(SHA) == ETAG
    assert etag_for(SHA.upper()) == ETAG


@pytest.mark.parametrize("value", ["", "abc", SHA + "0", SHA[:-1] + "g", f'"{SHA}"'])
def test_etag_for_rejects_non_sha256(value):
    with pytest.raises(ValueError, match="64 hex"):
        etag_for(value)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        ("", False),
        ("*", True),
        (" * ", True),
        (ETAG, True),
        (f"W/{ETAG}", True),  # weak comparison
        (f"{OTHER}, {ETAG}", True),
        (f'"a,b", W/{ETAG}', True),  # commas inside an opaque-tag
        (f"{OTHER}", False),
        (f"W/{OTHER}, {OTHER}", False),
        (SHA, False),  # unquoted: malformed, never a match
        (f"w/{ETAG}", False),  # W/ is case-sensitive
        (f"{ETAG} {OTHER}", False),  # missing comma: malformed
        (f"{ETAG}, *", False),  # "*" is not a list member
    ],
)
def test_if_none_match(header, expected):
    assert if_none_match(header, ETAG) is expected


def test_if_none_match_with_weak_current_etag():
    assert if_none_match('"v1"', 'W/"v1"') is True


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("*", True),
        (ETAG, True),
        (f"{OTHER}, {ETAG}", True),
        (f" {OTHER} ,{ETAG} ", True),
        (f"W/{ETAG}", False),  # strong comparison: weak never matches
        (OTHER, False),
        ("", False),
        (SHA, False),  # malformed fails closed
        (f"{ETAG}garbage", False),
    ],
)
def test_if_match(header, expected):
    assert if_match(header, ETAG) is expected


def test_if_match_weak_current_etag_never_matches():
    assert if_match('"v1"', 'W/"v1"') is False


def test_conditionals_reject_malformed_own_etag():
    with pytest.raises(ValueError, match="entity-tag"):
        if_none_match(ETAG, SHA)
    with pytest.raises(ValueError, match="entity-tag"):
        if_match(ETAG, f"{ETAG}, {OTHER}")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, True),
        (ETAG, True),
        (f"  {ETAG} ", True),
        (OTHER, False),
        (f"W/{ETAG}", False),  # weak tags never allow a range
        (f"{ETAG}, {OTHER}", False),  # If-Range takes one validator
        (LM_TEXT, True),  # date equal at second precision
        ("Tuesday, 05-Mar-24 10:20:30 GMT", True),  # RFC 850 form
        ("Tue Mar  5 10:20:30 2024", True),  # asctime form
        ("Tue, 05 Mar 2024 10:20:29 GMT", False),
        ("Tue, 05 Mar 2024 10:20:31 GMT", False),  # later is not "equal"
        ("not a date", False),
        ("", False),
    ],
)
def test_if_range_allows(header, expected):
    assert if_range_allows(header, ETAG, LAST_MODIFIED) is expected


def test_if_range_date_with_non_utc_last_modified():
    moscow = LAST_MODIFIED.astimezone(timezone(timedelta(hours=3)))
    assert if_range_allows(LM_TEXT, ETAG, moscow) is True


# --------------------------------------------------------------------------- dates


def test_http_date_formats_utc_and_drops_microseconds():
    assert http_date(LAST_MODIFIED) == LM_TEXT
    plus3 = LAST_MODIFIED.astimezone(timezone(timedelta(hours=3)))
    assert http_date(plus3) == LM_TEXT


def test_http_date_rejects_naive():
    with pytest.raises(ValueError, match="timezone-aware"):
        http_date(LAST_MODIFIED.replace(tzinfo=None))


@pytest.mark.parametrize(
    "value",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
        "  Sun, 06 Nov 1994 08:49:37 GMT  ",
        "Sun, 06 Nov 1994 10:49:37 +0200",
    ],
)
def test_parse_http_date_accepts_all_forms(value):
    parsed = parse_http_date(value)
    assert parsed == datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC)
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        "Sun, 31 Feb 1994 08:49:37 GMT",
        "Sun, 06 Nov 99999 08:49:37 GMT",
        "x" * 65,
    ],
)
def test_parse_http_date_invalid(value):
    assert parse_http_date(value) is None


def test_http_date_round_trip():
    assert parse_http_date(http_date(LAST_MODIFIED)) == LAST_MODIFIED.replace(microsecond=0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        (LM_TEXT, True),  # same second (microseconds ignored)
        ("Wed, 06 Mar 2024 00:00:00 GMT", True),  # later than Last-Modified
        ("Tue, 05 Mar 2024 10:20:29 GMT", False),  # modified since
        ("garbage", False),
    ],
)
def test_if_modified_since(header, expected):
    assert if_modified_since(header, LAST_MODIFIED) is expected


def test_if_modified_since_rejects_naive_last_modified():
    with pytest.raises(ValueError, match="timezone-aware"):
        if_modified_since(LM_TEXT, LAST_MODIFIED.replace(tzinfo=None))


# --------------------------------------------------------------------------- Content-Disposition


def _filename_star(value: str) -> str | None:
    m = re.search(r"filename\*=UTF-8''([^;]*)$", value)
    return unquote(m[1], encoding="utf-8", errors="strict") if m else None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", 'attachment; filename="report.pdf"'),
        ("my report (v2);final.txt", 'attachment; filename="my report (v2);final.txt"'),
        (
            'say "hi".txt',
            'attachment; filename="say \\"hi\\".txt"; filename*=UTF-8\'\'say%20%22hi%22.txt',
        ),
        ("back\\slash.txt",
         "attachment; filename=\"slash.txt\"; filename*=UTF-8''back%5Cslash.txt"),
        # the plain name is the last path component, never with / \\ or .. (issue 19)
        ("../../../../tmp/x.txt",
         "attachment; filename=\"x.txt\"; filename*=UTF-8''..%2F..%2F..%2F..%2Ftmp%2Fx.txt"),
        ("\uff0e\uff0e\uff0fx",  # ．．／x: the ASCII fallback would read ../x
         "attachment; filename=\"x\"; filename*=UTF-8''%EF%BC%8E%EF%BC%8E%EF%BC%8Fx"),
        ("dir/", "attachment; filename=\"file\"; filename*=UTF-8''dir%2F"),
        ("a/..", "attachment; filename=\"file\"; filename*=UTF-8''a%2F.."),
        ("report..final.txt",
         "attachment; filename=\"report.final.txt\"; filename*=UTF-8''report..final.txt"),
        ("100%.txt", "attachment; filename=\"100_.txt\"; filename*=UTF-8''100%25.txt"),
        (
            "отчёт.pdf",
            'attachment; filename="_____.pdf"; '
            "filename*=UTF-8''%D0%BE%D1%82%D1%87%D1%91%D1%82.pdf",
        ),
        (
            "résumé €.pdf",
            'attachment; filename="resume _.pdf"; '
            "filename*=UTF-8''r%C3%A9sum%C3%A9%20%E2%82%AC.pdf",
        ),
        ("😀.png", "attachment; filename=\"_.png\"; filename*=UTF-8''%F0%9F%98%80.png"),
        ("", 'attachment; filename="file"'),
        ("   ", 'attachment; filename="file"'),
        ("..", 'attachment; filename="file"'),
        ("\r\n\t\x00", 'attachment; filename="file"'),
        ("😀", "attachment; filename=\"_\"; filename*=UTF-8''%F0%9F%98%80"),
    ],
)
def test_content_disposition(name, expected):
    assert content_disposition(name) == expected


def test_content_disposition_round_trips_unicode_name():
    for name in ["отчёт.pdf", "日本.txt", "résumé €.pdf", "👨‍👩‍👧 family.jpg", 'a%20b\\c".txt']:
        assert _filename_star(content_disposition(name)) == name


def test_content_disposition_safe_ascii_has_no_extended_parameter():
    for name in ["a b+c&d.txt", "x-y_z.tar.gz", "[1] {2} (3) ~!#$&'=@^`|.bin"]:
        assert content_disposition(name) == f'attachment; filename="{name}"'


def test_content_disposition_nfc_normalises():
    decomposed = "re\u0301sume\u0301.pdf"
    assert _filename_star(content_disposition(decomposed)) == "résumé.pdf"


@pytest.mark.parametrize(
    "name",
    [
        "a\r\nSet-Cookie: x=1",
        "evil.txt\r\n\r\n<html>",
        "a\nb",
        "a\rb",
        "a\x00b\x7fc\x85d",
        "line\u2028sep\u2029.txt",
        "отчёт\r\nX-Injected: 1.pdf",
    ],
)
def test_content_disposition_strips_injection(name):
    value = content_disposition(name)
    assert "\r" not in value and "\n" not in value
    assert all(0x20 <= ord(c) < 0x7F for c in value)
    value.encode("latin-1")
    assert value.count("filename=") == 1


def test_content_disposition_drops_bidi_overrides():
    assert content_disposition("invoice\u202egpj.exe") == 'attachment; filename="invoicegpj.exe"'
    value = content_disposition("счёт\u202egpj.exe")
    assert _filename_star(value) == "счётgpj.exe"


def test_content_disposition_inline_and_validation():
    assert content_disposition("a.txt", "inline") == 'inline; filename="a.txt"'
    assert content_disposition("a.txt", "INLINE") == 'inline; filename="a.txt"'
    for bad in ["", "attachment; x=1", "in line", "attach\r\nment"]:
        with pytest.raises(ValueError, match="token"):
            content_disposition("a.txt", bad)


def test_content_disposition_fuzz_is_always_safe_ascii():
    rng = random.Random(99)
    alphabet = (string.printable + '\x00\x7f\x85\u202e\u2028отчёт日本😀\ud800é\u0301"\\%;'
                + "...///\uff0e\uff0f\uff3c\u2024\u2215")  # path parts, and look-alikes
    for _ in range(2000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        value = content_disposition(name)
        assert re.fullmatch(r"[\x20-\x7e]+", value)
        fallback = re.match(r'attachment; filename="((?:[^"\\]|\\.)*)"', value)
        assert fallback and fallback[1]
        plain = re.sub(r"\\(.)", r"\1", fallback[1])  # quoted-string unescaped
        assert not re.search(r"[/\\]|\.\.", plain), (name, value)


# --------------------------------------------------------------------------- digests


SHA256 = hashlib.sha256(b"payload").digest()
SHA512 = hashlib.sha512(b"payload").digest()
MD5 = hashlib.md5(b"payload").digest()  # noqa: S324 - protocol digest, not security


def test_parse_content_digest_single_and_multiple():
    assert parse_content_digest(f"sha-256={sf(SHA256)}") == {"sha256": SHA256}
    value = f"sha-512={sf(SHA512)},  sha-256={sf(SHA256)} , md5={sf(MD5)}"
    assert parse_content_digest(value) == {"sha256": SHA256, "sha512": SHA512, "md5": MD5}


def test_parse_content_digest_ignores_unknown_and_parameters():
    value = (
        f'unixsum=30637, foo=(1 2 "a,b)");q=1, flag, crc32c={sf(b"1234")}, '
        f"sha-256={sf(SHA256)};note=x"
    )
    assert parse_content_digest(value) == {"sha256": SHA256}


def test_parse_content_digest_last_duplicate_wins_and_case():
    other = hashlib.sha256(b"other").digest()
    assert parse_content_digest(f"sha-256={sf(other)}, sha-256={sf(SHA256)}") == {"sha256": SHA256}
    assert parse_content_digest(f"SHA-256={sf(SHA256)}") == {"sha256": SHA256}


def test_parse_content_digest_tolerates_missing_padding():
    unpadded = ":" + base64.b64encode(SHA256).decode().rstrip("=") + ":"
    assert parse_content_digest(f"sha-256={unpadded}") == {"sha256": SHA256}


def test_parse_content_digest_empty_is_empty():
    assert parse_content_digest("") == {}
    assert parse_content_digest("   ") == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (f"sha-256={b64(SHA256)}", "malformed"),  # legacy form: "=" padding is not a token
        ("sha-256=abc", "byte sequence"),  # a token, not a byte sequence
        ('sha-256="abc"', "byte sequence"),
        ("sha-256", "byte sequence"),
        ("sha-256=:not base64!:", "malformed"),
        ("sha-256=:@@@@:", "malformed"),
        (f"sha-256={sf(SHA256[:31])}", "expected 32 bytes"),
        (f"sha-256={sf(SHA256)},", "trailing"),
        (f"sha-256={sf(SHA256)} sha-512={sf(SHA512)}", "malformed"),
        (f"sha-256={sf(SHA256)};", "malformed"),
        ("=:abc:", "malformed"),
        ("foo=(1 2", "malformed"),
        ("a" * 5000, "too long"),
    ],
)
def test_parse_content_digest_malformed(value, message):
    with pytest.raises(BadDigest, match=message):
        parse_content_digest(value)


def test_bad_digest_is_value_error():
    assert issubclass(BadDigest, ValueError)


def test_parse_content_md5():
    assert parse_content_md5(b64(MD5)) == MD5
    assert parse_content_md5(f"  {b64(MD5)} ") == MD5


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (MD5.hex(), "not hex"),
        ("", "expected 16 bytes"),
        (b64(SHA256), "expected 16 bytes"),
        ("!!!!", "base64"),
        (b64(MD5)[:-4] + "a b=", "base64"),
    ],
)
def test_parse_content_md5_invalid(value, message):
    with pytest.raises(BadDigest, match=message):
        parse_content_md5(value)


def test_parse_legacy_digest():
    value = f"SHA-256={b64(SHA256)}, md5={b64(MD5)}, UNIXsum=30637, SHA={b64(b'x' * 20)}"
    assert parse_legacy_digest(value) == {"sha256": SHA256, "md5": MD5}
    assert parse_legacy_digest(f" ,SHA-512 = {b64(SHA512)} ,, ") == {"sha512": SHA512}
    assert parse_legacy_digest("") == {}
    with pytest.raises(BadDigest, match="too long"):
        parse_legacy_digest("x" * 5000)


@pytest.mark.parametrize(
    "value", ["SHA-256", f"={b64(SHA256)}", "SHA-256=zz", f"SHA-256={b64(MD5)}"]
)
def test_parse_legacy_digest_invalid(value):
    with pytest.raises(BadDigest):
        parse_legacy_digest(value)


def test_expected_digests_sources():
    assert expected_digests({}) == {}
    assert expected_digests({"Content-Digest": f"sha-256={sf(SHA256)}"}) == {"sha256": SHA256}
    assert expected_digests({"repr-digest": f"sha-256={sf(SHA256)}"}) == {"sha256": SHA256}
    assert expected_digests({"DIGEST": f"SHA-256={b64(SHA256)}"}) == {"sha256": SHA256}
    assert expected_digests({"Content-MD5": b64(MD5)}) == {"md5": MD5}


def test_expected_digests_combines_and_ignores_others():
    headers = {
        "Content-Digest": f"sha-512={sf(SHA512)}, sha-256={sf(SHA256)}",
        "Repr-Digest": f"sha-256={sf(SHA256)}",
        "Digest": f"SHA-256={b64(SHA256)}, MD5={b64(MD5)}",
        "Content-MD5": b64(MD5),
        "Content-Type": "text/plain",
    }
    assert expected_digests(headers) == {"sha256": SHA256, "md5": MD5}


def test_expected_digests_multidict_repeated_fields():
    headers = CIMultiDict(
        [("Content-Digest", f"sha-512={sf(SHA512)}"), ("content-digest", f"sha-256={sf(SHA256)}")]
    )
    assert expected_digests(headers) == {"sha256": SHA256}


def test_expected_digests_conflict():
    other = hashlib.sha256(b"other").digest()
    headers = {"Content-Digest": f"sha-256={sf(SHA256)}", "Repr-Digest": f"sha-256={sf(other)}"}
    with pytest.raises(BadDigest, match="conflicting sha256"):
        expected_digests(headers)
    other_md5 = hashlib.md5(b"other").digest()  # noqa: S324
    with pytest.raises(BadDigest, match="conflicting md5"):
        expected_digests({"Content-MD5": b64(MD5), "Digest": f"MD5={b64(other_md5)}"})


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Content-Digest": "sha-256=nope"}, "Content-Digest: sha-256"),
        ({"Repr-Digest": "sha-256=:AAAA:"}, "Repr-Digest: sha-256: expected 32 bytes"),
        ({"Digest": "SHA-256"}, "Digest: malformed element"),
        ({"Content-MD5": "abc"}, "Content-MD5"),
    ],
)
def test_expected_digests_malformed_names_the_header(headers, message):
    with pytest.raises(BadDigest, match=re.escape(message)):
        expected_digests(headers)
