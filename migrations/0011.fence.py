"""Fencing (issue 22): process leases, and claims on WAL intents.

- ``<prefix>_leases``: one row per live process of the element (a server, or a
  ``run.py recover``), renewed every few seconds (``heartbeat_at``, the database's
  clock).  A lease whose heartbeat is older than the TTL is expired; a process whose
  row is gone registers a new one (a new ``lease_id``: the epoch).  Unlike the
  ``serve`` advisory lock, a lease survives a restart of PostgreSQL, a terminated
  session or a proxy cutting idle connections, so "no session holds the lock" is
  never again taken for "no process is alive".
- ``<prefix>_wal.claimed_by`` / ``claimed_at``: the lease of whoever is settling a
  pending intent other than through the group commit (recovery, or the upload itself
  when it undoes a failure).  A claim is taken in one committed statement before any
  file is read or removed; only the claimer may then commit or roll the intent back,
  and a claim is taken over only once its claimer's lease expired.
- ``<prefix>_commit_batch``: unchanged but for three conditions (``AND w.claimed_by IS
  NULL``): a finish inserts its row only for an unclaimed pending intent (else
  ``gone``), and a reservation grows only an unclaimed one (else ``gone``).  So a live
  upload can never publish a row for files that recovery is removing.
- ``<prefix>_end_delete``: locks the config row before it deletes the file's row (see
  END_DELETE below), the order a batch finish takes them in.
"""

import re

from yoyo import step  # noqa: F401  (yoyo inspects the module namespace)

from storage.db.migrate import ddl

__depends__ = {"0010.resumable_uploads"}


COMMIT_BATCH = """
        CREATE OR REPLACE FUNCTION <prefix>_commit_batch(
            p_limit bigint, p_free bigint, p_app_mode text,
            r_txid uuid[], r_need bigint[], r_op text[], r_file uuid[], r_data jsonb[],
            r_user text[], r_started timestamptz[], r_check boolean[],
            f_txid uuid[], f_result jsonb[], f_at timestamptz[],
            f_file_id uuid[], f_original_filename text[], f_storage_filename text[],
            f_file_size bigint[], f_content_type text[], f_created_at timestamptz[],
            f_updated_at timestamptz[], f_created_by_id text[], f_created_by_username text[],
            f_created_by_fullname text[], f_description text[], f_version text[],
            f_storage_path text[], f_checksum text[], f_metadata jsonb[], f_ttl integer[])
        RETURNS TABLE (kind text, idx integer, status text, mode text, used bigint,
                       reserved bigint)
        LANGUAGE plpgsql VOLATILE AS $$
        #variable_conflict use_column
        DECLARE
            nf integer := coalesce(cardinality(f_txid), 0);
            nr integer := coalesce(cardinality(r_txid), 0);
            v_mode text;
            v_done uuid[] := '{}';
            v_used bigint;
            v_reserved bigint;
            v_current bigint;
            v_status text;
        BEGIN
            IF nr > 0 THEN
                -- capacity decisions are serialised per element, across processes; taken
                -- before the config row (locked by the finishes) so the order is fixed
                PERFORM pg_advisory_xact_lock(hashtext('<prefix>_capacity'));
            END IF;
            IF nf > 0 THEN
                -- the mode, under the row a mode change locks: it committed before this
                -- batch and is seen here, or it waits until the batch has committed
                SELECT COALESCE(c.current_mode, p_app_mode) INTO v_mode
                  FROM <prefix>_config c WHERE c.id = 1 FOR NO KEY UPDATE;
                -- the intents still pending, locked: recovery cannot resolve one under us
                PERFORM 1 FROM <prefix>_wal w
                  WHERE w.transaction_id = ANY (f_txid) AND w.status = 'pending'
                  ORDER BY w.transaction_id FOR UPDATE;
                IF v_mode IN ('edit', 'rw') THEN
                    WITH m AS (
                        SELECT * FROM unnest(
                            f_txid, f_result, f_at, f_file_id, f_original_filename,
                            f_storage_filename, f_file_size, f_content_type, f_created_at,
                            f_updated_at, f_created_by_id, f_created_by_username,
                            f_created_by_fullname, f_description, f_version, f_storage_path,
                            f_checksum, f_metadata, f_ttl)
                        AS u(txid, result, at, file_id, original_filename, storage_filename,
                             file_size, content_type, created_at, updated_at, created_by_id,
                             created_by_username, created_by_fullname, description, version,
                             storage_path, checksum, metadata_json, ttl)
                    ), ins AS (
                        INSERT INTO <prefix>_files (
                            file_id, original_filename, storage_filename, file_size,
                            content_type, created_at, updated_at, created_by_id,
                            created_by_username, created_by_fullname, description, version,
                            storage_path, checksum, metadata_json, cache_updated_at,
                            cache_ttl_hours)
                        SELECT m.file_id, m.original_filename, m.storage_filename, m.file_size,
                               m.content_type, m.created_at, m.updated_at, m.created_by_id,
                               m.created_by_username, m.created_by_fullname, m.description,
                               m.version, m.storage_path, m.checksum, m.metadata_json, now(),
                               m.ttl
                          FROM m
                         WHERE EXISTS (SELECT 1 FROM <prefix>_wal w
                                        WHERE w.transaction_id = m.txid
                                          AND w.status = 'pending'
                                          AND w.claimed_by IS NULL)
                        ON CONFLICT DO NOTHING
                        RETURNING file_id, storage_filename
                    ), upd AS (
                        UPDATE <prefix>_wal w SET
                            status = 'committed',
                            operation_data = w.operation_data
                                             || jsonb_build_object('result', m.result),
                            completed_at = m.at,
                            duration_ms = (extract(epoch FROM (m.at - w.started_at))
                                           * 1000)::integer,
                            reserved_bytes = 0
                          FROM m JOIN ins ON ins.file_id = m.file_id
                                         AND ins.storage_filename = m.storage_filename
                         WHERE w.transaction_id = m.txid
                        RETURNING w.transaction_id
                    )
                    SELECT coalesce(array_agg(upd.transaction_id), '{}') INTO v_done FROM upd;
                END IF;
                RETURN QUERY
                    SELECT 'finish', u.ord::integer,
                           CASE WHEN u.txid = ANY (v_done) THEN 'ok'
                                WHEN NOT EXISTS (SELECT 1 FROM <prefix>_wal w
                                                  WHERE w.transaction_id = u.txid
                                                    AND w.status = 'pending'
                                                    AND w.claimed_by IS NULL) THEN 'gone'
                                WHEN v_mode NOT IN ('edit', 'rw') THEN 'mode'
                                ELSE 'exists' END,
                           v_mode, NULL::bigint, NULL::bigint
                      FROM unnest(f_txid) WITH ORDINALITY AS u(txid, ord);
            END IF;
            IF nr > 0 THEN
                -- one snapshot for the stored total and the reservations (see 0005)
                SELECT c.total_size_bytes,
                       (SELECT COALESCE(sum(w.reserved_bytes), 0)::bigint
                          FROM <prefix>_wal w WHERE w.status = 'pending')
                  INTO v_used, v_reserved
                  FROM <prefix>_config c WHERE c.id = 1;
                FOR i IN 1 .. nr LOOP
                    v_status := 'ok';
                    v_current := 0;
                    IF r_op[i] IS NULL THEN
                        SELECT w.reserved_bytes INTO v_current FROM <prefix>_wal w
                         WHERE w.transaction_id = r_txid[i] AND w.status = 'pending'
                           AND w.claimed_by IS NULL;
                        IF NOT FOUND THEN
                            v_status := 'gone';
                            v_current := 0;
                        END IF;
                    ELSIF r_check[i] AND EXISTS (SELECT 1 FROM <prefix>_files f
                                                  WHERE f.file_id = r_file[i]) THEN
                        v_status := 'exists';
                    END IF;
                    IF v_status = 'ok' THEN
                        IF v_used + v_reserved - v_current + r_need[i] > p_limit THEN
                            v_status := 'capacity';
                        ELSIF p_free IS NOT NULL
                              AND p_free - (v_reserved - v_current) < r_need[i] - v_current THEN
                            v_status := 'disk';
                        ELSIF r_op[i] IS NULL THEN
                            UPDATE <prefix>_wal SET reserved_bytes = r_need[i]
                             WHERE transaction_id = r_txid[i] AND status = 'pending';
                        ELSE
                            INSERT INTO <prefix>_wal (transaction_id, operation_type, status,
                                                      file_id, operation_data, user_id,
                                                      started_at, reserved_bytes)
                            VALUES (r_txid[i], r_op[i], 'pending', r_file[i], r_data[i],
                                    r_user[i], r_started[i], r_need[i]);
                        END IF;
                    END IF;
                    RETURN QUERY SELECT 'reserve', i, v_status, NULL::text, v_used, v_reserved;
                    IF v_status = 'ok' THEN
                        v_reserved := v_reserved - v_current + r_need[i];
                    END IF;
                END LOOP;
            END IF;
        END $$;
"""

# 0007's body: the same function without the three claim conditions
COMMIT_BATCH_0007 = re.sub(r"\n *AND w\.claimed_by IS NULL", "", COMMIT_BATCH)

# A DELETE's row removal fires the totals trigger, which updates the config row.  A
# batch finish of the same (explicit) file id locks the config row first and then waits
# for the deleted row's transaction (ON CONFLICT): a deadlock, whose victim could be the
# DELETE after its files were gone.  The config row is now locked first here too.
END_DELETE = """
        CREATE OR REPLACE FUNCTION <prefix>_end_delete(
            p_txid uuid, p_file_id uuid, p_result jsonb, p_at timestamptz) RETURNS boolean
        LANGUAGE plpgsql VOLATILE AS $$
        DECLARE
            found_row boolean;
        BEGIN
            PERFORM 1 FROM <prefix>_config c WHERE c.id = 1 FOR NO KEY UPDATE;
            DELETE FROM <prefix>_files WHERE file_id = p_file_id;
            found_row := FOUND;
            PERFORM <prefix>_end_change(p_txid, p_file_id, p_result, p_at);
            RETURN found_row;
        END $$;
"""
END_DELETE_0007 = END_DELETE.replace(
    "            PERFORM 1 FROM <prefix>_config c WHERE c.id = 1 FOR NO KEY UPDATE;\n", "")

steps = [
    ddl(
        """
        CREATE TABLE <prefix>_leases (
            lease_id     uuid        PRIMARY KEY,
            holder       text        NOT NULL,
            host         text        NOT NULL,
            pid          integer     NOT NULL,
            started_at   timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now()
        );
        ALTER TABLE <prefix>_wal ADD COLUMN claimed_by uuid, ADD COLUMN claimed_at timestamptz;
        """,
        """
        ALTER TABLE <prefix>_wal DROP COLUMN claimed_at, DROP COLUMN claimed_by;
        DROP TABLE <prefix>_leases;
        """,
    ),
    ddl(COMMIT_BATCH, COMMIT_BATCH_0007),
    ddl(END_DELETE, END_DELETE_0007),
]
