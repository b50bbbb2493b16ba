"""Integrity headers a client sends with an upload: ``Content-Digest`` / ``Repr-Digest``
(RFC 9530), legacy ``Digest`` (RFC 3230) and ``Content-MD5`` (RFC 1864).

Pure functions over header strings; :func:`expected_digests` is what the upload handler
calls, and :class:`BadDigest` becomes its 400.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping

MAX_DIGEST_HEADER = 4096


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
