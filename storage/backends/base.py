"""The backend seam (after Swift's DiskFile): writer, reader, attr and listing.

Handlers, WAL, attr and cache code see only this API; ``local`` and ``s3``
implement it.  Paths are *relative* (``YYYY/MM/DD/HH/<storage_filename>``); the
attr document lives at ``relpath + ATTR_SUFFIX``.  Backends raise the domain
errors below, never a bare ``OSError`` or botocore error.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InsufficientStorage, NotFound, Unavailable

ATTR_SUFFIX = ".attr.json"


class ObjectMissing(NotFound):
    """The data or attr object is not in the store."""


class NoSpace(InsufficientStorage):
    """The store ran out of space while writing."""


class StoreUnavailable(Unavailable):
    """The store cannot be reached or is not writable."""


class SizeMismatch(StoreUnavailable):
    """The stored object's size is not the size it was opened with (see Backend.open)."""


class Hasher:
    """Running sha256 (and md5 once enabled) and byte count of what was written.

    md5 costs as much as sha256, so it runs only for clients that send
    ``Content-MD5``: call :meth:`enable_md5` before the first write.
    """

    __slots__ = ("sha256", "md5", "size")

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.md5 = None
        self.size = 0

    def enable_md5(self) -> None:
        if self.size:
            raise RuntimeError("md5 must be enabled before the first write")
        self.md5 = hashlib.md5(usedforsecurity=False)

    def update(self, chunk: bytes | memoryview) -> None:
        self.sha256.update(chunk)
        if self.md5 is not None:
            self.md5.update(chunk)
        self.size += len(chunk)


class Writer(abc.ABC):
    """Streams one new object; nothing is visible until :meth:`commit`.

    Use as ``async with backend.create(relpath) as w``: leaving the block without
    a commit aborts (temp file removed / multipart upload aborted).
    """

    relpath: str
    hasher: Hasher
    #: Set by the caller before the first write: awaited with :attr:`temp_name` when a
    #: writer learns it only while writing (S3: the multipart upload id), after the
    #: partial data exists and before any byte of it leaves, so a WAL intent can name
    #: what recovery must discard.  A writer whose temp name is known from the start
    #: (local) never calls it.  If it raises, the write fails and the writer aborts.
    on_temp: Callable[[str], Awaitable[object]] | None = None
    #: Set by the caller before the first write: names this upload (its WAL txid).  A
    #: store without an atomic "create only if absent" (S3) stamps it on the object, so
    #: an undo removes only what this upload wrote (:meth:`Backend.delete` ``owner``) and
    #: a conditional write retried after a lost response recognises its own object.
    tag: str | None = None
    #: True once the data object may be visible at ``relpath`` (its commit was sent):
    #: a failure from then on must remove it (``Backend.delete`` with ``owner=tag``).
    landed: bool = False
    #: True when :meth:`abort` could not remove the partial data (the store was down):
    #: the caller leaves the intent that names :attr:`temp_name` to recovery.
    left: bool = False

    @property
    def size(self) -> int:
        return self.hasher.size

    @property
    def sha256(self) -> str:
        return self.hasher.sha256.hexdigest()

    @property
    def md5(self) -> bytes | None:
        return self.hasher.md5.digest() if self.hasher.md5 is not None else None

    @abc.abstractmethod
    async def write(self, chunk: bytes) -> None:
        """Append ``chunk`` and hash it.  :raises NoSpace: / StoreUnavailable:"""

    def defer(self, chunk: bytes) -> bool:
        """Offer the body's last piece: a writer may hash it now and write it in
        :meth:`commit` (saving a round of its own).  False: call :meth:`write`."""
        return False

    @abc.abstractmethod
    async def commit(self, attr: bytes | None = None) -> None:
        """Make the object durable and visible at ``relpath`` atomically; never clobber
        (:raises Conflict: another object is there).

        ``attr``, when given, is (re)placed as the object's attr document in the same
        step (the local backend then fsyncs the directory once for both).  The data
        becomes visible first: a crash in between leaves data without an attr
        document, which recovery treats as an incomplete upload.
        """

    @abc.abstractmethod
    async def abort(self) -> None:
        """Discard everything written; idempotent."""

    @property
    @abc.abstractmethod
    def temp_name(self) -> str:
        """Where partial data lives (temp path or multipart upload id), for the WAL."""

    async def __aenter__(self) -> Writer:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.abort()


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    size: int
    path: Path | None = None  # local file path (enables sendfile), None for S3
    # Which stored object this is: another object written at the same path later (the id
    # deleted and uploaded anew within the same second) has another version.  Local: the
    # inode and its mtime; S3: the object's ETag (known after the first GET when opened
    # with ``expect_size``).
    version: str | None = None


class Reader(abc.ABC):
    """An opened object; reads stay valid even if it is deleted meanwhile (local)."""

    info: ObjectInfo

    @abc.abstractmethod
    def iter_range(self, start: int, end: int, chunk_size: int) -> AsyncIterator[bytes]:
        """Yield bytes ``start..end`` inclusive."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class Backend(abc.ABC):
    name: str
    location: str  # base path, or bucket/app_folder

    async def start(self) -> None:
        """Open clients; called once from the app's cleanup context."""

    async def close(self) -> None:
        """Release clients."""

    @abc.abstractmethod
    def create(self, relpath: str, size_hint: int | None = None, *,
               content_type: str | None = None) -> Writer:
        """A writer for a new object at ``relpath`` (see :class:`Writer`); ``content_type``
        is stored with the object where the store keeps one (S3), else ignored."""

    @abc.abstractmethod
    async def open(self, relpath: str, *, expect_size: int | None = None,
                   expect_version: str | None = None) -> Reader:
        """:raises ObjectMissing: when the data object does not exist, or (with
        ``expect_version``) is another object than the one of that version.

        With ``expect_size`` a backend whose lookups cost a round trip (S3) may skip the
        lookup: ``info.size`` is then ``expect_size``, and the first read raises
        ObjectMissing or :class:`SizeMismatch` instead of returning other bytes."""

    @abc.abstractmethod
    async def read_attr(self, relpath: str) -> bytes:
        """The attr document of ``relpath``.  :raises ObjectMissing:"""

    @abc.abstractmethod
    async def write_attr(self, relpath: str, data: bytes) -> None:
        """Atomically (re)place the attr document of ``relpath``."""

    @abc.abstractmethod
    async def delete(self, relpath: str, *, owner: str | None = None) -> bool:
        """Remove data and attr; True if the data object existed.  Idempotent.

        With ``owner`` (a :attr:`Writer.tag`), only if the data object is that upload's:
        an object another upload wrote at the same key stays (False).  A store whose
        creates never clobber (local) ignores it."""

    @abc.abstractmethod
    async def exists(self, relpath: str) -> bool: ...

    async def missing(self, relpaths: list[str]) -> set[str]:
        """Those of ``relpaths`` whose data object does not exist (a few lookups at a
        time; a backend with cheaper lookups overrides it)."""
        gate = asyncio.Semaphore(16)

        async def one(relpath: str) -> bool:
            async with gate:
                return await self.exists(relpath)

        found = await asyncio.gather(*(one(p) for p in relpaths))
        return {p for p, there in zip(relpaths, found, strict=True) if not there}

    @abc.abstractmethod
    def iter_attr_paths(self) -> AsyncIterator[str]:
        """Relative paths of every data object that has an attr document (streamed)."""

    @abc.abstractmethod
    async def check(self) -> dict[str, Any]:
        """Readiness details without side effects.  :raises StoreUnavailable:"""

    @abc.abstractmethod
    async def free_bytes(self) -> int | None:
        """Free space the store reports, or None when it has no such notion (S3)."""

    @abc.abstractmethod
    async def remove_stray_temps(self, older_than_s: float = 0,
                                 keep: frozenset[str] = frozenset()) -> int:
        """Remove partial uploads left ``older_than_s`` seconds ago or earlier (temp
        files, multipart uploads) except those named in ``keep`` (the temp names of
        pending WAL intents: live uploads); return how many were removed."""

    async def iter_bare_data(self, older_than_s: float) -> AsyncIterator[str]:
        """Relative paths of data objects without an attr document, last written
        ``older_than_s`` seconds ago or earlier (a commit that failed between the two);
        resumable staging and quarantine are not data objects."""
        return
        yield

    @abc.abstractmethod
    async def discard_temp(self, relpath: str, temp_name: str) -> bool:
        """Remove the partial data a writer for ``relpath`` left as ``temp_name``
        (its :attr:`Writer.temp_name`, kept in the WAL intent); True if removed, False
        when there was none (or ``temp_name`` is empty or not such a writer's)."""
