"""Local-disk backend: temp file → hash → fsync → link into place → fsync the directory.

Blocking file I/O runs in the default executor; each chunk is written *and*
hashed in the same thread hop (cheaper than aiofiles' one hop per call).  The
symlink-proof steps themselves are in :mod:`storage.backends.fsutil`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .. import attrs
from ..config import Config
from ..errors import Conflict
from .base import (
    ATTR_SUFFIX,
    Backend,
    Hasher,
    NoSpace,
    ObjectInfo,
    ObjectMissing,
    Reader,
    StoreUnavailable,
    Writer,
)
from .fsutil import (
    TEMP_PREFIX,
    DirSync,
    link_with_attr,
    open_dir,
    open_real,
    write_atomic,
    write_fully,
)

_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _translate(exc: OSError, what: str) -> Exception:
    if exc.errno in _SPACE_ERRNOS:
        return NoSpace(f"Not enough storage space to {what}")
    return StoreUnavailable(f"Storage error while trying to {what}: {exc.strerror or exc}")


class LocalWriter(Writer):
    """Temp file beside the object, written and hashed in the executor.

    A small last piece of the body can be handed over with :meth:`defer`: it is hashed
    at once and written by :meth:`commit`, so a small upload costs one executor hop
    (open, write, fsync, attr, link, directory fsync) instead of three.
    """

    def __init__(self, backend: LocalBackend, relpath: str) -> None:
        self.relpath = relpath
        self.hasher = Hasher()
        self._final = backend.path(relpath)
        self._root = backend.root
        self._dirsync = backend.dirsync
        self._tmp = self._final.parent / f"{TEMP_PREFIX}_{secrets.token_hex(16)}"
        self._dirfd: int | None = None
        self._fd: int | None = None
        self._tail = b""
        self._done = False

    @property
    def temp_name(self) -> str:
        return str(self._tmp)

    def _open(self) -> None:
        self._dirfd = open_dir(self._final.parent, self._root)
        self._fd = os.open(self._tmp.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                           0o644, dir_fd=self._dirfd)

    def _write(self, chunk: bytes) -> None:
        if self._fd is None:
            self._open()
        write_fully(self._fd, chunk)
        self.hasher.update(chunk)

    async def write(self, chunk: bytes) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._write, chunk)
        except OSError as exc:
            raise _translate(exc, "store the file") from exc

    def defer(self, chunk: bytes) -> bool:
        self.hasher.update(chunk)  # the caller offers small pieces only
        self._tail += chunk
        return True

    def _commit(self, attr: bytes | None) -> None:
        if self._fd is None:
            self._open()
        dirfd = self._dirfd
        if self._tail:
            write_fully(self._fd, self._tail)
            self._tail = b""
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        link_with_attr(dirfd, self._tmp.name, dirfd, self._final.name, attr)
        self.landed = True  # both or neither: a link never clobbers another upload's
        os.unlink(self._tmp.name, dir_fd=dirfd)
        self._done = True
        # one directory sync makes both names durable (shared with concurrent commits)
        self._dirsync.sync(str(self._final.parent), dirfd)
        os.close(dirfd)  # done: abort() has nothing left to do
        self._dirfd = None

    async def commit(self, attr: bytes | None = None) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._commit, attr)
        except FileExistsError:
            raise Conflict(f"Another file is stored at {self.relpath}") from None
        except OSError as exc:
            raise _translate(exc, "store the file") from exc

    def _abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dirfd is not None:
            if not self._done:
                try:
                    os.unlink(self._tmp.name, dir_fd=self._dirfd)
                except FileNotFoundError:
                    pass
            os.close(self._dirfd)
            self._dirfd = None

    async def abort(self) -> None:
        if self._dirfd is None:  # nothing was opened: no file to remove, no hop needed
            return
        await asyncio.shield(asyncio.to_thread(self._abort))


class LocalReader(Reader):
    def __init__(self, fobj, info: ObjectInfo) -> None:
        self.fobj = fobj
        self.info = info

    async def iter_range(self, start: int, end: int, chunk_size: int) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        fd = self.fobj.fileno()
        pos = start
        while pos <= end:
            n = min(chunk_size, end - pos + 1)
            data = await loop.run_in_executor(None, os.pread, fd, n, pos)
            if not data:
                raise StoreUnavailable("The stored file is shorter than its metadata says")
            pos += len(data)
            yield data

    async def close(self) -> None:
        self.fobj.close()


class LocalBackend(Backend):
    name = "local"

    def __init__(self, config: Config) -> None:
        self.root = config.storage_local_base_path.resolve()
        self.location = str(self.root)
        self.dirsync = DirSync()  # directory fsyncs shared between concurrent writes

    def path(self, relpath: str) -> Path:
        """Absolute path of ``relpath``; refuses anything that could leave the root.

        The check is lexical (no absolute path, no ``..``, no empty or ``.``
        component, no NUL) so the hot path makes no syscalls; symlinks planted
        inside the tree are refused where data is read (:meth:`open`).
        """
        parts = relpath.split("/")
        if (not relpath or relpath.startswith("/") or "\0" in relpath
                or any(p in ("", ".", "..") for p in parts)):
            raise ObjectMissing(f"Invalid storage path: {relpath!r:.200}")
        return self.root.joinpath(*parts)

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"Cannot create storage directory {self.root}: {exc}") from exc

    def create(self, relpath: str, size_hint: int | None = None, *,
               content_type: str | None = None) -> Writer:
        return LocalWriter(self, relpath)  # a file has no content type; the attr keeps it

    async def open(self, relpath: str, *, expect_size: int | None = None,
                   expect_version: str | None = None) -> Reader:
        # an open() and an fstat() cost no round trip: expect_size is not needed here
        path = self.path(relpath)

        def _open():
            fobj = os.fdopen(open_real(path), "rb")  # closed by LocalReader.close
            st = os.fstat(fobj.fileno())
            version = f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}"
            if expect_version is not None and version != expect_version:
                fobj.close()
                raise FileNotFoundError(path)  # another file now lies at that path
            return fobj, st.st_size, version

        try:
            fobj, size, version = await asyncio.to_thread(_open)
        except FileNotFoundError:
            raise ObjectMissing(f"Stored data for {relpath} is missing") from None
        except OSError as exc:
            raise _translate(exc, "read the file") from exc
        return LocalReader(fobj, ObjectInfo(size=size, path=path, version=version))

    async def read_attr(self, relpath: str) -> bytes:
        path = self.path(relpath + ATTR_SUFFIX)

        def _read() -> bytes:
            with os.fdopen(open_real(path), "rb") as f:
                return f.read(attrs.MAX_ATTR_SIZE + 1)  # loads() refuses anything longer

        try:
            return await asyncio.to_thread(_read)
        except FileNotFoundError:
            raise ObjectMissing(f"Attribute file for {relpath} is missing") from None
        except OSError as exc:
            raise _translate(exc, "read the attribute file") from exc

    async def write_attr(self, relpath: str, data: bytes) -> None:
        path = self.path(relpath + ATTR_SUFFIX)
        try:
            await asyncio.to_thread(write_atomic, path, data, self.root, self.dirsync)
        except OSError as exc:
            raise _translate(exc, "write the attribute file") from exc

    async def delete(self, relpath: str, *, owner: str | None = None) -> bool:
        data, attr = self.path(relpath), self.path(relpath + ATTR_SUFFIX)

        def _delete() -> bool:
            try:
                dirfd = open_dir(data.parent, self.root, create=False)
            except FileNotFoundError:
                return False
            try:
                existed = True
                try:
                    os.unlink(data.name, dir_fd=dirfd)
                except FileNotFoundError:
                    existed = False
                try:
                    os.unlink(attr.name, dir_fd=dirfd)
                except FileNotFoundError:
                    pass
                self.dirsync.sync(str(data.parent), dirfd)
            finally:
                os.close(dirfd)
            return existed

        try:
            return await asyncio.to_thread(_delete)
        except OSError as exc:
            raise _translate(exc, "delete the file") from exc

    async def exists(self, relpath: str) -> bool:
        return await asyncio.to_thread(self.path(relpath).is_file)

    async def missing(self, relpaths: list[str]) -> set[str]:
        """One thread hop for the whole batch (a stat each)."""
        paths = [(p, self.path(p)) for p in relpaths]
        return await asyncio.to_thread(lambda: {p for p, a in paths if not a.is_file()})

    def _walk_attr_batches(self, emit, stop: threading.Event, size: int = 500) -> None:
        """Walk the tree in a thread, handing over sorted relpaths in batches.

        Dot-directories (``.quarantine``, temp areas) are skipped; an unreadable
        directory raises instead of being silently left out of a rebuild or check.
        """
        def fail(exc: OSError) -> None:
            raise exc

        batch: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=fail):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in sorted(filenames):
                if name.endswith(ATTR_SUFFIX) and not name.startswith("."):
                    rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                    batch.append(rel[: -len(ATTR_SUFFIX)])
                    if len(batch) >= size:
                        if stop.is_set():
                            return
                        emit(batch)
                        batch = []
        if batch and not stop.is_set():
            emit(batch)

    async def iter_attr_paths(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[str] | BaseException | None] = asyncio.Queue(maxsize=4)
        stop = threading.Event()

        def emit(item) -> None:
            asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

        def walk() -> None:
            try:
                self._walk_attr_batches(emit, stop)
                emit(None)
            except BaseException as exc:  # handed to the consumer, raised there
                emit(exc)

        task = loop.run_in_executor(None, walk)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise _translate(item, "list the stored files") if isinstance(
                        item, OSError) else item
                for relpath in item:
                    yield relpath
        finally:
            stop.set()
            while not task.done():  # unblock the walker if it waits on a full queue
                if queue.empty():
                    await asyncio.sleep(0.01)
                else:
                    queue.get_nowait()
            await task

    async def check(self) -> dict[str, Any]:
        def probe() -> None:
            if not self.root.is_dir():
                raise OSError(errno.ENOENT, "storage directory does not exist")
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise OSError(errno.EACCES, "storage directory is not writable")

        try:
            await asyncio.to_thread(probe)
        except OSError as exc:
            raise StoreUnavailable(f"Storage directory {self.root} is not accessible: "
                                   f"{exc.strerror}") from exc
        return {"storage_directory": "accessible", "storage_path": str(self.root)}

    async def free_bytes(self) -> int | None:
        # statvfs of a local filesystem answers from memory in microseconds: cheaper
        # on the loop than the thread hop it would take (one per upload)
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    async def disk_usage(self) -> tuple[int, int]:
        """(total, available) bytes of the filesystem holding the root."""
        st = await asyncio.to_thread(os.statvfs, self.root)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    async def discard_temp(self, relpath: str, temp_name: str) -> bool:
        temp = Path(temp_name) if temp_name else None
        if temp is None or temp.parent != self.path(relpath).parent:
            return False  # only ever a temp file beside the object it was for
        if not temp.name.startswith(TEMP_PREFIX):
            return False
        try:
            await asyncio.to_thread(temp.unlink)
        except FileNotFoundError:
            return False
        return True

    async def remove_stray_temps(self, older_than_s: float = 0,
                                 keep: frozenset[str] = frozenset()) -> int:
        cutoff = time.time() - older_than_s

        def sweep() -> int:
            removed = 0
            for dirpath, _dirs, filenames in os.walk(self.root):
                for name in filenames:
                    if name.startswith(TEMP_PREFIX):
                        path = os.path.join(dirpath, name)
                        if path in keep:
                            continue
                        try:
                            if os.lstat(path).st_mtime <= cutoff:
                                os.unlink(path)
                                removed += 1
                        except FileNotFoundError:
                            continue
            return removed

        return await asyncio.to_thread(sweep)
