"""The ``*.attr.json`` file beside every data object: the source of truth (reference §2).

We write schema **v2**: the fifteen v1 keys in upstream order, then ``schema_version`` and
``custom_attributes``, then any unknown keys found when the file was read (they survive
every rewrite).  ``metadata`` and ``custom_attributes`` carry the same object, the
client's upload/PATCH ``metadata``: v2 readers use ``custom_attributes``, and upstream's v1
model (which ignores unknown keys) still finds it under ``metadata``.  The price is that
the object counts twice against :data:`MAX_ATTR_SIZE`.

Reading accepts v1 and v2, ``T`` or space datetimes (naive ones are UTC) and unknown keys.
When both objects are present, a non-empty ``custom_attributes`` wins over ``metadata``.
Any problem with a document's content is an :class:`AttrError`, whatever the bytes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import stat
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

V1_KEYS = (
    "file_id", "original_filename", "storage_filename", "file_size", "content_type",
    "created_at", "updated_at", "created_by_id", "created_by_username",
    "created_by_fullname", "description", "version", "storage_path", "checksum", "metadata",
)
V2_KEYS = (*V1_KEYS, "schema_version", "custom_attributes")
OPTIONAL_KEYS = frozenset({"created_by_fullname", "description", "version", "metadata"})
SCHEMA_VERSION = "2.0"
SUPPORTED_VERSIONS = ("1.0", "2.0")
MAX_ATTR_SIZE = 4096
MAX_DEPTH = 32
_TEXT_FIELDS = ("original_filename", "storage_filename", "content_type", "created_by_id",
                "created_by_username", "storage_path")
_NULLABLE_TEXT_FIELDS = ("created_by_fullname", "description", "version")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class AttrError(ValueError):
    """An attribute document or file is unusable; ``path`` may be empty."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path, self.reason = path, reason


class AttrTooLarge(AttrError):
    """The serialised document would exceed :data:`MAX_ATTR_SIZE`; ``field`` is the main cause."""

    def __init__(self, field_name: str, size: int, path: str = "") -> None:
        reason = (f"{field_name} is too long: the attribute file would be {size} bytes, "
                  f"limit {MAX_ATTR_SIZE}")
        super().__init__(path, reason)
        self.field, self.size = field_name, size


def _check_text(text: str, where: str) -> None:
    # PostgreSQL text/jsonb refuses NUL, and a lone surrogate cannot be encoded as UTF-8.
    if "\x00" in text:
        raise AttrError("", f"{where} contains a NUL character (\\u0000)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise AttrError("", f"{where} contains a lone surrogate") from None


def _check_value(value: Any, where: str, depth: int) -> None:
    """Recursively check one JSON value; ``depth`` counts enclosing containers."""
    if isinstance(value, dict | list) and depth > MAX_DEPTH:
        raise AttrError("", f"{where} is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        _check_text(value, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AttrError("", f"{where} has a non-string key {key!r:.40}")
            _check_text(key, f"{where} key {key!r:.40}")
            _check_value(item, f"{where}[{key!r:.40}]", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(item, f"{where}[{index}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise AttrError("", f"{where} is {value}, which JSON cannot represent")
    elif value is not None and not isinstance(value, bool | int | float):
        raise AttrError("", f"{where} is a {type(value).__name__}, not a JSON value")


def validate_custom_attributes(obj: Any, where: str = "custom_attributes") -> dict[str, Any]:
    """Return ``obj`` if it is a dict with string keys and JSON values (finite numbers),
    at most :data:`MAX_DEPTH` containers deep, with no NUL or lone surrogate in any string.

    :raises AttrError: naming the offending place, e.g. ``custom_attributes['a'][0]``.
    """
    if not isinstance(obj, dict):
        raise AttrError("", f"{where} must be a JSON object, not {type(obj).__name__}")
    _check_value(obj, where, 1)
    return obj


def _as_uuid(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return uuid.UUID(value)
    raise AttrError("", f"file_id is not a UUID: {value!r:.60}")


def _as_utc(value: Any, name: str) -> datetime:
    """A datetime or ISO-8601 string (``T`` or space) as aware UTC; naive means UTC."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise AttrError("", f"{name} is not an ISO-8601 datetime: {value!r:.60}")
    if value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise AttrError("", f"{name} is out of range: {value!r:.60}") from None


def _check_string_field(name: str, value: Any) -> None:
    if value is None and name in _NULLABLE_TEXT_FIELDS:
        return
    if not isinstance(value, str):
        raise AttrError("", f"{name} must be a string, not {type(value).__name__}")
    _check_text(value, name)


def _check_location(filename: str, path: str) -> None:
    # A rebuild joins these onto the storage root, so they must not climb out of it.
    if "/" in filename or filename in ("", ".", ".."):
        raise AttrError("", f"storage_filename is not a single file name: {filename!r:.60}")
    if path.startswith("/") or ".." in path.split("/"):
        raise AttrError("", f"storage_path escapes the storage root: {path!r:.60}")


@dataclass(slots=True)
class AttrDoc:
    """One attribute document; construction and :meth:`validate` raise :class:`AttrError`."""

    file_id: uuid.UUID
    original_filename: str
    storage_filename: str
    file_size: int
    content_type: str
    created_at: datetime
    updated_at: datetime
    created_by_id: str
    created_by_username: str
    storage_path: str
    checksum: str
    created_by_fullname: str | None = None
    description: str | None = None
    version: str | None = None
    custom_attributes: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; normalise ``file_id`` to UUID and datetimes to aware UTC."""
        self.file_id = _as_uuid(self.file_id)
        self.created_at = _as_utc(self.created_at, "created_at")
        self.updated_at = _as_utc(self.updated_at, "updated_at")
        for name in (*_TEXT_FIELDS, *_NULLABLE_TEXT_FIELDS):
            _check_string_field(name, getattr(self, name))
        if isinstance(self.file_size, bool) or not isinstance(self.file_size, int):
            raise AttrError("", f"file_size must be an integer, not {self.file_size!r:.60}")
        if self.file_size < 0:
            raise AttrError("", f"file_size must be >= 0, not {self.file_size}")
        if not isinstance(self.checksum, str) or not _HEX64.fullmatch(self.checksum):
            raise AttrError("", f"checksum is not 64 hex digits: {self.checksum!r:.80}")
        _check_location(self.storage_filename, self.storage_path)
        validate_custom_attributes(self.custom_attributes)
        if not isinstance(self.extra, dict):
            raise AttrError("", f"extra must be a dict, not {type(self.extra).__name__}")
        _check_value(self.extra, "unknown keys", 0)

    def to_dict(self, *, copies: bool = True) -> dict[str, Any]:
        """The v2 document: v1 keys in upstream order, v2 keys, then unknown keys.
        Without ``copies`` nested values are shared with this object (to serialise)."""
        clone = copy.deepcopy if copies else _same
        doc: dict[str, Any] = {k: getattr(self, k) for k in V1_KEYS[:-1]}
        doc["file_id"] = str(self.file_id)
        for name in ("created_at", "updated_at"):
            doc[name] = _as_utc(doc[name], name).isoformat()
        doc["metadata"] = clone(self.custom_attributes)
        doc["schema_version"] = SCHEMA_VERSION
        doc["custom_attributes"] = clone(self.custom_attributes)
        doc.update((k, clone(v)) for k, v in self.extra.items() if k not in doc)
        return doc

    def serialize(self) -> bytes:
        """:func:`dumps` of a document that was validated when it was built and has not
        been changed since (the upload path builds one and writes it at once)."""
        return indent2(self.to_dict(copies=False)).encode("utf-8")


def _same(value: Any) -> Any:
    return value


def indent2(doc: Mapping[str, Any]) -> str:
    """``json.dumps(doc, indent=2, ensure_ascii=False)``, byte for byte, for a non-empty
    object, with the C encoder: the standard library indents with its pure-Python
    encoder, ~20 % of a small upload's Python time.  Each top-level value is encoded
    alone and nested containers re-indented one level."""
    if not doc:
        return "{}"
    flat, nested = _FLAT.encode, _NESTED.encode
    parts = []
    for key, value in doc.items():
        if isinstance(value, dict | list) and value:
            text = nested(value).replace("\n", "\n  ")
        else:
            text = flat(value)
        parts.append(f"  {flat(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}"


_FLAT = json.JSONEncoder(ensure_ascii=False)
_NESTED = json.JSONEncoder(ensure_ascii=False, indent=2)


def detect_version(d: Mapping[str, Any]) -> str:
    """The document's ``schema_version``, or ``"1.0"`` when the key is absent.

    :raises AttrError: if ``d`` is not an object or the version is not a string.
    """
    if not isinstance(d, Mapping):
        raise AttrError("", f"expected a JSON object, not {type(d).__name__}")
    version = d.get("schema_version", "1.0")
    if not isinstance(version, str):
        raise AttrError("", f"schema_version must be a string, not {version!r:.40}")
    return version


def _custom_from(d: Mapping[str, Any], path: str) -> Any:
    custom, legacy = d.get("custom_attributes"), d.get("metadata")
    if legacy is not None:
        validate_custom_attributes(legacy, "metadata")
    if custom is None or custom == {}:
        return {} if legacy is None else legacy
    if legacy and legacy != custom:
        log.warning("%s: metadata differs from custom_attributes; keeping custom_attributes",
                    path or "attribute document")
    return custom


def from_dict(d: Any, path: str = "") -> AttrDoc:
    """Validate a decoded v1 or v2 document.

    :raises AttrError: (carrying ``path``) on an unsupported version, a missing required
        key or a bad value.
    """
    try:
        version = detect_version(d)
        if version not in SUPPORTED_VERSIONS:
            raise AttrError("", f"unsupported schema_version {version!r:.40}")
        missing = [k for k in V1_KEYS if k not in d and k not in OPTIONAL_KEYS]
        if missing:
            raise AttrError("", f"missing key(s): {', '.join(missing)}")
        known = {k: d[k] for k in V1_KEYS if k in d and k != "metadata"}
        extra = {k: v for k, v in d.items() if k not in V2_KEYS}
        return AttrDoc(**known, custom_attributes=_custom_from(d, path), extra=extra)
    except AttrError as exc:
        raise AttrError(path, exc.reason) from None


def loads(data: bytes, path: str = "") -> AttrDoc:
    """Parse attribute-file bytes (UTF-8 JSON, at most :data:`MAX_ATTR_SIZE` bytes).

    :raises AttrError: for every kind of bad input, with ``path`` in the message.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AttrError(path, f"expected bytes, not {type(data).__name__}")
    if len(data) > MAX_ATTR_SIZE:
        raise AttrError(path, f"attribute file is {len(data)} bytes, limit {MAX_ATTR_SIZE}")
    try:
        obj = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise AttrError(path, f"corrupt or truncated JSON: {exc}") from None
    return from_dict(obj, path)


def _coerce(doc: AttrDoc | Mapping[str, Any]) -> AttrDoc:
    if isinstance(doc, AttrDoc):
        doc.validate()
        return doc
    return from_dict(doc)


def build(**fields: Any) -> dict[str, Any]:
    """The v2 dict for :class:`AttrDoc` keyword fields (``custom_attributes`` = metadata).

    :raises AttrError: on a bad value.
    """
    return AttrDoc(**fields).to_dict()


def dumps(doc: AttrDoc | Mapping[str, Any]) -> bytes:
    """Serialise as UTF-8 JSON with indent 2 (no size check: see :func:`check_size`).

    :raises AttrError: if the document is invalid.
    """
    return _coerce(doc).serialize()


def check_size(doc: AttrDoc | Mapping[str, Any]) -> None:
    """Refuse a document whose serialised form exceeds :data:`MAX_ATTR_SIZE` bytes.

    Run it before any data is written.  ``metadata`` and ``custom_attributes`` are
    counted together, under the name the client knows: ``metadata``.

    :raises AttrTooLarge: naming the field that contributes most.
    :raises AttrError: if the document is invalid.
    """
    size = len(dumps(doc))
    if size <= MAX_ATTR_SIZE:
        return
    as_dict = _coerce(doc).to_dict()
    sizes = {k: len(json.dumps(v, indent=2, ensure_ascii=False).encode()) + len(k)
             for k, v in as_dict.items()}
    sizes["metadata"] += sizes.pop("custom_attributes")
    raise AttrTooLarge(max(sizes, key=sizes.__getitem__), size)


def export_v1(d: AttrDoc | Mapping[str, Any]) -> dict[str, Any]:
    """The fifteen v1 keys only, for legacy consumers.  Lossy, so it logs a warning.

    :raises AttrError: if the document is invalid.
    """
    doc = _coerce(d)
    log.warning("exporting attributes of %s as schema v1 drops schema_version, "
                "custom_attributes and %d unknown key(s)", doc.file_id, len(doc.extra))
    return {k: v for k, v in doc.to_dict().items() if k in V1_KEYS}


def migrate_v1_to_v2(d: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """Migrate a v1 (or v2) document in memory; the caller writes it back.

    ``custom_attributes`` is taken from ``metadata`` (``{}`` when there is none).

    :raises AttrError: on an unsupported ``schema_version`` or an invalid document.
    """
    return from_dict(d, path).to_dict()


def fsync_dir(directory: Path) -> None:
    """fsync a directory, making the names created or renamed in it durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (blocking; run in a thread).

    Temp file ``.tmp_attr_*.json`` in the same directory, fsync, ``os.replace``, then
    fsync the directory.  The temp file never outlives a failure.

    :raises OSError: from the filesystem; ``TypeError`` if ``data`` is not bytes.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_attr_", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def read_file(path: Path) -> AttrDoc:
    """Stat, then read and parse one attribute file.

    :raises AttrError: (with the path) if it is not a regular file, is larger than
        :data:`MAX_ATTR_SIZE` or has bad content.
    :raises OSError: e.g. ``FileNotFoundError`` when it does not exist.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise AttrError(str(path), "not a regular file")
    if info.st_size > MAX_ATTR_SIZE:
        raise AttrError(str(path), f"file is {info.st_size} bytes, limit {MAX_ATTR_SIZE}")
    with open(path, "rb") as f:
        data = f.read(MAX_ATTR_SIZE + 1)
    return loads(data, str(path))
