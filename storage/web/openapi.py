"""The OpenAPI 3.1 description of every endpoint, served at ``/api/v1/openapi.json``.

:func:`build` is the source; ``storage/web/openapi.json`` is its committed output for
readers and tools (``python -m storage.web.openapi`` rewrites it; a test keeps the two
equal).  Tests validate real responses against it and fuzz the live app with
schemathesis.  Errors everywhere are ``application/problem+json`` (RFC 9457) with
a string ``detail`` (artStore clients read ``detail``).
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from ..auth.access import Access, gate
from ..domain.element import config_key

JSON_PATH = Path(__file__).with_name("openapi.json")
PROBLEM = "application/problem+json"
MODES = ["edit", "rw", "ro", "ar"]
SORTS = ["-created_at", "created_at", "-file_size", "file_size", "-original_filename",
         "original_filename", "rank"]

STATUS_TEXT = {
    400: "Bad request: invalid parameter, body, or an operation the current mode refuses",
    401: "Missing, malformed, invalid or expired bearer token",
    403: "The token's role or type does not allow this operation",
    404: "No such file (or upload: unknown, expired or terminated)",
    405: "Method not allowed (tus: an X-HTTP-Method-Override other than HEAD, PATCH, "
         "DELETE)",
    408: "The client sent the body too slowly (UPLOAD_READ_TIMEOUT, UPLOAD_MIN_RATE)",
    409: "Conflict: duplicate file id (or one an unfinished resumable upload holds), a mode "
         "transition that is not allowed, or a tus Upload-Offset that is not the upload's "
         "offset",
    412: "A precondition failed: If-Match, or (tus) Tus-Resumable missing or not 1.0.0",
    413: "Body or file larger than allowed (for files: only when STORAGE_MAX_FILE_SIZE is "
         "set; a file that cannot fit the element is 507)",
    415: "tus: PATCH without Content-Type: application/offset+octet-stream",
    416: "Range not satisfiable",
    422: "Validation error: a parameter has the wrong format (see errors)",
    423: "tus: another request is writing to the upload (one PATCH at a time)",
    460: "tus: Checksum Mismatch (Upload-Checksum); the chunk was discarded",
    500: "Internal error (never with a traceback)",
    503: "The database or the storage is unavailable, or a maintenance lock is busy",
    507: "Not enough capacity or disk space for the file (also a file larger than the "
         "element's whole capacity): try another element",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(props: dict[str, Any], required: list[str] | None = None,
         additional: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props,
                              "required": list(props) if required is None else required}
    if not additional:
        schema["additionalProperties"] = False
    return schema


STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
UUID = {"type": "string", "format": "uuid"}
TIME = {"type": "string", "format": "date-time"}
NON_NEG = {"type": "integer", "minimum": 0}
BIGINT = {**NON_NEG, "maximum": 2**63 - 1}  # what PostgreSQL's bigint holds
# Text the service stores: PostgreSQL text refuses NUL, so it is no valid input.
TEXT = {"type": "string", "pattern": "^[^\\u0000]*$"}

NO_NUL = "^[^\\u0000]*$"
# What the strict JSON reader accepts anywhere in a body: no NUL in text or keys,
# integers exact in a double (|n| <= 2**53), at most 32 levels deep.
JSON_VALUE = {"anyOf": [
    {"type": "string", "pattern": NO_NUL},
    {"type": "integer", "minimum": -(2**53), "maximum": 2**53},
    {"type": "number", "not": {"type": "integer"}},
    {"type": "boolean"}, {"type": "null"},
    {"type": "array", "items": {"$ref": "#/components/schemas/JsonValue"}},
    {"type": "object", "propertyNames": {"pattern": NO_NUL},
     "additionalProperties": {"$ref": "#/components/schemas/JsonValue"}},
]}

SCHEMAS: dict[str, Any] = {
    "JsonValue": JSON_VALUE,
    "Problem": _obj({
        "type": STR, "title": STR, "status": {"type": "integer", "minimum": 400,
                                                "maximum": 599},
        "detail": STR,
        "errors": {"type": "array", "items": _ref("ValidationIssue")},
        "upload_kept": {"type": "boolean", "description": (
            "tus PATCH 400: the element left the upload modes while the upload's last bytes "
            "were being made a file; the bytes are kept and the file is made once uploads "
            "are allowed again")},
        "upload_offset": {**NON_NEG, "description": "with upload_kept: the bytes kept"},
    }, required=["type", "title", "status", "detail"]),
    "ValidationIssue": _obj({
        "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
        "msg": STR, "type": STR, "input": {},
    }, required=["loc", "msg", "type"]),
    "FileMetadata": _obj({
        "file_id": UUID, "original_filename": STR, "storage_filename": STR,
        "file_size": NON_NEG, "content_type": STR, "created_at": TIME,
        "created_by_username": STR, "created_by_fullname": _nullable(STR),
        "description": _nullable(STR), "version": _nullable(STR), "storage_path": STR,
        "checksum": {"type": "string", "pattern": "^([0-9a-f]{64})?$"},
        "cache_updated_at": TIME, "cache_ttl_hours": INT, "cache_expired": BOOL,
    }),
    "SearchHit": {"allOf": [_ref("FileMetadata"), {
        "type": "object", "properties": {"search_rank": {"type": "number"}}}]},
    "FileList": _obj({"total": NON_NEG,
                      "files": {"type": "array", "items": _ref("FileMetadata")}}),
    "SearchResult": _obj({
        "files": {"type": "array", "items": _ref("SearchHit")},
        "next_cursor": _nullable(STR), "total": NON_NEG, "total_is_estimate": BOOL,
    }),
    "UploadResult": _obj({
        "file_id": UUID, "original_filename": STR, "storage_filename": STR,
        "file_size": NON_NEG, "checksum": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "message": STR,
    }),
    "MetadataUpdate": _obj({
        "description": _nullable({**TEXT, "maxLength": 4096}),
        "version": _nullable({**TEXT, "maxLength": 50}),
        "metadata": _nullable({"type": "object", "description":
                               "Replaces the whole custom metadata object",
                               "propertyNames": {"pattern": NO_NUL},
                               "additionalProperties": _ref("JsonValue")}),
    }, required=[]) | {"additionalProperties": _ref("JsonValue")},
    "Root": _obj({"service": STR, "version": STR, "mode": {"enum": MODES},
                  "storage_type": {"enum": ["local", "s3"]}, "status": STR}),
    "Live": _obj({"status": {"const": "ok"}, "timestamp": TIME,
                  "checks": _obj({"process": {"const": "running"}})}),
    "Ready": _obj({"status": {"enum": ["ready", "not_ready"]}, "timestamp": TIME,
                   "checks": {"type": "object", "description":
                              "storage_type, storage_mode, storage and database checks; "
                              "*_error and recovery/lifecycle/migrations on failure"}}),
    "Startup": _obj({"status": {"enum": ["started", "starting"]}, "timestamp": TIME}),
    "Info": _obj({
        "name": STR, "display_name": STR, "version": STR, "mode": {"enum": MODES},
        "storage_type": {"enum": ["local", "s3"]}, "base_path": STR,
        "capacity_bytes": NON_NEG, "used_bytes": NON_NEG, "file_count": NON_NEG,
        "status": {"enum": ["operational", "degraded", "maintenance", "offline"]},
        "priority": INT, "element_id": STR, "timestamp": TIME,
    }, additional=False),
    "Capacity": _obj({
        "storage_id": STR, "mode": {"enum": MODES},
        "capacity": _obj({"total": NON_NEG, "used": NON_NEG, "available": NON_NEG,
                          "percent_used": {"type": "number", "minimum": 0, "maximum": 100}},
                         additional=False),
        "health": {"enum": ["healthy", "degraded", "unhealthy"]},
        "backend": {"enum": ["local", "s3"]}, "location": STR,
        "last_update": {"type": "string", "format": "date-time"},
    }, additional=False),
    "ModeInfo": _obj({
        "mode": {"enum": MODES}, "persisted": BOOL, "changed_at": _nullable(TIME),
        "changed_by": _nullable(STR),
        "allowed_operations": {"type": "array", "items": {
            "enum": ["upload", "download", "update", "delete", "list"]}},
        "allowed_transitions": {"type": "array", "items": {"enum": MODES}},
    }, additional=False),
    "ModeTransitionRequest": _obj({
        "target_mode": {"type": "string", "enum": MODES},
        "confirm": {"type": "boolean", "default": False,
                    "description": "Required (true) for the one backward step ro -> rw"},
    }, required=["target_mode"]),
    "ModeTransition": _obj({"previous_mode": {"enum": MODES}, "current_mode": {"enum": MODES},
                            "transitioned_at": TIME, "changed_by": STR}, additional=False),
    "ModeHistory": _obj({"history": {"type": "array", "items": _obj({
        "from_mode": {"enum": MODES}, "to_mode": {"enum": MODES}, "changed_by": STR,
        "changed_at": TIME}, additional=False)}}, additional=False),
    "GcDeleteRequest": _obj({
        "reason": _nullable({**TEXT, "maxLength": 500, "default": "gc_cleanup",
                             "description": "Logged; null, empty or absent means gc_cleanup"}),
        "cleanup_type": _nullable({**TEXT, "maxLength": 100, "description":
                                   "ttl_expired, finalized or orphaned (free text, logged)"}),
    }, required=[]) | {"additionalProperties": _ref("JsonValue")},
    "GcDeleteResult": _obj({"status": {"enum": ["deleted", "already_deleted"]},
                            "file_id": UUID, "deleted_at": TIME, "deleted_by": STR,
                            "reason": STR}),
    "GcExists": _obj({"exists": BOOL, "file_id": UUID}),
    "CacheStatistics": _obj({name: NON_NEG for name in (
        "attr_files_scanned", "cache_entries_before", "cache_entries_after",
        "entries_created", "entries_updated", "entries_deleted")}),
    "CacheResult": _obj({
        "status": {"const": "success"}, "message": STR,
        "result": _obj({
            "operation_type": {"enum": ["full", "incremental", "cleanup_expired"]},
            "started_at": TIME, "completed_at": TIME,
            "duration_seconds": {"type": "number", "minimum": 0},
            "statistics": _ref("CacheStatistics"),
            "errors": {"type": "array", "items": STR, "maxItems": 10},
        }),
    }),
    "CacheConsistency": _obj({
        "status": {"const": "success"}, "message": STR,
        "report": _obj({
            "total_attr_files": NON_NEG, "total_cache_entries": NON_NEG,
            "orphan_cache_count": NON_NEG, "orphan_attr_count": NON_NEG,
            "expired_cache_count": NON_NEG, "orphan_data_count": NON_NEG,
            "missing_data_count": NON_NEG, "is_consistent": BOOL,
            "inconsistency_percentage": {"type": "number", "minimum": 0},
            "details": _obj({name: {"type": "array", "items": STR, "maxItems": 10} for name in (
                "orphan_cache_entries", "orphan_attr_files", "expired_cache_entries",
                "orphan_data_files", "attr_files_without_data")}),
        }),
    }),
}

RID_HEADER = {"description": "The request id: the client's X-Request-ID when printable and "
              "at most 128 characters, else a generated one",
              "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": 128}}


def _headers(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}, **(extra or {})}


def ok(schema: str | dict[str, Any] | None, description: str = "OK",
       media: str = "application/json", headers: dict[str, Any] | None = None) -> dict:
    resp: dict[str, Any] = {"description": description, "headers": _headers(headers)}
    if schema is not None:
        resp["content"] = {media: {"schema": _ref(schema) if isinstance(schema, str)
                                   else schema}}
    return resp


def errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"$ref": f"#/components/responses/E{code}"} for code in codes}


def _error_component(code: int) -> dict[str, Any]:
    headers = _headers({"WWW-Authenticate": {"schema": STR}} if code == 401 else None)
    if code in (423, 503):
        headers["Retry-After"] = {"schema": STR}
    if code == 412:
        headers["Tus-Version"] = {"schema": STR, "description": "tus: the supported version"}
    return {"description": STATUS_TEXT[code], "headers": headers,
            "content": {PROBLEM: {"schema": _ref("Problem")}}}


EMPTY = {"type": "string", "maxLength": 0}


def _param(name: str, where: str, schema: dict[str, Any], description: str = "",
           required: bool = False) -> dict[str, Any]:
    if where == "query" and schema.get("type") != "string":
        schema = {"anyOf": [schema, EMPTY]}  # an empty value means "not given" (the default)
    p = {"name": name, "in": where, "schema": schema, "required": required or where == "path"}
    if description:
        p["description"] = description
    return p


FILE_ID = _param("file_id", "path", UUID, "The file's UUID")
AUTH = [{"bearerAuth": []}]
PUBLIC: list[Any] = []


def op(summary: str, responses: dict[str, Any], *, tags: list[str], security=AUTH,
       params: list[dict] | None = None, body: dict | None = None, op_id: str,
       description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op_id, "summary": summary, "tags": tags,
                           "security": security, "responses": responses}
    if description:
        out["description"] = description
    if params:
        out["parameters"] = params
    if body:
        out["requestBody"] = body
    return out


def _json_body(schema: str, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": _ref(schema)}}}


LIST_PARAMS = [
    _param("skip", "query", BIGINT, "Rows to skip (legacy list only; default 0)"),
    _param("limit", "query", NON_NEG, "Page size; the legacy list clamps it to 100 "
           "(default 100), a search accepts 1-1000"),
]
SEARCH_PARAMS = [
    _param("q", "query", {**TEXT, "maxLength": 1000},
           "Full-text query (websearch syntax) over filename, version, description and "
           "metadata values"),
    _param("content_type", "query", TEXT, "Exact media type, or a family like image/*"),
    _param("created_by", "query", {**TEXT, "maxLength": 255}, "Uploader's JWT sub or name"),
    _param("min_size", "query", BIGINT, "Smallest file size in bytes (inclusive)"),
    _param("max_size", "query", BIGINT, "Largest file size in bytes (inclusive)"),
    _param("created_after", "query", {"type": "string", "anyOf": [TIME, EMPTY]},
           "ISO 8601 with a UTC offset, within the years 1-9999 in UTC (inclusive)"),
    _param("created_before", "query", {"type": "string", "anyOf": [TIME, EMPTY]},
           "ISO 8601 with a UTC offset, within the years 1-9999 in UTC (exclusive)"),
    _param("sort", "query", {"enum": SORTS}, "rank needs q; default -created_at"),
    _param("cursor", "query", {**TEXT, "maxLength": 1024},
           "next_cursor of the previous page"),
]
SEARCH_NOTE = ("Custom metadata filters are extra query parameters "
               "`metadata.<key>=<value>` (up to 16, AND-ed).")


def _files_paths() -> dict[str, Any]:
    metadata = op("File metadata", {"200": ok("FileMetadata"), **errors(401, 404, 422, 503)},
                  tags=["files"], params=[FILE_ID], op_id="get_file_metadata")
    listing = op("List files, newest first (or search, when a search parameter is given)",
                 {"200": ok({"anyOf": [_ref("FileList"), _ref("SearchResult")]}),
                  **errors(400, 401, 503)},
                 tags=["files"], params=LIST_PARAMS + SEARCH_PARAMS, op_id="list_files",
                 description="Without search parameters: the artStore list `{total, files}` "
                 "with skip/limit. With any of them: the search result. " + SEARCH_NOTE)
    upload_fields = _obj({
        "file": {"type": "string", "contentMediaType": "application/octet-stream",
                 "description": "The file; its part filename and Content-Type are stored. "
                 "A `file` part without a filename (curl `-F file=name` instead of "
                 "`-F file=@path`) is a text field, refused with 400"},
        "description": {**TEXT, "maxLength": 4096}, "version": {**TEXT, "maxLength": 50},
        "file_id": {**UUID, "description": "Keep this id (finalization); 409 if it exists"},
        "metadata": {"type": "string", "description": "A JSON object, as text"},
        "finalize_transaction_id": STR, "retention_policy": STR,
    }, required=["file"])
    upload_errors = errors(400, 401, 403, 408, 409, 413, 422, 503, 507)
    return {
        "/api/v1/files/upload": {"post": op(
            "Upload a file (multipart, streamed)", {"201": ok("UploadResult", "Stored"),
                                                    **upload_errors},
            tags=["files"], op_id="upload_file",
            description="Allowed in edit and rw modes. Unknown form fields are ignored. "
            "Send `Expect: 100-continue` to be refused before sending the body.",
            body={"required": True, "content": {"multipart/form-data": {
                "schema": upload_fields}}})},
        "/api/v1/files": {"get": listing},
        "/api/v1/files/": {"get": {**listing, "operationId": "list_files_slash"}},
        "/api/v1/files/search": {"get": op(
            "Search files", {"200": ok("SearchResult"), **errors(400, 401, 503)},
            tags=["files"], params=SEARCH_PARAMS + [_param(
                "limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000},
                "Page size (default 100)")],
            op_id="search_files", description=SEARCH_NOTE)},
        "/api/v1/files/{file_id}": {
            "get": metadata,
            "put": op("Upload a raw body under a chosen id", {
                "201": ok("UploadResult", "Stored"), **upload_errors},
                tags=["files"], op_id="put_file", params=[
                    FILE_ID,
                    _param("filename", "query", {**TEXT, "maxLength": 1000},
                           "Original filename (else Content-Disposition, else the id)"),
                    _param("description", "query", {**TEXT, "maxLength": 4096}),
                    _param("version", "query", {**TEXT, "maxLength": 50}),
                    _param("metadata", "query", STR, "A JSON object, as text")],
                body={"required": True, "content": {"*/*": {"schema": {
                    "type": "string", "contentMediaType": "application/octet-stream"}}}}),
            "patch": op("Update description, version or custom metadata", {
                "200": ok("FileMetadata"), **errors(400, 401, 403, 404, 413, 422, 503)},
                tags=["files"], params=[FILE_ID], body=_json_body("MetadataUpdate", False),
                op_id="update_file", description="Allowed in edit and rw modes; null or "
                "absent fields are kept; metadata replaces the whole object."),
            "delete": op("Delete a file (edit mode, role admin or operator)", {
                "204": {"description": "Deleted", "headers": _headers()},
                **errors(400, 401, 403, 404, 422, 503)},
                tags=["files"], params=[FILE_ID], op_id="delete_file"),
        },
        "/api/v1/files/{file_id}/download": {"get": op(
            "Download (streamed; Range, conditional requests)", {
                "200": ok({"type": "string", "contentMediaType": "application/octet-stream"},
                          media="*/*", headers={"ETag": {"schema": STR},
                                                "Accept-Ranges": {"schema": STR}}),
                "206": ok({"type": "string"}, "Partial content", media="*/*",
                          headers={"Content-Range": {"schema": STR}}),
                "304": {"description": "Not modified", "headers": _headers()},
                **errors(401, 404, 412, 416, 422, 500, 503)},
            tags=["files"], op_id="download_file", params=[
                FILE_ID,
                _param("Range", "header", STR, "bytes=start-end[, ...] (RFC 9110 §14)"),
                _param("If-None-Match", "header", STR),
                _param("If-Match", "header", STR),
                _param("If-Range", "header", STR),
            ])},
    }


def _ops_paths() -> dict[str, Any]:
    transition = op("Change the runtime mode (role admin)", {
        "200": ok("ModeTransition"), **errors(400, 401, 403, 409, 413, 422, 503)},
        tags=["mode"], body=_json_body("ModeTransitionRequest"), op_id="change_mode",
        description="rw -> ro -> ar; ro -> rw only with confirm: true (409 otherwise); edit "
        "is isolated (409); an unknown or the current mode is 400. Persisted; every process "
        "of the element applies it within a second.")
    return {
        "/api/v1/info": {"get": op("Element facts for admin-module discovery", {
            "200": ok("Info")}, tags=["ops"], security=PUBLIC, op_id="get_info")},
        "/api/v1/capacity": {"get": op("Capacity and health for the ingester", {
            "200": ok("Capacity")}, tags=["ops"], security=PUBLIC, op_id="get_capacity",
            description="available = what the next upload can get: min(STORAGE_MAX_SIZE - "
            "stored - reserved, free disk - STORAGE_DISK_RESERVE - reserved) less a 64 KiB "
            "allowance for multipart framing and form fields; used = stored + reserved; "
            "total = STORAGE_MAX_SIZE, or used + what the filesystem still offers when that "
            "is smaller. health: healthy below CAPACITY_CRITICAL_THRESHOLD percent used, "
            "degraded from there, unhealthy from CAPACITY_FULL_THRESHOLD, when available is "
            "0, or when the database or storage is unreachable.")},
        "/api/v1/mode": {
            "get": op("Current mode", {"200": ok("ModeInfo"), **errors(401, 503)},
                      tags=["mode"], op_id="get_mode"),
            "post": transition,
        },
        "/api/v1/mode/transition": {"post": {**transition,
                                             "operationId": "change_mode_transition",
                                             "summary": "Alias of POST /api/v1/mode "
                                             "(goartstore path)"}},
        "/api/v1/mode/history": {"get": op("Mode changes, newest first", {
            "200": ok("ModeHistory"), **errors(400, 401, 403, 503)}, tags=["mode"],
            op_id="mode_history", description="Role admin only.", params=[_param(
                "limit", "query", {"type": "integer", "minimum": 1},
                "At most this many entries (default 100; clamped to 1000)")])},
        "/api/v1/gc/{file_id}": {"delete": op("Garbage-collect a file (service accounts)", {
            "200": ok("GcDeleteResult"), **errors(400, 401, 403, 422, 503)},
            tags=["gc"], params=[FILE_ID], body={"required": False, "content": {
                "application/json": {"schema": _nullable(_ref("GcDeleteRequest"))}}},
            op_id="gc_delete", description="Any mode; idempotent: already_deleted when the "
            "file is gone. A service account with role readonly gets 403.")},
        "/api/v1/gc/{file_id}/exists": {"get": op("Whether a file exists (service accounts)", {
            "200": ok("GcExists"), **errors(401, 403, 422, 503)},
            tags=["gc"], params=[FILE_ID], op_id="gc_exists")},
        "/api/v1/cache/rebuild": {"post": op("Full cache rebuild from attr files", {
            "200": ok("CacheResult"), **errors(401, 403, 409, 503)}, tags=["cache"],
            op_id="cache_rebuild")},
        "/api/v1/cache/rebuild/incremental": {"post": op(
            "Add cache rows for attr files not in the cache", {
                "200": ok("CacheResult"), **errors(401, 403, 409, 503)}, tags=["cache"],
            op_id="cache_rebuild_incremental")},
        "/api/v1/cache/consistency": {"get": op("Compare the cache with the attr files", {
            "200": ok("CacheConsistency"), **errors(401, 403, 409, 503)}, tags=["cache"],
            op_id="cache_consistency", description="A dry run. Files that an operation "
            "touched while the scan ran (pending, or completed after the scan started on "
            "the database clock) are left out; damage done before the scan is reported.")},
        "/api/v1/cache/cleanup-expired": {"post": op("Drop expired cache rows", {
            "200": ok("CacheResult"), **errors(401, 403, 409, 503)}, tags=["cache"],
            op_id="cache_cleanup_expired")},
    }


def _service_paths() -> dict[str, Any]:
    text = {"type": "string"}
    metrics = op("Prometheus metrics", {"200": ok(text, media="text/plain")},
                 tags=["service"], security=PUBLIC, op_id="metrics")
    return {
        "/": {"get": op("Service summary", {"200": ok("Root")}, tags=["service"],
                        security=PUBLIC, op_id="root")},
        "/health/live": {"get": op("Liveness (the process answers)", {"200": ok("Live")},
                                   tags=["service"], security=PUBLIC, op_id="health_live")},
        "/health/ready": {"get": op(
            "Readiness: database, storage, migrations, recovery, not shutting down", {
                "200": ok("Ready"), "503": ok("Ready", "Not ready (with reasons)")},
            tags=["service"], security=PUBLIC, op_id="health_ready")},
        "/health/startup": {"get": op("Startup finished (recovery done)", {
            "200": ok("Startup"), "503": ok("Startup", "Still starting")},
            tags=["service"], security=PUBLIC, op_id="health_startup")},
        "/metrics": {"get": metrics},
        "/metrics/": {"get": {**metrics, "operationId": "metrics_slash"}},
        "/api/v1/openapi.json": {"get": op("This document", {"200": ok({"type": "object"})},
                                           tags=["service"], security=PUBLIC,
                                           op_id="openapi")},
    }


TUS_HEADERS = {
    "Tus-Resumable": _param("Tus-Resumable", "header", {"const": "1.0.0"},
                            "The tus protocol version (412 otherwise)", required=True),
    "Upload-Offset": _param("Upload-Offset", "header", {**STR, "pattern": "^[0-9]{1,18}$"},
                            "Where this body goes: the upload's current offset (409 "
                            "otherwise)", required=True),
    "Upload-Length": _param("Upload-Length", "header", {**STR, "pattern": "^[0-9]{1,18}$"},
                            "The size of the whole upload"),
    "Upload-Defer-Length": _param("Upload-Defer-Length", "header", {"const": "1"},
                                  "The size is sent later, with a PATCH"),
    "Upload-Metadata": _param(
        "Upload-Metadata", "header", STR,
        "Comma-separated `key base64value` pairs: filename (or name), filetype (or "
        "content_type, type), description, version, metadata (a JSON object), file_id "
        "(409 if taken); other keys are kept for HEAD only"),
    "Upload-Checksum": _param("Upload-Checksum", "header", {**STR, "pattern": (
        "^(sha1 [A-Za-z0-9+/]{27}=|sha256 [A-Za-z0-9+/]{43}=|md5 [A-Za-z0-9+/]{22}==)$")},
                              "`sha1|sha256|md5 <base64 digest>` of this body (460 on a "
                              "mismatch)"),
}
TUS_RESPONSE = {name: {"schema": STR} for name in ("Tus-Resumable", "Upload-Offset",
                                                    "Upload-Expires")}
OCTETS = {"application/offset+octet-stream": {"schema": {
    "type": "string", "contentMediaType": "application/octet-stream"}}}


def _tus_paths() -> dict[str, Any]:
    item = [_param("file_id", "path", UUID, "The upload's id: the id the file will have")]
    tus = ["uploads"]
    return {
        "/api/v1/uploads": {
            "options": op("tus discovery", {"204": {
                "description": "Versions, extensions and limits", "headers": _headers({
                    name: {"schema": STR} for name in (
                        "Tus-Resumable", "Tus-Version", "Tus-Extension", "Tus-Max-Size",
                        "Tus-Checksum-Algorithm")})}},
                tags=tus, security=PUBLIC, op_id="tus_options"),
            "post": op("Create a resumable upload (tus creation)", {
                "201": {"description": "Created; with a body (creation-with-upload) its bytes "
                        "are stored", "headers": _headers({
                            "Location": {"schema": STR, "required": True},
                            **TUS_RESPONSE})},
                **errors(400, 401, 403, 409, 412, 413, 460, 503, 507)},
                tags=tus, op_id="tus_create", params=[
                    TUS_HEADERS[n] for n in ("Tus-Resumable", "Upload-Length",
                                             "Upload-Defer-Length", "Upload-Metadata",
                                             "Upload-Checksum")],
                body={"required": False, "content": OCTETS},
                description="Allowed in edit and rw modes. The declared length is reserved "
                "now (507 when it cannot fit, or when the caller's unfinished uploads would "
                "hold more than UPLOAD_MAX_PENDING_BYTES; 413 only over "
                "STORAGE_MAX_FILE_SIZE). Location is /api/v1/uploads/{file_id}, the id the "
                "finished file gets, under PUBLIC_BASE_URL, else the request's scheme and "
                "Host (a proxy's Forwarded or X-Forwarded-Proto/-Host only with "
                "TRUST_FORWARDED_HEADERS); a Host that cannot form a URL is 400, before "
                "anything is created. A file_id chosen in Upload-Metadata is held by the "
                "upload until it ends: any other upload of that id gets 409."),
        },
        "/api/v1/uploads/{file_id}": {
            "head": op("Offset of a resumable upload", {
                "200": {"description": "The upload", "headers": _headers({
                    **TUS_RESPONSE, "Upload-Length": {"schema": STR},
                    "Upload-Defer-Length": {"schema": STR},
                    "Upload-Metadata": {"schema": STR}, "Cache-Control": {"schema": STR}})},
                **errors(401, 403, 404, 412, 503)},
                tags=tus, op_id="tus_head", params=item + [TUS_HEADERS["Tus-Resumable"]],
                description="Only the creator (token sub) or an admin; anyone else gets "
                "404, as for an unknown upload. A full upload is made a file here when the "
                "mode allows uploads; in other modes HEAD only reports its offset."),
            "patch": op("Append to a resumable upload", {
                "204": {"description": "Stored durably; the new offset", "headers": _headers(
                    TUS_RESPONSE)},
                **errors(400, 401, 403, 404, 408, 409, 412, 413, 415, 423, 460, 503, 507)},
                tags=tus, op_id="tus_patch", params=item + [
                    TUS_HEADERS[n] for n in ("Tus-Resumable", "Upload-Offset",
                                             "Upload-Length", "Upload-Checksum")],
                body={"required": True, "content": OCTETS},
                description="Acknowledged only once the bytes are durable. The last byte "
                "makes the upload an ordinary file (same id). Upload-Length only for a "
                "deferred length. A body at the end of a complete upload is 413. A body cut "
                "short keeps every byte that arrived (unless Upload-Checksum was sent)."),
            "delete": op("Terminate a resumable upload", {
                "204": {"description": "Terminated: staged bytes and reservation gone (a "
                        "finished upload's file stays)", "headers": _headers(
                            {"Tus-Resumable": {"schema": STR}})},
                **errors(401, 403, 404, 412, 423, 503)},
                tags=tus, op_id="tus_delete", params=item + [TUS_HEADERS["Tus-Resumable"]]),
            "post": op("HEAD, PATCH or DELETE for clients that cannot send them", {
                "200": {"description": "As HEAD", "headers": _headers(TUS_RESPONSE)},
                "204": {"description": "As PATCH or DELETE", "headers": _headers(
                    TUS_RESPONSE)},
                **errors(400, 401, 403, 404, 405, 408, 409, 412, 413, 415, 423, 460, 503,
                         507)},
                tags=tus, op_id="tus_override", params=item + [
                    TUS_HEADERS["Tus-Resumable"],
                    _param("X-HTTP-Method-Override", "header", {"enum": ["HEAD", "PATCH",
                                                                          "DELETE"]},
                           required=True)],
                body={"required": False, "content": OCTETS}),
        },
    }


def build(version: str = "1.0.0") -> dict[str, Any]:
    """The whole document for an element reporting ``version``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Storage element",
            "version": version,
            "description": "Drop-in replacement for artStore's storage element: files on "
            "local disk or S3, metadata in PostgreSQL. Every response carries X-Request-ID; "
            "every error is application/problem+json with a string detail, including the "
            "HTTP framing errors answered before any route is matched (so on any path): 414 "
            "for a request target over 16 KiB, 431 for a header line over 24 KiB or more "
            "than 128 headers, 400 for malformed framing (a bad request line or chunk size, "
            "Content-Length with Transfer-Encoding); these carry a fresh X-Request-ID and "
            "no CORS headers, as the request's headers were never read.",
        },
        "tags": [{"name": n} for n in ("files", "uploads", "ops", "mode", "gc", "cache",
                                       "service")],
        "paths": {**_service_paths(), **_ops_paths(), **_files_paths(), **_tus_paths()},
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "responses": {f"E{code}": _error_component(code) for code in STATUS_TEXT},
            "headers": {"RequestId": RID_HEADER},
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "RS256 JWT issued by artStore's admin module"}},
        },
    }


@functools.cache
def _document(version: str) -> bytes:
    return json.dumps(build(version), ensure_ascii=False).encode("utf-8")


@gate(Access.PUBLIC)
async def serve(request: web.Request) -> web.Response:
    body = _document(request.app[config_key].app_version)
    return web.Response(body=body, content_type="application/json")


def render_file() -> str:
    """The committed ``storage/web/openapi.json`` text (default version)."""
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":  # python -m storage.web.openapi  (rewrites storage/web/openapi.json)
    JSON_PATH.write_text(render_file(), encoding="utf-8")
    print(f"wrote {JSON_PATH}", file=sys.stderr)
