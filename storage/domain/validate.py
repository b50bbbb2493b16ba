"""Input validation shared by handlers: ids, paging, strict JSON, text fields.

PostgreSQL's ``text`` and ``jsonb`` refuse ``\\u0000`` and lone surrogates, and
Python's ``json`` accepts NaN, Infinity and duplicate keys: all are rejected here
with a 4xx naming the field, so nothing malformed ever reaches the database.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from typing import Any

from ..errors import BadRequest, invalid

MAX_DEPTH = 32
MAX_JSON_INT = 2**53
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")


def file_id(raw: str, *, where: str = "path", field: str = "file_id") -> uuid.UUID:
    """Parse a UUID or raise 422 in FastAPI's ``uuid_parsing`` spirit."""
    try:
        if len(raw) > 64:
            raise ValueError
        return uuid.UUID(raw)
    except (ValueError, AttributeError, TypeError):
        raise invalid(field, "Input should be a valid UUID", raw[:100], where=where) from None


def int_param(raw: str | None, name: str, default: int, *, lo: int = 0,
              hi: int | None = None, clamp: bool = False) -> int:
    """An integer query parameter; 400 when malformed or out of range."""
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        if raw.strip().lstrip("+-").isdigit():  # more digits than int() converts
            raise BadRequest(f"{name} is out of range, got {len(raw)} digits") from None
        raise BadRequest(f"{name} must be an integer, got {raw[:50]!r}") from None
    if value < lo:
        raise BadRequest(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        if clamp:
            return hi
        raise BadRequest(f"{name} must be <= {hi}, got {value}")
    return value


def text(value: Any, name: str, *, max_len: int, allow_none: bool = True) -> str | None:
    """A text field: a string without NUL or lone surrogates, at most ``max_len`` characters."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    if len(value) > max_len:
        raise BadRequest(f"{name} is too long: {len(value)} characters, limit {max_len}")
    if _BAD_TEXT.search(value):
        raise BadRequest(f"{name} contains a NUL character or an unpaired surrogate")
    return value


def filename(value: Any) -> str | None:
    """An upload's original filename: :func:`text`, and not a bare ``.`` or ``..``
    (reliability guide B.2: a name that means a directory is refused, not rewritten)."""
    name = text(value, "filename", max_len=500)
    if name is not None and name.strip() in (".", ".."):
        raise BadRequest(f"filename {name.strip()!r} is not a file name")
    return name


_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9!#$&^_.+-]{1,127}/[A-Za-z0-9!#$&^_.+*-]{1,127}"
    r"(?:\s*;\s*[A-Za-z0-9!#$&^_.+-]+=(?:[A-Za-z0-9!#$&^_.+-]+|\"[\x20-\x21\x23-\x7e]*\"))*"
)


def content_type(value: str | None) -> str:
    """A media type safe to store and to echo in a header (RFC 9110 §8.3.1)."""
    if not value or not value.strip():
        return "application/octet-stream"
    value = value.strip()
    if len(value) > 255 or not _MEDIA_TYPE.fullmatch(value):
        raise BadRequest(f"Content type {value[:80]!r} is not a valid media type")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadRequest(f"duplicate key {key[:50]!r} in JSON object")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise BadRequest(f"{name} is not valid JSON")


def _check(value: Any, depth: int, where: str) -> None:
    if depth > MAX_DEPTH:
        raise BadRequest(f"{where} is nested too deeply (limit {MAX_DEPTH} levels)")
    if isinstance(value, str):
        text(value, where, max_len=1 << 20)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if abs(value) > MAX_JSON_INT:
            raise BadRequest(f"{where} contains a number too large to store exactly")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise BadRequest(f"{where} contains a number out of range")
    elif isinstance(value, dict):
        for key, item in value.items():
            text(key, f"{where} key", max_len=1024)
            _check(item, depth + 1, where)
    elif isinstance(value, list):
        for item in value:
            _check(item, depth + 1, where)


def strict_json(raw: bytes | str, where: str = "body") -> Any:
    """Parse JSON refusing NaN/Infinity, duplicate keys, deep nesting and unstorable text."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{where} is not valid UTF-8") from None
    if raw.count("[") + raw.count("{") > 10_000:
        raise BadRequest(f"{where} has too many nested structures")
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_constant)
    except RecursionError:
        raise BadRequest(f"{where} is nested too deeply") from None
    except ValueError as exc:
        raise BadRequest(f"{where} is not valid JSON: {exc}") from None
    _check(value, 0, where)
    return value


def metadata_object(value: Any, where: str = "metadata") -> dict[str, Any] | None:
    """Custom metadata: a JSON object (or null) already checked by :func:`strict_json`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object")
    return value
