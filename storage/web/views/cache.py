"""``/api/v1/cache/*`` (reference §7.4) and ``/api/v1/gc/*`` (§8.3): service accounts only,
in every mode; a GC delete also needs a role other than ``readonly``.  The work is in
:mod:`storage.domain.cache` and :func:`storage.domain.files.delete`."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from ...auth.access import Access, gate, identity
from ...domain import cache, files, validate
from ...domain.element import element
from ...errors import BadRequest, NotFound
from ...models import utcnow
from ...observability.metrics import metrics_key

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024


def _envelope(message: str, **body: Any) -> web.Response:
    return web.json_response({"status": "success", "message": message, **body})


@gate(Access.SERVICE)
async def rebuild(request: web.Request) -> web.Response:
    outcome = await cache.full_rebuild(element(request))
    return _envelope("Cache rebuild completed successfully", result=outcome.to_dict())


@gate(Access.SERVICE)
async def rebuild_incremental(request: web.Request) -> web.Response:
    outcome = await cache.incremental_rebuild(element(request))
    return _envelope("Incremental cache rebuild completed", result=outcome.to_dict())


@gate(Access.SERVICE)
async def consistency(request: web.Request) -> web.Response:
    report = await cache.consistency(element(request))
    result = "consistent" if report["is_consistent"] else "inconsistent"
    request.app[metrics_key].consistency_reports.labels(result).inc()
    return _envelope("Consistency check completed", report=report)


@gate(Access.SERVICE)
async def cleanup_expired(request: web.Request) -> web.Response:
    outcome = await cache.cleanup_expired(element(request))
    return _envelope("Expired cache cleanup completed", result=outcome.to_dict())


async def _optional_json(request: web.Request) -> dict[str, Any]:
    """The optional GC body: absent, empty or ``null`` mean defaults; else a JSON object."""
    too_large = BadRequest(f"request body too large (limit {MAX_BODY} bytes)")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise too_large
    try:
        raw = await request.read()  # a chunked body is capped by client_max_size (1 MiB)
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    if len(raw) > MAX_BODY:
        raise too_large
    if not raw.strip():
        return {}
    body = validate.strict_json(raw)
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


@gate(Access.SERVICE_DELETE)
async def gc_delete(request: web.Request) -> web.Response:
    """Delete in any mode; ``already_deleted`` only when no row exists (it is truthful:
    a missing data file does not stop the row from going)."""
    el = element(request)
    file_id = validate.file_id(request.match_info["file_id"])
    body = await _optional_json(request)
    reason = validate.text(body.get("reason"), "reason", max_len=500) or "gc_cleanup"
    cleanup_type = validate.text(body.get("cleanup_type"), "cleanup_type", max_len=100)
    who = identity(request)
    deleted = await files.delete(el, file_id, who, action=None)  # any mode
    status = "deleted" if deleted is not None else "already_deleted"
    log.info("gc %s: %s (reason %r, cleanup_type %r, by %s)", file_id, status, reason,
             cleanup_type, who.sub)
    return web.json_response({
        "status": status,
        "file_id": str(file_id),
        "deleted_at": utcnow().isoformat(),
        "deleted_by": who.sub,
        "reason": reason,
    })


@gate(Access.SERVICE)
async def gc_exists(request: web.Request) -> web.Response:
    file_id = validate.file_id(request.match_info["file_id"])
    try:
        await files.get(element(request), file_id)
        exists = True
    except NotFound:
        exists = False
    return web.json_response({"exists": exists, "file_id": str(file_id)})
