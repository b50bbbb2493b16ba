"""Small helpers shared by the HTTP-level tests."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiobotocore.session import AioSession
from aiohttp import FormData
from botocore.config import Config as BotoConfig

from storage.backends import make_backend
from storage.backends.base import Backend
from storage.config import Config
from storage.domain.element import config_key

_SESSION = AioSession()  # caches the parsed S3 model: a client per helper call is cheap
# Runs a test on local disk and on S3 (SeaweedFS); see the storage_kind fixture.
BOTH_BACKENDS = pytest.mark.parametrize("storage_kind", ["local", "s3"], indirect=True)


def form(data: bytes, name: str = "a.txt", content_type: str = "text/plain",
         **fields: str) -> FormData:
    f = FormData(quote_fields=False)  # raw UTF-8 names, as browsers and httpx send them
    for key, value in fields.items():
        f.add_field(key, value)
    f.add_field("file", io.BytesIO(data), filename=name, content_type=content_type)
    return f


async def upload(client, headers, data: bytes = b"hello", name: str = "a.txt",
                 content_type: str = "text/plain", status: int = 201, **fields: str) -> dict:
    resp = await client.post("/api/v1/files/upload", data=form(data, name, content_type, **fields),
                             headers=headers)
    body = await resp.json(content_type=None)
    assert resp.status == status, body
    return body


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_files(root: Path) -> list[Path]:
    """Every regular file under the storage root (data, attr and temp files)."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def temp_files(root: Path) -> list[Path]:
    return [p for p in stored_files(root) if p.name.startswith(".tmp")]


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def raw_multipart(filename: str, data: bytes, boundary: str = "b0undary") -> tuple[bytes, str]:
    """A hand-built multipart body, for names a well-behaved client would refuse to send."""
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{filename}"\r\nContent-Type: text/plain\r\n\r\n')
    body = head.encode("utf-8", "surrogateescape") + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


# --- the element's store, whichever backend ----------------------------------------------


def config_of(client) -> Config:
    """The Config of the app behind an aiohttp test client."""
    return client.app[config_key]


_PROCESS_SETTINGS = (
    "database_url", "table_prefix", "app_mode", "data_dir", "storage_type",
    "storage_local_base_path", "storage_max_size", "storage_disk_reserve",
    "jwt_public_key_path", "s3_endpoint_url", "s3_access_key_id", "s3_secret_access_key",
    "s3_bucket_name", "s3_app_folder", "s3_region", "s3_multipart_threshold",
)


def process_env(config: Config, **extra: str) -> dict[str, str]:
    """The environment of a ``python run.py`` serving ``config``'s element (database,
    prefix, store on either backend, keys): a real process beside an in-process app."""
    env = {f.metadata["env"]: str(getattr(config, f.name)) for f in dataclasses.fields(Config)
           if f.name in _PROCESS_SETTINGS and getattr(config, f.name) is not None}
    return {**env, **extra}


@contextlib.asynccontextmanager
async def s3_client(config: Config) -> AsyncIterator[Any]:
    """A raw aiobotocore client on the element's S3 endpoint (for looking behind its back)."""
    async with _SESSION.create_client(
            "s3", endpoint_url=config.s3_endpoint_url, region_name=config.s3_region,
            aws_access_key_id=config.s3_access_key_id,
            aws_secret_access_key=config.s3_secret_access_key,
            config=BotoConfig(s3={"addressing_style": config.s3_addressing_style})) as s3:
        yield s3


def s3_folder(config: Config) -> str:
    return config.s3_app_folder.strip("/") + "/"


async def s3_uploads(config: Config) -> list[str]:
    """Keys (relative to the app folder) of multipart uploads in progress there."""
    folder = s3_folder(config)
    async with s3_client(config) as s3:
        resp = await s3.list_multipart_uploads(Bucket=config.s3_bucket_name, Prefix=folder)
    return sorted(u["Key"][len(folder):] for u in resp.get("Uploads", []))


async def stored_objects(config: Config) -> list[str]:
    """Everything the element holds in its store, relative to its root: local files
    (temp files included) or S3 objects under the app folder plus ``upload:<key>`` for
    every multipart upload in progress there.  ``[]`` means no residue at all."""
    if config.storage_type != "s3":
        root = config.storage_local_base_path
        return [str(p.relative_to(root)) for p in stored_files(root)]
    folder, found = s3_folder(config), []
    async with s3_client(config) as s3:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=config.s3_bucket_name,
                                                               Prefix=folder)
        async for page in pages:
            found += [o["Key"][len(folder):] for o in page.get("Contents", [])]
    return sorted(found) + [f"upload:{key}" for key in await s3_uploads(config)]


@contextlib.asynccontextmanager
async def backend_of(config: Config) -> AsyncIterator[Backend]:
    """A second, started backend on the element's store (reads and writes go through
    the seam, never around it)."""
    backend = make_backend(config)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


async def drop_data_object(config: Config, relpath: str) -> None:
    """Remove only the data object of ``relpath`` (its attr document stays)."""
    if config.storage_type == "s3":
        async with s3_client(config) as s3:
            await s3.delete_object(Bucket=config.s3_bucket_name, Key=s3_folder(config) + relpath)
    else:
        (config.storage_local_base_path / relpath).unlink()


async def replace_data_object(config: Config, relpath: str, data: bytes) -> None:
    """Overwrite the data object of ``relpath`` behind the element's back."""
    if config.storage_type == "s3":
        async with s3_client(config) as s3:
            await s3.put_object(Bucket=config.s3_bucket_name, Key=s3_folder(config) + relpath,
                                Body=data)
    else:
        (config.storage_local_base_path / relpath).write_bytes(data)


async def wal_outcomes(pg_dsn: str, config: Config) -> list[tuple[str, int]]:
    """(status, reserved_bytes) of every WAL row of ``config``'s element."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch(f"SELECT status, reserved_bytes FROM {config.table_prefix}_wal")
    finally:
        await conn.close()
    return [(r["status"], r["reserved_bytes"]) for r in rows]
