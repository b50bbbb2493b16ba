"""``/api/v1/uploads``: resumable uploads over tus 1.0.0 (the domain: storage/domain/resumable.py).

``OPTIONS`` (discovery, no token), ``POST`` (creation, creation-with-upload,
creation-defer-length), ``HEAD`` (offset), ``PATCH`` (append; checksum), ``DELETE``
(termination), and ``POST …/{id}`` with ``X-HTTP-Method-Override``.  The same roles and
modes as ``POST /api/v1/files/upload``; an upload belongs to its creator (token ``sub``)
and admins.  Every response under ``/api/v1/uploads`` carries ``Tus-Resumable: 1.0.0``,
errors and ``Expect`` refusals included (:func:`install`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_urldispatcher import _default_expect_handler

from ...auth.access import Access, gate, identity
from ...auth.bearer import check_request_auth
from ...domain import resumable
from ...domain.element import element
from ...domain.resumable import Hashes
from ...errors import (
    BadRequest,
    ClientGone,
    NotFound,
    StorageError,
    UnsupportedMediaType,
    render,
)
from ...observability.metrics import metrics_key
from .. import bodies, origin, tusproto
from ..tusproto import CHECKSUMS, EXTENSIONS, OFFSET_OCTETS, TUS_VERSION
from .files import require_mode

ROOT = "/api/v1/uploads"
hashes_key = web.AppKey("resumable_hashes", Hashes)


def _file_id(request: web.Request) -> uuid.UUID:
    raw = request.match_info["file_id"]
    try:
        return uuid.UUID(raw) if len(raw) <= 64 else uuid.UUID(int=0)
    except ValueError:
        raise NotFound(f"Upload {raw[:64]!r} not found") from None


def _is_chunk(request: web.Request) -> bool:
    ctype = request.headers.get(hdrs.CONTENT_TYPE, "")
    return ctype.split(";", 1)[0].strip().lower() == OFFSET_OCTETS


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body in pieces; a body that ends early is :class:`ClientGone` (its
    bytes so far are kept), one that comes too slowly a 408 (``Pace``)."""
    el = element(request)
    try:
        pace = bodies.Pace.of(el)
        async for chunk in bodies.body_chunks(request, el.config.upload_chunk_size, pace,
                                              partial=True):
            yield chunk
    except (ConnectionError, asyncio.IncompleteReadError, HttpProcessingError) as exc:
        reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise ClientGone(f"The upload body ended early: {reason.strip()[:200]}") from None


def _location(base: str, file_id: uuid.UUID) -> str:
    """Absolute (aiotus cannot resolve a relative ``Location``), from
    :func:`origin.base_url`, which is checked before the upload is created."""
    return f"{base}{ROOT}/{file_id}"


def _count(request: web.Request, progress: resumable.Progress) -> None:
    m = request.app[metrics_key]
    m.tus_bytes.inc(progress.received)
    if progress.completed:
        m.tus_completed.inc()
    if progress.rehashed:
        m.tus_rehashes.inc()


def _progress_headers(up) -> dict[str, str]:
    return {"Upload-Offset": str(up.upload_offset),
            "Upload-Expires": tusproto.http_date(up.expires_at)}


@gate(Access.PUBLIC)
async def options(request: web.Request) -> web.Response:
    """Discovery: version, extensions, limits (tus §OPTIONS; no Tus-Resumable needed)."""
    return web.Response(status=204, headers={
        "Tus-Version": TUS_VERSION, "Tus-Extension": ",".join(EXTENSIONS),
        "Tus-Max-Size": str(resumable.max_size(element(request))),
        "Tus-Checksum-Algorithm": ",".join(CHECKSUMS)})


@gate(Access.WRITE)
async def create(request: web.Request) -> web.Response:
    el = element(request)
    tusproto.check_version(request.headers)
    require_mode(el, "upload")
    req = resumable.Creation(tusproto.creation_length(request.headers),
                             tusproto.file_fields(request.headers.get("Upload-Metadata")))
    base = origin.base_url(request, el.config)  # 400 now, before anything is created
    chunk = _is_chunk(request)
    checksum = tusproto.upload_checksum(request.headers) if chunk else None
    progress = await resumable.create(
        el, request.app[hashes_key], req, identity(request), _body(request) if chunk else None,
        checksum=checksum, content_length=bodies.declared(request))
    request.app[metrics_key].tus_started.inc()
    _count(request, progress)
    up = progress.upload
    headers = {hdrs.LOCATION: _location(base, up.file_id),
               "Upload-Expires": tusproto.http_date(up.expires_at)}
    if chunk:
        headers["Upload-Offset"] = str(up.upload_offset)
    return web.Response(status=201, headers=headers)


@gate(Access.WRITE)
async def head(request: web.Request) -> web.Response:
    tusproto.check_version(request.headers)
    up = await resumable.status(element(request), request.app[hashes_key], _file_id(request),
                                identity(request))
    headers = {**_progress_headers(up), hdrs.CACHE_CONTROL: "no-store"}
    if up.upload_length is None:
        headers["Upload-Defer-Length"] = "1"
    else:
        headers["Upload-Length"] = str(up.upload_length)
    if up.metadata_header:
        headers["Upload-Metadata"] = up.metadata_header
    return web.Response(status=200, headers=headers)


@gate(Access.WRITE)
async def patch(request: web.Request) -> web.Response:
    el = element(request)
    tusproto.check_version(request.headers)
    require_mode(el, "upload")
    if not _is_chunk(request):
        raise UnsupportedMediaType(f"PATCH needs Content-Type: {OFFSET_OCTETS}")
    offset = tusproto.non_negative(request.headers, "Upload-Offset")
    if offset is None:
        raise BadRequest("Upload-Offset is required")
    req = resumable.Append(offset, tusproto.non_negative(request.headers, "Upload-Length"),
                           tusproto.upload_checksum(request.headers), bodies.declared(request))
    progress = await resumable.append(el, request.app[hashes_key], _file_id(request),
                                      identity(request), req, _body(request))
    _count(request, progress)
    return web.Response(status=204, headers=_progress_headers(progress.upload))


@gate(Access.WRITE)
async def terminate(request: web.Request) -> web.Response:
    tusproto.check_version(request.headers)
    await resumable.terminate(element(request), request.app[hashes_key], _file_id(request),
                              identity(request))
    request.app[metrics_key].tus_terminated.inc()
    return web.Response(status=204)


@gate(Access.WRITE)
async def override(request: web.Request) -> web.StreamResponse:
    """``POST`` with ``X-HTTP-Method-Override`` (tus core: for clients without PATCH)."""
    method = request.headers.get("X-HTTP-Method-Override", "").strip().upper()
    handler = {"PATCH": patch, "DELETE": terminate, "HEAD": head}.get(method)
    if handler is None:
        raise web.HTTPMethodNotAllowed("POST", ["HEAD", "PATCH", "DELETE"])
    return await handler(request)


async def expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: auth, version, mode and headers before any body byte."""
    refused = await check_request_auth(request)
    if refused is not None:
        return refused
    method = request.method
    if "file_id" in request.match_info:  # POST …/{id}: the method it stands for
        method = request.headers.get("X-HTTP-Method-Override", "").strip().upper() or method
    try:
        tusproto.check_version(request.headers)
        el = element(request)
        if method in (hdrs.METH_PATCH, hdrs.METH_POST):
            require_mode(el, "upload")
        if method == hdrs.METH_PATCH and not _is_chunk(request):
            raise UnsupportedMediaType(f"PATCH needs Content-Type: {OFFSET_OCTETS}")
        if method == hdrs.METH_POST and "file_id" not in request.match_info:
            resumable.check_length(el, tusproto.creation_length(request.headers))
            origin.base_url(request, el.config)
    except StorageError as exc:
        exc.headers.setdefault("Connection", "close")
        return render(exc)
    return await _default_expect_handler(request)


async def _tus_headers(request: web.Request, resp: web.StreamResponse) -> None:
    if request.path == ROOT or request.path.startswith(ROOT + "/"):
        resp.headers["Tus-Resumable"] = TUS_VERSION


def install(app: web.Application) -> None:
    """The running hashes of this process, and ``Tus-Resumable`` on every tus response."""
    app[hashes_key] = Hashes()
    app.on_response_prepare.append(_tus_headers)
