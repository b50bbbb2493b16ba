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

-- name: get_file_for_update
-- $1 file_id: row-locks the file for a PATCH or DELETE (held until the transaction ends)
SELECT file_id, original_filename, storage_filename, file_size, content_type, created_at,
       updated_at, cache_updated_at, cache_ttl_hours, created_by_id, created_by_username,
       created_by_fullname, description, version, storage_path, checksum, metadata_json
FROM <prefix>_files WHERE file_id = $1 FOR UPDATE;

-- name: update_file
-- $1 file_id, $2 description (NULL keeps), $3 version (NULL keeps),
-- $4 metadata_json, $5 replace metadata?, $6 updated_at, $7 cache_ttl_hours
UPDATE <prefix>_files SET
    description = COALESCE($2, description),
    version = COALESCE($3, version),
    metadata_json = CASE WHEN $5 THEN $4::jsonb ELSE metadata_json END,
    updated_at = $6,
    cache_updated_at = now(),
    cache_ttl_hours = $7
WHERE file_id = $1
RETURNING file_id, original_filename, storage_filename, file_size, content_type, created_at,
       updated_at, cache_updated_at, cache_ttl_hours, created_by_id, created_by_username,
       created_by_fullname, description, version, storage_path, checksum, metadata_json;

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

-- name: finish_create
-- $1..$16 as insert_file, $17 transaction_id, $18 WAL result, $19 completed_at:
-- the metadata row and the WAL commit in one statement (one round trip, atomic)
WITH f AS (
    INSERT INTO <prefix>_files (
        file_id, original_filename, storage_filename, file_size, content_type,
        created_at, updated_at, created_by_id, created_by_username, created_by_fullname,
        description, version, storage_path, checksum, metadata_json,
        cache_updated_at, cache_ttl_hours)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, now(), $16)
    RETURNING file_id, original_filename, storage_filename, file_size, content_type, created_at,
              updated_at, cache_updated_at, cache_ttl_hours, created_by_id, created_by_username,
              created_by_fullname, description, version, storage_path, checksum, metadata_json
), w AS (
    UPDATE <prefix>_wal SET
        status = 'committed',
        operation_data = operation_data || jsonb_build_object('result', $18::jsonb),
        completed_at = $19,
        duration_ms = (extract(epoch FROM ($19 - started_at)) * 1000)::integer,
        reserved_bytes = 0
    WHERE transaction_id = $17 AND status = 'pending'
    RETURNING transaction_id
)
SELECT f.*, (SELECT count(*) FROM w) AS wal_committed FROM f;  -- f has the columns above
