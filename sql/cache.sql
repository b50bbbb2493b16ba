-- Cache maintenance (reference §7): rebuild from attr files, consistency, expiry,
-- and the advisory locks that keep one maintenance operation per prefix at a time.
--
-- A scan reads attr files while the element keeps serving, so a write can land between
-- reading a document and writing its row.  The WAL says which files were in flux: an
-- operation still pending, or one completed after the "horizon".  For the rebuilds the
-- horizon is the scan start minus a skew margin (they write and delete rows); for the
-- consistency report it is the scan start on the database clock, so only operations that
-- overlap the scan are left out (WAL rows are stamped by the application: its hosts'
-- clocks are assumed NTP-close to PostgreSQL's).  Two rules use it:
--
-- * before (re)inserting a row: skip files with a pending operation, or with a delete,
--   quarantine or rolled-back upload completed since the horizon (their document may be
--   gone by now).  A committed upload needs no skip: it wrote its row itself, so a row
--   that is missing now was evicted and the document is the truth;
-- * before overwriting an existing row: also skip files with an update completed since
--   the horizon (the row may be newer than the document read), and rows whose
--   cache_updated_at is past the scan start on the database clock.
--
-- Removal and orphan reports skip every file touched since the horizon.

-- name: cache_db_now
SELECT now();

-- name: cache_count_files
SELECT count(*) FROM <prefix>_files;

-- name: cache_existing_ids
-- $1 file ids: those that have a cache row
SELECT file_id FROM <prefix>_files WHERE file_id = ANY($1::uuid[]);

-- name: rebuild_upsert
-- $1 scan start (database clock), $2 WAL horizon (application clock), $3 cache_ttl_hours,
-- $4..$18 arrays, one element per attr document: file_id, original_filename,
-- storage_filename, file_size, content_type, created_at, updated_at, created_by_id,
-- created_by_username, created_by_fullname, description, version, storage_path, checksum,
-- metadata_json.  New and differing rows are written in full; rows already equal to
-- their document only get cache_updated_at/cache_ttl_hours (so the search column is not
-- recomputed).  Files in flux (see the top of this file) and documents whose
-- storage_filename belongs to another file id are skipped.  Returns the three counts.
WITH src AS (
    SELECT u.*
    FROM unnest($4::uuid[], $5::text[], $6::text[], $7::bigint[], $8::text[],
                $9::timestamptz[], $10::timestamptz[], $11::text[], $12::text[], $13::text[],
                $14::text[], $15::text[], $16::text[], $17::text[], $18::jsonb[])
         AS u(file_id, original_filename, storage_filename, file_size, content_type,
              created_at, updated_at, created_by_id, created_by_username,
              created_by_fullname, description, version, storage_path, checksum,
              metadata_json)
    WHERE NOT EXISTS (SELECT 1 FROM <prefix>_wal w
                      WHERE w.file_id = u.file_id
                        AND (w.status = 'pending'
                             OR (w.completed_at >= $2
                                 AND (w.operation_type IN ('file_delete', 'file_quarantine')
                                      OR w.status = 'rolled_back'))))
      AND NOT EXISTS (SELECT 1 FROM <prefix>_files o
                      WHERE o.storage_filename = u.storage_filename
                        AND o.file_id <> u.file_id)
), changed AS (
    SELECT s.*
    FROM src s LEFT JOIN <prefix>_files f ON f.file_id = s.file_id
    WHERE f.file_id IS NULL
       OR (f.cache_updated_at < $1
           AND NOT EXISTS (SELECT 1 FROM <prefix>_wal w
                           WHERE w.file_id = s.file_id AND w.operation_type = 'file_update'
                             AND w.completed_at >= $2)
           AND (f.original_filename, f.storage_filename, f.file_size, f.content_type,
                f.created_at, f.updated_at, f.created_by_id, f.created_by_username,
                f.created_by_fullname, f.description, f.version, f.storage_path,
                f.checksum, f.metadata_json)
               IS DISTINCT FROM
               (s.original_filename::varchar, s.storage_filename::varchar, s.file_size,
                s.content_type::varchar, s.created_at, s.updated_at,
                s.created_by_id::varchar, s.created_by_username::varchar,
                s.created_by_fullname::varchar, s.description, s.version::varchar,
                s.storage_path::varchar, s.checksum::varchar, s.metadata_json))
), verified AS (
    UPDATE <prefix>_files f SET cache_updated_at = now(), cache_ttl_hours = $3
    FROM src s
    WHERE f.file_id = s.file_id AND f.cache_updated_at < $1
      AND NOT EXISTS (SELECT 1 FROM changed c WHERE c.file_id = s.file_id)
    RETURNING f.file_id
), written AS (
    INSERT INTO <prefix>_files (
        file_id, original_filename, storage_filename, file_size, content_type,
        created_at, updated_at, created_by_id, created_by_username, created_by_fullname,
        description, version, storage_path, checksum, metadata_json,
        cache_updated_at, cache_ttl_hours)
    SELECT c.file_id, c.original_filename, c.storage_filename, c.file_size, c.content_type,
           c.created_at, c.updated_at, c.created_by_id, c.created_by_username,
           c.created_by_fullname, c.description, c.version, c.storage_path, c.checksum,
           c.metadata_json, now(), $3
    FROM changed c
    ON CONFLICT (file_id) DO UPDATE SET
        original_filename = EXCLUDED.original_filename,
        storage_filename = EXCLUDED.storage_filename,
        file_size = EXCLUDED.file_size,
        content_type = EXCLUDED.content_type,
        created_at = EXCLUDED.created_at,
        updated_at = EXCLUDED.updated_at,
        created_by_id = EXCLUDED.created_by_id,
        created_by_username = EXCLUDED.created_by_username,
        created_by_fullname = EXCLUDED.created_by_fullname,
        description = EXCLUDED.description,
        version = EXCLUDED.version,
        storage_path = EXCLUDED.storage_path,
        checksum = EXCLUDED.checksum,
        metadata_json = EXCLUDED.metadata_json,
        cache_updated_at = now(),
        cache_ttl_hours = EXCLUDED.cache_ttl_hours
    WHERE <prefix>_files.cache_updated_at < $1
    RETURNING (xmax = 0) AS inserted
)
SELECT (SELECT count(*) FROM verified) AS verified,
       (SELECT count(*) FROM written WHERE inserted) AS created,
       (SELECT count(*) FROM written WHERE NOT inserted) AS updated;

-- name: rebuild_insert_missing
-- $1 WAL horizon, $2 cache_ttl_hours, $3..$17 the same arrays as rebuild_upsert.
-- Incremental rebuild: insert documents that have no row; never touches existing rows.
INSERT INTO <prefix>_files (
    file_id, original_filename, storage_filename, file_size, content_type,
    created_at, updated_at, created_by_id, created_by_username, created_by_fullname,
    description, version, storage_path, checksum, metadata_json,
    cache_updated_at, cache_ttl_hours)
SELECT u.*, now(), $2
FROM unnest($3::uuid[], $4::text[], $5::text[], $6::bigint[], $7::text[],
            $8::timestamptz[], $9::timestamptz[], $10::text[], $11::text[], $12::text[],
            $13::text[], $14::text[], $15::text[], $16::text[], $17::jsonb[])
     AS u(file_id, original_filename, storage_filename, file_size, content_type,
          created_at, updated_at, created_by_id, created_by_username, created_by_fullname,
          description, version, storage_path, checksum, metadata_json)
WHERE NOT EXISTS (SELECT 1 FROM <prefix>_wal w
                  WHERE w.file_id = u.file_id
                    AND (w.status = 'pending'
                         OR (w.completed_at >= $1
                             AND (w.operation_type IN ('file_delete', 'file_quarantine')
                                  OR w.status = 'rolled_back'))))
ON CONFLICT DO NOTHING
RETURNING file_id;

-- name: rebuild_name_conflicts
-- $1 file ids, $2 storage filenames (parallel arrays): the pairs whose name is taken by
-- another file id's row, with that id
SELECT u.file_id, o.file_id AS other
FROM unnest($1::uuid[], $2::text[]) AS u(file_id, storage_filename)
JOIN <prefix>_files o ON o.storage_filename = u.storage_filename AND o.file_id <> u.file_id;

-- name: rebuild_unseen
-- $1 scan start (database clock), $2 WAL horizon, $3 after this file id (keyset), $4 limit:
-- rows the finished scan neither wrote nor verified and no write touched since — the
-- candidates for removal (each is re-checked against the store before it goes)
SELECT f.file_id, f.original_filename, f.storage_filename, f.file_size, f.content_type,
       f.created_at, f.updated_at, f.cache_updated_at, f.cache_ttl_hours, f.created_by_id,
       f.created_by_username, f.created_by_fullname, f.description, f.version,
       f.storage_path, f.checksum, f.metadata_json
FROM <prefix>_files f
WHERE f.cache_updated_at < $1 AND f.file_id > $3
  AND NOT EXISTS (SELECT 1 FROM <prefix>_wal w
                  WHERE w.file_id = f.file_id
                    AND (w.status = 'pending' OR w.completed_at >= $2))
ORDER BY f.file_id
LIMIT $4;

-- name: rebuild_delete_unseen
-- $1 file ids confirmed to have no attr file, $2 scan start, $3 WAL horizon (same guards
-- as rebuild_unseen, re-evaluated at delete time)
DELETE FROM <prefix>_files f
WHERE f.file_id = ANY($1::uuid[]) AND f.cache_updated_at < $2
  AND NOT EXISTS (SELECT 1 FROM <prefix>_wal w
                  WHERE w.file_id = f.file_id
                    AND (w.status = 'pending' OR w.completed_at >= $3))
RETURNING f.file_id;

-- name: rebuild_delete_without_data
-- $1 file id, $2 storage path, $3 storage filename, $4 checksum: the row of an attr
-- document whose data object is gone (checked just before), unless a write is in flight
-- on the file or the row now describes other bytes
DELETE FROM <prefix>_files f
WHERE f.file_id = $1 AND f.storage_path = $2 AND f.storage_filename = $3 AND f.checksum = $4
  AND NOT EXISTS (SELECT 1 FROM <prefix>_wal w
                  WHERE w.file_id = f.file_id AND w.status = 'pending')
RETURNING f.file_id;

-- name: totals_lock
-- no parameters: the config row, locked so totals_recompute sees every committed file
SELECT id FROM <prefix>_config WHERE id = 1 FOR UPDATE;

-- name: totals_recompute
-- no parameters: reset the trigger-maintained totals from the table (run after totals_lock,
-- in the same transaction) and stamp the rebuild time
UPDATE <prefix>_config SET
    total_files = t.n, total_size_bytes = t.bytes,
    last_cache_rebuild = now(), updated_at = now()
FROM (SELECT count(*) AS n, COALESCE(sum(file_size), 0)::bigint AS bytes
        FROM <prefix>_files) t
WHERE id = 1
RETURNING total_files, total_size_bytes;

-- name: scan_clear
-- no parameters: forget every consistency scan (run under the maintenance lock)
DELETE FROM <prefix>_cache_scan;

-- name: scan_add
-- $1 scan id, $2 file ids (NULL when the name has none), $3 relative paths
INSERT INTO <prefix>_cache_scan (scan_id, file_id, relpath)
SELECT $1, u.file_id, u.relpath FROM unnest($2::uuid[], $3::text[]) AS u(file_id, relpath);

-- name: scan_analyze
ANALYZE <prefix>_cache_scan;

-- name: scan_orphan_attr
-- $1 scan id, $2 WAL horizon: attr files without a cache row (count and ten examples)
SELECT count(*) AS n,
       (array_agg(COALESCE(s.file_id::text, s.relpath) ORDER BY s.relpath))[1:10] AS sample
FROM <prefix>_cache_scan s
WHERE s.scan_id = $1
  AND (s.file_id IS NULL
       OR (NOT EXISTS (SELECT 1 FROM <prefix>_files f WHERE f.file_id = s.file_id)
           AND NOT EXISTS (SELECT 1 FROM <prefix>_wal w
                           WHERE w.file_id = s.file_id
                             AND (w.status = 'pending'
                                  OR (w.completed_at >= $2
                                      AND (w.operation_type IN ('file_delete',
                                                                'file_quarantine')
                                           OR w.status = 'rolled_back'))))));

-- name: scan_orphan_cache
-- $1 scan id, $2 WAL horizon: cache rows without an attr file (count and ten examples)
SELECT count(*) AS n, (array_agg(f.file_id::text ORDER BY f.file_id))[1:10] AS sample
FROM <prefix>_files f
WHERE NOT EXISTS (SELECT 1 FROM <prefix>_cache_scan s
                  WHERE s.scan_id = $1 AND s.file_id = f.file_id)
  AND NOT EXISTS (SELECT 1 FROM <prefix>_wal w
                  WHERE w.file_id = f.file_id
                    AND (w.status = 'pending' OR w.completed_at >= $2));

-- name: scan_expired
-- no parameters: expired cache rows (count and ten examples)
SELECT count(*) AS n, (array_agg(file_id::text ORDER BY file_id))[1:10] AS sample
FROM <prefix>_files
WHERE cache_updated_at + make_interval(hours => cache_ttl_hours) < now();

-- name: scan_drop
-- $1 scan id
DELETE FROM <prefix>_cache_scan WHERE scan_id = $1;

-- name: expired_rows_after
-- $1 after this file id (keyset), $2 limit: expired cache rows in id order
SELECT file_id, original_filename, storage_filename, file_size, content_type, created_at,
       updated_at, cache_updated_at, cache_ttl_hours, created_by_id, created_by_username,
       created_by_fullname, description, version, storage_path, checksum, metadata_json
FROM <prefix>_files
WHERE cache_updated_at + make_interval(hours => cache_ttl_hours) < now() AND file_id > $1
ORDER BY file_id
LIMIT $2;

-- name: refresh_if_unchanged
-- $1 file_id, $2 original_filename, $3 file_size, $4 content_type, $5 description,
-- $6 version, $7 created_at, $8 updated_at, $9 checksum, $10 metadata_json,
-- $11 cache_ttl_hours, $12 the cache_updated_at read before the attr file: a row written
-- meanwhile (PATCH) is newer than the document and is left alone
UPDATE <prefix>_files SET
    original_filename = $2, file_size = $3, content_type = $4, description = $5,
    version = $6, created_at = $7, updated_at = $8, checksum = $9, metadata_json = $10,
    cache_updated_at = now(), cache_ttl_hours = $11
WHERE file_id = $1 AND cache_updated_at = $12
RETURNING file_id;

-- name: delete_if_expired
-- $1 file_id: drop one cache row if it is (still) expired
DELETE FROM <prefix>_files
WHERE file_id = $1 AND cache_updated_at + make_interval(hours => cache_ttl_hours) < now()
RETURNING file_id;

-- Advisory locks (one 64-bit key per prefix and purpose, see storage/db/locks.py).

-- name: lock_try
-- $1 key
SELECT pg_try_advisory_lock($1);

-- name: lock_try_shared
-- $1 key
SELECT pg_try_advisory_lock_shared($1);

-- name: lock_release
-- $1 key
SELECT pg_advisory_unlock($1);

-- name: lock_release_shared
-- $1 key
SELECT pg_advisory_unlock_shared($1);

-- name: lock_label
-- $1 label: what another process sees when it finds the lock taken
SELECT set_config('application_name', $1, false);

-- name: lock_holders
-- $1 key: the other sessions holding it, with their labels
SELECT a.pid, a.application_name AS label, a.client_addr::text AS client_addr,
       a.backend_start, l.mode
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((l.classid::bigint << 32) | l.objid::bigint) = $1
  AND a.pid <> pg_backend_pid()
ORDER BY a.backend_start;
