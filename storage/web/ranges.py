"""Byte ranges for downloads: the Range header (RFC 9110 §14.1-14.4) and the layout of a
``multipart/byteranges`` body (§14.6).

Pure functions: handlers feed header strings and sizes in and map the results to
responses.  ``parse_range`` returns ``None`` for "ignore Range, send 200 with the full
body" and raises :class:`RangeNotSatisfiable` for 416; a returned list is never empty.
aiohttp's ``FileResponse`` gets multi-range and ``bytes=-0`` wrong (reliability guide
§0.4, §C.2), which is why this module exists.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from typing import NamedTuple

MAX_RANGE_HEADER = 1024


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
