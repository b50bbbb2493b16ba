"""Development RSA keys and token minting for ``python run.py token``.

Only the embedded default uses these keys: when no JWT key is configured the
service generates a key pair under ``<DATA_DIR>/keys`` so a developer can mint
tokens locally.  Tokens carry the claims artStore's admin module issues
(reference §10), so the same verifier path is exercised as in production.
"""

from __future__ import annotations

import os
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

PRIVATE_NAME = "private_key.pem"
PUBLIC_NAME = "public_key.pem"
TOKEN_TYPES = ("admin_user", "service_account", "access", "refresh")
_TTL_RE = re.compile(r"\s*(\d+)\s*([smhd]?)\s*", re.IGNORECASE)
_TTL_UNITS = {"": "seconds", "s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def ensure_dev_keys(directory: Path) -> tuple[Path, Path]:
    """Return ``(private_pem, public_pem)`` under ``directory``, creating them if absent.

    The directory is created with mode 0700 and the private key with mode 0600.
    Idempotent and safe when several workers start at once: the private key is
    published with ``os.link`` (fails if another process won), the public key
    is always derived from whichever private key ended up on disk.
    """
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private, public = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    if not private.exists():
        _publish_private_key(private)
    if not public.exists():
        key = serialization.load_pem_private_key(private.read_bytes(), password=None)
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        _write_atomic(public, pem, 0o644)
    return private, public


def _publish_private_key(private: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = private.with_name(f".{private.name}.{uuid.uuid4().hex}")
    _write_new(tmp, pem, 0o600)
    try:
        os.link(tmp, private)
    except FileExistsError:
        pass  # another worker generated the key first; theirs is the one in use
    finally:
        tmp.unlink()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL + explicit mode: the secret is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # umask may have cleared bits we asked for


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    _write_new(tmp, data, mode)
    os.replace(tmp, path)


def mint_token(
    private_key_pem: bytes,
    *,
    role: str,
    token_type: str,
    name: str,
    sub: str | None = None,
    ttl: timedelta = timedelta(hours=1),
    client_id: str | None = None,
    extra: dict[str, Any] | None = None,
    kid: str | None = None,
) -> str:
    """Sign an RS256 token with the claims artStore's admin module issues.

    ``sub`` defaults to a stable UUID derived from ``name`` for service accounts
    (admin-module uses the account's UUID) and to ``name`` for users.
    ``client_id`` defaults to ``sa_<name>`` / ``user_<name>``.  ``extra`` claims
    are applied last and may override anything (tests use it for iss/aud).

    :raises ValueError: unknown ``token_type``, empty ``name`` or non-positive ``ttl``.
    """
    if token_type not in TOKEN_TYPES:
        raise ValueError(f"token type must be one of {', '.join(TOKEN_TYPES)}")
    if not name or ttl <= timedelta(0):
        raise ValueError("name must be non-empty and ttl positive")
    now = datetime.now(UTC)
    service = token_type == "service_account"
    claims: dict[str, Any] = {
        "sub": sub or (str(uuid.uuid5(uuid.NAMESPACE_URL, f"sa:{name}")) if service else name),
        "type": token_type,
        "role": role,
        "name": name,
        "jti": str(uuid.uuid4()),
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
    }
    default_client = {"service_account": f"sa_{name}", "admin_user": f"user_{name}"}
    if client_id or token_type in default_client:
        claims["client_id"] = client_id or default_client[token_type]
    claims.update(extra or {})
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, private_key_pem, algorithm="RS256", headers=headers)


def parse_ttl(text: str) -> timedelta:
    """Parse ``"3600"``, ``"3600s"``, ``"30m"``, ``"1h"`` or ``"2d"`` into a positive timedelta.

    :raises ValueError: anything else, or zero.
    """
    match = _TTL_RE.fullmatch(text or "")
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"invalid ttl {text!r}: use a positive number with s, m, h or d")
    return timedelta(**{_TTL_UNITS[match.group(2).lower()]: int(match.group(1))})
