"""Helpers for the resumable-upload (tus) tests: raw protocol requests and store checks."""

from __future__ import annotations

import io

import asyncpg
from aiotus.creation import encode_metadata
from yarl import URL

from storage.config import Config

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {"Content-Type": "application/offset+octet-stream"}
ROOT = "/api/v1/uploads"


def metadata(**values: str | bytes) -> str:
    """An ``Upload-Metadata`` value, encoded by aiotus (a real client)."""
    return encode_metadata({k: v.encode() if isinstance(v, str) else v
                            for k, v in values.items()})


async def create(client, headers: dict, *, length: int | None = None, status: int = 201,
                 body: bytes | None = None, **extra: str) -> str:
    """POST a creation; the path of the new upload (or the response body if refused)."""
    h = {**headers, **TUS, **extra}
    if length is not None:
        h["Upload-Length"] = str(length)
    if body is not None:
        h.update(OCTETS)
    resp = await client.post(ROOT, headers=h, data=body)
    text = await resp.text()
    assert resp.status == status, text
    if status != 201:
        return text
    assert resp.headers["Tus-Resumable"] == "1.0.0"
    return URL(resp.headers["Location"]).path


async def patch(client, headers: dict, path: str, offset: int, data, *, status: int = 204,
                **extra: str):
    if isinstance(data, bytes) and len(data) > 1024 * 1024:
        data = io.BytesIO(data)  # aiohttp warns about large raw bodies
    resp = await client.patch(path, data=data, headers={
        **headers, **TUS, **OCTETS, "Upload-Offset": str(offset), **extra})
    body = await resp.text()
    assert resp.status == status, body
    assert resp.headers["Tus-Resumable"] == "1.0.0"
    return resp


async def offset_of(client, headers: dict, path: str) -> int:
    resp = await client.head(path, headers={**headers, **TUS})
    assert resp.status == 200, resp.status
    return int(resp.headers["Upload-Offset"])


def staged_file(config: Config, path: str):
    """The local staging file of the upload at ``path``."""
    return config.storage_local_base_path / ".resumable" / path.rsplit("/", 1)[1]


async def upload_row(pg_dsn: str, config: Config, path: str) -> dict | None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        rec = await conn.fetchrow(
            f"SELECT * FROM {config.table_prefix}_uploads WHERE file_id = $1",
            path.rsplit("/", 1)[1])
    finally:
        await conn.close()
    return dict(rec) if rec else None


async def sql(pg_dsn: str, statement: str, *args):
    conn = await asyncpg.connect(pg_dsn)
    try:
        return await conn.fetch(statement, *args)
    finally:
        await conn.close()
