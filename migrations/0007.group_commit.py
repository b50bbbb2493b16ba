"""Group commit (issue 16): the database work of concurrent writes in one statement.

- ``<prefix>_commit_batch``: the finishing statements (metadata row in, WAL intent
  committed, reservation released) and the reservations (capacity check, WAL intent in
  or grown) of every upload that queued while the previous batch was in flight, in one
  call and one commit.  Each member gets its own outcome: a duplicate id, an intent
  that recovery already resolved, or a refused reservation fails that member only.
  The element's mode is checked where uploads commit, under the config row lock that a
  mode change takes too (issue 19).
- ``<prefix>_begin_change`` / ``_end_update`` / ``_end_delete`` / ``_abort_change``:
  PATCH and DELETE in two round trips.  The first one takes the file's lock, checks the
  mode, reads the row and commits the WAL intent; the second one changes the row,
  commits the WAL entry and releases the lock.  The lock is a *session* advisory lock
  keyed on the file (a row lock would need its transaction open across the attr
  write, which costs a BEGIN and a COMMIT round trip of its own), so it spans the attr
  write exactly as the row lock did, across processes, and dies with the session.
  Maintenance and recovery take the same key (``<prefix>_lock_file``).  Every change
  also holds the element's ``writes`` lock shared; a mode change takes it exclusively,
  so it waits for changes in flight and nothing is written after it.
- The totals trigger fires once per statement (a batch inserts many rows) for INSERT
  and DELETE; UPDATE OF file_size stays per row (transition tables take no column list).
"""

from yoyo import step  # noqa: F401  (yoyo inspects the module namespace)

from storage.db.migrate import ddl

__depends__ = {"0005.reserve", "0006.lean_writes"}

steps = [
    ddl(
        """
        CREATE FUNCTION <prefix>_commit_batch(
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
                                          AND w.status = 'pending')
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
                                                    AND w.status = 'pending') THEN 'gone'
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
                         WHERE w.transaction_id = r_txid[i] AND w.status = 'pending';
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
        """,
        """
        DROP FUNCTION <prefix>_commit_batch(
            bigint, bigint, text, uuid[], bigint[], text[], uuid[], jsonb[], text[],
            timestamptz[], boolean[], uuid[], jsonb[], timestamptz[], uuid[], text[], text[],
            bigint[], text[], timestamptz[], timestamptz[], text[], text[], text[], text[],
            text[], text[], text[], jsonb[], integer[]);
        """,
    ),
    ddl(
        """
        CREATE FUNCTION <prefix>_begin_change(
            p_txid uuid, p_op text, p_file_id uuid, p_data jsonb, p_user text,
            p_started timestamptz, p_modes text[], p_app_mode text,
            OUT status text, OUT mode text, OUT f <prefix>_files)
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            PERFORM pg_advisory_lock_shared(hashtext('<prefix>_writes'));
            PERFORM pg_advisory_lock(hashtext('<prefix>_file'), hashtext(p_file_id::text));
            -- each statement below reads what committed before the locks were granted
            SELECT COALESCE(c.current_mode, p_app_mode) INTO mode
              FROM <prefix>_config c WHERE c.id = 1;
            IF p_modes IS NOT NULL AND NOT mode = ANY (p_modes) THEN
                status := 'mode';
            ELSE
                SELECT x.* INTO f FROM <prefix>_files x WHERE x.file_id = p_file_id;
                IF FOUND THEN
                    INSERT INTO <prefix>_wal (transaction_id, operation_type, status, file_id,
                                              operation_data, user_id, started_at)
                    VALUES (p_txid, p_op, 'pending', p_file_id,
                            p_data || jsonb_build_object(
                                'original_filename', f.original_filename,
                                'storage_filename', f.storage_filename,
                                'relative_path', f.storage_path || f.storage_filename),
                            p_user, p_started);
                    status := 'ok';
                    RETURN;  -- the locks stay with the session until _end_* / _abort_change
                END IF;
                status := 'missing';
            END IF;
            PERFORM pg_advisory_unlock(hashtext('<prefix>_file'), hashtext(p_file_id::text));
            PERFORM pg_advisory_unlock_shared(hashtext('<prefix>_writes'));
        END $$;

        -- The file's lock is an advisory lock on (hashtext('<prefix>_file'),
        -- hashtext(file_id)); the element's writes lock on hashtext('<prefix>_writes').
        -- The session's locks pass to the transaction: they are released when it commits
        -- (a session lock released inside the transaction would let the next change read
        -- the row before this change is visible).
        CREATE FUNCTION <prefix>_release_change(p_file_id uuid) RETURNS void
        LANGUAGE sql VOLATILE AS $$
            SELECT pg_advisory_xact_lock(hashtext('<prefix>_file'), hashtext(p_file_id::text)),
                   pg_advisory_xact_lock_shared(hashtext('<prefix>_writes'));
            SELECT pg_advisory_unlock(hashtext('<prefix>_file'), hashtext(p_file_id::text)),
                   pg_advisory_unlock_shared(hashtext('<prefix>_writes'));
        $$;

        -- The WAL entry of a change committed, and its locks released (at commit).
        CREATE FUNCTION <prefix>_end_change(
            p_txid uuid, p_file_id uuid, p_result jsonb, p_at timestamptz) RETURNS void
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            UPDATE <prefix>_wal SET
                status = 'committed',
                operation_data = operation_data || jsonb_build_object('result', p_result),
                completed_at = p_at,
                duration_ms = (extract(epoch FROM (p_at - started_at)) * 1000)::integer
            WHERE transaction_id = p_txid AND status = 'pending';
            PERFORM <prefix>_release_change(p_file_id);
        END $$;

        CREATE FUNCTION <prefix>_end_update(
            p_txid uuid, p_file_id uuid, p_description text, p_version text,
            p_metadata jsonb, p_replace boolean, p_updated_at timestamptz, p_ttl integer,
            p_result jsonb, p_at timestamptz)
        RETURNS SETOF <prefix>_files
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            RETURN QUERY
                UPDATE <prefix>_files SET
                    description = COALESCE(p_description, description),
                    version = COALESCE(p_version, version),
                    metadata_json = CASE WHEN p_replace THEN p_metadata ELSE metadata_json END,
                    updated_at = p_updated_at,
                    cache_updated_at = now(),
                    cache_ttl_hours = p_ttl
                WHERE file_id = p_file_id
                RETURNING *;
            PERFORM <prefix>_end_change(p_txid, p_file_id, p_result, p_at);
        END $$;

        CREATE FUNCTION <prefix>_end_delete(
            p_txid uuid, p_file_id uuid, p_result jsonb, p_at timestamptz) RETURNS boolean
        LANGUAGE plpgsql VOLATILE AS $$
        DECLARE
            found_row boolean;
        BEGIN
            DELETE FROM <prefix>_files WHERE file_id = p_file_id;
            found_row := FOUND;
            PERFORM <prefix>_end_change(p_txid, p_file_id, p_result, p_at);
            RETURN found_row;
        END $$;

        CREATE FUNCTION <prefix>_abort_change(
            p_txid uuid, p_file_id uuid, p_error text, p_at timestamptz) RETURNS void
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            -- NULL p_error: storage already changed, the intent stays for recovery
            IF p_error IS NOT NULL THEN
                UPDATE <prefix>_wal SET
                    status = 'rolled_back', error_message = p_error, completed_at = p_at,
                    duration_ms = (extract(epoch FROM (p_at - started_at)) * 1000)::integer
                WHERE transaction_id = p_txid AND status = 'pending';
            END IF;
            PERFORM <prefix>_release_change(p_file_id);
        END $$;

        CREATE FUNCTION <prefix>_lock_file(p_file_id uuid, p_wait boolean)
        RETURNS SETOF <prefix>_files
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            IF p_wait THEN
                PERFORM pg_advisory_xact_lock(hashtext('<prefix>_file'), hashtext(p_file_id::text));
                RETURN QUERY SELECT * FROM <prefix>_files WHERE file_id = p_file_id FOR UPDATE;
            ELSIF pg_try_advisory_xact_lock(hashtext('<prefix>_file'),
                                            hashtext(p_file_id::text)) THEN
                RETURN QUERY SELECT * FROM <prefix>_files WHERE file_id = p_file_id
                    FOR UPDATE NOWAIT;
            ELSE
                RAISE EXCEPTION 'file % is being changed by a live operation', p_file_id
                    USING ERRCODE = 'lock_not_available';
            END IF;
        END $$;
        """,
        """
        DROP FUNCTION <prefix>_lock_file(uuid, boolean);
        DROP FUNCTION <prefix>_abort_change(uuid, uuid, text, timestamptz);
        DROP FUNCTION <prefix>_end_delete(uuid, uuid, jsonb, timestamptz);
        DROP FUNCTION <prefix>_end_update(uuid, uuid, text, text, jsonb, boolean, timestamptz,
                                          integer, jsonb, timestamptz);
        DROP FUNCTION <prefix>_end_change(uuid, uuid, jsonb, timestamptz);
        DROP FUNCTION <prefix>_release_change(uuid);
        DROP FUNCTION <prefix>_begin_change(uuid, text, uuid, jsonb, text, timestamptz, text[],
                                            text);
        """,
    ),
    ddl(
        """
        DROP TRIGGER <prefix>_files_totals ON <prefix>_files;
        CREATE TRIGGER <prefix>_files_totals AFTER UPDATE OF file_size
            ON <prefix>_files FOR EACH ROW EXECUTE FUNCTION <prefix>_files_totals();
        CREATE FUNCTION <prefix>_files_added() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE <prefix>_config c SET total_files = c.total_files + d.n,
                   total_size_bytes = c.total_size_bytes + d.s
              FROM (SELECT count(*) AS n, COALESCE(sum(file_size), 0) AS s FROM added) d
             WHERE c.id = 1 AND d.n > 0;
            RETURN NULL;
        END $$;
        CREATE FUNCTION <prefix>_files_removed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE <prefix>_config c SET total_files = c.total_files - d.n,
                   total_size_bytes = c.total_size_bytes - d.s
              FROM (SELECT count(*) AS n, COALESCE(sum(file_size), 0) AS s FROM removed) d
             WHERE c.id = 1 AND d.n > 0;
            RETURN NULL;
        END $$;
        CREATE TRIGGER <prefix>_files_added AFTER INSERT ON <prefix>_files
            REFERENCING NEW TABLE AS added
            FOR EACH STATEMENT EXECUTE FUNCTION <prefix>_files_added();
        CREATE TRIGGER <prefix>_files_removed AFTER DELETE ON <prefix>_files
            REFERENCING OLD TABLE AS removed
            FOR EACH STATEMENT EXECUTE FUNCTION <prefix>_files_removed();
        """,
        """
        DROP TRIGGER <prefix>_files_removed ON <prefix>_files;
        DROP TRIGGER <prefix>_files_added ON <prefix>_files;
        DROP FUNCTION <prefix>_files_removed();
        DROP FUNCTION <prefix>_files_added();
        DROP TRIGGER <prefix>_files_totals ON <prefix>_files;
        CREATE TRIGGER <prefix>_files_totals AFTER INSERT OR DELETE OR UPDATE OF file_size
            ON <prefix>_files FOR EACH ROW EXECUTE FUNCTION <prefix>_files_totals();
        """,
    ),
]
