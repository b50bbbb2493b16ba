"""Reading an upload's request body: paced (a slow client gets 408, never holds its
reservation for long), in large pieces, and a multipart form walked part by part.
Used by the plain uploads (:mod:`.views.files`) and the resumable ones (:mod:`.views.tus`).
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from ..domain import validate
from ..domain.element import Element
from ..errors import BadRequest, StorageError

MAX_FIELDS = 64
MAX_FIELD_BYTES = 64 * 1024
MIN_PROGRESS = 64 * 1024  # bytes an upload must deliver per UPLOAD_READ_TIMEOUT window


class RequestTimeout(StorageError):
    status, code = 408, "request_timeout"


def declared(request: web.Request) -> int | None:
    return request.content_length if "chunked" not in request.headers.get(
        hdrs.TRANSFER_ENCODING, "").lower() else None


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


async def body_chunks(request: web.Request, size: int, pace: Pace, *,
                      partial: bool = False) -> AsyncIterator[bytes]:
    """The raw body in pieces of ``size`` bytes (fewer executor hops than readany).

    ``partial``: when the body breaks off (the client went away, or came too slowly),
    the bytes gathered for the unfinished piece are handed over before the error (a
    resumable upload keeps every byte that arrived), else they are dropped with it.
    """
    content = request.content
    pieces: list[bytes] = []
    have = 0
    while True:
        # readany() hands over what arrived as it is; read(n) re-slices the buffer
        # to n bytes and measured at half the throughput (64 MiB: 0.33 s vs 0.17 s).
        try:
            piece = await pace.wait(content.readany())
        except Exception:
            if partial and have:
                yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
            raise
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


def parse_field(name: str, value: str, *, after_file: bool) -> dict[str, Any]:
    """One form field (or raw-PUT query parameter) as ``UploadSpec`` keyword arguments;
    unknown names are ignored, as artStore does."""
    if name == "description":
        return {"description": validate.text(value, "description", max_len=4096)}
    if name == "version":
        return {"version": validate.text(value, "version", max_len=50) or None}
    if name == "metadata":
        parsed = validate.strict_json(value, "metadata") if value.strip() else None
        return {"metadata": validate.metadata_object(parsed)}
    if name == "file_id":
        if after_file:
            raise BadRequest("file_id must be sent before the file part")
        if value.strip():
            try:
                return {"file_id": uuid.UUID(value.strip())}
            except ValueError:
                raise BadRequest(f"Invalid file_id format: {value[:100]}") from None
    return {}


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
        self.trailing: dict[str, Any] = {}  # the fields after the file part

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

    async def until_file(self) -> tuple[dict[str, Any], BodyPartReader]:
        """The fields before the file part (as ``UploadSpec`` keywords), and that part."""
        fields: dict[str, Any] = {}
        while (part := await self.next_part()) is not None:
            if part.name == "file":
                return fields, part
            fields |= parse_field(part.name or "", await _field_text(part, self.pace),
                                  after_file=False)
        raise validate.invalid("file", "Field required", where="body")

    async def file_then_rest(self, part: BodyPartReader) -> AsyncIterator[bytes]:
        """The file's bytes; the fields after it land in :attr:`trailing` as the body
        ends, for :func:`storage.domain.uploads.store` to apply once it has read it all."""
        size = self.el.config.upload_chunk_size
        try:
            while chunk := await self.pace.read(part.read_chunk, size):
                yield chunk
        except (HttpProcessingError, ValueError, AssertionError) as exc:
            raise BadRequest(f"malformed multipart body: {_reason(exc)}") from None
        while (part := await self.next_part()) is not None:
            if part.name == "file":
                raise BadRequest("more than one file part in the upload")
            self.trailing |= parse_field(part.name or "", await _field_text(part, self.pace),
                                         after_file=True)
