-- Search and listing building blocks (issue 7), composed by storage/db/search_sql.py.
--
-- These are FRAGMENTS, not statements: each block starts with "-- fragment: <name>"
-- (not "-- name:"), so storage/db/sql.py's statement loader, and the test that prepares
-- every statement, never see them.  Do not add "-- name:" blocks to this file.
--
-- Trust boundary: this file is the whole vocabulary of search SQL.  storage/db/search_sql.py
-- only picks fragments by fixed names and joins them with " AND " / " OR "; request
-- text is never spliced in.  Inside a fragment:
--   <prefix>   the validated table prefix (rendered by storage.db.sql.render)
--   {tsquery}  the text of the "tsquery" fragment, included when the file is loaded
--   {select} {where} {order}  filled with other fragments by storage/db/search_sql.py
--   :name      a value, bound as $n; the same name and value share one $n
--              (so ORDER BY ts_rank(...) is the select-list expression, computed once)
-- The query text reaching :q is already normalised the way the stored document is
-- (migrations/0002.search.py): "-_./\" between words become spaces.

-- fragment: tsquery
-- exact words OR english stems; one of them when both read the same (the planner's
-- row estimate would count an "x | x" twice).  Folded to a constant at planning.
(CASE WHEN websearch_to_tsquery('simple'::regconfig, :q)
         = websearch_to_tsquery('english'::regconfig, :q)
      THEN websearch_to_tsquery('simple'::regconfig, :q)
      ELSE websearch_to_tsquery('simple'::regconfig, :q)
           || websearch_to_tsquery('english'::regconfig, :q) END)

-- fragment: select
-- every FileMeta field but metadata_json, which FileMetadataResponse does not show
SELECT file_id, original_filename, storage_filename, file_size, content_type, created_at,
       updated_at, created_by_id, created_by_username, created_by_fullname, description,
       version, storage_path, checksum, cache_updated_at, cache_ttl_hours,
       NULL::real AS search_rank
FROM <prefix>_files

-- fragment: select_ranked
SELECT file_id, original_filename, storage_filename, file_size, content_type, created_at,
       updated_at, created_by_id, created_by_username, created_by_fullname, description,
       version, storage_path, checksum, cache_updated_at, cache_ttl_hours,
       ts_rank(search_vector, {tsquery}) AS search_rank
FROM <prefix>_files

-- statements: {select} {where} {order} are filled with the fragments below --------

-- fragment: page
{select} WHERE {where} ORDER BY {order} LIMIT :limit

-- fragment: page_offset
-- the legacy list's skip/limit page (GET /api/v1/files without search parameters)
{select} WHERE {where} ORDER BY {order} LIMIT :limit OFFSET :skip

-- fragment: count
-- reads at most :cap matching rows
SELECT count(*) FROM (SELECT 1 FROM <prefix>_files WHERE {where} LIMIT :cap) AS capped

-- fragment: estimate
EXPLAIN (FORMAT JSON) SELECT 1 FROM <prefix>_files WHERE {where}

-- fragment: response
-- The page as PostgreSQL renders it: per row the FileMetadataResponse JSON text (what
-- FileMeta.to_response() gives, timestamps as Python's isoformat(): UTC, "+00:00",
-- microseconds only when not zero), then the row's sort key and file_id for the cursor.
-- A plain projection over the ordered, limited page keeps its order.  Building the JSON
-- here costs PostgreSQL ~0.3 ms per 100 rows and saves the one Python process ~1.4 ms
-- of decoding rows, building dicts and json.dumps (bench/search_bench.py).
SELECT json_build_object(
           'file_id', file_id,
           'original_filename', original_filename,
           'storage_filename', storage_filename,
           'file_size', file_size,
           'content_type', content_type,
           'created_at', to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
               || CASE WHEN date_trunc('second', created_at) = created_at THEN ''
                       ELSE to_char(created_at AT TIME ZONE 'UTC', '.US') END || '+00:00',
           'created_by_username', created_by_username,
           'created_by_fullname', created_by_fullname,
           'description', description,
           'version', version,
           'storage_path', storage_path,
           'checksum', checksum,
           'cache_updated_at',
               to_char(cache_updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
               || CASE WHEN date_trunc('second', cache_updated_at) = cache_updated_at THEN ''
                       ELSE to_char(cache_updated_at AT TIME ZONE 'UTC', '.US') END
               || '+00:00',
           'cache_ttl_hours', cache_ttl_hours,
           'cache_expired', now()
               > cache_updated_at + make_interval(hours => cache_ttl_hours)
           {rank})::text AS item,
       {key} AS sort_key, file_id
FROM ({page}) AS page

-- fragment: rank_item
, 'search_rank', search_rank

-- fragment: custom_plans
-- Every search statement is planned for its actual values: a cached generic plan
-- cannot know whether a word matches ten rows or half the table.  Session-level (no
-- transaction round trips); repo_search marks the connection so the pool's reset
-- undoes it on release.
SELECT set_config('plan_cache_mode', 'force_custom_plan', false)

-- filters (joined with AND) -------------------------------------------------------

-- fragment: all_rows
true

-- fragment: where_q
search_vector @@ {tsquery}

-- fragment: where_content_type
(content_type COLLATE "C") = :content_type

-- fragment: where_content_type_prefix
-- image/* is the range ['image/', 'image0'): '0' follows '/' in "C" byte order
(content_type COLLATE "C") >= :ctype_lo AND (content_type COLLATE "C") < :ctype_hi

-- fragment: where_created_by
created_by_username = :created_by

-- fragment: where_min_size
file_size >= :min_size::bigint

-- fragment: where_max_size
file_size <= :max_size::bigint

-- fragment: where_created_after
created_at >= :created_after::timestamptz

-- fragment: where_created_before
created_at < :created_before::timestamptz

-- fragment: where_metadata
-- :metadata is a jsonpath VALUE built by storage/db/search_sql.py from JSON-escaped literals,
-- e.g. $."year" == "2024" || $."year" == 2024 (lax mode: an array matches by element);
-- served by the jsonb_path_ops GIN index idx_<prefix>_files_metadata_path
metadata_json @@ :metadata::jsonpath

-- sorts: ORDER BY and the keyset "after this row" condition, file_id breaking ties --

-- fragment: order_created_at_desc
created_at DESC, file_id DESC

-- fragment: after_created_at_desc
(created_at, file_id) < (:after_key::timestamptz, :after_id::uuid)

-- fragment: order_created_at_asc
created_at, file_id

-- fragment: after_created_at_asc
(created_at, file_id) > (:after_key::timestamptz, :after_id::uuid)

-- fragment: order_file_size_desc
file_size DESC, file_id DESC

-- fragment: after_file_size_desc
(file_size, file_id) < (:after_key::bigint, :after_id::uuid)

-- fragment: order_file_size_asc
file_size, file_id

-- fragment: after_file_size_asc
(file_size, file_id) > (:after_key::bigint, :after_id::uuid)

-- fragment: order_original_filename_desc
original_filename DESC, file_id DESC

-- fragment: after_original_filename_desc
(original_filename, file_id) < (:after_key::varchar, :after_id::uuid)

-- fragment: order_original_filename_asc
original_filename, file_id

-- fragment: after_original_filename_asc
(original_filename, file_id) > (:after_key::varchar, :after_id::uuid)

-- fragment: order_rank
ts_rank(search_vector, {tsquery}) DESC, file_id DESC

-- fragment: after_rank
(ts_rank(search_vector, {tsquery}), file_id) < (:after_key::real, :after_id::uuid)

-- maintenance and benchmarking ------------------------------------------------------

-- fragment: explain_analyze
EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}

-- fragment: vacuum_analyze
VACUUM (ANALYZE) <prefix>_files

-- fragment: newest_created_at
SELECT max(created_at) FROM <prefix>_files

-- fragment: server_settings
SELECT current_setting('server_version') AS version,
       current_setting('shared_buffers') AS shared_buffers,
       current_setting('work_mem') AS work_mem
