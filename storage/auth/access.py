"""Who may call what: the access level a route needs and the caller's identity.

Handlers declare their level with :func:`gate`; the auth middleware enforces it
before any body byte is read.  A route without a gate needs a valid token.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from ..models import Identity


class Access(enum.Enum):
    PUBLIC = "public"  # no token
    READ = "read"  # any valid token
    WRITE = "write"  # a token whose role may change data (admin, operator, user)
    DELETE = "delete"  # role admin or operator
    SERVICE = "service"  # a service account (gc, cache)
    SERVICE_DELETE = "service_delete"  # a service account whose role is not readonly (gc)
    ADMIN = "admin"  # role admin (runtime mode changes)


identity_key = web.RequestKey("identity", Identity)

H = TypeVar("H", bound=Callable[..., Any])


def gate(access: Access) -> Callable[[H], H]:
    """Mark a handler with the access level it requires."""

    def mark(handler: H) -> H:
        handler.access = access  # type: ignore[attr-defined]
        return handler

    return mark


def required_access(request: web.Request) -> Access | None:
    """The level the matched route needs; None for router errors (404/405)."""
    match_info = request.match_info
    if getattr(match_info, "http_exception", None) is not None:
        return None
    return getattr(match_info.handler, "access", Access.READ)


def identity(request: web.Request) -> Identity:
    """The caller's identity; only valid on routes gated above PUBLIC."""
    return request[identity_key]
