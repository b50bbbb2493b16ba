-- name: element_usage
-- no parameters: committed bytes and files (trigger-maintained, O(1)), plus the bytes
-- reserved by uploads in flight and the number of WAL operations still pending
SELECT c.total_size_bytes AS stored,
       c.total_files AS files,
       w.reserved,
       w.pending
FROM <prefix>_config c,
     (SELECT COALESCE(sum(reserved_bytes), 0)::bigint AS reserved, count(*) AS pending
        FROM <prefix>_wal WHERE status = 'pending') w
WHERE c.id = 1;

-- name: applied_migrations
-- no parameters: the yoyo migration ids applied for this prefix (readiness check)
SELECT migration_id FROM <prefix>_yoyo_migration;
