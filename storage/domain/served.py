"""What a download needs to know about a file, kept in memory for a minute.

A download's answer depends only on columns that never change after the upload
(path, size, checksum, creation time, name, content type): PATCH changes none of
them.  So each process keeps them, with the response headers built from them, for
:data:`TTL_S` seconds, and a download of a recently served file costs no database
round trip.

Deletes stay exact across processes without any message between them: a DELETE (any
process, any path: API, GC, scrub, rebuild) removes the data object before it is
acknowledged, and a download opens the data object before it sends a header.  A cached
entry is only served from the very object it was made from (its version: inode and
mtime on disk, ETag on S3, checked when the object is opened): an entry whose object is
gone, or replaced by a new upload of the same id at the same path (same name, within
the same second), is dropped and the database asked again, so after an acknowledged
DELETE no process serves the file, and an id uploaded anew is served with headers
(ETag, length, digest, 304 decisions) of the new bytes.  The only staleness is a change
made behind the element's back (an attr document edited by hand, then a rebuild): seen
within a minute, like the TTL of the metadata cache itself, sooner by the process that
deletes.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict

from ..models import Served

TTL_S = 60.0
MAX_ENTRIES = 50_000


class ServedCache:
    """A bounded LRU of :class:`Served` by file id, each entry valid :data:`TTL_S`."""

    __slots__ = ("_entries", "_ttl", "_max", "hits", "misses")

    def __init__(self, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: OrderedDict[uuid.UUID, tuple[float, Served]] = OrderedDict()
        self._ttl, self._max = ttl_s, max_entries
        self.hits = self.misses = 0

    def get(self, file_id: uuid.UUID) -> Served | None:
        found = self._entries.get(file_id)
        if found is None or found[0] < time.monotonic():
            if found is not None:
                del self._entries[file_id]
            self.misses += 1
            return None
        self._entries.move_to_end(file_id)
        self.hits += 1
        return found[1]

    def put(self, served: Served) -> None:
        self._entries[served.file_id] = (time.monotonic() + self._ttl, served)
        self._entries.move_to_end(served.file_id)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def forget(self, file_id: uuid.UUID) -> None:
        self._entries.pop(file_id, None)

    def __len__(self) -> int:
        return len(self._entries)
