"""Errors of aiohttp's HTTP parser as ``application/problem+json`` (issue 15).

What the parser refuses (a request line or header over the limits below, malformed
framing: a bad request line, ``Content-Length`` with ``Transfer-Encoding``, a bad
chunk size) is answered by aiohttp's ``RequestHandler.handle_error`` before any
application code runs, as a ``text/plain`` 400.  aiohttp 3.14 has no public hook for
that response (aio-libs/aiohttp#3287, open since 2018): the application, its
middlewares and its signals never see the request.  So the server is built with
:class:`ProblemRequestHandler`, which overrides ``handle_error`` (a method aiohttp
has called with the same signature since 3.0) to answer:

- 414 when the request target (URL) is over :data:`MAX_REQUEST_LINE` bytes;
- 431 when a header line is over :data:`MAX_HEADER_LINE` bytes or there are more than
  :data:`MAX_HEADERS`;
- 400 for any other framing error;
- 500/504 for an error that escaped the middlewares (none should),

all as problem+json with a string ``detail``, ``Connection: close`` and a fresh
``X-Request-ID`` (the request's own headers were never parsed, so a client's id and
its ``Origin`` are unknown: no CORS headers, no access-log line or metrics sample).

It is installed by :class:`Runner` (``python run.py``) and by the test fixtures, both
through ``AppRunner._make_server``; the raw-socket tests in tests/web/test_protocol.py
fail if an aiohttp upgrade stops calling it.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from ..errors import parser_reason, problem
from .middleware import REQUEST_ID_HEADER, new_request_id

log = logging.getLogger("storage.http")
# The two limits differ so that a LineTooLong (which carries only the limit it hit)
# says which one it was: the request target, or a header line (name and value).
MAX_REQUEST_LINE = 16 * 1024
MAX_HEADER_LINE = 24 * 1024  # an 8 KiB token (auth.py's cap) fits with room to spare
MAX_HEADERS = 128
HANDLER_ARGS = {"max_line_size": MAX_REQUEST_LINE, "max_field_size": MAX_HEADER_LINE,
                "max_headers": MAX_HEADERS}


def classify(exc: BaseException | None, status: int, *, max_line: int,
             max_field: int) -> tuple[int, str, str]:
    """(status, code, detail) for what ``handle_error`` was called with."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == max_line and max_line != max_field:
            return (414, "uri_too_long",
                    f"The request target (path and query) is longer than {max_line} bytes")
        return (431, "request_header_fields_too_large",
                f"A request header line (name and value) is longer than {max_field} bytes")
    if isinstance(exc, BadHttpMessage) and "too many headers" in exc.message.lower():
        return (431, "request_header_fields_too_large",
                f"Too many request headers (at most {MAX_HEADERS})")
    if isinstance(exc, HttpProcessingError):
        code = exc.code if 400 <= exc.code < 500 else 400
        return code, "malformed_request", f"Malformed request: {parser_reason(exc)}"
    if status == 504:
        return 504, "timeout", "The request handler timed out"
    return 500, "internal_error", "Internal server error"


def _response(status: int, code: str, detail: str, request_id: str) -> web.Response:
    resp = problem(status, detail, code=code,
                   headers={REQUEST_ID_HEADER: request_id, "Connection": "close"})
    resp.force_close()
    return resp


class ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors as problem+json."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            # aiohttp's logging (with the traceback) and its "response already sent" check
            super().handle_error(request, status, exc, message)
        elif request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response "
                                  "with the error message")
        status, code, detail = classify(exc, status, max_line=self.max_line_size,
                                        max_field=self.max_field_size)
        request_id = new_request_id()
        if isinstance(exc, HttpProcessingError):  # the client's mistake: one line, no traceback
            log.info("%d %s from %s [%s]", status, detail, request.remote, request_id)
        return _response(status, code, detail, request_id)


class ProblemServer(web.Server):
    """``web.Server`` whose connections are :class:`ProblemRequestHandler`\\ s."""

    def __call__(self) -> RequestHandler:
        return ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


def problem_server(server: web.Server) -> ProblemServer:
    """The same server (handler, request factory, handler arguments), as a ProblemServer."""
    return ProblemServer(server.request_handler, request_factory=server.request_factory,
                         handler_cancellation=server.handler_cancellation, **server._kwargs)


class Runner(web.AppRunner):
    """``web.AppRunner`` serving with :class:`ProblemServer`."""

    __slots__ = ()

    async def _make_server(self) -> web.Server:
        return problem_server(await super()._make_server())
