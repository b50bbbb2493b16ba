"""Per-request plumbing: request id, access log, metrics, tracing, CORS, draining.

Order in ``make_app``: ``error_middleware`` (outermost) → :func:`request_middleware`
→ :func:`cors_middleware` → ``auth_middleware``.  Error responses are rendered
*inside* :func:`request_middleware` too, so the access log and the metrics see the
status the client gets.  Headers every response needs (``X-Request-ID``, CORS, a
``Server`` without versions) are added in ``on_response_prepare``, which also covers
responses produced outside the middlewares (``Expect: 100-continue`` refusals, router
errors).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time

from aiohttp import hdrs, web

from ..auth.access import identity_key
from ..domain.element import config_key, runtime_key
from ..errors import Unavailable, error_middleware, problem, render
from ..observability import metrics as metrics_mod
from ..observability.logs import request_id_var
from ..observability.metrics import metrics_key
from ..observability.tracing import tracing_key

log = logging.getLogger("storage.access")
REQUEST_ID_HEADER = "X-Request-ID"
# aiohttp's default names its and Python's versions: a scanner's shortcut to known bugs
SERVER_HEADER = "storage-element"
MAX_REQUEST_ID = 128
QUIET_ROUTES = ("live", "ready", "startup", "metrics", "metrics_slash")
request_id_key = web.RequestKey("request_id", str)


def _valid_request_id(value: str | None) -> bool:
    return (value is not None and 0 < len(value) <= MAX_REQUEST_ID
            and value.isascii() and value.isprintable() and not value.isspace())


# Generated ids: 16 random hex digits per process, then a 16-digit counter: unique across
# processes and restarts like a uuid4 hex (same length), without a getrandom() per request.
_ID_STEM = secrets.token_hex(8)
_id_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_STEM}{next(_id_counter):016x}"


def request_id(request: web.BaseRequest) -> str:
    """This request's id: the client's ``X-Request-ID`` when sane, else a new one."""
    rid = request.get(request_id_key)
    if rid is None:
        given = request.headers.get(REQUEST_ID_HEADER)
        rid = given.strip() if _valid_request_id(given) else new_request_id()
        request[request_id_key] = rid
    return rid


def _response_bytes(resp: web.StreamResponse | None) -> int:
    if resp is None:
        return 0
    if resp.prepared and resp.body_length:
        return resp.body_length
    body = getattr(resp, "body", None)
    if isinstance(body, bytes | bytearray):
        return len(body)
    return resp.content_length or 0


def _access_log(request: web.Request, status: int, resp: web.StreamResponse | None,
                duration: float) -> None:
    ident = request.get(identity_key)
    route = metrics_mod.route_label(request)
    level = logging.ERROR if status >= 500 else logging.INFO
    if metrics_mod.route_name(request) in QUIET_ROUTES and status < 500:
        level = logging.DEBUG
    if not log.isEnabledFor(level):
        return
    log.log(level, "%s %s %d %.1fms", request.method, route, status, duration * 1000, extra={
        "request_id": request_id(request), "method": request.method, "route": route,
        "path": request.path[:512], "status": status, "bytes": _response_bytes(resp),
        "bytes_in": request.content_length, "duration_s": round(duration, 6),
        "user_sub": ident.sub if ident is not None else None,
    })


@web.middleware
async def request_middleware(request: web.Request, handler) -> web.StreamResponse:
    rid = request_id(request)
    token = request_id_var.set(rid)
    app = request.app
    m: metrics_mod.Metrics = app[metrics_key]
    upload = metrics_mod.route_name(request) in metrics_mod.UPLOAD_ROUTES
    span = None
    tracing = app.get(tracing_key)
    if tracing is not None:
        span = tracing.start_request(request, metrics_mod.route_label(request), rid)
    runtime = app.get(runtime_key)
    if runtime is not None:
        runtime.enter()
    m.requests_in_flight.inc()
    if upload:
        m.uploads_in_flight.inc()
    start = time.perf_counter()
    resp: web.StreamResponse | None = None
    status = 500
    try:
        if runtime is not None and runtime.stopping and \
                metrics_mod.route_name(request) not in QUIET_ROUTES:
            resp = render(Unavailable("The service is shutting down; retry on another "
                                      "connection", headers={"Retry-After": "1",
                                                             "Connection": "close"}))
            resp.force_close()
        else:
            resp = await error_middleware(request, handler)
        status = resp.status
        return resp
    except web.HTTPException as exc:  # redirects pass through the error middleware
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away, or shutdown cancelled the handler
        raise
    finally:
        duration = time.perf_counter() - start
        if runtime is not None:
            runtime.leave()
        m.requests_in_flight.dec()
        if upload:
            m.uploads_in_flight.dec()
        metrics_mod.observe_request(request, resp, status, duration)
        _access_log(request, status, resp, duration)
        if span is not None:
            tracing.end_request(span, status)
        request_id_var.reset(token)


def _allowed_origin(origins: tuple[str, ...], origin: str) -> str | None:
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


@web.middleware
async def cors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Answer CORS preflight requests; headers for other responses come from the signal."""
    config = request.app[config_key]
    origin = request.headers.get(hdrs.ORIGIN)
    if (config.cors_enabled and origin and request.method == hdrs.METH_OPTIONS
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers):
        return _preflight(request, origin)
    return await handler(request)


def _preflight(request: web.Request, origin: str) -> web.Response:
    config = request.app[config_key]
    allowed = _allowed_origin(config.cors_allow_origins, origin)
    method = request.headers[hdrs.ACCESS_CONTROL_REQUEST_METHOD].upper()
    methods = {m.upper() for m in config.cors_allow_methods}
    if allowed is None or ("*" not in methods and method not in methods):
        return problem(403, "CORS preflight refused: origin or method not allowed",
                       code="cors_refused")
    wanted = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
    allowed_headers = {h.lower() for h in config.cors_allow_headers}
    asked = [h.strip() for h in wanted.split(",") if h.strip()]
    if "*" not in allowed_headers and any(h.lower() not in allowed_headers for h in asked):
        return problem(403, "CORS preflight refused: header not allowed", code="cors_refused")
    headers = {
        hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: allowed,
        hdrs.ACCESS_CONTROL_ALLOW_METHODS: ", ".join(config.cors_allow_methods),
        hdrs.ACCESS_CONTROL_MAX_AGE: str(config.cors_max_age),
        hdrs.VARY: "Origin",
    }
    if asked:
        headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ", ".join(asked)
    if config.cors_allow_credentials:
        headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
    return web.Response(status=204, headers=headers)


async def _on_response_prepare(request: web.Request, resp: web.StreamResponse) -> None:
    resp.headers[REQUEST_ID_HEADER] = request_id(request)
    resp.headers[hdrs.SERVER] = SERVER_HEADER  # before aiohttp's setdefault in _start
    config = request.app[config_key]
    origin = request.headers.get(hdrs.ORIGIN)
    if not config.cors_enabled or not origin or hdrs.ACCESS_CONTROL_ALLOW_ORIGIN in resp.headers:
        return
    allowed = _allowed_origin(config.cors_allow_origins, origin)
    if allowed is None:
        return
    resp.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
    if allowed != "*":
        resp.headers.add(hdrs.VARY, "Origin")
    if config.cors_allow_credentials:
        resp.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
    if config.cors_expose_headers:
        resp.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = ", ".join(config.cors_expose_headers)


async def _on_shutdown(app: web.Application) -> None:
    """Readiness turns 503 and new requests are refused (storage/cli/lifecycle.py does it
    earlier, before draining; this covers any other runner)."""
    runtime = app.get(runtime_key)
    if runtime is not None:
        runtime.stopping = True


def install(app: web.Application) -> None:
    app.on_response_prepare.append(_on_response_prepare)
    app.on_shutdown.append(_on_shutdown)
