-- name: get_mode
-- no parameters: the persisted mode (NULL means "use APP_MODE") and who set it last
SELECT current_mode, mode_changed_at, mode_changed_by FROM <prefix>_config WHERE id = 1;

-- name: lock_mode
-- no parameters: the same row, locked until the mode change commits
SELECT current_mode, mode_changed_at, mode_changed_by FROM <prefix>_config WHERE id = 1
FOR UPDATE;

-- name: set_mode
-- $1 current_mode, $2 mode_changed_at, $3 mode_changed_by
UPDATE <prefix>_config
   SET current_mode = $1, mode_changed_at = $2, mode_changed_by = $3, updated_at = $2
 WHERE id = 1;

-- name: insert_mode_history
-- $1 from_mode, $2 to_mode, $3 changed_by (JWT sub), $4 changed_by_name, $5 changed_at
INSERT INTO <prefix>_mode_history (from_mode, to_mode, changed_by, changed_by_name, changed_at)
VALUES ($1, $2, $3, $4, $5)
RETURNING from_mode, to_mode, changed_by, changed_at;

-- name: list_mode_history
-- $1 limit: newest first
SELECT from_mode, to_mode, changed_by, changed_at FROM <prefix>_mode_history
ORDER BY changed_at DESC, id DESC
LIMIT $1;

-- name: lock_writes
-- no parameters: waits until every PATCH/DELETE in flight has finished (each holds this
-- lock shared, see begin_change) and keeps new ones out until the transaction ends
SELECT pg_advisory_xact_lock(hashtext('<prefix>_writes'));

-- name: mode_for_commit
-- $1 APP_MODE: the effective mode, under the row lock a mode change takes (as in
-- commit_batch): a change committed before is seen, a later one waits for the commit
SELECT COALESCE(current_mode, $1) FROM <prefix>_config WHERE id = 1 FOR NO KEY UPDATE;
