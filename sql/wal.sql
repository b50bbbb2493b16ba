-- name: insert_wal
-- $1 transaction_id, $2 operation_type, $3 file_id, $4 operation_data, $5 user_id,
-- $6 started_at, $7 reserved_bytes
INSERT INTO <prefix>_wal (transaction_id, operation_type, status, file_id, operation_data,
                          user_id, started_at, reserved_bytes)
VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7)
RETURNING *;

-- name: commit_wal
-- $1 transaction_id, $2 result (merged into operation_data under "result"), $3 completed_at,
-- $4 the claimer's lease (NULL: only an unclaimed intent; see claim_wal)
UPDATE <prefix>_wal SET
    status = 'committed',
    operation_data = operation_data || jsonb_build_object('result', $2::jsonb),
    completed_at = $3,
    duration_ms = (extract(epoch FROM ($3 - started_at)) * 1000)::integer,
    reserved_bytes = 0
WHERE transaction_id = $1 AND status = 'pending' AND claimed_by IS NOT DISTINCT FROM $4::uuid
RETURNING transaction_id;

-- name: rollback_wal
-- $1 transaction_id, $2 error_message, $3 completed_at, $4 the claimer's lease (NULL: only
-- an unclaimed intent)
UPDATE <prefix>_wal SET
    status = 'rolled_back',
    error_message = $2,
    completed_at = $3,
    duration_ms = (extract(epoch FROM ($3 - started_at)) * 1000)::integer,
    reserved_bytes = 0
WHERE transaction_id = $1 AND status = 'pending' AND claimed_by IS NOT DISTINCT FROM $4::uuid
RETURNING transaction_id;

-- name: set_wal_temp
-- $1 transaction_id, $2 temp_path: where the pending intent's partial data lives, once
-- the writer knows (an S3 multipart upload id exists only after its creation)
UPDATE <prefix>_wal
   SET operation_data = jsonb_set(operation_data, '{temp_path}', to_jsonb($2::text))
WHERE transaction_id = $1 AND status = 'pending'
RETURNING transaction_id;

-- name: pending_temps
-- The temp names (temp files, S3 multipart upload ids) pending intents name: live
-- uploads, or partial data recovery will discard; a stray-temp sweep leaves them alone
SELECT DISTINCT operation_data->>'temp_path' AS temp_path FROM <prefix>_wal
WHERE status = 'pending' AND coalesce(operation_data->>'temp_path', '') <> '';

-- name: pending_paths
-- The storage paths pending intents (uploads, changes, removals) name
SELECT DISTINCT operation_data->>'relative_path' AS relative_path FROM <prefix>_wal
WHERE status = 'pending' AND operation_data ? 'relative_path';

-- name: abandon_wal
-- $1 transaction_id, $2 reason, $3 the owner's claim (NULL: unclaimed): its owner gave up
-- on a pending upload but could not remove what it wrote (the store was down); the intent
-- stays pending, naming it, unclaimed and disowned, for the next recovery pass (which
-- resolves abandoned intents at any age), and its reservation is released
UPDATE <prefix>_wal SET
    operation_data = operation_data
        || jsonb_build_object('abandoned', $2::text, 'lease', 'disowned'),
    reserved_bytes = 0, claimed_by = NULL, claimed_at = NULL
WHERE transaction_id = $1 AND status = 'pending' AND claimed_by IS NOT DISTINCT FROM $3::uuid
RETURNING transaction_id;

-- name: purge_wal
-- $1 cutoff: finished rows completed before it are deleted
DELETE FROM <prefix>_wal WHERE status <> 'pending' AND completed_at < $1;

-- name: commit_batch
-- One group commit (migrations/0007.group_commit.py): $1 capacity limit, $2 free disk
-- bytes (NULL: no disk limit), $3 APP_MODE (applies while no mode is persisted);
-- reservations $4..$11 (transaction_id, bytes needed in total, operation_type or NULL to
-- grow, file_id, operation_data, user_id, started_at, refuse an existing file_id?);
-- finishes $12..$30 (transaction_id, WAL result, completed_at, then the insert_file
-- columns).  One row per member: kind ('reserve'/'finish'), 1-based index, status, the
-- mode seen (finishes) or the usage seen (reservations).
SELECT kind, idx, status, mode, used, reserved
FROM <prefix>_commit_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
                           $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27,
                           $28, $29, $30);

-- name: claim_wal
-- $1 transaction_id, $2 the claimer's lease, $3 lease TTL seconds, $4 force: the pending
-- intent claimed for settling outside the group commit (recovery, or an upload undoing
-- itself).  Refused (no row) when it is settled, claimed by another live lease, or (unless
-- $4) owned by a live lease (operation_data.lease), the claimer's own included: a
-- process's periodic pass never touches its own uploads in flight.  One committed statement: the
-- claim survives a lost session, and a finish of a claimed intent answers "gone".
UPDATE <prefix>_wal w SET claimed_by = $2, claimed_at = now()
WHERE w.transaction_id = $1 AND w.status = 'pending'
  AND (w.claimed_by IS NULL OR w.claimed_by = $2 OR NOT EXISTS (
        SELECT 1 FROM <prefix>_leases l
         WHERE l.lease_id = w.claimed_by
           AND greatest(l.heartbeat_at, pg_postmaster_start_time())
               > now() - make_interval(secs => $3)))
  AND ($4 OR NOT EXISTS (
        SELECT 1 FROM <prefix>_leases l
         WHERE l.lease_id::text = w.operation_data ->> 'lease'
           AND greatest(l.heartbeat_at, pg_postmaster_start_time())
               > now() - make_interval(secs => $3)))
RETURNING *;

-- name: release_wal_claim
-- $1 transaction_id, $2 the claimer's lease: the claim given up (the intent left pending)
UPDATE <prefix>_wal SET claimed_by = NULL, claimed_at = NULL
WHERE transaction_id = $1 AND claimed_by = $2
RETURNING transaction_id;

-- name: disown_wal
-- $1 transaction_id: a live process gives up a pending intent it owns (its outcome is
-- unknown): recovery may resolve it at its next pass as if the owner had died
UPDATE <prefix>_wal
   SET operation_data = jsonb_set(operation_data, '{lease}', '"disowned"')
WHERE transaction_id = $1 AND status = 'pending'
RETURNING transaction_id;

-- name: wal_state
-- $1 transaction_id: status and claim of one intent
SELECT status, claimed_by FROM <prefix>_wal WHERE transaction_id = $1;
