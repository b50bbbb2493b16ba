"""An upload in progress holds its file id (issue 23 finding 2, issue 24 finding 2).

From the creation of an upload until it ends (committed, rolled back; for a tus upload:
completed, terminated, expired), no other upload may create a file under its id: not a
plain upload, not a tus creation.  ``<prefix>_files`` only knows finished files, so the
plain upload's id check let a stranger take a pending tus upload's id and replace its
content; and two plain uploads of one id in the same second both wrote the one storage
key, which a store without atomic conditional creates (SeaweedFS) let both complete,
so the loser's undo removed the winner's data.

The rule is a trigger on the WAL intents, where every creation starts: a pending
``file_create`` or ``file_upload_resumable`` intent is refused while another pending
creation intent for the same id exists, before a byte is written.  It raises
``unique_violation`` naming ``<prefix>_wal_upload_id``, which
:mod:`storage.domain.reservations` answers with 409.
The intents are inserted by ``<prefix>_commit_batch`` under the element's capacity lock,
so the check sees every intent committed before it, across processes; the function
itself is unchanged.
"""

from yoyo import step  # noqa: F401  (yoyo inspects the module namespace)

from storage.db.migrate import ddl

__depends__ = {"0010.resumable_uploads"}

steps = [
    ddl(
        """
        CREATE FUNCTION <prefix>_wal_upload_id() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM <prefix>_wal w
                        WHERE w.file_id = NEW.file_id AND w.status = 'pending'
                          AND w.transaction_id <> NEW.transaction_id
                          AND w.operation_type IN ('file_create',
                                                   'file_upload_resumable')) THEN
                RAISE EXCEPTION 'file id % is held by an upload in progress', NEW.file_id
                    USING ERRCODE = 'unique_violation',
                          CONSTRAINT = '<prefix>_wal_upload_id';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER <prefix>_wal_upload_id BEFORE INSERT ON <prefix>_wal
            FOR EACH ROW
            WHEN (NEW.status = 'pending' AND NEW.file_id IS NOT NULL
                  AND NEW.operation_type IN ('file_create', 'file_upload_resumable'))
            EXECUTE FUNCTION <prefix>_wal_upload_id();
        """,
        """
        DROP TRIGGER <prefix>_wal_upload_id ON <prefix>_wal;
        DROP FUNCTION <prefix>_wal_upload_id();
        """,
    ),
]
