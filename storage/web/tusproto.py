"""The tus 1.0.0 request headers (tus.io/protocols/resumable-upload): strict parsing.

Pure functions over header values; every malformed value is a :class:`BadRequest`
naming the header (never a 500), an unsupported protocol version a 412 carrying
``Tus-Version``.  Metadata values are echoed by ``HEAD``, so only well-formed pairs
(an ASCII key, a base64 value) are accepted and they are re-serialised canonically.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping
from datetime import datetime
from email.utils import format_datetime

from ..domain import validate
from ..domain.resumable import FileFields
from ..domain.resumable_steps import CHECKSUMS, Checksum
from ..errors import BadRequest, PreconditionFailed

TUS_VERSION = "1.0.0"
EXTENSIONS = ("creation", "creation-with-upload", "creation-defer-length", "termination",
              "checksum", "expiration")
OFFSET_OCTETS = "application/offset+octet-stream"
MAX_PAIRS = 64
_INT = re.compile(r"[0-9]{1,19}")
_KEY = re.compile(r"[!-+\--~]{1,128}")  # printable ASCII without space and comma
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
# Upload-Metadata keys and the file fields they fill (tus-js-client and Uppy names too);
# the first key present wins.
FILENAME_KEYS = ("filename", "name")
TYPE_KEYS = ("filetype", "content_type", "type")


def check_version(headers: Mapping[str, str]) -> None:
    """:raises PreconditionFailed: ``Tus-Resumable`` missing or not 1.0.0 (tus §Tus-Resumable)."""
    got = headers.get("Tus-Resumable")
    if got != TUS_VERSION:
        said = "missing" if got is None else f"{got[:40]!r}, not supported"
        raise PreconditionFailed(f"Tus-Resumable is {said}: this server speaks tus {TUS_VERSION}",
                                 headers={"Tus-Version": TUS_VERSION})


def non_negative(headers: Mapping[str, str], name: str) -> int | None:
    """The header as a non-negative integer (digits only, at most 2**63-1), None if absent."""
    raw = headers.get(name)
    if raw is None:
        return None
    value = raw.strip()
    if not _INT.fullmatch(value) or int(value) >= 2**63:
        raise BadRequest(f"{name} must be a non-negative integer, got {raw[:40]!r}")
    return int(value)


def creation_length(headers: Mapping[str, str]) -> int | None:
    """``Upload-Length`` of a creation request, or None for ``Upload-Defer-Length: 1``."""
    length = non_negative(headers, "Upload-Length")
    defer = headers.get("Upload-Defer-Length")
    if defer is not None and defer.strip() != "1":
        raise BadRequest(f"Upload-Defer-Length must be 1, got {defer[:40]!r}")
    if length is not None and defer is not None:
        raise BadRequest("Send either Upload-Length or Upload-Defer-Length, not both")
    if length is None and defer is None:
        raise BadRequest("Upload-Length (or Upload-Defer-Length: 1) is required")
    return length


def parse_metadata(header: str | None) -> dict[str, bytes]:
    """``Upload-Metadata``: comma-separated ``key base64value`` pairs, in order.

    :raises BadRequest: an empty or malformed pair, a key with a space, comma or non-ASCII
        character, a value that is not base64, a repeated key, too many pairs.
    """
    pairs: dict[str, bytes] = {}
    if header is None or not header.strip():
        return pairs
    elements = header.split(",")
    if len(elements) > MAX_PAIRS:
        raise BadRequest(f"Upload-Metadata has more than {MAX_PAIRS} pairs")
    for element in elements:
        parts = element.strip(" \t").split(" ")
        key, value = parts[0], parts[1] if len(parts) == 2 else ""
        if len(parts) > 2 or not _KEY.fullmatch(key):
            raise BadRequest(f"Upload-Metadata: malformed pair {element.strip()[:60]!r} "
                             "(expected 'key base64value', key in printable ASCII)")
        if key in pairs:
            raise BadRequest(f"Upload-Metadata: key {key!r} appears more than once")
        if not _B64.fullmatch(value) or len(value) % 4:
            raise BadRequest(f"Upload-Metadata: the value of {key!r} is not base64")
        try:
            pairs[key] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"Upload-Metadata: the value of {key!r} is not base64") from None
    return pairs


def serialize_metadata(pairs: Mapping[str, bytes]) -> str:
    return ",".join(f"{k} {base64.b64encode(v).decode('ascii')}" if v else k
                    for k, v in pairs.items())


def _text(pairs: Mapping[str, bytes], key: str) -> str:
    try:
        return pairs[key].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"Upload-Metadata: the value of {key!r} is not UTF-8 text") from None


def _first(pairs: Mapping[str, bytes], keys: tuple[str, ...]) -> str | None:
    return next((_text(pairs, k) for k in keys if k in pairs), None)


def file_fields(header: str | None) -> FileFields:
    """Parse ``Upload-Metadata`` and validate the keys that become file fields: ``filename``
    (or ``name``), ``filetype`` (or ``content_type``, ``type``), ``description``,
    ``version``, ``metadata`` (a JSON object as text) and ``file_id``; other keys are
    kept for ``HEAD`` only.  :raises BadRequest: naming the key."""
    pairs = parse_metadata(header)
    out = FileFields(header=serialize_metadata(pairs))
    out.filename = validate.filename(_first(pairs, FILENAME_KEYS)) or None
    content_type = _first(pairs, TYPE_KEYS)
    if content_type is not None:
        out.content_type = validate.content_type(content_type)
    if "description" in pairs:
        out.description = validate.text(_text(pairs, "description"), "description",
                                        max_len=4096)
    if "version" in pairs:
        out.version = validate.text(_text(pairs, "version"), "version", max_len=50) or None
    if "metadata" in pairs and (raw := _text(pairs, "metadata")).strip():
        out.metadata = validate.metadata_object(validate.strict_json(raw, "metadata"))
    if "file_id" in pairs and (raw := _text(pairs, "file_id").strip()):
        try:
            out.file_id = uuid.UUID(raw) if len(raw) <= 64 else None
        except ValueError:
            out.file_id = None
        if out.file_id is None:
            raise BadRequest(f"Upload-Metadata: file_id {raw[:64]!r} is not a UUID")
    known = {*FILENAME_KEYS, *TYPE_KEYS, "description", "version", "metadata", "file_id"}
    out.unknown = [k for k in pairs if k not in known]
    return out


def upload_checksum(headers: Mapping[str, str]) -> Checksum | None:
    """:raises BadRequest: malformed, or an algorithm other than sha1, sha256 and md5."""
    raw = headers.get("Upload-Checksum")
    if raw is None:
        return None
    algorithm, _, value = raw.strip().partition(" ")
    if algorithm not in CHECKSUMS:
        raise BadRequest(f"Upload-Checksum: algorithm {algorithm[:20]!r} is not supported "
                         f"(use one of {', '.join(CHECKSUMS)})")
    size = CHECKSUMS[algorithm]().digest_size
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != size:
        raise BadRequest(f"Upload-Checksum: expected the base64 of a {size}-byte "
                         f"{algorithm} digest")
    return Checksum(algorithm, digest)


def http_date(when: datetime) -> str:
    """RFC 9110 IMF-fixdate (``Upload-Expires``)."""
    return format_datetime(when, usegmt=True)
