"""``GET /api/v1/files/search`` (and ``GET /api/v1/files`` with any search parameter).

Parameters (all optional; unknown names are ignored, a repeated one is a 400):

- ``q``: full text over original filename, description, version and custom metadata
  values, websearch syntax (``"exact phrase"``, ``or``, ``-term``); at most 1000
  characters and 64 words and operators.  ``-_./\\`` inside words separate them, so
  ``report-2025.pdf`` is found by ``report``, ``2025`` or the whole name.
- ``content_type``: an exact media type, or ``type/*`` (``image/*``).
- ``created_by``: the uploader's username (``created_by_username``).
- ``min_size`` / ``max_size``: bytes, inclusive.
- ``created_after`` (inclusive) / ``created_before`` (exclusive): ISO 8601 with an offset.
- ``metadata.<key>=<value>``: the custom metadata's top-level ``key`` equals ``value``
  (as text, or as the number/boolean it spells, or as an element of an array);
  repeatable, all must hold.
- ``sort``: ``-created_at`` (the default, also with ``q``), ``created_at``, ``file_size``,
  ``-file_size``, ``original_filename``, ``-original_filename``, or ``rank`` (with ``q``:
  best match first; it ranks every match, so it costs more the more files match).
- ``limit``: 1..1000, default 100.  ``cursor``: the ``next_cursor`` of the previous page.

Response: ``{"files": [FileMetadataResponse (+ "search_rank" when q is given), …],
"next_cursor": str | null, "total": int, "total_is_estimate": bool}``.
"""

from __future__ import annotations

from aiohttp import web

from ...auth.access import Access, gate
from ...domain import search, search_query
from ...domain.element import element
from ...errors import BadRequest


@gate(Access.READ)
async def search_files(request: web.Request) -> web.Response:
    if request.query.get("skip", "0") not in ("", "0"):
        raise BadRequest("skip cannot be combined with search parameters; "
                         "page with cursor=<next_cursor> instead")
    params = search_query.parse_params(request.query)
    result = await search.run(element(request).db, params)
    return web.Response(text=result.body(), content_type="application/json")
