"""Small helpers shared by the HTTP-level tests."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from aiohttp import FormData


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
