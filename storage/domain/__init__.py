"""The storage protocol, independent of HTTP: creating, changing and deleting files
(WAL intent, data and attr document, row), the group commit, resumable uploads, capacity
and modes, crash recovery, the cache rebuilt from attr documents, scrub, and search."""
