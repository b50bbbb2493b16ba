"""Local staging: ``<root>/.resumable/<file_id>``, one file per unfinished upload.

Same filesystem as the final path, so completing an upload is the writer's own commit:
a hard link into the hourly directory next to the attr document, one directory fsync
(:func:`~storage.backends.fsutil.link_with_attr`).  A session writes at the committed
offset (``pwrite``; anything past it from a dead session is truncated first), hashing
in the same executor hop, and fsyncs before the offset is recorded.
"""

from __future__ import annotations

import asyncio
import errno
import os
import uuid
from collections.abc import Sequence
from typing import Any

from ..errors import Conflict
from .base import ATTR_SUFFIX, StoreUnavailable
from .fsutil import link_with_attr, open_dir
from .local import LocalBackend, _translate
from .staging import OnTemp, Session, Staging

DIRNAME = ".resumable"
READ = 1024 * 1024


class LocalSession(Session):
    def __init__(self, fd: int, offset: int) -> None:
        self._fd, self._start, self._pos = fd, offset, offset

    def _write(self, chunk: bytes, hashers: Sequence[Any]) -> None:
        view, pos = memoryview(chunk), self._pos
        while view:
            n = os.pwrite(self._fd, view, pos)
            view, pos = view[n:], pos + n
        for h in hashers:
            h.update(chunk)
        self._pos = pos

    async def write(self, chunk: bytes, hashers: Sequence[Any]) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._write, chunk, hashers)
        except OSError as exc:
            raise _translate(exc, "stage the upload") from exc

    async def flush(self) -> dict[str, Any]:
        try:
            await asyncio.to_thread(os.fsync, self._fd)
        except OSError as exc:
            raise _translate(exc, "stage the upload") from exc
        return {}

    async def discard(self) -> None:
        if self._pos != self._start:
            await asyncio.shield(asyncio.to_thread(os.ftruncate, self._fd, self._start))
            self._pos = self._start

    async def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class LocalStaging(Staging):
    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self.dir = backend.root / DIRNAME

    def _dirfd(self, create: bool = True) -> int:
        return open_dir(self.dir, self.backend.root, create=create)

    async def _run(self, what: str, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as exc:
            raise _translate(exc, what) from exc

    def _create(self, name: str) -> None:
        dirfd = self._dirfd()
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644,
                         dir_fd=dirfd)
            os.close(fd)
            os.fsync(dirfd)  # the name is durable before any byte is acknowledged
        finally:
            os.close(dirfd)

    async def create(self, file_id: uuid.UUID) -> dict[str, Any]:
        await self._run("create the upload", self._create, str(file_id))
        return {}

    def _open(self, name: str, offset: int) -> int:
        dirfd = self._dirfd()
        try:
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=dirfd)
            except FileNotFoundError:
                if offset:
                    raise StoreUnavailable(f"The staged bytes of upload {name} are missing") \
                        from None
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644,
                             dir_fd=dirfd)
                os.fsync(dirfd)
        finally:
            os.close(dirfd)
        size = os.fstat(fd).st_size
        if size < offset:
            os.close(fd)
            raise StoreUnavailable(f"Upload {name} has {size} staged bytes, not {offset}")
        if size > offset:
            os.ftruncate(fd, offset)  # bytes of a session that never committed
        return fd

    async def open(self, file_id: uuid.UUID, offset: int, staging: dict[str, Any]) -> Session:
        return LocalSession(await self._run("open the upload", self._open, str(file_id),
                                            offset), offset)

    def _hash(self, name: str, offset: int, hasher: Any) -> None:
        dirfd = self._dirfd(create=False)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd)
        finally:
            os.close(dirfd)
        try:
            pos = 0
            while pos < offset:
                data = os.pread(fd, min(READ, offset - pos), pos)
                if not data:
                    raise StoreUnavailable(f"Upload {name} has fewer staged bytes than "
                                           f"its offset {offset}")
                hasher.update(data)
                pos += len(data)
        finally:
            os.close(fd)

    async def hash_into(self, file_id: uuid.UUID, offset: int, staging: dict[str, Any],
                        hasher: Any) -> None:
        if offset:
            await self._run("read the upload", self._hash, str(file_id), offset, hasher)

    def _publish(self, name: str, relpath: str, attr: bytes) -> None:
        final = self.backend.path(relpath)
        src = self._dirfd(create=False)
        try:
            dirfd = open_dir(final.parent, self.backend.root)
            try:
                try:
                    link_with_attr(src, name, dirfd, final.name, attr)
                except FileExistsError:
                    ours, there = (os.stat(n, dir_fd=d, follow_symlinks=False)
                                   for n, d in ((name, src), (final.name, dirfd)))
                    if (ours.st_dev, ours.st_ino) != (there.st_dev, there.st_ino):
                        raise Conflict(f"Another file is stored at {relpath}") from None
                    # the link of an earlier attempt that died before the database commit
                    for stale in (final.name, final.name + ATTR_SUFFIX):
                        try:
                            os.unlink(stale, dir_fd=dirfd)
                        except FileNotFoundError:
                            pass
                    link_with_attr(src, name, dirfd, final.name, attr)
                self.backend.dirsync.sync(str(final.parent), dirfd)  # shared, see DirSync
            finally:
                os.close(dirfd)
        finally:
            os.close(src)

    async def publish(self, file_id: uuid.UUID, offset: int, staging: dict[str, Any],
                      relpath: str, attr: bytes, *, content_type: str, checksum: str,
                      tag: str, on_temp: OnTemp | None = None) -> None:
        await self._run("store the file", self._publish, str(file_id), relpath, attr)

    def _discard(self, name: str) -> None:
        try:
            dirfd = self._dirfd(create=False)
        except FileNotFoundError:
            return
        try:
            os.unlink(name, dir_fd=dirfd)
        except FileNotFoundError:
            pass
        finally:
            os.close(dirfd)

    async def discard(self, file_id: uuid.UUID) -> None:
        await self._run("remove the upload", self._discard, str(file_id))

    def _ids(self) -> list[uuid.UUID]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        except NotADirectoryError as exc:
            raise OSError(errno.ENOTDIR, "not a directory", str(self.dir)) from exc
        found = []
        for name in names:
            try:
                found.append(uuid.UUID(name))
            except ValueError:
                continue
        return found

    async def staged_ids(self) -> list[uuid.UUID]:
        return await self._run("list the uploads", self._ids)

