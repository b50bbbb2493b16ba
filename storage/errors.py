"""Domain exceptions that carry their HTTP status, and the one middleware that renders them.

Every error leaves as ``application/problem+json`` (RFC 9457) with ``type``,
``title``, ``status`` and a string ``detail`` (artStore clients read ``detail``);
validation errors add an ``errors`` list.  No traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"
# Statuses outside the IANA registry that the service answers with (tus 1.0.0).
EXTRA_TITLES = {460: "Checksum Mismatch"}


class StorageError(Exception):
    """Base for errors a client should see.  ``status``/``code`` are class defaults."""

    status = 500
    code = "internal_error"

    def __init__(
        self,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.errors = errors
        self.extra = dict(extra or {})


class BadRequest(StorageError):
    status, code = 400, "bad_request"


class Unauthorized(StorageError):
    status, code = 401, "unauthorized"


class Forbidden(StorageError):
    status, code = 403, "forbidden"


class NotFound(StorageError):
    status, code = 404, "not_found"


class Conflict(StorageError):
    status, code = 409, "conflict"


class PreconditionFailed(StorageError):
    status, code = 412, "precondition_failed"


class PayloadTooLarge(StorageError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(StorageError):
    status, code = 415, "unsupported_media_type"


class RangeNotSatisfiable(StorageError):
    status, code = 416, "range_not_satisfiable"


class ValidationFailed(StorageError):
    status, code = 422, "validation_error"


class Locked(StorageError):
    """Another request is working on the resource (a tus PATCH in progress)."""

    status, code = 423, "locked"


class ChecksumMismatch(StorageError):
    """tus checksum extension: the body does not match its ``Upload-Checksum``."""

    status, code = 460, "checksum_mismatch"


class InsufficientStorage(StorageError):
    status, code = 507, "insufficient_storage"


class Unavailable(StorageError):
    status, code = 503, "service_unavailable"


class ClientGone(StorageError):
    """The client closed the connection or sent less than it announced."""

    status, code = 400, "incomplete_body"


def invalid(
    field: str, message: str, value: Any = None, *, where: str = "body"
) -> ValidationFailed:
    """A 422 for one bad input, with an ``errors`` entry pointing at it."""
    entry = {"loc": [where, field], "msg": message, "type": "value_error"}
    if value is not None:
        entry["input"] = value if isinstance(value, str | int | float | bool) else str(value)
    return ValidationFailed(f"{field}: {message}", errors=[entry])


def problem(
    status: int,
    detail: str,
    *,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> web.Response:
    """Build the canonical error response."""
    known = status in HTTPStatus._value2member_map_
    title = HTTPStatus(status).phrase if known else EXTRA_TITLES.get(status, "Error")
    body: dict[str, Any] = {
        "type": f"urn:storage-element:error:{code or title.lower().replace(' ', '_')}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = errors
    if extra:
        body.update(extra)
    resp = web.Response(
        status=status,
        reason=None if known else title,
        text=json.dumps(body, ensure_ascii=False),
        content_type=PROBLEM_JSON,
        headers={k: v for k, v in (headers or {}).items() if k.lower() != "content-type"},
    )
    return resp


def render(exc: StorageError) -> web.Response:
    return problem(
        exc.status, exc.detail, code=exc.code, headers=exc.headers, errors=exc.errors,
        extra=exc.extra,
    )


_DB_DOWN = (
    # 08xxx: connection lost or refused (ConnectionDoesNotExistError among them)
    asyncpg.exceptions.PostgresConnectionError,
    # 57xxx: shutdown (57P01), crash of another backend (57P02), starting up or in
    # recovery (57P03), statement timeout or cancel (57014)
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
    # asyncpg's "cannot switch to state N; another operation is in progress", raised
    # when the pool resets a connection the server has just shut down (issue 11)
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
)


def parser_reason(exc: HttpProcessingError) -> str:
    """aiohttp's parser message on one line, without its echo of the bytes and the caret."""
    lines = (line.strip() for line in (exc.message or "").splitlines())
    kept = [line.rstrip(":") for line in lines
            if line and not line.startswith(("b'", 'b"', "bytearray(", "^"))]
    return ": ".join(kept)[:200] or type(exc).__name__


def _http_detail(exc: web.HTTPException) -> str:
    if exc.status == 404:
        return "Not Found"
    if exc.status == 405:
        return f"Method {getattr(exc, 'method', '')} not allowed".replace("  ", " ")
    text = exc.text or exc.reason
    return text.removeprefix(f"{exc.status}: ")


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except StorageError as exc:
        return render(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        skip = ("content-type", "content-length")
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in skip}
        return problem(exc.status, _http_detail(exc), headers=headers)
    except HttpProcessingError as exc:  # malformed framing found while reading the body
        return problem(400, f"Malformed request: {parser_reason(exc)}",
                       code="malformed_request")
    except asyncio.CancelledError:
        raise
    except TimeoutError:
        log.warning("timeout serving %s %s", request.method, request.path)
        return problem(503, "The service timed out; try again", code="timeout")
    except _DB_DOWN as exc:
        log.error("dependency unavailable on %s %s: %r", request.method, request.path, exc)
        return problem(503, "A backing service (database or storage) is unavailable; try again",
                       code="service_unavailable", headers={"Retry-After": "1"})
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem(500, "Internal server error", code="internal_error")
