"""The OpenAPI 3.1 document: valid, complete, in sync, and true to real responses.

Real responses of every kind are validated against it with jsonschema, and
schemathesis fuzzes the live server (a real ``python run.py`` process) with a
bounded number of examples per GET/PATCH/DELETE operation.
"""

import json
import secrets
import uuid
from datetime import timedelta

import pytest
import schemathesis
from helpers import form, upload
from hypothesis import HealthCheck, settings
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    missing_required_header,
    negative_data_rejection,
    positive_data_acceptance,
    unsupported_method,
)
from server_proc import ServerProcess

from storage.auth.devkeys import mint_token
from storage.config import Config
from storage.web import openapi
from storage.web.app import make_app

DOC = openapi.build()
BASE = "urn:storage-element:openapi"
REGISTRY = Registry().with_resource(BASE, Resource.from_contents(
    DOC, default_specification=DRAFT202012))


def _routes() -> set[tuple[str, str]]:
    app = make_app(Config())
    return {(r.method, r.resource.canonical) for r in app.router.routes()
            if r.method != "HEAD" and r.resource is not None}


ROUTES = _routes()


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def response_spec(method: str, template: str, status: int) -> tuple[str, dict]:
    responses = DOC["paths"][template][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {template}: {status} is not documented"
    spec = responses[str(status)]
    pointer = "/".join(["#", "paths", _pointer(template), method.lower(), "responses",
                        str(status)])
    if "$ref" in spec:
        pointer = spec["$ref"]
        spec = DOC["components"]["responses"][pointer.rsplit("/", 1)[1]]
    return pointer, spec


async def check(resp, method: str, template: str) -> None:
    """Assert that ``resp`` is documented: status, media type, headers and body schema."""
    pointer, spec = response_spec(method, template, resp.status)
    for name, header in spec.get("headers", {}).items():
        header = DOC["components"]["headers"]["RequestId"] if "$ref" in header else header
        if header.get("required"):
            assert name in resp.headers, f"{method} {template} {resp.status}: no {name}"
    content = spec.get("content")
    if not content:
        assert not await resp.read(), f"{method} {template} {resp.status}: unexpected body"
        return
    media = resp.content_type
    key = media if media in content else "*/*"
    assert key in content, f"{method} {template} {resp.status}: {media} not in {list(content)}"
    if media not in ("application/json", "application/problem+json"):
        await resp.read()
        return
    body = json.loads(await resp.read())
    schema_ptr = f"{BASE}{pointer}/content/{_pointer(key)}/schema".replace(f"{BASE}#", f"{BASE}#")
    validator = Draft202012Validator({"$ref": schema_ptr}, registry=REGISTRY,
                                     format_checker=Draft202012Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(body), key=str)
    assert not errors, f"{method} {template} {resp.status}: {errors[0].message} in {body}"


def test_document_is_valid_openapi_3_1():
    validate_spec(DOC)
    assert DOC["openapi"] == "3.1.0"


def test_committed_json_is_current():
    assert openapi.JSON_PATH.read_text(encoding="utf-8") == openapi.render_file(), \
        "storage/web/openapi.json is stale: run `python -m storage.web.openapi`"


def test_every_route_is_documented():
    documented = {(m.upper(), path) for path, item in DOC["paths"].items() for m in item}
    missing = ROUTES - documented
    assert not missing, f"undocumented routes: {sorted(missing)}"


def test_every_operation_documents_errors_as_problem_json():
    for path, item in DOC["paths"].items():
        for method, operation in item.items():
            assert operation["operationId"] and operation["responses"], (method, path)
            for status, resp in operation["responses"].items():
                if int(status) >= 400 and "$ref" in resp:
                    assert resp["$ref"].startswith("#/components/responses/E"), (path, status)
            if operation["security"]:
                assert "401" in operation["responses"], (method, path)


async def test_served_document_is_the_built_one(client):
    resp = await client.get("/api/v1/openapi.json")
    assert resp.status == 200 and await resp.json() == DOC
    await check(resp, "GET", "/api/v1/openapi.json")


async def test_real_responses_match_the_document(app_factory, auth, token):
    # an explicit per-file cap: the 300 kB PUT is a 413, the 250 kB multipart file a 507
    client = await app_factory(app_mode="edit", storage_max_size=200_000,
                               storage_max_file_size=250_000)
    admin = auth()
    for path in ("/", "/health/live", "/health/ready", "/health/startup", "/metrics",
                 "/metrics/", "/api/v1/info", "/api/v1/capacity"):
        await check(await client.get(path), "GET", path)
    resp = await client.post("/api/v1/files/upload", data=form(b"doc" * 100, "r.txt"),
                             headers=admin)
    await check(resp, "POST", "/api/v1/files/upload")
    fid = (await resp.json())["file_id"]
    item = "/api/v1/files/{file_id}"
    for method, kwargs, path in [
        ("GET", {}, f"/api/v1/files/{fid}"),
        ("GET", {}, f"/api/v1/files/{uuid.uuid4()}"),
        ("GET", {}, "/api/v1/files/not-a-uuid"),
        ("GET", {"headers": {}}, f"/api/v1/files/{fid}"),
        ("PATCH", {"json": {"description": "d", "metadata": {"k": "v"}}}, f"/api/v1/files/{fid}"),
        ("PATCH", {"data": b"{nope"}, f"/api/v1/files/{fid}"),
        ("PUT", {"data": b"raw"}, f"/api/v1/files/{uuid.uuid4()}"),
        ("PUT", {"data": b"again"}, f"/api/v1/files/{fid}"),
        ("PUT", {"data": b"x" * 300_000}, f"/api/v1/files/{uuid.uuid4()}"),
    ]:
        headers = kwargs.pop("headers", admin)
        await check(await client.request(method, path, headers=headers, **kwargs), method, item)
    dl = f"/api/v1/files/{fid}/download"
    for headers in ({}, {"Range": "bytes=0-9"}, {"Range": "bytes=0-1,5-6"},
                    {"Range": "bytes=900-"}, {"If-Match": '"nope"'}):
        await check(await client.get(dl, headers={**admin, **headers}), "GET",
                    "/api/v1/files/{file_id}/download")
    etag = (await client.get(dl, headers=admin)).headers["ETag"]
    await check(await client.get(dl, headers={**admin, "If-None-Match": etag}), "GET",
                "/api/v1/files/{file_id}/download")
    for path, query in (("/api/v1/files", ""), ("/api/v1/files/", "?limit=5&skip=0"),
                        ("/api/v1/files", "?q=doc"), ("/api/v1/files", "?limit=-1"),
                        ("/api/v1/files/search", "?q=doc&sort=rank"),
                        ("/api/v1/files/search", "?sort=bogus")):
        if (("GET", path) in ROUTES):
            await check(await client.get(path + query, headers=admin), "GET", path)
    for body in ({"target_mode": "rw"}, {"target_mode": "zz"}, {}):
        await check(await client.post("/api/v1/mode", json=body, headers=admin), "POST",
                    "/api/v1/mode")
    await check(await client.post("/api/v1/mode", json={"target_mode": "rw"},
                                  headers=auth(role="user")), "POST", "/api/v1/mode")
    for path in ("/api/v1/mode", "/api/v1/mode/history"):
        await check(await client.get(path, headers=admin), "GET", path)
        await check(await client.get(path), "GET", path)
    await check(await client.get("/api/v1/mode/history", headers=auth(role="user")), "GET",
                "/api/v1/mode/history")
    for method, template, path in (
            ("DELETE", "/api/v1/gc/{file_id}", f"/api/v1/gc/{uuid.uuid4()}"),
            ("GET", "/api/v1/gc/{file_id}/exists", f"/api/v1/gc/{fid}/exists"),
            ("GET", "/api/v1/cache/consistency", "/api/v1/cache/consistency"),
            ("POST", "/api/v1/cache/rebuild/incremental", "/api/v1/cache/rebuild/incremental")):
        if (method, template) in ROUTES:  # endpoints other modules provide
            await check(await client.request(method, path, headers=admin), method, template)
            await check(await client.request(method, path, headers=auth(
                token_type="admin_user")), method, template)
    await check(await client.delete(f"/api/v1/files/{fid}", headers=auth(role="user")),
                "DELETE", item)
    await check(await client.delete(f"/api/v1/files/{fid}", headers=admin), "DELETE", item)
    await check(await client.delete(f"/api/v1/files/{fid}", headers=admin), "DELETE", item)
    multipart_507 = await client.post("/api/v1/files/upload",
                                      data=form(b"q" * 250_000), headers=admin)
    await check(multipart_507, "POST", "/api/v1/files/upload")
    assert multipart_507.status == 507
    await upload(client, admin, b"ok")


# --- schemathesis against the live server ------------------------------------------------


@pytest.fixture(scope="module")
def live(pg_dsn, keypair, tmp_path_factory):
    """A real server process in edit mode with a few files, and admin headers for it."""
    base = tmp_path_factory.mktemp("fuzz")
    server = ServerProcess({
        "DATABASE_URL": pg_dsn, "DB_TABLE_PREFIX": "fz" + secrets.token_hex(4),
        "STORAGE_LOCAL_BASE_PATH": str(base / "store"), "DATA_DIR": str(base / "data"),
        "JWT_PUBLIC_KEY_PATH": str(keypair[1]), "APP_MODE": "edit",
        "STORAGE_DISK_RESERVE": "0",
    }, base / "server.log").start()
    try:
        headers = {"Authorization": "Bearer " + mint_token(
            keypair[0].read_bytes(), role="admin", token_type="service_account",
            name="fuzzer", ttl=timedelta(hours=1))}
        ids = [_upload_sync(server.url, headers, b"fuzz data %d" % n) for n in range(3)]
    except BaseException:
        server.kill()
        raise
    yield server, headers, ids
    code = server.stop()
    log = server.log_tail(200)
    assert code == 0, log
    assert '"status": 500' not in log, log


def _upload_sync(url: str, headers: dict, data: bytes) -> str:
    import requests

    resp = requests.post(f"{url}/api/v1/files/upload", headers=headers, timeout=10,
                         files={"file": ("f.txt", data, "text/plain")})
    assert resp.status_code == 201, resp.text
    return resp.json()["file_id"]


# tus bodies are raw bytes under their own media type
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")
SCHEMA = schemathesis.openapi.from_dict(DOC)
# Unknown query parameters and form fields are ignored on purpose (artStore clients send
# extra ones), so schemathesis must not count an ignored extra parameter as a failure.
# Text with NUL is refused everywhere (PostgreSQL cannot store it), documented or not.
SCHEMA.config.generation.update(allow_extra_parameters=False, allow_x00=False)
FUZZED = SCHEMA.include(
    lambda ctx: (ctx.operation.method.upper(), ctx.operation.path) in ROUTES
    and ctx.operation.method.upper() in ("GET", "PATCH", "DELETE")
    and not ctx.operation.path.startswith("/api/v1/cache"))
# Search has cross-field rules no schema can state (created_after < created_before,
# min_size <= max_size): such schema-valid requests get a documented 400.
CROSS_FIELD = {"/api/v1/files", "/api/v1/files/", "/api/v1/files/search"}
# A well-formed If-Match that does not match is refused with 412 (RFC 9110 §13.1.1).
CONDITIONAL = {"/api/v1/files/{file_id}/download"}
# PUT/PATCH/DELETE /api/v1/files/search reach /api/v1/files/{file_id} and get a 422
# ("search" is no UUID) instead of the 405 OpenAPI path precedence implies, and a 405
# there lists the methods of both routes in Allow.
SHADOWED = {"/api/v1/files/search"}
# tus 1.0.0 answers a missing Tus-Resumable, or any other than 1.0.0, malformed or not,
# with 412 (the protocol says so), which schemathesis does not count as rejecting bad input;
# and its coverage phase sends header values outside their patterns (`Upload-Checksum: 0`)
# as positive data, which get their documented 400.
TUS = {"/api/v1/uploads/{file_id}"}


@FUZZED.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_fuzz_finds_no_server_error_and_no_schema_violation(case, live):
    server, headers, ids = live
    params = case.path_parameters or {}
    if "file_id" in params:  # reach existing files half of the time (valid ids only)
        try:
            parsed = uuid.UUID(str(params["file_id"]))
        except ValueError:
            parsed = None
        if parsed is not None and parsed.int % 2 == 0:
            params["file_id"] = ids[parsed.int % len(ids)]
    excluded = ([positive_data_acceptance]
                if case.operation.path in CROSS_FIELD | CONDITIONAL else [])
    if case.operation.path in SHADOWED:
        excluded += [unsupported_method, allow_header_conformance]
    if case.operation.path in TUS:
        excluded += [negative_data_rejection, missing_required_header,
                     positive_data_acceptance]
    case.call_and_validate(base_url=server.url, headers=headers, timeout=10,
                           excluded_checks=excluded)
