"""Pure HTTP helpers for downloads: validators (ETag, conditional requests), HTTP dates
and Content-Disposition.  Byte ranges live in :mod:`storage.web.ranges`, upload digests in
:mod:`storage.web.digests`.

Nothing here does I/O or touches aiohttp; handlers feed header strings in and map the
results to responses.  aiohttp's ``FileResponse`` gets If-Range with entity tags wrong
and uses an ``mtime-size`` ETag (reliability guide §0.4, §C.2), which is why this exists.

* Conditional helpers follow RFC 9110 §13.2.2 precedence: If-Match, then
  If-None-Match (If-Modified-Since only when If-None-Match is absent), then If-Range.
* Every header value produced here is plain ASCII with no control characters.
"""

from __future__ import annotations

import email.utils
import re
import unicodedata
from datetime import UTC, datetime
from typing import NamedTuple
from urllib.parse import quote

MAX_DATE_HEADER = 64


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


_SEPARATORS = re.compile(r"[/\\]")
_DOT_RUN = re.compile(r"\.{2,}")


def _plain_filename(name: str) -> str:
    """The ``filename=`` value: the ASCII fallback's last path component, without ``..``.

    Split *after* the fallback: NFKD turns ``．．／x`` into ``../x``.  A client that
    takes ``filename=`` literally then never sees a directory or a step out of one.
    """
    base = _SEPARATORS.split(_ascii_fallback(name))[-1]
    base = _DOT_RUN.sub(".", base).strip()
    return base if base.strip(".") else "file"


def content_disposition(filename: str, disposition: str = "attachment") -> str:
    """``Content-Disposition`` value per RFC 6266 §4 with an RFC 8187 ``filename*``.

    ``filename="<ASCII fallback>"`` always comes first: the last path component only,
    with no ``/``, ``\\`` or ``..`` (quotes escaped, never empty: ``file``);
    ``filename*=UTF-8''<percent-encoded>`` carries the whole name whenever that differs
    or is not plain safe ASCII (non-ASCII, ``"``, ``%``, directory parts).  Control
    characters, CR/LF and bidi overrides are removed first, so the result is ASCII and
    header injection is impossible.
    """
    if not _TOKEN.fullmatch(disposition):
        raise ValueError(f"disposition type must be a token: {disposition!r}")
    name = _clean_filename(filename)
    plain = _plain_filename(name)
    escaped = plain.replace('"', '\\"')
    value = f'{disposition.lower()}; filename="{escaped}"'
    if name and not (name == plain and _SAFE_FILENAME.fullmatch(name)):
        encoded = quote(name, safe=_ATTR_CHAR_EXTRA, encoding="utf-8")
        value += f"; filename*=UTF-8''{encoded}"
    return value
