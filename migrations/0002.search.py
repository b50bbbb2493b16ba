"""Full-text search document and the indexes behind every search filter and sort (issue 7).

Upgrades an existing ``<prefix>_files`` in place: ``ADD COLUMN … GENERATED ALWAYS AS
… STORED`` rewrites the table once under an exclusive lock (about a minute per
million rows), after which PostgreSQL keeps the document correct on every INSERT
and UPDATE — upload, PATCH, lazy refresh and cache rebuild alike (0006.lean_writes
keeps the stored values and computes the document in a trigger instead).

The document (see storage/search.py for the query side, which must tokenise the same way):
- ``-_./\\`` become spaces first, so ``report-2025.pdf`` yields ``report``, ``2025``
  and ``pdf`` (the default parser keeps it as one "file" token, and reads ``-2025``
  as a negative number);
- each text goes through ``simple`` (exact words, any script: Cyrillic, CJK) and
  ``english`` (stems: ``reports`` finds ``report``);
- weights: filename and version A, description B, custom metadata values C (keys
  are not indexed);
- each input is cut to 20,000 characters, so the tsvector stays far below its
  1 MiB limit and no upload can fail with "string is too long for tsvector".
"""

from yoyo import step  # noqa: F401  (yoyo inspects the module namespace)

from storage.db.migrate import ddl

__depends__ = {"0001.initial"}

steps = [
    ddl(
        r"""
        CREATE FUNCTION <prefix>_search_text(t text) RETURNS text
            LANGUAGE sql IMMUTABLE PARALLEL SAFE
            RETURN translate(left(t, 20000), '-_./\', '     ');

        CREATE FUNCTION <prefix>_search_metadata(m jsonb) RETURNS text
            LANGUAGE sql IMMUTABLE PARALLEL SAFE
            RETURN (SELECT left(string_agg(v #>> '{}', ' '), 20000)
                      FROM jsonb_path_query(m, 'strict $.**') AS v
                     WHERE jsonb_typeof(v) IN ('string', 'number', 'boolean'));

        CREATE FUNCTION <prefix>_search_document(
            filename text, description text, version text, metadata jsonb
        ) RETURNS tsvector LANGUAGE sql IMMUTABLE PARALLEL SAFE
            RETURN
                setweight(to_tsvector('simple'::regconfig, <prefix>_search_text(filename)), 'A')
             || setweight(to_tsvector('english'::regconfig, <prefix>_search_text(filename)), 'A')
             || setweight(to_tsvector('simple'::regconfig,
                                      coalesce(<prefix>_search_text(version), '')), 'A')
             || setweight(to_tsvector('simple'::regconfig,
                                      coalesce(<prefix>_search_text(description), '')), 'B')
             || setweight(to_tsvector('english'::regconfig,
                                      coalesce(<prefix>_search_text(description), '')), 'B')
             || setweight(to_tsvector('simple'::regconfig, coalesce(
                    <prefix>_search_text(<prefix>_search_metadata(metadata)), '')), 'C')
             || setweight(to_tsvector('english'::regconfig, coalesce(
                    <prefix>_search_text(<prefix>_search_metadata(metadata)), '')), 'C');

        ALTER TABLE <prefix>_files ADD COLUMN search_vector tsvector
            GENERATED ALWAYS AS (<prefix>_search_document(
                original_filename, description, version, metadata_json)) STORED;
        """,
        """
        ALTER TABLE <prefix>_files DROP COLUMN search_vector;
        DROP FUNCTION <prefix>_search_document(text, text, text, jsonb);
        DROP FUNCTION <prefix>_search_metadata(jsonb);
        DROP FUNCTION <prefix>_search_text(text);
        """,
    ),
    ddl(
        # Each index was chosen from EXPLAIN (ANALYZE, BUFFERS) at 1M rows (bench/results/).
        # content_type is compared in the "C" collation so `image/*` is a plain range
        # ['image/', 'image0') whatever the database collation is.  Metadata filters are
        # jsonpath matches (`@@`): the jsonb_path_ops index finds {"project": "x"} through
        # one hashed entry, where 0001's jsonb_ops index intersects the posting lists of
        # the key "project" (most rows) and the value "x" (3x slower at 1M rows).
        # Content type and size are strongly correlated (text is small, video large), so
        # "video/mp4, smallest first" walking the size index reads 830k rows (2.5 s):
        # hence the (content_type, file_size) index.
        """
        CREATE INDEX idx_<prefix>_files_search ON <prefix>_files USING gin (search_vector);
        CREATE INDEX idx_<prefix>_files_ctype ON <prefix>_files
            ((content_type COLLATE "C"), created_at DESC, file_id DESC);
        CREATE INDEX idx_<prefix>_files_ctype_size ON <prefix>_files
            ((content_type COLLATE "C"), file_size, file_id);
        CREATE INDEX idx_<prefix>_files_user ON <prefix>_files
            (created_by_username, created_at DESC, file_id DESC);
        CREATE INDEX idx_<prefix>_files_size ON <prefix>_files (file_size, file_id);
        CREATE INDEX idx_<prefix>_files_name ON <prefix>_files (original_filename, file_id);
        CREATE INDEX idx_<prefix>_files_metadata_path ON <prefix>_files
            USING gin (metadata_json jsonb_path_ops);
        """,
        """
        DROP INDEX idx_<prefix>_files_metadata_path;
        DROP INDEX idx_<prefix>_files_name;
        DROP INDEX idx_<prefix>_files_size;
        DROP INDEX idx_<prefix>_files_user;
        DROP INDEX idx_<prefix>_files_ctype_size;
        DROP INDEX idx_<prefix>_files_ctype;
        DROP INDEX idx_<prefix>_files_search;
        """,
    ),
]
