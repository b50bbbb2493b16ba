"""Capacity reservation in one round trip (``<prefix>_reserve``).

Uploads reserve their bytes on their WAL intent row.  The check and the insert
must be serialised per element, and in READ COMMITTED a single SQL statement
reads with a snapshot taken *before* it could acquire a lock, so the logic lives
in a VOLATILE PL/pgSQL function: each statement in it sees what committed before
the advisory lock was granted.  The usage is read in ONE statement, since uploads
finish (row in, reservation out) without taking the lock.  Returns the usage it
saw so a refusal can say why.
"""

from yoyo import step  # noqa: F401  (yoyo inspects the module namespace)

from storage.db.migrate import ddl

__depends__ = {"0001.initial"}

steps = [
    ddl(
        """
        CREATE FUNCTION <prefix>_reserve(
            p_txid uuid, p_need bigint, p_limit bigint, p_free bigint,
            p_op text, p_file_id uuid, p_data jsonb, p_user text, p_started timestamptz,
            p_check_id boolean,
            OUT status text, OUT used bigint, OUT reserved bigint)
        LANGUAGE plpgsql VOLATILE AS $$
        #variable_conflict use_column
        DECLARE
            current bigint;
        BEGIN
            PERFORM pg_advisory_xact_lock(hashtext('<prefix>_capacity'));
            IF p_check_id AND EXISTS (SELECT 1 FROM <prefix>_files WHERE file_id = p_file_id) THEN
                status := 'exists';
                RETURN;
            END IF;
            -- One statement, one snapshot: an upload that commits (its row counted in
            -- the totals, its reservation released) is seen entirely or not at all.
            -- Separate SELECTs could straddle that commit and count it in neither.
            SELECT c.total_size_bytes,
                   (SELECT COALESCE(sum(w.reserved_bytes), 0)::bigint
                      FROM <prefix>_wal w WHERE w.status = 'pending'),
                   COALESCE((SELECT w.reserved_bytes FROM <prefix>_wal w
                              WHERE w.transaction_id = p_txid AND w.status = 'pending'), 0)
              INTO used, reserved, current
              FROM <prefix>_config c WHERE c.id = 1;
            IF used + reserved - current + p_need > p_limit THEN
                status := 'capacity';
            ELSIF p_free IS NOT NULL AND p_free - (reserved - current) < p_need - current THEN
                status := 'disk';
            ELSIF p_op IS NULL THEN
                UPDATE <prefix>_wal SET reserved_bytes = p_need
                 WHERE transaction_id = p_txid AND status = 'pending';
                status := CASE WHEN FOUND THEN 'ok' ELSE 'gone' END;
            ELSE
                INSERT INTO <prefix>_wal (transaction_id, operation_type, status, file_id,
                                          operation_data, user_id, started_at, reserved_bytes)
                VALUES (p_txid, p_op, 'pending', p_file_id, p_data, p_user, p_started, p_need);
                status := 'ok';
            END IF;
        END $$;
        """,
        """
        DROP FUNCTION <prefix>_reserve(uuid, bigint, bigint, bigint, text, uuid, jsonb, text,
                                       timestamptz, boolean);
        """,
    ),
]
