"""Safe file-system steps for the local backend: nothing planted in the tree can redirect
a read or a write (reliability guide S29), and every name that is created is durable.

* Reads open the final component with ``O_NOFOLLOW`` and compare the kernel's name for
  the open file (``/proc/self/fd``) with the expected path: one syscall, no window
  between check and use (:func:`open_real`).
* Writes first open the directory the same way (:func:`open_dir`) and then create,
  link, rename, unlink and fsync *relative to that directory fd*.
* A new file is fsynced before it gets its final name; the directory after
  (:func:`write_atomic`, and the writer in :mod:`storage.backends.local`).

Blocking calls: run them in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from ..attrs import fsync_dir
from .base import ATTR_SUFFIX, StoreUnavailable

TEMP_PREFIX = ".tmp"


def makedirs_durable(path: Path, root: Path) -> None:
    """``mkdir -p`` that fsyncs the parent of every directory it creates."""
    missing = []
    probe = path
    while not probe.exists() and probe != root and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another writer's: fsynced here too
            directory.mkdir()
        fsync_dir(directory.parent)
        _known_durable(directory)


_DURABLE: set[str] = set()  # directories whose entries this process made sure of (a cache
_DURABLE_LOCK = threading.Lock()  # of file-system facts, keyed by absolute path)
_DURABLE_MAX = 4096


def _known_durable(directory: Path) -> None:
    with _DURABLE_LOCK:
        if len(_DURABLE) >= _DURABLE_MAX:
            _DURABLE.clear()
        _DURABLE.add(str(directory))


def ensure_durable(directory: Path, root: Path,
                   fsync: Callable[[Path], None] = fsync_dir) -> None:
    """Make the entry of ``directory`` (and of each ancestor below ``root``) durable before
    a name in it is acknowledged: once per directory and process.  A writer that finds a
    new hour directory already there cannot know whether its creator has fsynced the
    parent yet (or died before it did), so it does so itself, the first time."""
    todo = []
    probe = directory
    while probe != root and probe != probe.parent and str(probe) not in _DURABLE:
        todo.append(probe)
        probe = probe.parent
    for each in reversed(todo):
        fsync(each.parent)
        _known_durable(each)


def is_real(path: Path) -> bool:
    """True if no component of ``path`` (under the resolved root) is a symlink.

    A symlink planted in the tree could lead outside the root, or to another stored
    object whose bytes would then be served under this one's name (guide S29).
    """
    return os.path.realpath(path) == str(path)


def _fd_is(fd: int, path: Path) -> bool:
    """True if the kernel's name for the open ``fd`` is ``path`` (no symlink on the way)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == str(path)
    except OSError:  # no /proc: fall back to the walk
        return is_real(path)


def open_real(path: Path) -> int:
    """Open ``path`` read-only, refusing a symlink anywhere on the way; returns the fd.

    The final component is opened with O_NOFOLLOW and the kernel's own name for the
    open file (``/proc/self/fd``) must equal ``path``: one syscall instead of a
    realpath walk, and no window between the check and the open.
    :raises FileNotFoundError: missing, or reached through a symlink.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the file itself is a symlink
            raise FileNotFoundError(errno.ENOENT, "symlink in the store", str(path)) from None
        raise
    if not _fd_is(fd, path):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "symlink in the store", str(path))
    return fd


def open_dir(directory: Path, root: Path, *, create: bool = True) -> int:
    """An fd of ``directory``, checked not to be reached through a symlink; names are
    then created, linked and fsynced relative to it, so nothing planted in the tree
    after the check can redirect them.  A missing directory is created durably when
    ``create``, else :raises FileNotFoundError:.

    :raises StoreUnavailable: if a component of ``directory`` is a symlink.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(directory, flags)
    except FileNotFoundError:
        if not create:
            raise
        makedirs_durable(directory, root)
        fd = os.open(directory, flags)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        fd = None
    if fd is not None and _fd_is(fd, directory):
        if create:
            try:
                ensure_durable(directory, root)
            except BaseException:
                os.close(fd)
                raise
        return fd
    if fd is not None:
        os.close(fd)
    raise StoreUnavailable(f"Refusing to write through a symlink in the storage tree "
                           f"at {directory.relative_to(root)}")


class DirSync:
    """Directory fsyncs shared between the threads that need one (group commit for names).

    A thread that has just linked, renamed or unlinked names in a directory calls
    :meth:`sync`.  If no fsync of that directory is running, it runs one itself, covering
    every name changed so far by anyone.  If one is running, it may have started before
    this caller's change, so the caller waits for the *next* one (run by the first waiter,
    covering all who queued meanwhile).  Nobody returns before an fsync that started
    after its change has ended; a failed fsync makes each waiter try for itself.
    """

    __slots__ = ("_cond", "_dirs", "_fsync")

    def __init__(self, fsync: Callable[[int], None] = os.fsync) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._dirs: dict[str, _DirState] = {}
        self._fsync = fsync  # tests pass an instrumented one

    def idle(self) -> bool:
        """True when no directory has an fsync running or owed."""
        with self._cond:
            return not self._dirs

    def sync(self, key: str, dirfd: int) -> None:
        """Make the changes of names in the directory ``dirfd`` (named ``key``) durable."""
        with self._cond:
            state = self._dirs.get(key)
            if state is None:
                state = self._dirs[key] = _DirState()
            state.requested += 1
            ticket = state.requested
            while state.done < ticket:
                if not state.running:
                    break
                self._cond.wait()
            else:
                return  # an fsync that started after our change has ended
            state.running = True
            covered = state.requested  # every change up to here happened before the fsync
        ok = False
        try:
            self._fsync(dirfd)
            ok = True
        finally:
            with self._cond:
                state.running = False
                if ok:
                    state.done = max(state.done, covered)
                    if state.done == state.requested and self._dirs.get(key) is state:
                        del self._dirs[key]  # idle: forget the directory
                self._cond.notify_all()


class _DirState:
    __slots__ = ("requested", "done", "running")

    def __init__(self) -> None:
        self.requested = self.done = 0
        self.running = False


def write_atomic(path: Path, data: bytes, root: Path, dirsync: DirSync) -> None:
    """Create missing directories durably, then replace ``path`` atomically (sync)."""
    dirfd = open_dir(path.parent, root)
    try:
        tmp = write_synced_temp(dirfd, data)
        try:
            os.replace(tmp, path.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except BaseException:
            os.unlink(tmp, dir_fd=dirfd)
            raise
        dirsync.sync(str(path.parent), dirfd)
    finally:
        os.close(dirfd)


def link_with_attr(src_dirfd: int, src: str, dirfd: int, name: str, attr: bytes | None) -> None:
    """Give the fsynced file ``src`` (in ``src_dirfd``) the name ``name`` in ``dirfd``
    (a hard link: never clobbers an existing object, :raises FileExistsError:) and
    place ``attr``, when given, beside it as its attr document: both or neither.

    The caller removes ``src`` and fsyncs ``dirfd`` (one directory sync for both names).
    """
    attr_tmp = write_synced_temp(dirfd, attr) if attr is not None else None
    try:
        os.link(src, name, src_dir_fd=src_dirfd, dst_dir_fd=dirfd, follow_symlinks=False)
        if attr_tmp is not None:
            try:
                os.replace(attr_tmp, name + ATTR_SUFFIX, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            except BaseException:
                os.unlink(name, dir_fd=dirfd)  # all or nothing: the data goes again
                raise
            attr_tmp = None
    finally:
        if attr_tmp is not None:
            try:
                os.unlink(attr_tmp, dir_fd=dirfd)
            except FileNotFoundError:
                pass


def write_fully(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_synced_temp(dirfd: int, data: bytes) -> str:
    """``data`` in a new fsynced temp file in the directory ``dirfd``; returns its name
    (the caller renames it)."""
    tmp = f"{TEMP_PREFIX}_attr_{secrets.token_hex(8)}.json"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644,
                 dir_fd=dirfd)
    try:
        write_fully(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dirfd)
        raise
    os.close(fd)
    return tmp
