"""JWT auth: every gate, every way a token can be bad, key rotation (PEM and JWKS), dev keys."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import logging
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web, web_urldispatcher
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jwt.algorithms import RSAAlgorithm

from storage import errors
from storage.auth import bearer as auth
from storage.auth import devkeys
from storage.auth.access import Access, gate, identity_key
from storage.auth.bearer import auth_key
from storage.config import Config
from storage.domain.element import config_key


def now() -> int:
    """Read at call time: a slow suite must not age the tokens a test builds."""
    return int(time.time())
ALL = tuple(Access)
seen_key = web.AppKey("seen", list)


@functools.cache
def rsa_key(n: int, bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    base = {"sub": "u-1", "type": "service_account", "role": "admin", "name": "svc",
            "jti": str(uuid.uuid4()), "iat": now() - 5, "nbf": now() - 5, "exp": now() + 600}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}  # ... removes a claim


def sign(payload: dict[str, Any] | None = None, key: int = 1, **headers: Any) -> str:
    return jwt.encode(payload or claims(), rsa_key(key), algorithm="RS256", headers=headers or None)


def unsigned(header: dict[str, Any]) -> str:
    """``header.payload`` built by hand: pyjwt refuses to produce the tokens we test against."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"


def hs256_with_public_pem() -> str:
    signing_input = unsigned({"alg": "HS256", "typ": "JWT"})
    mac = hmac.new(public_pem(rsa_key(1)), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def rs256_raw(header: dict[str, Any]) -> str:
    signing_input = unsigned({"alg": "RS256", **header})
    signature = rsa_key(1).sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def config(tmp_path: Path, key: int = 1, **over: Any) -> Config:
    pem = tmp_path / "public.pem"
    pem.write_bytes(public_pem(rsa_key(key)))
    if "jwt_jwks_url" not in over:
        over.setdefault("jwt_public_key_path", pem)
    return Config().with_(data_dir=tmp_path, database_url="postgresql://db/x", **over)


def build_app(cfg: Config) -> web.Application:
    app = web.Application(middlewares=[errors.error_middleware, auth.auth_middleware])
    app[config_key], app[seen_key] = cfg, []
    app.cleanup_ctx.append(auth.auth_ctx)
    for access in Access:
        app.router.add_route("*", f"/{access.value}", _handler(access))
    app.router.add_put("/upload", _upload, expect_handler=_expect)
    return app


def _handler(access: Access):
    @gate(access)
    async def handler(request: web.Request) -> web.Response:
        ident = request.get(identity_key)
        return web.json_response(ident and {"role": ident.role, "sa": ident.is_service_account,
                                             "sub": ident.sub, "name": ident.name})
    return handler


@gate(Access.WRITE)
async def _upload(request: web.Request) -> web.Response:
    body = await request.read()
    request.app[seen_key].append(len(body))
    return web.json_response({"size": len(body)})


async def _expect(request: web.Request) -> web.StreamResponse | None:
    refused = await auth.check_request_auth(request)
    if refused is not None:
        return refused
    return await web_urldispatcher._default_expect_handler(request)


class Clock:
    def __init__(self) -> None:
        self.t = time.monotonic()

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    # A header limit above 8 KiB, so the over-8KiB token reaches our own size check.
    server = TestServer(build_app(config(tmp_path)))
    await server.start_server(max_field_size=64 * 1024)
    return await aiohttp_client(server)


async def call(client, path: str, token: str | None = None, **headers: str):
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    resp = await client.get(path, headers=headers)
    return resp.status, await resp.json(content_type=None), resp.headers


W, D, S, A = Access.WRITE, Access.DELETE, Access.SERVICE, Access.ADMIN
SD = Access.SERVICE_DELETE
MATRIX = [  # (type, role, client_id) -> gates allowed besides PUBLIC and READ
    (("service_account", "admin", None), {W, D, S, SD, A}),
    (("service_account", "user", None), {W, S, SD}),
    (("service_account", "operator", None), {W, D, S, SD}),
    (("service_account", "readonly", None), {S}),
    (("service_account", "auditor", None), {S}),
    (("admin_user", "super_admin", "user_a"), {W, D, A}),
    (("admin_user", "ADMIN", "user_a"), {W, D, A}),
    (("admin_user", "readonly", "user_a"), set()),
    (("access", "operator", "user_b"), {W, D}),
    (("access", "user", "sa_legacy"), {W, S, SD}),
    (("access", "readonly", "sa_legacy"), {S}),
    (("access", "Auditor", None), set()),
    (("access", "", None), set()),
]
SERVICE_ONLY = ("Service account access required. Only service accounts can perform "
                "GC operations.")
DENIED = {Access.WRITE: "Write access required: role admin, operator or user",
          Access.DELETE: "Operator or admin access required",
          Access.SERVICE: SERVICE_ONLY,
          Access.ADMIN: "Admin access required: role admin"}


def denied(access: Access, is_service_account: bool) -> str:
    """The 403 detail for a caller lacking ``access``: for a GC delete, what is missing
    first (a service account, then a role other than readonly)."""
    if access is Access.SERVICE_DELETE:
        return "Role readonly cannot delete files" if is_service_account else SERVICE_ONLY
    return DENIED[access]


@pytest.mark.parametrize(("who", "allowed"), MATRIX, ids=lambda v: "-".join(map(str, v))
                         if isinstance(v, tuple) else "")
async def test_gate_matrix(client, who, allowed):
    token_type, role, client_id = who
    token = sign(claims(type=token_type, role=role, client_id=client_id or ...))
    expected_sa = token_type == "service_account" or (client_id or "").startswith("sa_")
    for access in ALL:
        status, body, _ = await call(client, f"/{access.value}", token)
        if access in allowed | {Access.PUBLIC, Access.READ}:
            assert status == 200, (access, body)
        else:
            assert (status, body["detail"]) == (403, denied(access, expected_sa)), access
    _, body, _ = await call(client, "/read", token)
    assert body["sa"] is expected_sa and body["sub"] == "u-1" and body["name"] == "svc"
    assert body["role"] == {"super_admin": "admin", "ADMIN": "admin"}.get(
        role, role if role in ("admin", "operator", "user") else "readonly")


async def test_missing_and_wrong_scheme(client):
    for access in ALL:
        status, body, headers = await call(client, f"/{access.value}")
        if access is Access.PUBLIC:
            assert (status, body) == (200, None)
            continue
        assert (status, body["detail"], headers["WWW-Authenticate"]) == (
            401, "Not authenticated", "Bearer")
        assert headers["Content-Type"].startswith("application/problem+json")
        assert body["status"] == 401 and body["title"] == "Unauthorized"
    for value in ("Basic dXNlcjpwdw==", "Token abc"):
        status, body, headers = await call(client, "/read", Authorization=value)
        assert (status, headers["WWW-Authenticate"]) == (401, "Bearer")
    for value in ("Bearer", "Bearer   ", ""):
        assert (await call(client, "/delete", Authorization=value))[1]["detail"] == \
            "Not authenticated"


async def test_router_errors_are_not_turned_into_401(client):
    assert (await client.get("/nowhere")).status == 404


BAD_TOKENS = {
    "expired": lambda: sign(claims(iat=now() - 7200, nbf=now() - 7200, exp=now() - 3600)),
    "not-yet-valid": lambda: sign(claims(nbf=now() + 3600)),
    "issued-in-future": lambda: sign(claims(iat=now() + 3600)),
    **{f"missing-{c}": functools.partial(lambda c: sign(claims(**{c: ...})), c)
       for c in auth.REQUIRED_CLAIMS},
    **{f"empty-{c}": functools.partial(lambda c: sign(claims(**{c: " "})), c)
       for c in ("sub", "name", "jti", "type")},
    "sub-not-string": lambda: sign(claims(sub=42)),
    "role-not-string": lambda: sign(claims(role=["admin"])),
    "unknown-type": lambda: sign(claims(type="robot")),
    "kid-not-string": lambda: rs256_raw({"kid": 7}),
    "wrong-key": lambda: sign(key=2),
    "alg-none": lambda: unsigned({"alg": "none", "typ": "JWT"}) + ".",
    "alg-none-no-dot": lambda: unsigned({"alg": "none"}),
    "alg-ps256": lambda: jwt.encode(claims(), rsa_key(1), algorithm="PS256"),
    "hs256-with-public-pem": hs256_with_public_pem,
    "over-8KiB": lambda: sign(pad="A" * 9000),
    "garbage": lambda: "not-a-jwt",
    "garbage-base64": lambda: "eyJ!!!.e30.@@@",
    "header-not-json": lambda: f"{b64(b'nope')}.{b64(b'{}')}.{b64(b'x')}",
    "tampered": lambda: sign()[:-4] + "AAAA",
}


@pytest.mark.parametrize("make", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
async def test_bad_tokens_are_401_invalid_token(client, make):
    status, body, headers = await call(client, "/read", make())
    assert (status, body["detail"]) == (401, "Invalid or expired token")
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def test_refresh_token_refused(client):
    status, body, headers = await call(client, "/read", sign(claims(type="refresh")))
    assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer error="invalid_token"')
    assert "Refresh" in body["detail"]


async def test_huge_jose_header_under_limit_is_still_verified(client):
    assert (await call(client, "/read", sign(pad="A" * 5000)))[0] == 200


async def verify(cfg: Config, token: str) -> bool:
    authn = auth.Authenticator(cfg)
    try:
        await authn.verify(token)
        return True
    except errors.Unauthorized:
        return False
    finally:
        await authn.close()


async def test_audience_and_issuer(tmp_path):
    assert await verify(config(tmp_path), sign(claims(aud="anything", iss="whoever")))
    cfg = config(tmp_path, jwt_audience="se", jwt_issuer="admin-module")
    ok = claims(aud="se", iss="admin-module")
    assert await verify(cfg, sign(ok))
    assert await verify(cfg, sign({**ok, "aud": ["other", "se"]}))
    for bad in ({"aud": "other"}, {"aud": ...}, {"iss": "evil"}, {"iss": ...}):
        assert not await verify(cfg, sign(claims(**{**ok, **bad})))


async def test_leeway(tmp_path):
    late = sign(claims(exp=now() - 10))
    early = sign(claims(nbf=now() + 10, iat=now() + 10))
    assert await verify(config(tmp_path), late) and await verify(config(tmp_path), early)
    strict = config(tmp_path, jwt_leeway_seconds=0)
    assert not await verify(strict, late) and not await verify(strict, early)
    assert not await verify(config(tmp_path), sign(claims(exp=now() - 60)))


async def test_pem_rotation_without_restart(client, tmp_path, caplog):
    authn, clock = client.app[auth_key], Clock()
    authn.clock = clock
    old, new = sign(key=1), sign(key=3)
    pem = tmp_path / "public.pem"
    staged = tmp_path / "staged.pem"
    staged.write_bytes(public_pem(rsa_key(3)))
    staged.replace(pem)
    assert (await call(client, "/read", old))[0] == 200  # stat at most once per second
    clock.t += 1.1
    assert [(await call(client, "/read", t))[0] for t in (old, new)] == [401, 200]
    clock.t += 1.1  # unchanged file: nothing reloaded
    assert [(await call(client, "/read", t))[0] for t in (old, new)] == [401, 200]
    pem.write_text("-----BEGIN PUBLIC KEY-----\ngarbage\n")  # a broken rotation keeps the key
    clock.t += 1.1
    assert (await call(client, "/read", new))[0] == 200
    assert "keeping the previous key" in caplog.text
    pem.unlink()
    clock.t += 1.1
    assert (await call(client, "/read", new))[0] == 200


def jwk(n: int, kid: str) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(rsa_key(n).public_key(), as_dict=True),
            "kid": kid, "use": "sig", "alg": "RS256"}


@pytest.fixture
async def jwks(aiohttp_server):
    doc = {"keys": [jwk(1, "a"), jwk(2, "b"), {"kty": "EC", "kid": "ec"}]}

    async def serve(request: web.Request) -> web.Response:
        return web.json_response(doc) if doc["keys"] else web.Response(status=500)

    app = web.Application()
    app.router.add_get("/jwks.json", serve)
    server = await aiohttp_server(app)
    return doc, str(server.make_url("/jwks.json"))


async def test_jwks_keys_by_kid_and_rate_limited_rotation(jwks, tmp_path):
    doc, url = jwks
    clock = Clock()
    authn = auth.Authenticator(config(tmp_path, jwt_jwks_url=url), clock=clock)
    await authn.start()
    try:
        assert authn.pem is None and authn.jwks.fetches == 1
        for key, kid in ((1, "a"), (2, "b"), (2, None)):  # no kid: every key is tried
            assert (await authn.verify(sign(key=key, **({"kid": kid} if kid else {})))).sub
        rotated = sign(key=3, kid="c")
        doc["keys"].append(jwk(3, "c"))
        with pytest.raises(errors.Unauthorized):
            await authn.verify(rotated)  # refreshed less than a minute ago: no fetch
        assert authn.jwks.fetches == 1
        clock.t += 61
        await asyncio.gather(*(authn.verify(rotated) for _ in range(5)))
        assert authn.jwks.fetches == 2  # concurrent unknown kids share one fetch
        for _ in range(3):
            with pytest.raises(errors.Unauthorized):
                await authn.verify(sign(key=2, kid="zzz"))
        assert authn.jwks.fetches == 2
    finally:
        await authn.close()


async def test_jwks_and_pem_together(jwks, tmp_path):
    _, url = jwks
    cfg = config(tmp_path, key=3, jwt_jwks_url=url, jwt_public_key_path=tmp_path / "public.pem")
    for token in (sign(key=1, kid="a"), sign(key=3, kid="file-key"), sign(key=3)):
        assert await verify(cfg, token)
    assert not await verify(cfg, sign(key=4, kid="a"))


async def test_jwks_outage_retries_soon(jwks, tmp_path, aiohttp_client):
    doc, url = jwks
    saved, doc["keys"] = doc["keys"], []
    app = build_app(config(tmp_path, jwt_jwks_url=url))
    client = await aiohttp_client(app)
    clock = client.app[auth_key].clock = Clock()
    assert (await call(client, "/read", sign(kid="a")))[0] == 401
    doc["keys"] = saved
    clock.t += auth.JWKS_RETRY_AFTER_FAILURE + 1
    assert (await call(client, "/read", sign(kid="a")))[0] == 200


def test_parse_jwks_rejects_non_documents():
    for doc in ([], {"keys": "x"}, None):
        with pytest.raises(ValueError):
            auth.parse_jwks(doc)
    small = {**RSAAlgorithm.to_jwk(rsa_key(9, 1024).public_key(), as_dict=True), "kid": "s"}
    assert auth.parse_jwks({"keys": [small, {"kty": "RSA", "kid": "broken"}]}) == {}
    private = {**RSAAlgorithm.to_jwk(rsa_key(1), as_dict=True), "kid": "p"}
    no_kid = RSAAlgorithm.to_jwk(rsa_key(2).public_key(), as_dict=True)
    keys = auth.parse_jwks({"keys": [private, no_kid, {**no_kid, "alg": "RS512"}]})
    assert sorted(keys) == ["#1", "p"] and isinstance(keys["p"], rsa.RSAPublicKey)


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read"),
    (b"hello", "not a PEM-encoded public key"),
    (lambda: rsa_key(1).private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()), "not a PEM-encoded"),
    (lambda: public_pem(ec.generate_private_key(ec.SECP256R1())), "not an RSA public key"),
    (lambda: public_pem(rsa_key(9, 1024)), "1024 bits"),
])
def test_misconfigured_key_fails_at_startup(tmp_path, content, message):
    path = tmp_path / "key.pem"
    if content is not None:
        path.write_bytes(content() if callable(content) else content)
    with pytest.raises(auth.AuthConfigError, match=message):
        auth.Authenticator(config(tmp_path, jwt_public_key_path=path))


def test_jwks_url_must_be_http(tmp_path):
    with pytest.raises(auth.AuthConfigError, match="JWT_JWKS_URL='ftp://keys'"):
        auth.Authenticator(config(tmp_path, jwt_jwks_url="ftp://keys"))


async def test_no_key_outside_embedded_refuses_to_start(tmp_path):
    with pytest.raises(auth.AuthConfigError, match="JWT_PUBLIC_KEY_PATH is not set"):
        auth.Authenticator(Config())
    app = web.Application()
    app[config_key] = Config().with_(data_dir=tmp_path, db_host="db")
    with pytest.raises(auth.AuthConfigError, match="JWT_PUBLIC_KEY_PATH is not set"):
        await anext(auth.auth_ctx(app))


async def test_embedded_default_generates_dev_keys(tmp_path, aiohttp_client, caplog):
    caplog.set_level(logging.WARNING, "storage.auth.bearer")
    client = await aiohttp_client(build_app(Config().with_(data_dir=tmp_path)))
    private, public = tmp_path / "keys" / "private_key.pem", tmp_path / "keys" / "public_key.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.parent.stat().st_mode) == 0o700
    assert "python run.py token --role admin --type service_account --name me" in caplog.text
    token = devkeys.mint_token(private.read_bytes(), role="admin", token_type="service_account",
                               name="me")
    assert [(await call(client, f"/{a.value}", token))[0] for a in ALL] == [200] * len(ALL)
    before = (private.read_bytes(), public.read_bytes())
    assert devkeys.ensure_dev_keys(tmp_path / "keys") == (private, public)
    devkeys._publish_private_key(private)  # a concurrent worker losing the race changes nothing
    public.unlink()  # a lost public key is derived again from the private one
    assert devkeys.ensure_dev_keys(tmp_path / "keys") == (private, public)
    assert (private.read_bytes(), public.read_bytes()) == before
    assert sorted(p.name for p in private.parent.iterdir()) == [private.name, public.name]


def test_mint_token_claims(tmp_path):
    private, public = devkeys.ensure_dev_keys(tmp_path / "k")
    pem = private.read_bytes()
    decode = functools.partial(jwt.decode, key=serialization.load_pem_public_key(
        public.read_bytes()), algorithms=["RS256"], options={"verify_aud": False})
    sa = decode(devkeys.mint_token(pem, role="user", token_type="service_account", name="me"))
    assert sa["client_id"] == "sa_me" and uuid.UUID(sa["sub"]) and sa["exp"] - sa["iat"] == 3600
    user = decode(devkeys.mint_token(pem, role="admin", token_type="admin_user", name="bob",
                                     ttl=devkeys.parse_ttl("5m"), extra={"aud": "x"}))
    assert (user["sub"], user["client_id"], user["aud"], user["exp"] - user["nbf"]) == (
        "bob", "user_bob", "x", 300)
    legacy = decode(devkeys.mint_token(pem, role="user", token_type="access", name="x"))
    assert "client_id" not in legacy and legacy["type"] == "access"
    assert jwt.get_unverified_header(devkeys.mint_token(
        pem, role="user", token_type="access", name="x", kid="k1"))["kid"] == "k1"
    for bad in ({"token_type": "robot"}, {"name": ""}):
        with pytest.raises(ValueError):
            devkeys.mint_token(pem, **{"role": "user", "token_type": "access", "name": "x", **bad})


@pytest.mark.parametrize(("text", "seconds"), [
    ("1h", 3600), ("30m", 1800), ("3600s", 3600), ("2d", 172800), ("90", 90), (" 1H ", 3600)])
def test_parse_ttl(text, seconds):
    assert devkeys.parse_ttl(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "0h", "-1h", "1w", "h", "1.5h"])
def test_parse_ttl_rejects(text):
    with pytest.raises(ValueError):
        devkeys.parse_ttl(text)


async def raw_put(client, token: str, length: int) -> tuple[asyncio.StreamReader, Any, bytes]:
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(f"PUT /upload HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, head


async def test_expect_continue_bad_token_401_before_body(client):
    reader, writer, head = await raw_put(client, "bad", 1 << 30)  # 1 GiB announced, none sent
    try:
        assert head.startswith(b"HTTP/1.1 401") and b"Connection: close" in head
        assert b'WWW-Authenticate: Bearer error="invalid_token"' in head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
        assert body["detail"] == "Invalid or expired token"
        assert client.app[seen_key] == []
    finally:
        writer.close()
        await writer.wait_closed()


async def test_expect_continue_readonly_403_and_good_token_continues(client):
    _, writer, head = await raw_put(client, sign(claims(role="readonly")), 1 << 30)
    writer.close()
    await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 403") and b"Operator" not in head
    reader, writer, head = await raw_put(client, sign(), 5)
    try:
        assert head.startswith(b"HTTP/1.1 100")
        writer.write(b"hello")
        response = await asyncio.wait_for(reader.readuntil(b'{"size": 5}'), 5)
        assert response.startswith(b"HTTP/1.1 200") and client.app[seen_key] == [5]
    finally:
        writer.close()
        await writer.wait_closed()


async def test_cached_verification_still_expires(tmp_path):
    authn = auth.Authenticator(config(tmp_path, jwt_leeway_seconds=0))
    exp = int(time.time()) + 1
    token = sign(claims(exp=exp, iat=exp - 60, nbf=exp - 60))
    try:
        assert (await authn.verify(token)).sub == "u-1"
        assert (await authn.verify(token)).sub == "u-1"  # served from the cache
        assert len(authn._verified) == 1
        await asyncio.sleep(exp + 1.1 - time.time())
        with pytest.raises(errors.Unauthorized):
            await authn.verify(token)
    finally:
        await authn.close()
