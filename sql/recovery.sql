-- WAL crash recovery (storage/domain/recovery.py) and maintenance that needs a row lock.

-- name: lock_file_nowait
-- $1 file_id: the file's lock and the row, locked for the transaction; fails at once
-- (55P03) when a live operation holds either, so recovery skips that row instead of waiting
SELECT file_id, original_filename, storage_filename, file_size, content_type, created_at,
       updated_at, cache_updated_at, cache_ttl_hours, created_by_id, created_by_username,
       created_by_fullname, description, version, storage_path, checksum, metadata_json
FROM <prefix>_lock_file($1, false);

-- name: pending_wal_page
-- $1 started before, $2/$3 after this (started_at, transaction_id) (keyset), $4 limit:
-- pending rows in start order (recovery works in pages and skips rows it cannot resolve)
SELECT * FROM <prefix>_wal
WHERE status = 'pending' AND started_at < $1 AND (started_at, transaction_id) > ($2, $3)
ORDER BY started_at, transaction_id
LIMIT $4;
