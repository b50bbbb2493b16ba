"""``GET /api/v1/files/search`` (and ``GET /api/v1/files`` with search parameters)."""

from __future__ import annotations

from aiohttp import web

from .. import search
from ..access import Access, gate
from ..element import element
from ..errors import BadRequest


@gate(Access.READ)
async def search_files(request: web.Request) -> web.Response:
    """Full text, filters, sorts and keyset pages; see :mod:`storage.search`."""
    if request.query.get("skip", "0") not in ("", "0"):
        raise BadRequest("skip cannot be combined with search parameters; "
                         "page with cursor=<next_cursor> instead")
    params = search.parse_params(request.query)
    result = await search.run(element(request).db, params)
    return web.json_response(result.to_response(with_rank=params.q is not None))
