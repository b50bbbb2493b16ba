"""Resumable uploads (tus 1.0.0, issue 17): one row per upload that is not yet a file.

The row is the upload's whole state, so any process of the element can take its next
PATCH: ``upload_offset`` (bytes durably staged), ``upload_length`` (NULL while the
client defers it), what the finished file will be called and carry, who created it,
``staging`` (backend bookkeeping: for S3 the chunk count and the tail object), the
sliding ``expires_at`` and the PATCH lease (``lease_owner``/``lease_until``, see
storage/resumable.py).  The capacity reservation is not here: it is the
``reserved_bytes`` of the pending WAL row ``transaction_id`` (operation
``file_upload_resumable``), counted by ``<prefix>_reserve`` like every upload's.
A finished upload keeps its row (``completed_at``) until it expires, so a client's
``HEAD`` still learns that it is complete.
"""

from yoyo import step  # noqa: F401  (yoyo inspects the module namespace)

from storage.db.migrate import ddl

__depends__ = {"0006.lean_writes"}

steps = [
    ddl(
        """
        CREATE TABLE <prefix>_uploads (
            file_id             uuid PRIMARY KEY,
            transaction_id      uuid          NOT NULL,
            upload_offset       bigint        NOT NULL DEFAULT 0 CHECK (upload_offset >= 0),
            upload_length       bigint        CHECK (upload_length >= 0),
            metadata_header     text          NOT NULL DEFAULT '',
            original_filename   varchar(500)  NOT NULL,
            content_type        varchar(255)  NOT NULL,
            description         text,
            version             varchar(50),
            metadata_json       jsonb,
            created_by_id       varchar(255)  NOT NULL,
            created_by_username varchar(255)  NOT NULL,
            storage_path        varchar(1000) NOT NULL,
            storage_filename    varchar(500)  NOT NULL,
            staging             jsonb         NOT NULL DEFAULT '{}'::jsonb,
            created_at          timestamptz   NOT NULL,
            updated_at          timestamptz   NOT NULL,
            expires_at          timestamptz   NOT NULL,
            completed_at        timestamptz,
            lease_owner         text,
            lease_until         timestamptz,
            CONSTRAINT <prefix>_uploads_offset_in_length
                CHECK (upload_length IS NULL OR upload_offset <= upload_length)
        );
        CREATE INDEX idx_<prefix>_uploads_expires ON <prefix>_uploads (expires_at);
        """,
        "DROP TABLE <prefix>_uploads",
    ),
]
