"""``/api/v1/files``: upload (multipart and raw PUT), metadata, PATCH, DELETE, list."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_urldispatcher import _default_expect_handler

from ...auth.access import Access, gate, identity
from ...auth.bearer import check_request_auth
from ...domain import files, modes, reservations, search, uploads, validate
from ...domain.element import Element, element
from ...domain.search_query import is_search
from ...domain.uploads import UploadSpec
from ...errors import BadRequest, StorageError, render
from .. import digests
from .search import search_files

MAX_FIELDS = 64
MAX_FIELD_BYTES = 64 * 1024
MIN_PROGRESS = 64 * 1024  # bytes an upload must deliver per UPLOAD_READ_TIMEOUT window
MAX_LIST = 100
MAX_SKIP = 2**63 - 1  # PostgreSQL's OFFSET is a bigint


class RequestTimeout(StorageError):
    status, code = 408, "request_timeout"


def require_mode(el: Element, action: str) -> None:
    """The artStore mode matrix against this process's view of the mode (the change is
    checked again where it commits, see :func:`storage.modes.require`)."""
    modes.require(action, el.runtime.mode)


def _declared(request: web.Request) -> int | None:
    return request.content_length if "chunked" not in request.headers.get(
        hdrs.TRANSFER_ENCODING, "").lower() else None


def _file_size_hint(request: web.Request) -> int | None:
    """The announced file size: the body length, less the envelope for multipart."""
    size = _declared(request)
    # the raw header: request.content_type parses it with the email package (~5 % of a
    # small upload's CPU in py-spy), and a prefix is all this needs
    ctype = request.headers.get(hdrs.CONTENT_TYPE, "")
    if size is not None and ctype.lstrip()[:10].lower() == "multipart/":
        return reservations.file_size_bound(size)
    return size


def _precheck_upload(request: web.Request) -> None:
    """Checks that need no body: mode and announced size (auth ran already)."""
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
    return await _default_expect_handler(request)


class Pace:
    """The read deadlines of one request body (issue 11, issue 19).

    At least :data:`MIN_PROGRESS` bytes, or the end of the body, must arrive in every
    window of ``timeout`` seconds, else 408.  A per-read idle timeout alone never fires
    on a body trickled a byte at a time (slowloris on the body), which would hold its
    capacity reservation and temp file for as long as the client likes.  And once the
    first window has passed, the body so far must have come at ``min_rate`` bytes per
    second on average (0: no floor), else 408: 64 KiB per window alone lets a client
    that declared the whole free capacity hold it for days at ~1 KiB/s.  Only time
    spent waiting for the client counts: both pause while the server writes.
    """

    def __init__(self, timeout: float, min_rate: int = 0) -> None:
        self.timeout = timeout
        self.min_rate = min_rate
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + timeout
        self.window = 0
        self.received = 0
        self.waited = 0.0  # seconds spent waiting for the client
        self.returned_at: float | None = None

    def _rate_due(self) -> float:
        """Waiting time at which the average falls below ``min_rate`` (inf: never)."""
        if self.min_rate <= 0:
            return math.inf
        return max(self.timeout, self.received / self.min_rate)

    async def wait(self, awaitable):
        """Await one body read under the window's deadline and the rate floor."""
        now = self.loop.time()
        if self.returned_at is not None:
            self.deadline += now - self.returned_at
        rate_deadline = now + self._rate_due() - self.waited
        try:  # a deadline already past still lets a read of buffered bytes through
            async with asyncio.timeout_at(min(self.deadline, rate_deadline)):
                return await awaitable
        except TimeoutError:
            pass  # raised below, once the wait is accounted for
        finally:
            self.returned_at = self.loop.time()
            self.waited += self.returned_at - now
        raise self._too_slow(rate=self.returned_at >= rate_deadline)

    def _too_slow(self, *, rate: bool) -> RequestTimeout:
        if rate:
            why = (f"{self.received} bytes in {self.waited:.1f} seconds, less than the "
                   f"{self.min_rate} bytes per second required on average")
        else:
            why = f"less than {MIN_PROGRESS // 1024} KiB received in {self.timeout:g} seconds"
        return RequestTimeout(f"The upload is too slow: {why}", headers={"Connection": "close"})

    def count(self, n: int) -> None:
        self.received += n
        self.window += n
        if self.window >= MIN_PROGRESS:
            self.window = 0
            self.deadline = self.loop.time() + self.timeout

    async def read(self, read, n: int) -> bytes:
        chunk = await self.wait(read(n))
        self.count(len(chunk))
        return chunk

    @classmethod
    def of(cls, el: Element) -> Pace:
        return cls(el.config.upload_read_timeout, el.config.upload_min_rate)


async def _body_chunks(request: web.Request, size: int, pace: Pace) -> AsyncIterator[bytes]:
    """The raw body in pieces of ``size`` bytes (fewer executor hops than readany)."""
    content = request.content
    pieces: list[bytes] = []
    have = 0
    while True:
        # readany() hands over what arrived as it is; read(n) re-slices the buffer
        # to n bytes and measured at half the throughput (64 MiB: 0.33 s vs 0.17 s).
        piece = await pace.wait(content.readany())
        pace.count(len(piece))
        if piece:
            pieces.append(piece)
            have += len(piece)
        if have >= size or (not piece and have):
            yield pieces[0] if len(pieces) == 1 else b"".join(pieces)  # one copy at most
            pieces, have = [], 0
        if not piece:
            return


async def _field_text(part: BodyPartReader, pace: Pace) -> str:
    data = bytearray()
    while chunk := await pace.read(part.read_chunk, 16384):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise BadRequest(f"form field {part.name!r} is larger than {MAX_FIELD_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"form field {part.name!r} is not valid UTF-8") from None


def _apply_field(spec: UploadSpec, name: str, value: str, *, after_file: bool) -> None:
    if name == "description":
        spec.description = validate.text(value, "description", max_len=4096)
    elif name == "version":
        spec.version = validate.text(value, "version", max_len=50) or None
    elif name == "metadata":
        parsed = validate.strict_json(value, "metadata") if value.strip() else None
        spec.metadata = validate.metadata_object(parsed)
    elif name == "file_id":
        if after_file:
            raise BadRequest("file_id must be sent before the file part")
        if value.strip():
            try:
                spec.file_id = uuid.UUID(value.strip())
            except ValueError:
                raise BadRequest(f"Invalid file_id format: {value[:100]}") from None


def _reason(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return text.strip().splitlines()[0][:200]


class MultipartUpload:
    """Walks a multipart body: fields before the file, the file streamed, fields after."""

    def __init__(self, reader: MultipartReader, el: Element) -> None:
        self.reader = reader
        self.el = el
        self.count = 0
        self.pace = Pace.of(el)

    async def next_part(self) -> BodyPartReader | None:
        try:
            part = await self.pace.wait(self.reader.next())
        except (HttpProcessingError, ValueError, AssertionError) as exc:
            raise BadRequest(f"malformed multipart body: {_reason(exc)}") from None
        if part is None:
            return None
        self.count += 1
        if self.count > MAX_FIELDS:
            raise BadRequest(f"too many form parts (limit {MAX_FIELDS})")
        if isinstance(part, MultipartReader):
            raise BadRequest("nested multipart bodies are not supported")
        return part

    async def until_file(self, spec: UploadSpec) -> BodyPartReader:
        while (part := await self.next_part()) is not None:
            if part.name == "file":
                return part
            _apply_field(spec, part.name or "", await _field_text(part, self.pace),
                         after_file=False)
        raise validate.invalid("file", "Field required", where="body")

    async def file_then_rest(self, part: BodyPartReader, spec: UploadSpec) -> AsyncIterator[bytes]:
        size = self.el.config.upload_chunk_size
        try:
            while chunk := await self.pace.read(part.read_chunk, size):
                yield chunk
        except (HttpProcessingError, ValueError, AssertionError) as exc:
            raise BadRequest(f"malformed multipart body: {_reason(exc)}") from None
        while (part := await self.next_part()) is not None:
            if part.name == "file":
                raise BadRequest("more than one file part in the upload")
            _apply_field(spec, part.name or "", await _field_text(part, self.pace),
                         after_file=True)


@gate(Access.WRITE)
async def upload(request: web.Request) -> web.Response:
    el = element(request)
    _precheck_upload(request)
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError) as exc:
        raise BadRequest(f"expected a multipart/form-data body: {exc}") from None
    walker = MultipartUpload(reader, el)
    spec = UploadSpec(original_filename="file", size_bound=_declared(request),
                      digests=_digests(request))
    part = await walker.until_file(spec)
    if part.filename is None:  # curl -F file=report.pdf: the text "report.pdf", not a file
        raise BadRequest(
            "The form part 'file' has no filename in its Content-Disposition, so it is a "
            "text field, not a file; nothing was stored. Send the file as a file part, e.g. "
            "curl -F file=@path (the @ makes curl read and attach the file)")
    spec.original_filename = validate.filename(part.filename) or "file"
    spec.content_type = validate.content_type(part.headers.get(hdrs.CONTENT_TYPE))
    meta = await uploads.store(el, spec, identity(request), walker.file_then_rest(part, spec))
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
    query = request.query
    spec = UploadSpec(
        original_filename=_raw_filename(request, file_id),
        content_type=validate.content_type(request.headers.get(hdrs.CONTENT_TYPE)),
        file_id=file_id, declared_size=_declared(request), digests=_digests(request),
    )
    for name in ("description", "version", "metadata"):
        if name in query:
            _apply_field(spec, name, query[name], after_file=False)
    chunks = _body_chunks(request, el.config.upload_chunk_size, Pace.of(el))
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
