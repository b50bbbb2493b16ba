"""Pure HTTP helpers for downloads and uploads: Range, validators, dates, filenames, digests.

Nothing here does I/O or touches aiohttp; handlers feed header strings in and map the
results (and the two exceptions) to responses.  aiohttp's ``FileResponse`` gets If-Range
with entity tags, multi-range and ``bytes=-0`` wrong and uses an ``mtime-size`` ETag
(reliability guide §0.4, §C.2), which is why this module exists.

Summary of the decisions a handler relies on:

* ``parse_range`` returns ``None`` for "ignore Range, send 200 with the full body" and
  raises ``RangeNotSatisfiable`` for 416; a returned list is never empty.
* Conditional helpers follow RFC 9110 §13.2.2 precedence: If-Match, then
  If-None-Match (If-Modified-Since only when If-None-Match is absent), then If-Range.
* Every header value produced here is plain ASCII with no control characters.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
import secrets
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import NamedTuple
from urllib.parse import quote

MAX_RANGE_HEADER = 1024
MAX_DIGEST_HEADER = 4096
MAX_DATE_HEADER = 64


# --------------------------------------------------------------------------- Range


class RangeNotSatisfiable(Exception):
    """No range in a valid ``bytes`` Range header overlaps the representation (→ 416).

    The caller answers 416 with ``Content-Range: {exc.content_range}`` (RFC 9110 §15.5.17).
    """

    def __init__(self, size: int) -> None:
        super().__init__(f"no satisfiable byte range for a representation of {size} bytes")
        self.size = size

    @property
    def content_range(self) -> str:
        return f"bytes */{self.size}"


_INT_RANGE = re.compile(r"([0-9]+)[ \t]*-[ \t]*([0-9]*)")
_SUFFIX_RANGE = re.compile(r"-[ \t]*([0-9]+)")


def parse_range(
    header: str | None, size: int, *, max_ranges: int = 16
) -> list[tuple[int, int]] | None:
    """Parse a Range header (RFC 9110 §14.1.1, §14.2) against a representation of ``size`` bytes.

    Returns inclusive ``(start, end)`` pairs with ``end`` clamped to ``size - 1``, or
    ``None`` meaning "ignore Range and send 200": header absent, longer than 1024
    characters, a unit other than ``bytes`` (RFC 9110 §14.2 MUST ignore), or any
    syntactically invalid range-spec including ``5-2`` (which §14.2 lets us ignore).

    Unsatisfiable specs (``first >= size``, ``-0``, anything when ``size == 0``) are
    dropped; if none is left, ``RangeNotSatisfiable`` is raised (§14.1.1, §15.5.17).

    Amplification guard (§14.2 "MAY ignore or reject ... many small ranges"):
    overlapping and adjacent ranges are coalesced, so the bytes selected never exceed
    ``size``.  If more than ``max_ranges`` disjoint ranges remain the header is ignored
    (``None`` → 200 with the whole body), as Apache does past ``MaxRanges`` and as the
    guide's S27 expects.  That sends at most ``size`` bytes with no per-part overhead;
    coalescing into one covering range would return bytes nobody asked for under a 206,
    and 416 would wrongly tell a client with satisfiable ranges that none were.

    Coalesced ranges keep the order of their first range-spec (§14.6 SHOULD).
    """
    if size < 0 or max_ranges < 1:
        raise ValueError("size must be >= 0 and max_ranges >= 1")
    if header is None or len(header) > MAX_RANGE_HEADER:
        return None
    unit, eq, range_set = header.partition("=")
    if not eq or unit.strip(" \t").lower() != "bytes":
        return None
    specs = _parse_range_set(range_set)
    if specs is None:
        return None
    ranges = [r for r in (_resolve(first, last, size) for first, last in specs) if r]
    if not ranges:
        raise RangeNotSatisfiable(size)
    merged = _coalesce(ranges)
    return merged if len(merged) <= max_ranges else None


def _parse_range_set(text: str) -> list[tuple[int | None, int | None]] | None:
    """``(first, last)`` per range-spec, ``(None, n)`` for a suffix; None when invalid."""
    specs: list[tuple[int | None, int | None]] = []
    for element in text.split(","):
        element = element.strip(" \t")
        if not element:  # RFC 9110 §5.6.1: empty list elements are ignored
            continue
        if m := _INT_RANGE.fullmatch(element):
            first, last = int(m[1]), int(m[2]) if m[2] else None
            if last is not None and last < first:
                return None
            specs.append((first, last))
        elif m := _SUFFIX_RANGE.fullmatch(element):
            specs.append((None, int(m[1])))
        else:
            return None
    return specs or None


def _resolve(first: int | None, last: int | None, size: int) -> tuple[int, int] | None:
    """Map one spec onto ``[0, size)``; None when that spec is unsatisfiable."""
    if first is None:
        suffix = last or 0
        return (max(0, size - suffix), size - 1) if suffix > 0 and size > 0 else None
    if first >= size:
        return None
    return first, size - 1 if last is None else min(last, size - 1)


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping/adjacent ranges; each result keeps its earliest request position."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    merged: list[list[int]] = []  # [start, end, first_index]
    for i in order:
        start, end = ranges[i]
        if merged and start <= merged[-1][1] + 1:
            last = merged[-1]
            last[1], last[2] = max(last[1], end), min(last[2], i)
        else:
            merged.append([start, end, i])
    merged.sort(key=lambda m: m[2])
    return [(start, end) for start, end, _ in merged]


def content_range(start: int, end: int, size: int) -> str:
    """``Content-Range`` for a 206 part: ``bytes start-end/size`` (RFC 9110 §14.4)."""
    if not 0 <= start <= end < size:
        raise ValueError(f"invalid range {start}-{end} for size {size}")
    return f"bytes {start}-{end}/{size}"


class ByteRanges(NamedTuple):
    """Layout of a ``multipart/byteranges`` body (RFC 9110 §14.6).

    Write, for each ``(header, start, end)`` in ``parts``, ``header`` then the bytes
    ``start..end`` (inclusive) of the representation; finish with ``trailer``.  The
    result is exactly ``content_length`` bytes.
    """

    boundary: str
    parts: list[tuple[bytes, int, int]]
    trailer: bytes
    content_length: int

    @property
    def content_type(self) -> str:
        return f"multipart/byteranges; boundary={self.boundary}"


_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_FIELD_VALUE = re.compile(r"[\x20-\x7e\t]*")


def multipart_byteranges(
    ranges: Sequence[tuple[int, int]],
    size: int,
    content_type: str,
    *,
    boundary: str | None = None,
) -> ByteRanges:
    """Plan a multipart/byteranges body so it can be streamed with an exact Content-Length.

    ``boundary`` defaults to 32 random hex digits (RFC 2046 §5.1.1 syntax is enforced
    when one is given).  Each part carries ``Content-Type`` (omitted when
    ``content_type`` is empty) and ``Content-Range``.
    """
    if not ranges:
        raise ValueError("at least one range is required")
    if not _FIELD_VALUE.fullmatch(content_type):
        raise ValueError("content_type must be printable ASCII")
    boundary = secrets.token_hex(16) if boundary is None else boundary
    if not _BOUNDARY.fullmatch(boundary):
        raise ValueError("invalid multipart boundary")
    type_line = f"Content-Type: {content_type}\r\n" if content_type else ""
    parts: list[tuple[bytes, int, int]] = []
    total = 0
    for index, (start, end) in enumerate(ranges):
        lead = "" if index == 0 else "\r\n"
        head = f"{lead}--{boundary}\r\n{type_line}Content-Range: {content_range(start, end, size)}"
        header = f"{head}\r\n\r\n".encode("ascii")
        parts.append((header, start, end))
        total += len(header) + end - start + 1
    trailer = f"\r\n--{boundary}--\r\n".encode("ascii")
    return ByteRanges(boundary, parts, trailer, total + len(trailer))


# --------------------------------------------------------------------------- validators

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_ENTITY_TAG = re.compile(r'(W/)?"([^"]*)"')
_ETAGC = re.compile(r"[\x21\x23-\x7e\x80-\U0010ffff]*")


class _Tag(NamedTuple):
    weak: bool
    opaque: str


def etag_for(sha256_hex: str) -> str:
    """Strong ETag for content with this SHA-256: ``"<64 lowercase hex>"`` (RFC 9110 §8.8.3)."""
    if not _SHA256_HEX.fullmatch(sha256_hex):
        raise ValueError("sha256_hex must be 64 hex digits")
    return f'"{sha256_hex.lower()}"'


def _parse_etags(header: str) -> list[_Tag] | None:
    """Parse ``#entity-tag`` (RFC 9110 §8.8.3); None when malformed (commas may sit in tags)."""
    tags: list[_Tag] = []
    pos = 0
    for m in _ENTITY_TAG.finditer(header):
        gap = header[pos : m.start()]
        if gap.strip(" \t,") or (tags and "," not in gap) or not _ETAGC.fullmatch(m[2]):
            return None
        tags.append(_Tag(bool(m[1]), m[2]))
        pos = m.end()
    return None if header[pos:].strip(" \t,") else tags


def _own_tag(etag: str) -> _Tag:
    tags = _parse_etags(etag)
    if tags is None or len(tags) != 1:
        raise ValueError(f"not a single entity-tag: {etag!r}")
    return tags[0]


def if_none_match(header: str | None, etag: str) -> bool:
    """True when If-None-Match matches ``etag`` (weak comparison, RFC 9110 §13.1.2).

    The caller (resource exists) then sends 304 for GET/HEAD, 412 otherwise.  ``*``
    matches; an absent or malformed header never does (the request proceeds normally).
    """
    if header is None:
        return False
    if header.strip(" \t") == "*":
        return True
    own = _own_tag(etag)
    return any(tag.opaque == own.opaque for tag in _parse_etags(header) or ())


def if_match(header: str | None, etag: str) -> bool | None:
    """Evaluate If-Match with strong comparison (RFC 9110 §13.1.1); None when absent.

    False → the caller sends 412.  A weak or malformed list never matches (fail closed:
    a precondition the server cannot read must not let a write through).
    """
    if header is None:
        return None
    if header.strip(" \t") == "*":
        return True
    own = _own_tag(etag)
    tags = _parse_etags(header) or ()
    return not own.weak and any(not t.weak and t.opaque == own.opaque for t in tags)


def if_range_allows(header: str | None, etag: str, last_modified: datetime) -> bool:
    """True when a Range may be honoured given If-Range (RFC 9110 §13.1.5); absent → True.

    An entity-tag must match ``etag`` strongly (a weak tag never does); an HTTP-date
    must equal ``last_modified`` at second precision.  Anything else is False: ignore
    Range and send 200 with the full, current body.
    """
    if header is None:
        return True
    value = header.strip(" \t")
    if value.startswith("W/"):
        return False
    if value.startswith('"'):
        tags = _parse_etags(value)
        own = _own_tag(etag)
        return (
            tags is not None
            and len(tags) == 1
            and not own.weak
            and tags[0] == _Tag(False, own.opaque)
        )
    date = parse_http_date(value)
    return date is not None and date == _utc_seconds(last_modified)


# --------------------------------------------------------------------------- dates


def _utc_seconds(dt: datetime) -> datetime:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware")
    return dt.astimezone(UTC).replace(microsecond=0)


def http_date(dt: datetime) -> str:
    """IMF-fixdate for an aware datetime: ``Sun, 06 Nov 1994 08:49:37 GMT`` (RFC 9110 §5.6.7)."""
    return email.utils.format_datetime(_utc_seconds(dt), usegmt=True)


def parse_http_date(value: str | None) -> datetime | None:
    """Parse any of the three HTTP-date forms (RFC 9110 §5.6.7) into aware UTC; None if invalid.

    Zone-less results (asctime form, ``-0000``) are taken as UTC, as HTTP dates are GMT.
    """
    if value is None or len(value) > MAX_DATE_HEADER:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def if_modified_since(header: str | None, last_modified: datetime) -> bool:
    """True when If-Modified-Since allows a 304 (RFC 9110 §13.1.3).

    That is, the header is a valid date and ``last_modified`` (at second precision) is
    not later.  Consult only for GET/HEAD and only when If-None-Match is absent.
    """
    date = parse_http_date(header)
    return date is not None and _utc_seconds(last_modified) <= date


# --------------------------------------------------------------------------- Content-Disposition

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SAFE_FILENAME = re.compile(r"[\x20\x21\x23\x24\x26-\x5b\x5d-\x7e]+")  # no " % \ or controls
_ATTR_CHAR_EXTRA = "!#$&+^`|~"  # RFC 8187 attr-char beyond ALPHA / DIGIT / "-" / "." / "_"
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
_DROP_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _clean_filename(name: str) -> str:
    """NFC, without controls, surrogates, line/paragraph separators or bidi overrides."""
    name = unicodedata.normalize("NFC", name)
    kept = (
        c
        for c in name
        if unicodedata.category(c) not in _DROP_CATEGORIES and c not in _BIDI_CONTROLS
    )
    cleaned = "".join(kept).strip()
    return cleaned if cleaned.strip(".") else ""


def _ascii_fallback(name: str) -> str:
    """Accents stripped (NFKD), other non-ASCII and ``%`` → ``_``; ``file`` if nothing is left."""
    decomposed = unicodedata.normalize("NFKD", name)
    chars = (
        c if " " <= c <= "~" and c != "%" else "_"
        for c in decomposed
        if not unicodedata.combining(c)
    )
    fallback = "".join(chars).strip()
    return fallback if fallback.strip(".") else "file"


def content_disposition(filename: str, disposition: str = "attachment") -> str:
    """``Content-Disposition`` value per RFC 6266 §4 with an RFC 8187 ``filename*``.

    ``filename="<ASCII fallback>"`` always comes first (quotes and backslashes escaped,
    never empty: ``file``); ``filename*=UTF-8''<percent-encoded>`` is added whenever the
    cleaned name is not plain safe ASCII (non-ASCII, ``"``, ``\\``, ``%``).  Control
    characters, CR/LF and bidi overrides are removed first, so the result is ASCII and
    header injection is impossible.
    """
    if not _TOKEN.fullmatch(disposition):
        raise ValueError(f"disposition type must be a token: {disposition!r}")
    name = _clean_filename(filename)
    fallback = _ascii_fallback(name)
    escaped = fallback.replace("\\", "\\\\").replace('"', '\\"')
    value = f'{disposition.lower()}; filename="{escaped}"'
    if name and not (name == fallback and _SAFE_FILENAME.fullmatch(name)):
        encoded = quote(name, safe=_ATTR_CHAR_EXTRA, encoding="utf-8")
        value += f"; filename*=UTF-8''{encoded}"
    return value


# --------------------------------------------------------------------------- digests


class BadDigest(ValueError):
    """A client-sent integrity header is malformed (the caller answers 400)."""


# RFC 9530 §7.2 registry names, also the RFC 3230 ones (md5 is deprecated but verifiable).
_ALGORITHMS = {"sha-256": ("sha256", 32), "sha-512": ("sha512", 64), "md5": ("md5", 16)}

_SF_KEY = r"[a-z*][a-z0-9_\-.*]*"
_SF_BARE = (
    r':[A-Za-z0-9+/=]*:|"(?:[^"\\\x00-\x1f\x7f]|\\["\\])*"|\?[01]'
    r"|-?[0-9]+(?:\.[0-9]+)?|[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*"
)
_SF_PARAMS = rf"(?:;[ ]*{_SF_KEY}(?:=(?:{_SF_BARE}))?)*"
_SF_ITEM = rf"(?:{_SF_BARE}){_SF_PARAMS}"
_SF_INNER = rf"\([ ]*(?:{_SF_ITEM}(?:[ ]+{_SF_ITEM})*)?[ ]*\)"
_OWS = re.compile(r"[ \t]*")
_SF_MEMBER = re.compile(rf"({_SF_KEY})(?:=({_SF_INNER}|{_SF_BARE}))?{_SF_PARAMS}", re.IGNORECASE)


def _b64(value: str, length: int, what: str) -> bytes:
    """Strict base64 of exactly ``length`` bytes; missing ``=`` padding is tolerated."""
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadDigest(f"{what}: value is not valid base64") from None
    if len(raw) != length:
        raise BadDigest(f"{what}: expected {length} bytes, got {len(raw)}")
    return raw


def _sf_dictionary(header: str) -> list[tuple[str, str | None]]:
    """Members of an RFC 8941 §4.2.2 dictionary as (lowercased key, raw value or None)."""
    members: list[tuple[str, str | None]] = []
    text = header.strip(" \t")
    pos = 0
    while pos < len(text):
        m = _SF_MEMBER.match(text, pos)
        if not m:
            raise BadDigest(f"malformed dictionary (RFC 8941) near {text[pos : pos + 20]!r}")
        members.append((m[1].lower(), m[2]))
        pos = _OWS.match(text, m.end()).end()
        if pos == len(text):
            break
        if text[pos] != ",":
            raise BadDigest(f"malformed dictionary (RFC 8941) near {text[pos : pos + 20]!r}")
        pos = _OWS.match(text, pos + 1).end()
        if pos == len(text):
            raise BadDigest("malformed dictionary (RFC 8941): trailing ','")
    return members


def parse_content_digest(header: str) -> dict[str, bytes]:
    """Parse ``Content-Digest`` / ``Repr-Digest`` (RFC 9530 §2, §3).

    Returns ``{"sha256": ..., "sha512": ..., "md5": ...}`` for the algorithms present
    (hashlib names); unknown algorithms and parameters are ignored, and for a repeated
    key the last member wins (RFC 8941 §4.2.2).  Keys are matched case-insensitively.
    :raises BadDigest: bad dictionary syntax, or a known algorithm whose value is not
        a byte sequence of the right length.
    """
    if len(header) > MAX_DIGEST_HEADER:
        raise BadDigest("digest header too long")
    digests: dict[str, bytes] = {}
    for key, value in _sf_dictionary(header):
        if key not in _ALGORITHMS:
            continue
        name, length = _ALGORITHMS[key]
        if value is None or len(value) < 2 or value[0] != ":" or value[-1] != ":":
            raise BadDigest(f"{key}: value must be a byte sequence ':<base64>:'")
        digests[name] = _b64(value[1:-1], length, key)
    return digests


def parse_content_md5(header: str) -> bytes:
    """Decode ``Content-MD5`` (RFC 1864): base64 of the 16-byte digest.

    :raises BadDigest: not base64 of 16 bytes (a hex digest is rejected, as S3 does).
    """
    value = header.strip(" \t")
    if re.fullmatch(r"[0-9a-fA-F]{32}", value):
        raise BadDigest("Content-MD5: must be base64 of the digest, not hex")
    return _b64(value, 16, "Content-MD5")


def parse_legacy_digest(header: str) -> dict[str, bytes]:
    """Parse the obsolete RFC 3230 ``Digest: SHA-256=<base64>, MD5=<base64>`` field.

    Algorithm names are case-insensitive; unknown ones (``UNIXsum``, ``SHA``...) are ignored.
    :raises BadDigest: an element without ``=`` or a bad value for a known algorithm.
    """
    if len(header) > MAX_DIGEST_HEADER:
        raise BadDigest("digest header too long")
    digests: dict[str, bytes] = {}
    for element in header.split(","):
        element = element.strip(" \t")
        if not element:
            continue
        algorithm, eq, value = element.partition("=")
        if not eq or not algorithm.strip():
            raise BadDigest(f"malformed element {element[:20]!r}")
        key = algorithm.strip().lower()
        if key in _ALGORITHMS:
            name, length = _ALGORITHMS[key]
            digests[name] = _b64(value.strip(), length, algorithm.strip())
    return digests


def _header_values(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup, repeated fields joined with ``,`` (dicts and multidicts)."""
    values = [v for k, v in headers.items() if k.lower() == name]
    return ", ".join(values) if values else None


def expected_digests(headers: Mapping[str, str]) -> dict[str, bytes]:
    """Digests the client asked us to verify for a whole-body upload: ``sha256`` and/or ``md5``.

    Sources: ``Content-Digest``, ``Repr-Digest`` (RFC 9530), legacy ``Digest`` (RFC 3230)
    and ``Content-MD5`` (RFC 1864).  For a complete body these all describe
    the same bytes, so two sources disagreeing is a client error.  (For partial uploads
    such as tus PATCH, Repr-Digest covers the whole file: do not use this helper there.)
    :raises BadDigest: any present header is malformed, or two sources conflict.
    """
    found: list[dict[str, bytes]] = []
    for name, parser in (
        ("content-digest", parse_content_digest),
        ("repr-digest", parse_content_digest),
        ("digest", parse_legacy_digest),
    ):
        value = _header_values(headers, name)
        if value is not None:
            try:
                found.append(parser(value))
            except BadDigest as exc:
                raise BadDigest(f"{name.title()}: {exc}") from None
    md5 = _header_values(headers, "content-md5")
    if md5 is not None:
        found.append({"md5": parse_content_md5(md5)})
    result: dict[str, bytes] = {}
    for digests in found:
        for algorithm in ("sha256", "md5"):
            if algorithm not in digests:
                continue
            if result.setdefault(algorithm, digests[algorithm]) != digests[algorithm]:
                raise BadDigest(f"conflicting {algorithm} digests in request headers")
    return result
