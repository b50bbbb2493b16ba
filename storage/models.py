"""Plain dataclasses for rows: file metadata, WAL entries, element config, the download
facts of a file (:class:`Served`) and the caller (:class:`Identity`)."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

R = TypeVar("R")


def utcnow() -> datetime:
    return datetime.now(UTC)


def from_record(cls: type[R], rec: Any) -> R:
    """An instance of the dataclass ``cls`` from an asyncpg Record (or mapping): the
    columns it has a field for, the others ignored."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in dict(rec).items() if k in names})


@dataclass(slots=True)
class FileMeta:
    """One row of ``<prefix>_files``; ``FileMeta.from_record(rec)`` works on an asyncpg Record."""

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
    metadata_json: dict[str, Any] | None = None
    cache_updated_at: datetime = field(default_factory=utcnow)
    cache_ttl_hours: int = 24

    @classmethod
    def from_record(cls, rec: Any) -> FileMeta:
        return from_record(cls, rec)

    @property
    def relative_path(self) -> str:
        return self.storage_path + self.storage_filename

    @property
    def cache_expired(self) -> bool:
        return utcnow() > self.cache_updated_at + timedelta(hours=self.cache_ttl_hours)

    def to_response(self) -> dict[str, Any]:
        """The 15-key ``FileMetadataResponse`` of reference §1.3.6."""
        return {
            "file_id": str(self.file_id),
            "original_filename": self.original_filename,
            "storage_filename": self.storage_filename,
            "file_size": self.file_size,
            "content_type": self.content_type,
            "created_at": self.created_at.isoformat(),
            "created_by_username": self.created_by_username,
            "created_by_fullname": self.created_by_fullname,
            "description": self.description,
            "version": self.version,
            "storage_path": self.storage_path,
            "checksum": self.checksum,
            "cache_updated_at": self.cache_updated_at.isoformat(),
            "cache_ttl_hours": self.cache_ttl_hours,
            "cache_expired": self.cache_expired,
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class WalEntry:
    """One row of ``<prefix>_wal``."""

    transaction_id: uuid.UUID
    operation_type: str
    status: str
    file_id: uuid.UUID | None
    operation_data: dict[str, Any]
    started_at: datetime
    user_id: str | None = None
    error_message: str | None = None
    completed_at: datetime | None = None
    duration_ms: int | None = None
    reserved_bytes: int = 0

    @classmethod
    def from_record(cls, rec: Any) -> WalEntry:
        return from_record(cls, rec)


@dataclass(frozen=True, slots=True)
class ElementState:
    """The ``<prefix>_config`` singleton: persisted mode and O(1) totals."""

    current_mode: str | None
    mode_changed_at: datetime | None
    mode_changed_by: str | None
    total_files: int
    total_size_bytes: int
    last_cache_rebuild: datetime | None

    @classmethod
    def from_record(cls, rec: Any) -> ElementState:
        return from_record(cls, rec)


@dataclass(frozen=True, slots=True)
class Served:
    """The immutable download facts of one file (a ``<prefix>_files`` row's subset)."""

    file_id: uuid.UUID
    relative_path: str
    file_size: int
    checksum: str
    created_at: datetime
    original_filename: str
    content_type: str
    cache_expires_at: datetime  # the row's lazy-refresh deadline (reference §7.2)
    headers: tuple[tuple[str, str], ...] = ()  # response headers built once from the above
    cached: bool = False  # True when this came from the in-memory cache
    # the stored object's version (ObjectInfo.version) seen by a download of this entry;
    # a cached entry is served only for that very object
    version: str | None = None


ROLES = ("admin", "operator", "user", "readonly")


@dataclass(frozen=True, slots=True)
class Identity:
    """The authenticated caller, as handlers see it."""

    sub: str
    name: str
    role: str  # one of ROLES; unknown upstream roles map to "readonly"
    token_type: str  # the JWT "type" claim
    is_service_account: bool
    jti: str = ""
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
