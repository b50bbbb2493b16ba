"""Lossless mapping between a metadata row (:class:`FileMeta`) and its attr document.

The correct key mapping (reference §7.6) — ``content_type``, ``checksum`` and
``created_by_*`` map to themselves, ``metadata`` to ``metadata_json`` and a null
``version`` stays null — so a row rebuilt from its attr file equals the original.
"""

from __future__ import annotations

from typing import Any

from ..attrs import AttrDoc
from ..models import FileMeta


def to_doc(meta: FileMeta, extra: dict[str, Any] | None = None) -> AttrDoc:
    """The attr document for ``meta``; ``extra`` holds unknown keys to preserve."""
    return AttrDoc(
        file_id=meta.file_id, original_filename=meta.original_filename,
        storage_filename=meta.storage_filename, file_size=meta.file_size,
        content_type=meta.content_type, created_at=meta.created_at,
        updated_at=meta.updated_at, created_by_id=meta.created_by_id,
        created_by_username=meta.created_by_username, storage_path=meta.storage_path,
        checksum=meta.checksum, created_by_fullname=meta.created_by_fullname,
        description=meta.description, version=meta.version,
        custom_attributes=dict(meta.metadata_json or {}), extra=dict(extra or {}),
    )


def to_meta(doc: AttrDoc, ttl_hours: int = 24) -> FileMeta:
    """The metadata row described by ``doc`` (``metadata_json`` is NULL when empty)."""
    return FileMeta(
        file_id=doc.file_id, original_filename=doc.original_filename,
        storage_filename=doc.storage_filename, file_size=doc.file_size,
        content_type=doc.content_type, created_at=doc.created_at, updated_at=doc.updated_at,
        created_by_id=doc.created_by_id, created_by_username=doc.created_by_username,
        storage_path=doc.storage_path, checksum=doc.checksum,
        created_by_fullname=doc.created_by_fullname, description=doc.description,
        version=doc.version, metadata_json=dict(doc.custom_attributes) or None,
        cache_ttl_hours=ttl_hours,
    )
