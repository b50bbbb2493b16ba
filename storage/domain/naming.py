"""Storage file names and the hourly directory layout (reference §3).

A storage name is ``{stem}_{user}_{YYYYMMDDTHHMMSS}_{uuid}{ext}``.  Like upstream it is at
most 200 code points; in addition it is at most 245 UTF-8 bytes, so that the sibling
``<name>.attr.json`` (and the ``.tmp_<name>`` staging file) fit a 255-byte name limit.
Every result is a single path component: no ``/``, no NUL, never ``.`` or ``..``.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from datetime import UTC, datetime
from pathlib import PurePosixPath

MAX_CHARS = 200
MAX_BYTES = 245
ELLIPSIS = "..."
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%S"
# Room always kept for the stem, so an absurdly long username cannot squeeze it out.
_MIN_STEM = 16
_FORBIDDEN = frozenset('<>:"/\\|?*')
# Upstream copies the extension verbatim; we only keep short, plain ones.
_SAFE_EXT = re.compile(r"\.[A-Za-z0-9_-]{1,15}")
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_UUID_RE = re.compile(_UUID)
_ANCHORED_UUID_RE = re.compile(rf"_\d{{8}}T\d{{6}}_({_UUID})")
_NAME_RE = re.compile(
    rf"(?P<head>.+)_(?P<ts>\d{{8}}T\d{{6}})_(?P<uuid>{_UUID})(?P<ext>(?:\.[A-Za-z0-9_-]+)?)"
)


class NamingError(ValueError):
    """A storage file name cannot be built or parsed."""


def sanitize(text: str) -> str:
    """Replace path-hostile characters by ``_``, collapse ``_`` runs and strip edge ``_``.

    Hostile: ``<>:"/\\|?*``, control characters (Unicode category Cc: U+0000–U+001F,
    U+007F–U+009F) and lone surrogates.  Spaces and other non-ASCII text are kept.
    """
    replaced = "".join("_" if _hostile(ch) else ch for ch in text)
    return re.sub("_+", "_", replaced).strip("_")


def _hostile(ch: str) -> bool:
    return ch in _FORBIDDEN or unicodedata.category(ch) in ("Cc", "Cs")


def _utc(when: datetime) -> datetime:
    """``when`` in UTC; a naive datetime is taken to be UTC already."""
    if when.utcoffset() is None:
        return when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def _split(original_filename: str) -> tuple[str, str]:
    """``(stem, ext)`` of the last POSIX path component; an unsafe ext stays in the stem."""
    name = PurePosixPath(original_filename).name if original_filename else ""
    dot = name.rfind(".")
    if 0 < dot < len(name) - 1 and _SAFE_EXT.fullmatch(name[dot:]):
        return name[:dot], name[dot:]
    return name, ""


def _clean_stem(stem: str) -> str:
    stem = sanitize(stem)
    # ".tmp*" would look like our own staging files to a startup sweep.
    if stem.startswith(".tmp"):
        stem = sanitize(stem[1:])
    return stem or "file"


def _prefix(text: str, max_chars: int, max_bytes: int) -> str:
    """The longest prefix of ``text`` within both limits, cut on a code-point boundary."""
    return text[:max_chars].encode()[:max_bytes].decode("utf-8", "ignore")


def storage_filename(
    original_filename: str, username: str, when: datetime, file_id: uuid.UUID
) -> str:
    """Build the storage name for an upload (reference §3.1, plus the 245-byte cap).

    An over-long stem is cut and ends with ``...``; an over-long username is cut too.

    :raises NamingError: if the username is empty after trimming and sanitising.
    :raises ValueError: if ``file_id`` is not a UUID.
    """
    user = sanitize(username.strip())
    if not user:
        raise NamingError(f"username {username!r} is empty after sanitising")
    stem, ext = _split(original_filename)
    stem = _clean_stem(stem)
    tail = f"_{_utc(when).strftime(TIMESTAMP_FORMAT)}_{uuid.UUID(str(file_id))}{ext}"
    user_chars = MAX_CHARS - _MIN_STEM - len(tail) - 1
    user_bytes = MAX_BYTES - _MIN_STEM - len(tail.encode()) - 1
    fixed = "_" + _prefix(user, user_chars, user_bytes).rstrip("_") + tail
    room_chars, room_bytes = MAX_CHARS - len(fixed), MAX_BYTES - len(fixed.encode())
    if len(stem) > room_chars or len(stem.encode()) > room_bytes:
        stem = _prefix(stem, room_chars - len(ELLIPSIS), room_bytes - len(ELLIPSIS)) + ELLIPSIS
    return stem + fixed


def storage_path(when: datetime) -> str:
    """The relative directory ``YYYY/MM/DD/HH/`` for ``when`` in UTC (naive = UTC)."""
    return _utc(when).strftime("%Y/%m/%d/%H/")


def parse_storage_filename(name: str) -> tuple[str, str, datetime, uuid.UUID, str]:
    """Split a storage name into ``(stem, user, created_at, file_id, ext)``.

    Best effort, as upstream: the user is the part after the last ``_`` before the
    timestamp, so a username that itself contains ``_`` is split wrongly.

    :raises NamingError: if the name does not have the storage-name shape.
    """
    match = _NAME_RE.fullmatch(name)
    if match is None:
        raise NamingError(f"not a storage file name: {name!r}")
    stem, sep, user = match["head"].rpartition("_")
    if not (sep and stem and user):
        raise NamingError(f"no stem/user in storage file name: {name!r}")
    try:
        when = datetime.strptime(match["ts"], TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError as exc:
        raise NamingError(f"bad timestamp in storage file name: {name!r}") from exc
    return stem, user, when, uuid.UUID(match["uuid"]), match["ext"]


def extract_file_id(name: str) -> uuid.UUID | None:
    """The file id in a storage (or ``.attr.json``) name, or ``None`` if there is no UUID.

    The UUID right after the last ``_YYYYMMDDTHHMMSS_`` wins, so a UUID inside the
    original filename is not mistaken for the id; otherwise the first UUID-looking
    substring (case-insensitive) is used, as upstream's cache rebuild does.
    """
    anchored = _ANCHORED_UUID_RE.findall(name)
    if anchored:
        return uuid.UUID(anchored[-1])
    match = _UUID_RE.search(name)
    return uuid.UUID(match.group()) if match else None
