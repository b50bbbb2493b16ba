-- Resumable (tus) uploads: storage/db/repo_uploads.py, storage/domain/resumable.py.
-- Every read returns the row plus its WAL row's status and reservation.

-- name: upload_insert
-- $1 file_id, $2 transaction_id, $3 upload_length (NULL: deferred), $4 metadata_header,
-- $5 original_filename, $6 content_type, $7 description, $8 version, $9 metadata_json,
-- $10 created_by_id, $11 created_by_username, $12 storage_path, $13 storage_filename,
-- $14 created_at (= updated_at), $15 expires_at, $16 lease_owner, $17 lease_until:
-- the new upload, leased to its creating request
WITH u AS (
    INSERT INTO <prefix>_uploads (
        file_id, transaction_id, upload_length, metadata_header, original_filename,
        content_type, description, version, metadata_json, created_by_id,
        created_by_username, storage_path, storage_filename, created_at, updated_at,
        expires_at, lease_owner, lease_until)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14, $15, $16, $17)
    RETURNING *
)
SELECT u.*, w.status AS wal_status, COALESCE(w.reserved_bytes, 0) AS reserved_bytes
FROM u LEFT JOIN <prefix>_wal w ON w.transaction_id = u.transaction_id;

-- name: upload_get
-- $1 file_id
SELECT u.*, w.status AS wal_status, COALESCE(w.reserved_bytes, 0) AS reserved_bytes
FROM <prefix>_uploads u LEFT JOIN <prefix>_wal w ON w.transaction_id = u.transaction_id
WHERE u.file_id = $1;

-- name: upload_lease_take
-- $1 file_id, $2 new lease_owner, $3 lease_until, $4 now, $5 a dead owner to take over
-- (NULL: none): the row when the lease was free, expired or $5's; no row when busy
WITH u AS (
    UPDATE <prefix>_uploads SET lease_owner = $2, lease_until = $3
    WHERE file_id = $1
      AND (lease_owner IS NULL OR lease_until < $4 OR lease_owner = $5)
    RETURNING *
)
SELECT u.*, w.status AS wal_status, COALESCE(w.reserved_bytes, 0) AS reserved_bytes
FROM u LEFT JOIN <prefix>_wal w ON w.transaction_id = u.transaction_id;

-- name: upload_lease_renew
-- $1 file_id, $2 lease_owner, $3 lease_until, $4 expires_at: NULL when the lease is lost
UPDATE <prefix>_uploads SET lease_until = $3, expires_at = GREATEST(expires_at, $4)
WHERE file_id = $1 AND lease_owner = $2
RETURNING file_id;

-- name: upload_lease_release
-- $1 file_id, $2 lease_owner
UPDATE <prefix>_uploads SET lease_owner = NULL, lease_until = NULL
WHERE file_id = $1 AND lease_owner = $2;

-- name: upload_advance
-- $1 file_id, $2 lease_owner, $3 expected upload_offset, $4 new upload_offset,
-- $5 staging, $6 updated_at, $7 expires_at, $8 keep the lease?: the new offset, or NULL
-- when the lease was lost or the offset moved (nothing is changed then)
UPDATE <prefix>_uploads SET
    upload_offset = $4, staging = $5, updated_at = $6, expires_at = $7,
    lease_owner = CASE WHEN $8 THEN lease_owner END,
    lease_until = CASE WHEN $8 THEN lease_until END
WHERE file_id = $1 AND lease_owner = $2 AND upload_offset = $3
RETURNING upload_offset;

-- name: upload_declare_length
-- $1 file_id, $2 lease_owner, $3 upload_length: the length of a deferred upload, once
UPDATE <prefix>_uploads SET upload_length = $3
WHERE file_id = $1 AND lease_owner = $2 AND upload_length IS NULL AND upload_offset <= $3
RETURNING upload_length;

-- name: upload_mark_completed
-- $1 file_id, $2 completed_at, $3 expires_at (the record is kept until then):
-- the upload is a file now; its lease and staging bookkeeping are dropped
UPDATE <prefix>_uploads SET
    completed_at = $2, updated_at = $2, expires_at = $3, upload_offset = upload_length,
    staging = '{}'::jsonb, lease_owner = NULL, lease_until = NULL
WHERE file_id = $1
RETURNING file_id;

-- name: upload_mark_finished
-- $1 completed_at, $2 expires_at: the records of uploads whose WAL row committed (the
-- file is made) but that were never marked complete (the database went away between the
-- finish and upload_mark_completed; recovery visits only pending intents), marked as the
-- completion would have; a request finishing it meanwhile writes the same; how many
UPDATE <prefix>_uploads u SET
    completed_at = $1, updated_at = $1, expires_at = $2, upload_offset = upload_length,
    staging = '{}'::jsonb, lease_owner = NULL, lease_until = NULL
FROM <prefix>_wal w
WHERE w.transaction_id = u.transaction_id AND w.status = 'committed'
  AND u.completed_at IS NULL;

-- name: upload_remove
-- $1 file_id, $2 lease_owner (NULL: whoever holds it), $3 reason, $4 completed_at:
-- delete the row and roll back its pending WAL row (the reservation goes with it) in
-- one statement; how many of each were changed
WITH u AS (
    DELETE FROM <prefix>_uploads
    WHERE file_id = $1 AND ($2::text IS NULL OR lease_owner = $2)
    RETURNING transaction_id
), w AS (
    UPDATE <prefix>_wal SET
        status = 'rolled_back',
        error_message = $3,
        completed_at = $4,
        duration_ms = (extract(epoch FROM ($4 - started_at)) * 1000)::integer,
        reserved_bytes = 0
    WHERE transaction_id = (SELECT transaction_id FROM u) AND status = 'pending'
    RETURNING transaction_id
)
SELECT (SELECT count(*) FROM u) AS removed, (SELECT count(*) FROM w) AS released;

-- name: upload_purge_finished
-- $1 now: records whose time is up and whose upload holds no reservation any more
-- (finished: their files stay); unfinished ones are removed by their WAL resolver
DELETE FROM <prefix>_uploads u
WHERE u.expires_at < $1
  AND NOT EXISTS (SELECT 1 FROM <prefix>_wal w
                  WHERE w.transaction_id = u.transaction_id AND w.status = 'pending');

-- name: upload_live_ids
-- $1 file_ids: those of them with an unfinished upload (its staged bytes are needed)
SELECT u.file_id FROM <prefix>_uploads u
JOIN <prefix>_wal w ON w.transaction_id = u.transaction_id AND w.status = 'pending'
WHERE u.file_id = ANY($1::uuid[]);

-- name: upload_reap_expired
-- $1 file_id, $2 now, $3 reason: an unfinished upload whose time is up and that no
-- request holds is removed (row deleted, WAL row rolled back, as upload_remove) so a new
-- creation may take its id; how many were removed
WITH u AS (
    DELETE FROM <prefix>_uploads u
    WHERE u.file_id = $1 AND u.expires_at <= $2 AND u.completed_at IS NULL
      AND (u.lease_owner IS NULL OR u.lease_until < $2)
      AND EXISTS (SELECT 1 FROM <prefix>_wal w
                  WHERE w.transaction_id = u.transaction_id AND w.status = 'pending')
    RETURNING transaction_id
), w AS (
    UPDATE <prefix>_wal SET
        status = 'rolled_back',
        error_message = $3,
        completed_at = $2,
        duration_ms = (extract(epoch FROM ($2 - started_at)) * 1000)::integer,
        reserved_bytes = 0
    WHERE transaction_id = (SELECT transaction_id FROM u) AND status = 'pending'
    RETURNING transaction_id
)
SELECT (SELECT count(*) FROM u) AS removed, (SELECT count(*) FROM w) AS released;

-- name: upload_pending_bytes
-- $1 user_id: the bytes reserved by the caller's unfinished resumable uploads
SELECT COALESCE(sum(w.reserved_bytes), 0)::bigint FROM <prefix>_wal w
WHERE w.status = 'pending' AND w.operation_type = 'file_upload_resumable'
  AND w.user_id = $1;

-- name: upload_shrink_reservation
-- $1 transaction_id, $2 reserved_bytes: give back what a refused growth took
UPDATE <prefix>_wal SET reserved_bytes = $2
WHERE transaction_id = $1 AND status = 'pending' AND reserved_bytes > $2;
