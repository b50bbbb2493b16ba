"""Where the bytes of unfinished resumable uploads live, behind one seam.

A resumable upload's bytes arrive over many requests, possibly in different processes,
and must survive a crash once acknowledged; they become an ordinary file (data and attr
document at the final relpath, atomically) only when complete.  :class:`Staging` is
that life cycle; :func:`storage.backends.make_staging` picks the backend's:

- local disk (:mod:`.staging_local`): one file per upload under ``<root>/.resumable/``
  (a dot-directory: the attr walkers skip it, the ``.tmp*`` sweep never matches it),
  fsynced before each acknowledgement, hard-linked to its final name at the end;
- S3 (:mod:`.staging_s3`): part-sized chunk objects plus a tail object in the bucket,
  assembled server-side (``UploadPartCopy``) at the end.

The upload's row (:class:`~storage.db.repo_uploads.ResumableUpload`) is the truth: its
``upload_offset`` counts the bytes a session flushed *and* the database recorded, and
its ``staging`` holds the backend's bookkeeping.  Anything staged past that offset (a
PATCH that died before its commit, a refused checksum) is ignored and overwritten.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .base import Backend

OnTemp = Callable[[str], Awaitable[object]]  # told the name of partial data (see publish)


class Session(abc.ABC):
    """The bytes of one request, appended at the upload's committed offset."""

    @abc.abstractmethod
    async def write(self, chunk: bytes, hashers: Sequence[Any]) -> None:
        """Append ``chunk``, feeding it to each of ``hashers`` in order."""

    @abc.abstractmethod
    async def flush(self) -> dict[str, Any]:
        """Make everything written durable; returns the new ``staging`` bookkeeping."""

    async def committed(self) -> None:
        """Called once the database has recorded the flush (drop what it replaced)."""

    @abc.abstractmethod
    async def discard(self) -> None:
        """Forget everything written in this session (the offset does not move)."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class Staging(abc.ABC):
    """The staged bytes of every resumable upload of one element."""

    backend: Backend

    @abc.abstractmethod
    async def create(self, file_id: uuid.UUID) -> dict[str, Any]:
        """Prepare an empty upload; returns its initial ``staging`` bookkeeping."""

    @abc.abstractmethod
    async def open(self, file_id: uuid.UUID, offset: int, staging: dict[str, Any]) -> Session:
        """A session appending at ``offset``.  :raises StoreUnavailable: bytes are lost."""

    @abc.abstractmethod
    async def hash_into(self, file_id: uuid.UUID, offset: int, staging: dict[str, Any],
                        hasher: Any) -> None:
        """Feed the first ``offset`` staged bytes to ``hasher`` (rebuilding a running hash)."""

    @abc.abstractmethod
    async def publish(self, file_id: uuid.UUID, offset: int, staging: dict[str, Any],
                      relpath: str, attr: bytes, *, content_type: str, checksum: str,
                      tag: str, on_temp: OnTemp | None = None) -> None:
        """Make the ``offset`` staged bytes the object at ``relpath`` and ``attr`` its attr
        document, atomically as a writer's commit does.  Never clobbers another object:
        one already there that an earlier attempt of this upload published (known by
        ``tag``) is replaced, any other is :raises Conflict:.  ``on_temp`` is awaited
        with the name of partial data the publishing leaves while it runs (S3: the
        assembling multipart upload), before any byte goes into it (as
        :attr:`~storage.backends.base.Writer.on_temp`), so a WAL intent can name it."""

    @abc.abstractmethod
    async def discard(self, file_id: uuid.UUID) -> None:
        """Remove every staged byte of the upload; idempotent."""

    @abc.abstractmethod
    async def staged_ids(self) -> list[uuid.UUID]:
        """Ids of the uploads that have staged bytes (for the orphan sweep)."""
