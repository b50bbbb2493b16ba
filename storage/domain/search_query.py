"""A search request: validation of the query string and the keyset cursors (issue 7).

:func:`parse_params` turns a request's query into a
:class:`~storage.db.search_sql.SearchParams` (a 400 naming the parameter otherwise);
:mod:`storage.domain.search` runs it.

A cursor is base64url JSON ``{"s": sort, "k": last sort key, "i": last file_id}``.  It
is validated strictly (structure, types, ranges) and its values are bound like any
other input, so a tampered cursor can only move the page, never inject; a malformed
one is a 400.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ..db.search_sql import DEFAULT_LIMIT, SORTS, Cursor, SearchParams, Sort
from ..errors import BadRequest
from . import validate

MAX_LIMIT = 1000
MAX_Q = 1000
MAX_Q_TOKENS = 64
MAX_METADATA_FILTERS = 16
MAX_CURSOR = 1024
MAX_REAL = 3.4028234663852886e38  # the largest finite PostgreSQL real (float32)

SEARCH_PARAMS = frozenset({
    "q", "content_type", "created_by", "min_size", "max_size", "created_after",
    "created_before", "sort", "cursor",
})
METADATA_PREFIX = "metadata."




def is_search(query: Mapping[str, str]) -> bool:
    """Whether a list request carries any search parameter (else it is the legacy list)."""
    return any(k in SEARCH_PARAMS or k.startswith(METADATA_PREFIX) for k in query)


def _one(query, name: str) -> str | None:
    values = query.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"{name} may be given only once")
    return values[0] if values else None


def parse_params(query) -> SearchParams:
    """Validate a request's query string (a MultiDict); unknown names are ignored.

    :raises BadRequest: with a detail naming the offending parameter.
    """
    q = _q(_one(query, "q"))
    sort_name = _one(query, "sort") or "-created_at"
    sort = SORTS.get(sort_name)
    if sort is None:
        raise BadRequest(f"sort must be one of {', '.join(SORTS)}; got {sort_name[:50]!r}")
    if sort.needs_q and not q:
        raise BadRequest("sort=rank needs a q to rank by")
    ctype, is_prefix = _content_type(_one(query, "content_type"))
    min_size = _size(_one(query, "min_size"), "min_size")
    max_size = _size(_one(query, "max_size"), "max_size")
    if min_size is not None and max_size is not None and min_size > max_size:
        raise BadRequest(f"min_size ({min_size}) is larger than max_size ({max_size})")
    after = _instant(_one(query, "created_after"), "created_after")
    before = _instant(_one(query, "created_before"), "created_before")
    if after is not None and before is not None and after >= before:
        raise BadRequest("created_after must be earlier than created_before")
    raw_limit = _one(query, "limit")
    limit = validate.int_param(raw_limit, "limit", DEFAULT_LIMIT, lo=1, hi=MAX_LIMIT)
    created_by = validate.text(_one(query, "created_by"), "created_by", max_len=255)
    raw_cursor = _one(query, "cursor")
    return SearchParams(
        q=q, content_type=ctype, content_type_prefix=is_prefix,
        created_by=created_by or None, min_size=min_size, max_size=max_size,
        created_after=after, created_before=before, metadata=_metadata(query), sort=sort,
        limit=limit, cursor=decode_cursor(raw_cursor, sort) if raw_cursor else None,
    )


_WORD = re.compile(r"\w+")
_OPERATOR = re.compile(r'"|(?<!\S)-')
_JOINERS = re.compile(r"[-_./\\]+")
_SEGMENT = re.compile(r'-?"[^"]*"?|\S+')


def _q(raw: str | None) -> str | None:
    """The query text, normalised like the stored document; None when blank."""
    if raw is None or not raw.strip():
        return None
    if len(raw) > MAX_Q:
        raise BadRequest(f"q is too long: {len(raw)} characters, limit {MAX_Q}")
    validate.text(raw, "q", max_len=MAX_Q)
    if not _WORD.search(raw):
        raise BadRequest("q has no words to search for, only operators or punctuation")
    tokens = len(_WORD.findall(raw)) + len(_OPERATOR.findall(raw))
    if tokens > MAX_Q_TOKENS:
        raise BadRequest(f"q has {tokens} words and operators, limit {MAX_Q_TOKENS}")
    return _normalise(raw)


def _normalise(q: str) -> str:
    """Split words the way the document does, keeping websearch's syntax.

    The stored document turns ``-_./\\`` into spaces (migrations/0002.search.py), so a
    word joined by them becomes a phrase of its parts (``report-2025.pdf`` →
    ``"report 2025 pdf"``: adjacent, in order); a leading ``-`` stays websearch's NOT
    and inside quotes they simply become spaces.
    """
    out = []
    for segment in _SEGMENT.findall(q):
        negate = "-" if segment.startswith("-") and len(segment) > 1 else ""
        if '"' in segment:
            out.append(negate + _JOINERS.sub(" ", segment[len(negate):]))
            continue
        parts = [p for p in _JOINERS.split(segment[len(negate):]) if p]
        if len(parts) > 1:
            out.append(f'{negate}"{" ".join(parts)}"')
        elif parts:
            out.append(negate + parts[0])
    return " ".join(out)


_TYPE_WILDCARD = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,127}/\*")


def _content_type(raw: str | None) -> tuple[str | None, bool]:
    """An exact media type (parameters allowed, compared byte for byte) or ``type/*``."""
    if raw is None or raw == "":
        return None, False
    value = raw.strip()
    if _TYPE_WILDCARD.fullmatch(value):
        return value[:-1], True
    try:
        return validate.content_type(value), False
    except BadRequest:
        raise BadRequest(f"content_type must be a media type like image/png or image/*; "
                         f"got {raw[:80]!r}") from None


def _size(raw: str | None, name: str) -> int | None:
    if raw is None or raw == "":
        return None
    return validate.int_param(raw, name, 0, lo=0, hi=2**63 - 1)


_LOST_PLUS = re.compile(r" (\d{2}(?::?\d{2})?)$")


def _instant(raw: str | None, name: str) -> datetime | None:
    """An ISO 8601 date-time with a UTC offset (``Z`` or ``+03:00``)."""
    if raw is None or raw == "":
        return None
    # An unencoded "+03:00" arrives as " 03:00" (form decoding turns + into a space).
    text = _LOST_PLUS.sub(r"+\1", raw.strip()) if "T" in raw or ":" in raw else raw.strip()
    try:
        if len(text) > 64:
            raise ValueError
        value = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{name} must be an ISO 8601 date-time such as "
                         f"2025-01-31T12:00:00Z; got {raw[:64]!r}") from None
    if value.tzinfo is None:
        raise BadRequest(f"{name} needs a UTC offset (Z or +03:00), e.g. "
                         f"2025-01-31T12:00:00Z; got {raw[:64]!r}")
    utc = _utc(value)
    if utc is None:
        raise BadRequest(f"{name} is out of range: in UTC it falls outside the years "
                         f"1-9999; got {raw[:64]!r}")
    return utc


def _utc(value: datetime) -> datetime | None:
    """``value`` in UTC, or None when that is outside ``datetime``'s years 1-9999
    (``9999-12-31T23:59:59-23:59`` is a valid string of such an instant)."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return None


def _metadata(query) -> tuple[tuple[str, str], ...]:
    found = []
    for name, value in query.items():
        if not name.startswith(METADATA_PREFIX):
            continue
        key = name[len(METADATA_PREFIX):]
        if not key:
            raise BadRequest("metadata filters look like metadata.<key>=<value>; the key is empty")
        validate.text(key, f"metadata key {key[:50]!r}", max_len=256)
        validate.text(value, f"metadata.{key[:50]}", max_len=4096)
        found.append((key, value))
    if len(found) > MAX_METADATA_FILTERS:
        raise BadRequest(f"at most {MAX_METADATA_FILTERS} metadata filters, got {len(found)}")
    return tuple(found)


# --- cursors -------------------------------------------------------------------------------


def encode_cursor(sort: Sort, key: Any, file_id: uuid.UUID) -> str:
    if isinstance(key, datetime):
        key = key.isoformat()
    raw = json.dumps({"s": sort.name, "k": key, "i": str(file_id)}, separators=(",", ":"),
                     ensure_ascii=False, allow_nan=False)
    return base64.urlsafe_b64encode(raw.encode("utf-8")).rstrip(b"=").decode("ascii")


def _bad_cursor(why: str) -> BadRequest:
    return BadRequest(f"cursor is not valid ({why}); use the next_cursor of a previous "
                      "response with the same sort")


def decode_cursor(raw: str, sort: Sort) -> Cursor:
    """Parse and strictly check a cursor for ``sort``.

    :raises BadRequest: on anything but a cursor this service could have produced.
    """
    if len(raw) > MAX_CURSOR:
        raise _bad_cursor("too long")
    try:
        data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _bad_cursor("not base64url JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"s", "k", "i"}:
        raise _bad_cursor("unexpected structure")
    if doc["s"] != sort.name:
        raise _bad_cursor(f"it continues sort={str(doc['s'])[:30]}, not sort={sort.name}")
    try:
        file_id = uuid.UUID(doc["i"]) if isinstance(doc["i"], str) else None
    except ValueError:
        file_id = None
    if file_id is None:
        raise _bad_cursor("bad file id")
    return Cursor(sort.name, _cursor_key(sort, doc["k"]), file_id)


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _cursor_key(sort: Sort, key: Any) -> Any:
    column = sort.column
    if column == "created_at" and isinstance(key, str) and len(key) <= 40:
        try:
            value = datetime.fromisoformat(key)
        except ValueError:
            value = None
        if value is not None and value.tzinfo is not None and (utc := _utc(value)):
            return utc
    elif column == "file_size" and type(key) is int and 0 <= key < 2**63:
        return key
    elif column == "original_filename" and isinstance(key, str) and len(key) <= 500:
        return validate.text(key, "cursor", max_len=500)
    elif column == "search_rank" and type(key) in (int, float) and abs(key) <= MAX_REAL:
        # compared before any float(): an int of 400 digits would overflow it, and a
        # float beyond float32 cannot be bound as the real a rank is (NaN fails too)
        return float(key)
    raise _bad_cursor(f"bad {column} value")


