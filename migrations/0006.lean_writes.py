"""Cheaper writes: every upload inserts one files row and one WAL row (issue 10).

Measured on the upload path (put-4k, c=16, PostgreSQL on the server's core):

- ``idx_<prefix>_wal_data``, a GIN (jsonb_ops) index over every key and value of
  ``operation_data``, copied from upstream's schema: no query reads it, and every WAL
  insert and status update re-indexed the whole document.  Dropped.
- ``idx_<prefix>_metadata`` (jsonb_ops) is superseded by 0002's jsonb_path_ops index,
  which every metadata filter uses (see bench/results/search-*.md).  Dropped.
- The search document becomes a BEFORE trigger instead of a generated column: a
  generated column's expression is rebuilt from its stored node tree and planned at
  every INSERT (the inlined SQL functions and the metadata subquery included), while
  PL/pgSQL plans the assignment once per connection.  ``DROP EXPRESSION`` keeps every
  stored value, so the upgrade rewrites nothing.

Together: PostgreSQL CPU per upload 1.13 -> 0.78 ms.
"""

from yoyo import step  # noqa: F401  (yoyo inspects the module namespace)

from storage.db.migrate import ddl

__depends__ = {"0002.search"}

steps = [
    ddl(
        "DROP INDEX idx_<prefix>_wal_data",
        "CREATE INDEX idx_<prefix>_wal_data ON <prefix>_wal USING gin (operation_data)",
    ),
    ddl(
        "DROP INDEX idx_<prefix>_metadata",
        "CREATE INDEX idx_<prefix>_metadata ON <prefix>_files USING gin (metadata_json)",
    ),
    ddl(
        """
        ALTER TABLE <prefix>_files ALTER COLUMN search_vector DROP EXPRESSION;
        CREATE FUNCTION <prefix>_files_search() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.search_vector := <prefix>_search_document(
                NEW.original_filename, NEW.description, NEW.version, NEW.metadata_json);
            RETURN NEW;
        END $$;
        CREATE TRIGGER <prefix>_files_search
            BEFORE INSERT OR UPDATE OF original_filename, description, version, metadata_json,
                                       search_vector
            ON <prefix>_files FOR EACH ROW EXECUTE FUNCTION <prefix>_files_search();
        """,
        """
        DROP TRIGGER <prefix>_files_search ON <prefix>_files;
        DROP FUNCTION <prefix>_files_search();
        ALTER TABLE <prefix>_files DROP COLUMN search_vector;
        ALTER TABLE <prefix>_files ADD COLUMN search_vector tsvector
            GENERATED ALWAYS AS (<prefix>_search_document(
                original_filename, description, version, metadata_json)) STORED;
        CREATE INDEX idx_<prefix>_files_search ON <prefix>_files USING gin (search_vector);
        """,
    ),
]
