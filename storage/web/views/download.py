"""``GET``/``HEAD /api/v1/files/{id}/download``: conditional, ranged, streamed.

The data object is opened *before* any header is sent, so a missing file is a
404 JSON, never a truncated 200.  Local files go out with ``sendfile`` where the
event loop supports it; objects without a local path (S3) are streamed with
``iter_range``, and their first read starts before the headers too, so an object
deleted between ``open`` and the GET is still a clean 404.  A failure once the
headers are out aborts the connection: the client sees a short body, never an
error document appended to a 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import replace

from aiohttp import hdrs, web

from ...auth.access import Access, gate
from ...backends.base import ObjectMissing, Reader, SizeMismatch
from ...domain import files, validate
from ...domain.element import element
from ...errors import NotFound, PreconditionFailed, RangeNotSatisfiable, StorageError
from ...models import Served
from .. import httputil
from .. import ranges as byte_ranges

log = logging.getLogger(__name__)
CHUNK = 256 * 1024
MAX_RANGES = 16


class DamagedFile(StorageError):
    status, code = 500, "damaged_file"


def _headers(meta: Served) -> dict[str, str]:
    return {
        hdrs.ETAG: httputil.etag_for(meta.checksum),
        hdrs.LAST_MODIFIED: httputil.http_date(meta.created_at),
        hdrs.ACCEPT_RANGES: "bytes",
        hdrs.CONTENT_DISPOSITION: httputil.content_disposition(meta.original_filename),
        hdrs.CACHE_CONTROL: "private, no-transform",
        # the stored content type is the uploader's word: a browser must not sniff past it
        hdrs.X_CONTENT_TYPE_OPTIONS: "nosniff",
        "Repr-Digest": f"sha-256=:{_b64(meta.checksum)}:",
    }


def _b64(hex_digest: str) -> str:
    import base64

    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


def _not_modified(request: web.Request, meta: Served, headers: dict[str, str]) -> bool:
    etag = headers[hdrs.ETAG]
    if httputil.if_match(request.headers.get(hdrs.IF_MATCH), etag) is False:
        raise PreconditionFailed("If-Match does not match the stored file")
    inm = request.headers.get(hdrs.IF_NONE_MATCH)
    if inm is not None:
        return httputil.if_none_match(inm, etag)
    return httputil.if_modified_since(request.headers.get(hdrs.IF_MODIFIED_SINCE),
                                      meta.created_at)


def _ranges(request: web.Request, meta: Served, etag: str) -> list[tuple[int, int]] | None:
    header = request.headers.get(hdrs.RANGE)
    if header is None or not httputil.if_range_allows(
            request.headers.get(hdrs.IF_RANGE), etag, meta.created_at):
        return None
    try:
        return byte_ranges.parse_range(header, meta.file_size, max_ranges=MAX_RANGES)
    except byte_ranges.RangeNotSatisfiable as exc:
        raise RangeNotSatisfiable(
            f"Range {header[:100]!r} is not satisfiable for a file of {meta.file_size} bytes",
            headers={hdrs.CONTENT_RANGE: exc.content_range},
        ) from None


class _Gone(Exception):
    """The data object is missing; raised before any header is sent."""


class _Stalled(ConnectionError):
    """The client took no bytes for ``DOWNLOAD_WRITE_TIMEOUT`` seconds."""


async def _write(resp: web.StreamResponse, chunk: bytes, deadline: float) -> None:
    """One chunk to the client, who must take it within ``deadline`` seconds: a reader
    that stops reading would otherwise hold the object's stream (an S3 connection of a
    bounded pool) for as long as it keeps the socket open."""
    try:
        async with asyncio.timeout(deadline):
            await resp.write(chunk)
    except TimeoutError:
        raise _Stalled(f"the client took no bytes for {deadline:g} s") from None


@gate(Access.READ)
async def download(request: web.Request) -> web.StreamResponse:
    el = element(request)
    file_id = validate.file_id(request.match_info["file_id"])
    served = await files.served(el, file_id, headers=_headers)
    try:
        try:
            return await _download(request, el, served)
        except (_Gone, RangeNotSatisfiable, PreconditionFailed):
            # A cached entry decides nothing alone: a 416 or 412 judged on its size or
            # ETag may be about a file deleted (or uploaded anew) in another process, as
            # a missing object is: ask the database
            if not served.cached:
                raise
            el.served.forget(file_id)
            served = await files.served(el, file_id, headers=_headers, fresh=True)
            return await _download(request, el, served)
    except _Gone:
        raise NotFound(f"File {file_id} not found: its stored data is missing") from None


async def _download(request: web.Request, el, served: Served) -> web.StreamResponse:
    """The response for ``served``.  :raises _Gone: the data object is missing (only
    before a header was sent)."""
    headers = dict(served.headers)
    if _not_modified(request, served, headers):
        if served.cached:  # the row was not read: make sure the data is still that file's
            await (await _open(el, served, None)).close()
        return web.Response(status=304, headers=headers)
    ranges = _ranges(request, served, headers[hdrs.ETAG])
    # A body is read before any header goes out (_prime), so its first read may check
    # existence and size: S3 then answers with one GET instead of HEAD + GET.
    expect = served.file_size if request.method != hdrs.METH_HEAD else None
    reader = await _open(el, served, expect)
    try:
        if reader.info.size != served.file_size:
            raise _damaged(served)
        return await _send(request, served, reader, headers, ranges,
                           el.config.download_write_timeout)
    finally:
        if not served.cached and reader.info.version is not None:
            el.served.put(replace(served, cached=True, version=reader.info.version))
        await reader.close()


async def _open(el, served: Served, expect: int | None) -> Reader:
    """Open the data object; a cached entry only opens the object it was made from (the
    id may have been deleted and uploaded anew at the same path by another process)."""
    try:
        return await el.backend.open(served.relative_path, expect_size=expect,
                                     expect_version=served.version if served.cached else None)
    except ObjectMissing:
        raise _Gone from None


async def _send(request, meta, reader, headers, ranges, deadline: float
                ) -> web.StreamResponse:
    content_type = meta.content_type or "application/octet-stream"
    if ranges is None:
        resp = _response(200, headers, content_type, meta.file_size)
        parts = [(b"", 0, meta.file_size - 1)] if meta.file_size else []
        trailer = b""
    elif len(ranges) == 1:
        start, end = ranges[0]
        headers[hdrs.CONTENT_RANGE] = byte_ranges.content_range(start, end, meta.file_size)
        resp = _response(206, headers, content_type, end - start + 1)
        parts, trailer = [(b"", start, end)], b""
    else:
        plan = byte_ranges.multipart_byteranges(ranges, meta.file_size, content_type)
        resp = _response(206, headers, plan.content_type, plan.content_length)
        parts, trailer = plan.parts, plan.trailer
    if request.method == hdrs.METH_HEAD:
        await resp.prepare(request)
        return resp
    first = await _prime(meta, reader, parts[0]) if parts else None
    try:
        await resp.prepare(request)
        for i, (head, start, end) in enumerate(parts):
            if head:
                await _write(resp, head, deadline)
            if i == 0 and first is not None:
                chunk, stream = first
                await _write(resp, chunk, deadline)
                async for chunk in stream:
                    await _write(resp, chunk, deadline)
            else:
                await _copy(request, resp, reader, start, end, deadline)
        if trailer:
            await _write(resp, trailer, deadline)
        await resp.write_eof()
    except Exception as exc:  # noqa: BLE001 - the status line is out: cut the connection
        _abort(request, meta, exc)
    finally:
        if first is not None:
            await first[1].aclose()
    return resp


def _damaged(meta: Served) -> DamagedFile:
    return DamagedFile(f"Stored data of {meta.file_id} is damaged (size differs); "
                       "an operator has been told")


async def _prime(meta: Served, reader: Reader, part: tuple[bytes, int, int]
                 ) -> tuple[bytes, AsyncGenerator[bytes, None]] | None:
    """For an object without a local file (S3): the first chunk of the first part and the
    rest of its stream, read before any header so a vanished object is a clean 404.
    None for local files (an open file stays readable)."""
    if reader.info.path is not None:
        return None
    _head, start, end = part
    stream = reader.iter_range(start, end, CHUNK)
    try:
        return await anext(stream), stream
    except ObjectMissing:
        await stream.aclose()
        raise _Gone from None
    except SizeMismatch:
        await stream.aclose()
        raise _damaged(meta) from None
    except BaseException:
        await stream.aclose()
        raise


def _abort(request: web.Request, meta: Served, exc: Exception) -> None:
    """Close the connection mid-body; a second response would corrupt the stream."""
    if isinstance(exc, _Stalled):
        log.info("download of %s cut: %s", meta.file_id, exc)
    elif isinstance(exc, ConnectionError):
        log.debug("client of %s went away: %r", meta.file_id, exc)
    else:
        detail = getattr(exc, "detail", None) or repr(exc)
        log.warning("download of %s failed after the headers were sent: %s",
                    meta.file_id, detail)
    if request.transport is not None:
        request.transport.abort()


def _response(status: int, headers: dict[str, str], content_type: str,
              length: int) -> web.StreamResponse:
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_type = content_type
    resp.content_length = length
    return resp


async def _copy(request: web.Request, resp: web.StreamResponse, reader: Reader,
                start: int, end: int, deadline: float) -> None:
    """Bytes ``start..end`` of the object to the client; sendfile when possible."""
    if reader.info.path is not None and getattr(reader, "fobj", None) is not None:
        transport = request.transport
        if transport is not None:
            with contextlib.suppress(NotImplementedError):
                await asyncio.get_running_loop().sendfile(
                    transport, reader.fobj, start, end - start + 1)
                return
    async for chunk in reader.iter_range(start, end, CHUNK):
        await _write(resp, chunk, deadline)
