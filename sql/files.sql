-- name: insert_file
-- $1 file_id, $2 original_filename, $3 storage_filename, $4 file_size, $5 content_type,
-- $6 created_at, $7 updated_at, $8 created_by_id, $9 created_by_username,
-- $10 created_by_fullname, $11 description, $12 version, $13 storage_path, $14 checksum,
-- $15 metadata_json, $16 cache_ttl_hours
INSERT INTO <prefix>_files (
    file_id, original_filename, storage_filename, file_size, content_type,
    created_at, updated_at, created_by_id, created_by_username, created_by_fullname,
    description, version, storage_path, checksum, metadata_json,
    cache_updated_at, cache_ttl_hours)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, now(), $16)
RETURNING file_id, original_filename, storage_filename, file_size, content_type, created_at,
       updated_at, cache_updated_at, cache_ttl_hours, created_by_id, created_by_username,
       created_by_fullname, description, version, storage_path, checksum, metadata_json;

-- name: get_file
-- $1 file_id
SELECT file_id, original_filename, storage_filename, file_size, content_type, created_at,
       updated_at, cache_updated_at, cache_ttl_hours, created_by_id, created_by_username,
       created_by_fullname, description, version, storage_path, checksum, metadata_json
FROM <prefix>_files WHERE file_id = $1;

-- name: get_served
-- $1 file_id: what a download needs (the columns that never change after the upload, and
-- when the row's cache time runs out)
SELECT storage_path || storage_filename AS relative_path, file_size, checksum, created_at,
       original_filename, content_type,
       cache_updated_at + make_interval(hours => cache_ttl_hours) AS cache_expires_at
FROM <prefix>_files WHERE file_id = $1;

-- name: get_file_for_update
-- $1 file_id: the file's lock (the one PATCH and DELETE hold) and its row lock, both
-- held until the transaction ends (maintenance)
SELECT file_id, original_filename, storage_filename, file_size, content_type, created_at,
       updated_at, cache_updated_at, cache_ttl_hours, created_by_id, created_by_username,
       created_by_fullname, description, version, storage_path, checksum, metadata_json
FROM <prefix>_lock_file($1, true);

-- name: refresh_file
-- $1 file_id, $2 original_filename, $3 file_size, $4 content_type, $5 description,
-- $6 version, $7 created_at, $8 updated_at, $9 checksum, $10 metadata_json, $11 cache_ttl_hours
UPDATE <prefix>_files SET
    original_filename = $2, file_size = $3, content_type = $4, description = $5,
    version = $6, created_at = $7, updated_at = $8, checksum = $9, metadata_json = $10,
    cache_updated_at = now(), cache_ttl_hours = $11
WHERE file_id = $1
RETURNING file_id, original_filename, storage_filename, file_size, content_type, created_at,
       updated_at, cache_updated_at, cache_ttl_hours, created_by_id, created_by_username,
       created_by_fullname, description, version, storage_path, checksum, metadata_json;

-- name: delete_file
-- $1 file_id
DELETE FROM <prefix>_files WHERE file_id = $1
RETURNING file_id, original_filename, storage_filename, file_size, content_type, created_at,
       updated_at, cache_updated_at, cache_ttl_hours, created_by_id, created_by_username,
       created_by_fullname, description, version, storage_path, checksum, metadata_json;

-- name: begin_change
-- $1 transaction_id, $2 operation_type, $3 file_id, $4 operation_data, $5 user_id,
-- $6 started_at, $7 modes that allow the change (NULL: any), $8 APP_MODE.  PATCH and
-- DELETE, first round trip: the file's lock (kept by the session when status is 'ok'),
-- the mode, the row and the committed WAL intent.  status: ok | missing | mode.
SELECT b.status, b.mode, (b.f).file_id, (b.f).original_filename, (b.f).storage_filename,
       (b.f).file_size, (b.f).content_type, (b.f).created_at, (b.f).updated_at,
       (b.f).cache_updated_at, (b.f).cache_ttl_hours, (b.f).created_by_id,
       (b.f).created_by_username, (b.f).created_by_fullname, (b.f).description,
       (b.f).version, (b.f).storage_path, (b.f).checksum, (b.f).metadata_json
FROM <prefix>_begin_change($1, $2, $3, $4, $5, $6, $7, $8) b;

-- name: end_update
-- $1 transaction_id, $2 file_id, $3 description (NULL keeps), $4 version (NULL keeps),
-- $5 metadata_json, $6 replace metadata?, $7 updated_at, $8 cache_ttl_hours, $9 WAL
-- result, $10 completed_at.  PATCH, second round trip: row, WAL commit, lock released.
SELECT file_id, original_filename, storage_filename, file_size, content_type, created_at,
       updated_at, cache_updated_at, cache_ttl_hours, created_by_id, created_by_username,
       created_by_fullname, description, version, storage_path, checksum, metadata_json
FROM <prefix>_end_update($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);

-- name: end_delete
-- $1 transaction_id, $2 file_id, $3 WAL result, $4 completed_at.  DELETE, second round
-- trip: row gone, WAL commit, lock released.  True if the row was there.
SELECT <prefix>_end_delete($1, $2, $3, $4);

-- name: abort_change
-- $1 transaction_id, $2 file_id, $3 error (NULL: storage changed, the intent stays
-- pending for recovery), $4 completed_at.  Releases the lock of begin_change.
SELECT <prefix>_abort_change($1, $2, $3, $4);
