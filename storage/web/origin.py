"""Where clients reach this service: the origin of absolute URLs (the tus ``Location``).

By default the scheme of the connection and the request's ``Host``.  Behind a proxy
either ``PUBLIC_BASE_URL`` fixes it (scheme, host, port and a path prefix), or, with
``TRUST_FORWARDED_HEADERS``, the proxy's ``Forwarded`` (RFC 7239: ``proto=`` and
``host=`` of the first element) or else ``X-Forwarded-Proto`` / ``X-Forwarded-Host``
(their first value) replace the connection's.  Both are off by default: a client that
reaches the server directly could otherwise have it hand out URLs of any host.

A host that cannot form a URL (empty, user info, a space, a port out of range) is a
:class:`BadRequest`; callers build the URL *before* anything is created, so a refused
request leaves nothing behind.
"""

from __future__ import annotations

import ipaddress
import re

from aiohttp import hdrs, web

from ..config import Config
from ..errors import BadRequest

_HOST = re.compile(r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9._~-]{1,253})(?::([0-9]{1,5}))?")


def check_host(raw: str | None, what: str = "Host") -> str:
    """``host[:port]`` as a URL authority (lower case); :raises BadRequest: otherwise."""
    value = (raw or "").strip()
    match = _HOST.fullmatch(value)
    ok = match is not None and not value.startswith(".")
    if ok and match.group(2) is not None:
        ok = 1 <= int(match.group(2)) <= 65535
    if ok and match.group(1).startswith("["):
        try:
            ok = ipaddress.ip_address(match.group(1)[1:-1]).version == 6
        except ValueError:
            ok = False
    if not ok:
        raise BadRequest(f"{what} {value[:80]!r} cannot form a URL: expected host[:port] "
                         "(a name or an IP address, a port from 1 to 65535)")
    return value.lower()


def _first(value: str | None) -> str | None:
    return value.split(",", 1)[0].strip() or None if value else None


def base_url(request: web.Request, config: Config) -> str:
    """``scheme://host[:port][/prefix]`` of this service as the client should use it.

    :raises BadRequest: the (trusted) request headers cannot form one."""
    if config.public_base_url:
        return config.public_base_url
    scheme = request.scheme
    host = request.headers.get(hdrs.HOST)
    if host is None:  # HTTP/1.0 without Host: the address the client connected to
        host = request.host
    what = "Host"
    if config.trust_forwarded_headers:
        forwarded = request.forwarded[0] if request.forwarded else {}
        proto = forwarded.get("proto") or _first(request.headers.get("X-Forwarded-Proto"))
        fwd_host = forwarded.get("host") or _first(request.headers.get("X-Forwarded-Host"))
        if proto:
            scheme = proto.lower()
        if fwd_host:
            host, what = fwd_host, "The forwarded host"
    if scheme not in ("http", "https"):
        raise BadRequest(f"The forwarded protocol {scheme[:20]!r} is not http or https")
    return f"{scheme}://{check_host(host, what)}"
