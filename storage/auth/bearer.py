"""JWT authentication and per-route authorization (reference §1.1, §10).

Accepts exactly the RS256 tokens artStore's admin module issues, without the
upstream holes (§15.2 items 1-2): the algorithm is pinned, unknown roles are
demoted to ``readonly`` (never escalated), refresh tokens are refused, and keys
follow rotation without a restart.  Runs before any body byte is read: from
:func:`auth_middleware`, or :func:`check_request_auth` in an Expect handler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from ..config import Config
from ..domain.element import config_key
from ..errors import Forbidden, StorageError, Unauthorized, render
from ..models import Identity
from . import devkeys
from .access import Access, identity_key, required_access
from .keys import (  # noqa: F401 - re-exported: the auth API in one place
    JWKS_REFRESH_INTERVAL,
    JWKS_RETRY_AFTER_FAILURE,
    PEM_CHECK_INTERVAL,
    TOKEN_ERRORS,
    AuthConfigError,
    JwksSource,
    PemKeySource,
    load_public_key,
    parse_jwks,
)

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 8 * 1024
VERIFIED_CACHE_SIZE = 4096
REQUIRED_CLAIMS = ["exp", "nbf", "iat", "sub", "type", "role", "name", "jti"]
BEARER_TYPES = ("admin_user", "service_account", "access")  # "refresh" is deliberately absent
_ROLES = {"admin": "admin", "operator": "operator", "user": "user", "super_admin": "admin"}
_INVALID_HEADERS = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
_Rule = tuple[Callable[[Identity], bool], str]
_SERVICE: _Rule = (lambda i: i.is_service_account,
                   "Service account access required. "
                   "Only service accounts can perform GC operations.")
# Each level's rules in order; the first one that fails names what is missing.
_GATES: dict[Access, tuple[_Rule, ...]] = {
    Access.WRITE: ((lambda i: i.role in ("admin", "operator", "user"),
                    "Write access required: role admin, operator or user"),),
    Access.DELETE: ((lambda i: i.role in ("admin", "operator"),
                     "Operator or admin access required"),),
    Access.SERVICE: (_SERVICE,),
    # artStore ignored the role here; a readonly identity never deletes (issue 19)
    Access.SERVICE_DELETE: (_SERVICE, (lambda i: i.role != "readonly",
                                       "Role readonly cannot delete files")),
    Access.ADMIN: ((lambda i: i.role == "admin", "Admin access required: role admin"),),
}


def invalid_token(detail: str = "Invalid or expired token") -> Unauthorized:
    return Unauthorized(detail, headers=_INVALID_HEADERS)


_UNSEEN = object()


class Authenticator:
    """Verifies bearer tokens against the configured PEM file and/or JWKS URL.

    :raises AuthConfigError: no key source configured, or the PEM file is unusable.
    """

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not config.jwt_public_key_path and not config.jwt_jwks_url:
            raise AuthConfigError("JWT_PUBLIC_KEY_PATH is not set (nor JWT_JWKS_URL): "
                                  "the service does not run without authentication")
        self.clock = clock
        path, url = config.jwt_public_key_path, config.jwt_jwks_url
        self.pem = PemKeySource(path, clock()) if path else None
        self.jwks = JwksSource(url) if url else None
        self.leeway = config.jwt_leeway_seconds
        self.issuer, self.audience = config.jwt_issuer, config.jwt_audience
        self._verified: dict[tuple[str, int], tuple[rsa.RSAPublicKey, dict[str, Any]]] = {}
        self._kids: dict[str, str | None] = {}  # header kid of tokens verified before

    async def start(self) -> None:
        if self.jwks is not None:
            await self.jwks.refresh(self.clock())

    async def close(self) -> None:
        if self.jwks is not None:
            await self.jwks.close()

    async def verify(self, token: str) -> Identity:
        """The caller's Identity for ``token``.

        :raises Unauthorized: with ``WWW-Authenticate: Bearer error="invalid_token"``
            for anything but a valid, current, RS256-signed bearer token.
        """
        if not isinstance(token, str) or len(token.encode("utf-8", "replace")) > MAX_TOKEN_BYTES:
            raise invalid_token()
        try:
            claims = await self._decode(token)
        except TOKEN_ERRORS as exc:
            log.info("token rejected: %s: %s", type(exc).__name__, exc)
            raise invalid_token() from None
        return to_identity(claims)

    async def _decode(self, token: str) -> dict[str, Any]:
        kid = self._kids.get(token, _UNSEEN)  # a verified token's header is not parsed again
        if kid is _UNSEEN:
            kid = jwt.get_unverified_header(token).get("kid") or None  # pyjwt wants a str
        keys = await self._candidate_keys(kid)
        if not keys:
            raise jwt.InvalidKeyError(f"no key for kid {kid!r}")
        for key in keys[:-1]:
            try:
                claims = self._decode_with(token, key)
                break
            except jwt.InvalidSignatureError:
                continue
        else:
            claims = self._decode_with(token, keys[-1])
        if token not in self._kids:
            if len(self._kids) >= VERIFIED_CACHE_SIZE:
                self._kids.pop(next(iter(self._kids)))
            self._kids[token] = kid
        return claims

    async def _candidate_keys(self, kid: str | None) -> list[rsa.RSAPublicKey]:
        now = self.clock()
        keys: list[rsa.RSAPublicKey] = []
        if self.jwks is not None:
            if (kid not in self.jwks.keys) if kid else (not self.jwks.keys):
                await self.jwks.refresh(now)
            if kid is None:
                keys.extend(self.jwks.keys.values())
            elif kid in self.jwks.keys:
                keys.append(self.jwks.keys[kid])
        if self.pem is not None:  # the file key signs tokens with or without a kid
            keys.append(self.pem.current(now))
        return keys

    def _decode_with(self, token: str, key: rsa.RSAPublicKey) -> dict[str, Any]:
        """Verified claims; a token already verified with this very key object is served
        from a bounded cache (the RSA check dominated small requests) until it expires.
        A rotated key is a new object, so rotation invalidates the cache by itself."""
        cached = self._verified.get((token, id(key)))
        fresh = cached is not None and time.time() <= cached[1]["exp"] + self.leeway
        if fresh and cached[0] is key:
            return cached[1]
        # algorithms is pinned, never taken from the token header (RFC 8725 §2.1).
        claims = jwt.decode(
            token, key, algorithms=["RS256"], leeway=self.leeway,
            issuer=self.issuer, audience=self.audience,
            options={"require": REQUIRED_CLAIMS, "enforce_minimum_key_length": True,
                     # upstream rejected any token with aud; we ignore aud unless configured
                     "verify_aud": self.audience is not None},
        )
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.pop(next(iter(self._verified)))
        self._verified[(token, id(key))] = (key, claims)
        return claims


def _text(claims: dict[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value.strip():
        raise invalid_token()
    return value.strip()


def map_role(role: str) -> str:
    """admin/operator/user as is, super_admin -> admin, anything else -> readonly."""
    return _ROLES.get(role.strip().lower(), "readonly")


def to_identity(claims: dict[str, Any]) -> Identity:
    """Map verified claims to an Identity (reference §10 token-type mapping).

    :raises Unauthorized: refresh tokens, unknown types, empty sub/name/jti, non-string role.
    """
    sub, name, jti, token_type = (_text(claims, k) for k in ("sub", "name", "jti", "type"))
    role = claims.get("role")
    if not isinstance(role, str):
        raise invalid_token()
    if token_type == "refresh":
        raise invalid_token("Refresh tokens are not accepted as bearer tokens")
    if token_type not in BEARER_TYPES:
        raise invalid_token()
    client_id = claims.get("client_id")
    service = token_type == "service_account" or (
        token_type == "access" and isinstance(client_id, str) and client_id.startswith("sa_"))
    return Identity(sub=sub, name=name, role=map_role(role), token_type=token_type,
                    is_service_account=service, jti=jti, claims=dict(claims))


def authorize(ident: Identity, access: Access) -> None:
    """:raises Forbidden: naming what ``access`` requires, when ``ident`` lacks it."""
    for allowed, missing in _GATES.get(access, ()):
        if not allowed(ident):
            raise Forbidden(missing)


def bearer_token(request: web.BaseRequest) -> str:
    """The token of ``Authorization: Bearer <token>``.

    :raises Unauthorized: no credentials (``Not authenticated``) or another scheme.
    """
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    if not scheme or not credentials.strip():
        raise Unauthorized("Not authenticated", headers=_CHALLENGE)
    if scheme.lower() != "bearer":  # upstream answered 403 here; a missing credential is 401
        raise Unauthorized("Invalid authentication credentials", headers=_CHALLENGE)
    return credentials.strip()


async def authenticate(request: web.Request) -> Identity | None:
    """Enforce the matched route's access level; store and return the caller's Identity.

    Returns None for PUBLIC routes and router errors (404/405 stay theirs).
    Idempotent: an Identity already on the request is reused, not re-verified.

    :raises Unauthorized: missing, malformed, invalid or expired credentials.
    :raises Forbidden: valid token whose role or type the route does not admit.
    """
    access = required_access(request)
    if access is None or access is Access.PUBLIC:
        return None
    ident = request.get(identity_key)
    if ident is None:
        ident = await request.app[auth_key].verify(bearer_token(request))
        request[identity_key] = ident
    authorize(ident, access)
    return ident


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Authenticate before the handler runs; never touches the body."""
    await authenticate(request)
    return await handler(request)


async def check_request_auth(request: web.Request) -> web.Response | None:
    """For an ``Expect: 100-continue`` handler: a rendered 401/403, or None when allowed."""
    try:
        await authenticate(request)
    except StorageError as exc:
        resp = render(exc)
        resp.force_close()  # the announced body was never read; don't reuse the connection
        return resp
    return None


async def _with_key_source(config: Config) -> Config:
    if config.jwt_public_key_path or config.jwt_jwks_url:
        return config
    if not config.embedded:
        raise AuthConfigError("JWT_PUBLIC_KEY_PATH is not set (nor JWT_JWKS_URL): "
                              "configure the admin module's public key")
    keys_dir = config.data_dir / "keys"
    _, public = await asyncio.to_thread(devkeys.ensure_dev_keys, keys_dir)
    log.warning("JWT: no key configured, using DEVELOPMENT keys in %s; mint a token with: "
                "python run.py token --role admin --type service_account --name me", keys_dir)
    return config.with_(jwt_public_key_path=public)


auth_key = web.AppKey("auth", Authenticator)


async def auth_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: build the Authenticator into ``app[auth_key]``; close it on exit.

    :raises AuthConfigError: no usable key (dev keys only on the embedded default).
    """
    authenticator = Authenticator(await _with_key_source(app[config_key]))
    await authenticator.start()
    app[auth_key] = authenticator
    try:
        yield
    finally:
        await authenticator.close()
