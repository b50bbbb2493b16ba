"""Initial schema: files (metadata cache), WAL, config singleton.  Reference §4, §5."""

from yoyo import step  # noqa: F401  (yoyo inspects the module namespace)

from storage.db.migrate import ddl

__depends__: set[str] = set()

steps = [
    ddl(
        """
        CREATE TABLE <prefix>_files (
            file_id             uuid PRIMARY KEY,
            original_filename   varchar(500)  NOT NULL,
            storage_filename    varchar(500)  NOT NULL,
            file_size           bigint        NOT NULL CHECK (file_size >= 0),
            content_type        varchar(255)  NOT NULL,
            created_at          timestamptz   NOT NULL DEFAULT now(),
            updated_at          timestamptz   NOT NULL DEFAULT now(),
            cache_updated_at    timestamptz   NOT NULL DEFAULT now(),
            cache_ttl_hours     integer       NOT NULL DEFAULT 24,
            created_by_id       varchar(255)  NOT NULL,
            created_by_username varchar(255)  NOT NULL,
            created_by_fullname varchar(500),
            description         text,
            version             varchar(50),
            storage_path        varchar(1000) NOT NULL,
            checksum            varchar(64)   NOT NULL,
            metadata_json       jsonb,
            CONSTRAINT <prefix>_files_storage_filename_key UNIQUE (storage_filename)
        );
        CREATE INDEX idx_<prefix>_files_created ON <prefix>_files (created_at DESC, file_id DESC);
        CREATE INDEX idx_<prefix>_user_date ON <prefix>_files (created_by_id, created_at);
        CREATE INDEX idx_<prefix>_metadata ON <prefix>_files USING gin (metadata_json);
        """,
        "DROP TABLE <prefix>_files",
    ),
    ddl(
        """
        CREATE TABLE <prefix>_wal (
            transaction_id uuid PRIMARY KEY,
            operation_type varchar(50) NOT NULL,
            status         varchar(20) NOT NULL
                CHECK (status IN ('pending', 'committed', 'rolled_back', 'failed')),
            file_id        uuid,
            operation_data jsonb       NOT NULL DEFAULT '{}'::jsonb,
            error_message  text,
            started_at     timestamptz NOT NULL DEFAULT now(),
            completed_at   timestamptz,
            duration_ms    integer,
            user_id        varchar(255),
            reserved_bytes bigint      NOT NULL DEFAULT 0
        );
        CREATE INDEX idx_<prefix>_wal_status_time ON <prefix>_wal (status, started_at);
        CREATE INDEX idx_<prefix>_wal_file ON <prefix>_wal (file_id, started_at);
        CREATE INDEX idx_<prefix>_wal_pending ON <prefix>_wal (started_at)
            WHERE status = 'pending';
        CREATE INDEX idx_<prefix>_wal_data ON <prefix>_wal USING gin (operation_data);
        """,
        "DROP TABLE <prefix>_wal",
    ),
    ddl(
        """
        CREATE TABLE <prefix>_config (
            id                 integer PRIMARY KEY CHECK (id = 1),
            current_mode       varchar(10),
            mode_changed_at    timestamptz,
            mode_changed_by    varchar(255),
            is_master          boolean     NOT NULL DEFAULT false,
            master_elected_at  timestamptz,
            total_files        bigint      NOT NULL DEFAULT 0,
            total_size_bytes   bigint      NOT NULL DEFAULT 0,
            last_cache_rebuild timestamptz,
            created_at         timestamptz NOT NULL DEFAULT now(),
            updated_at         timestamptz NOT NULL DEFAULT now()
        );
        INSERT INTO <prefix>_config (id) VALUES (1);

        -- Keep the file count and byte total in the singleton row, so /info and the
        -- capacity check read one row instead of scanning the table.
        CREATE FUNCTION <prefix>_files_totals() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                UPDATE <prefix>_config SET total_files = total_files + 1,
                       total_size_bytes = total_size_bytes + NEW.file_size WHERE id = 1;
            ELSIF TG_OP = 'DELETE' THEN
                UPDATE <prefix>_config SET total_files = total_files - 1,
                       total_size_bytes = total_size_bytes - OLD.file_size WHERE id = 1;
            ELSIF NEW.file_size <> OLD.file_size THEN
                UPDATE <prefix>_config
                   SET total_size_bytes = total_size_bytes + NEW.file_size - OLD.file_size
                 WHERE id = 1;
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER <prefix>_files_totals AFTER INSERT OR DELETE OR UPDATE OF file_size
            ON <prefix>_files FOR EACH ROW EXECUTE FUNCTION <prefix>_files_totals();
        CREATE FUNCTION <prefix>_files_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE <prefix>_config SET total_files = 0, total_size_bytes = 0 WHERE id = 1;
            RETURN NULL;
        END $$;
        CREATE TRIGGER <prefix>_files_truncated AFTER TRUNCATE ON <prefix>_files
            FOR EACH STATEMENT EXECUTE FUNCTION <prefix>_files_truncated();
        """,
        """
        DROP TRIGGER <prefix>_files_truncated ON <prefix>_files;
        DROP TRIGGER <prefix>_files_totals ON <prefix>_files;
        DROP FUNCTION <prefix>_files_truncated();
        DROP FUNCTION <prefix>_files_totals();
        DROP TABLE <prefix>_config;
        """,
    ),
]
