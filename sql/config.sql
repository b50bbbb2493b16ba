-- name: capacity_usage
-- no parameters: committed bytes and bytes reserved by uploads in flight
SELECT c.total_size_bytes AS used,
       c.total_files AS files,
       (SELECT COALESCE(sum(reserved_bytes), 0)::bigint
          FROM <prefix>_wal WHERE status = 'pending') AS reserved
FROM <prefix>_config c WHERE c.id = 1;

-- name: get_state
SELECT * FROM <prefix>_config WHERE id = 1;

-- name: ping
SELECT 1;
