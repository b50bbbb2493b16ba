"""Verification keys: a PEM file followed across rotations, and a JWKS URL by ``kid``.

Both sources fail closed: a missing or unusable key stops startup with a one-line
:class:`AuthConfigError`; a rotation to a broken file keeps the previous key.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from yarl import URL

log = logging.getLogger(__name__)

MIN_KEY_BITS = 2048
PEM_CHECK_INTERVAL = 1.0
JWKS_REFRESH_INTERVAL = 60.0
JWKS_RETRY_AFTER_FAILURE = 5.0  # an endpoint down at startup must not lock us out for a minute
# Everything a malformed token or key can make pyjwt / cryptography / base64 / json raise.
TOKEN_ERRORS = (jwt.PyJWTError, ValueError, TypeError, KeyError, binascii.Error,
                InvalidSignature, UnsupportedAlgorithm)


class AuthConfigError(RuntimeError):
    """The JWT key configuration is unusable; the message is one line naming the setting."""


def load_public_key(path: Path, setting: str = "JWT_PUBLIC_KEY_PATH") -> rsa.RSAPublicKey:
    """Read an RSA public key (>= 2048 bits) from a PEM file.

    :raises AuthConfigError: unreadable file, not PEM, not RSA, or too short.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"{setting}={path}: cannot read key file ({exc.strerror})") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise AuthConfigError(f"{setting}={path}: not a PEM-encoded public key") from None
    return _check_rsa(key, f"{setting}={path}")


def _check_rsa(key: Any, where: str) -> rsa.RSAPublicKey:
    if not isinstance(key, rsa.RSAPublicKey):
        raise AuthConfigError(f"{where}: not an RSA public key (tokens are RS256)")
    if key.key_size < MIN_KEY_BITS:
        raise AuthConfigError(f"{where}: RSA key is {key.key_size} bits, need >= {MIN_KEY_BITS}")
    return key


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class PemKeySource:
    """A PEM public key file, re-read when its inode, size or mtime changes."""

    def __init__(self, path: Path, now: float) -> None:
        self.path = Path(path)
        self.key = load_public_key(self.path)
        self._stamp = _stamp(self.path)
        self._next_check = now + PEM_CHECK_INTERVAL

    def current(self, now: float) -> rsa.RSAPublicKey:
        """The key to verify with; at most one cheap ``os.stat`` per interval."""
        if now >= self._next_check:
            self._next_check = now + PEM_CHECK_INTERVAL
            self._reload_if_changed()
        return self.key

    def _reload_if_changed(self) -> None:
        try:
            stamp = _stamp(self.path)
        except OSError:
            return  # mid-rotation (rm + create): keep the loaded key, look again later
        if stamp == self._stamp:
            return
        self._stamp = stamp  # a broken new file is reported once, not every second
        try:
            self.key = load_public_key(self.path)
            log.info("JWT public key reloaded from %s", self.path)
        except AuthConfigError as exc:
            log.error("JWT key reload failed, keeping the previous key: %s", exc)


def parse_jwks(doc: Any) -> dict[str, rsa.RSAPublicKey]:
    """Usable RS256 signing keys of a JWKS document, by ``kid``; others are skipped.

    :raises ValueError: ``doc`` is not a JWKS document.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str, rsa.RSAPublicKey] = {}
    for index, jwk in enumerate(doc["keys"]):
        if not (isinstance(jwk, dict) and jwk.get("kty") == "RSA"
                and jwk.get("use", "sig") == "sig" and jwk.get("alg", "RS256") == "RS256"):
            continue
        kid = jwk.get("kid") if isinstance(jwk.get("kid"), str) else f"#{index}"
        try:
            key = RSAAlgorithm.from_jwk(jwk)
            if isinstance(key, rsa.RSAPrivateKey):
                key = key.public_key()
            keys[kid] = _check_rsa(key, f"JWKS key {kid!r}")
        except (*TOKEN_ERRORS, AuthConfigError) as exc:
            log.warning("JWKS: skipping key %r: %s", kid, exc)
    return keys


class JwksSource:
    """Keys fetched from a JWKS URL, cached, refreshed at most once per interval."""

    def __init__(self, url: str) -> None:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise AuthConfigError(f"JWT_JWKS_URL={url!r}: must be an http(s) URL")
        self.url = url
        self.keys: dict[str, rsa.RSAPublicKey] = {}
        self.fetches = 0
        self._next_allowed = float("-inf")
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def refresh(self, now: float) -> None:
        """Re-fetch unless one happened within the interval; failures are logged, not raised."""
        async with self._lock:  # concurrent requests with a new kid share one fetch
            if now < self._next_allowed:
                return
            self._next_allowed = now + JWKS_RETRY_AFTER_FAILURE
            try:
                self.keys = await self._fetch()
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                log.warning("JWKS fetch from %s failed: %s: %s", self.url, type(exc).__name__, exc)
                return
            self._next_allowed = now + JWKS_REFRESH_INTERVAL
            log.info("JWKS: %d key(s) loaded from %s", len(self.keys), self.url)

    async def _fetch(self) -> dict[str, rsa.RSAPublicKey]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self.fetches += 1
        async with self._session.get(self.url) as resp:
            resp.raise_for_status()
            return parse_jwks(await resp.json(content_type=None))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
