"""``/api/v1/files``: upload (multipart and raw PUT), metadata, PATCH, DELETE, list."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import _default_expect_handler

from ...auth.access import Access, gate, identity
from ...auth.bearer import check_request_auth
from ...domain import files, modes, reservations, search, uploads, validate
from ...domain.element import Element, element
from ...domain.search_query import is_search
from ...domain.uploads import UploadSpec
from ...errors import BadRequest, StorageError, render
from .. import bodies, digests
from .search import search_files

MAX_LIST = 100
MAX_SKIP = 2**63 - 1  # PostgreSQL's OFFSET is a bigint


def require_mode(el: Element, action: str) -> None:
    """The artStore mode matrix against this process's view of the mode (the change is
    checked again where it commits, see :func:`storage.domain.modes.require`)."""
    modes.require(action, el.runtime.mode)


def _file_size_hint(request: web.Request) -> int | None:
    """The announced file size: the body length, less the envelope for multipart."""
    size = bodies.declared(request)
    # the raw header: request.content_type parses it with the email package (~5 % of a
    # small upload's CPU in py-spy), and a prefix is all this needs
    ctype = request.headers.get(hdrs.CONTENT_TYPE, "")
    if size is not None and ctype.lstrip()[:10].lower() == "multipart/":
        return reservations.file_size_bound(size)
    return size


# Set by the ``Expect: 100-continue`` handler once it has run the prechecks, so that the
# upload handler, which runs next on the same request, does not run them again.
prechecked_key = web.RequestKey("prechecked", bool)


def _precheck_upload(request: web.Request) -> None:
    """Checks that need no body: mode and announced size (auth ran already)."""
    if request.get(prechecked_key):
        return
    el = element(request)
    require_mode(el, "upload")
    reservations.check_declared_size(el, _file_size_hint(request))


async def upload_expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: refuse before the client sends a single body byte."""
    refused = await check_request_auth(request)
    if refused is not None:
        refused.headers["Connection"] = "close"
        return refused
    try:
        _precheck_upload(request)
        await reservations.precheck_capacity(element(request), _file_size_hint(request))
    except StorageError as exc:
        exc.headers.setdefault("Connection", "close")
        return render(exc)
    request[prechecked_key] = True
    return await _default_expect_handler(request)


@gate(Access.WRITE)
async def upload(request: web.Request) -> web.Response:
    el = element(request)
    _precheck_upload(request)
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError) as exc:
        raise BadRequest(f"expected a multipart/form-data body: {exc}") from None
    walker = bodies.MultipartUpload(reader, el)
    fields, part = await walker.until_file()
    if part.filename is None:  # curl -F file=report.pdf: the text "report.pdf", not a file
        raise BadRequest(
            "The form part 'file' has no filename in its Content-Disposition, so it is a "
            "text field, not a file; nothing was stored. Send the file as a file part, e.g. "
            "curl -F file=@path (the @ makes curl read and attach the file)")
    spec = UploadSpec(
        original_filename=validate.filename(part.filename) or "file",
        content_type=validate.content_type(part.headers.get(hdrs.CONTENT_TYPE)),
        size_bound=bodies.declared(request), digests=_digests(request), **fields,
    )
    meta = await uploads.store(el, spec, identity(request), walker.file_then_rest(part),
                               trailing=walker.trailing)
    return _created(meta)


def _digests(request: web.Request) -> dict[str, bytes]:
    try:
        return digests.expected_digests(request.headers)
    except digests.BadDigest as exc:
        raise BadRequest(str(exc)) from None


def _created(meta) -> web.Response:
    return web.json_response({
        "file_id": str(meta.file_id),
        "original_filename": meta.original_filename,
        "storage_filename": meta.storage_filename,
        "file_size": meta.file_size,
        "checksum": meta.checksum,
        "message": "File uploaded successfully",
    }, status=201)


def _raw_filename(request: web.Request, file_id: uuid.UUID) -> str:
    name = request.query.get("filename")
    if not name and (cd := request.headers.get(hdrs.CONTENT_DISPOSITION)):
        _kind, params = _parse_disposition(cd)
        name = params.get("filename")
    return validate.filename(name) or str(file_id)


def _parse_disposition(value: str) -> tuple[str, dict[str, str]]:
    from aiohttp.multipart import content_disposition_filename, parse_content_disposition

    kind, params = parse_content_disposition(value)
    name = content_disposition_filename(params, "filename")
    return kind or "", {"filename": name} if name else {}


@gate(Access.WRITE)
async def put_raw(request: web.Request) -> web.Response:
    el = element(request)
    file_id = validate.file_id(request.match_info["file_id"])
    _precheck_upload(request)
    fields: dict[str, Any] = {}
    for name in ("description", "version", "metadata"):
        if name in request.query:
            fields |= bodies.parse_field(name, request.query[name], after_file=False)
    spec = UploadSpec(
        original_filename=_raw_filename(request, file_id),
        content_type=validate.content_type(request.headers.get(hdrs.CONTENT_TYPE)),
        file_id=file_id, declared_size=bodies.declared(request), digests=_digests(request),
        **fields,
    )
    chunks = bodies.body_chunks(request, el.config.upload_chunk_size, bodies.Pace.of(el))
    meta = await uploads.store(el, spec, identity(request), chunks)
    return _created(meta)


@gate(Access.READ)
async def get_metadata(request: web.Request) -> web.Response:
    file_id = validate.file_id(request.match_info["file_id"])
    meta = await files.get(element(request), file_id)
    return web.json_response(meta.to_response())


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > request.app._client_max_size:
        raise BadRequest("request body too large")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest("request body too large (limit 1 MiB)") from None
    body = validate.strict_json(raw or b"{}")
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


@gate(Access.WRITE)
async def patch(request: web.Request) -> web.Response:
    el = element(request)
    file_id = validate.file_id(request.match_info["file_id"])
    body = await _json_body(request)
    require_mode(el, "update")
    meta = await files.update(
        el, file_id, identity(request),
        description=validate.text(body.get("description"), "description", max_len=4096),
        version=validate.text(body.get("version"), "version", max_len=50),
        metadata=validate.metadata_object(body.get("metadata")),
    )
    return web.json_response(meta.to_response())


@gate(Access.DELETE)
async def delete(request: web.Request) -> web.Response:
    el = element(request)
    file_id = validate.file_id(request.match_info["file_id"])
    require_mode(el, "delete")
    if await files.delete(el, file_id, identity(request)) is None:
        raise files.NotFound(f"File not found: {file_id}")
    return web.Response(status=204, content_type="application/json")


@gate(Access.READ)
async def list_files(request: web.Request) -> web.Response:
    if is_search(request.query):  # the same parameters as /api/v1/files/search
        return await search_files(request)
    el = element(request)
    skip = validate.int_param(request.query.get("skip"), "skip", 0, hi=MAX_SKIP)
    limit = validate.int_param(request.query.get("limit"), "limit", MAX_LIST, lo=0,
                               hi=MAX_LIST, clamp=True)
    body = await search.legacy_page(el.db, limit, skip)  # JSON rendered by PostgreSQL
    return web.Response(text=body, content_type="application/json")
