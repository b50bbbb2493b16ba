"""Configuration: one frozen dataclass built once from the environment.

Nothing else in the package reads ``os.environ``; ``run.py`` calls
:func:`Config.from_env` and passes the result to ``make_app``.  The env var
names are artStore's (reference §9) plus ``DATABASE_URL`` and a few of our own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

PREFIX_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
MODES = ("edit", "rw", "ro", "ar")
_TRUE = {"on", "true", "1", "yes"}
# What browser tus clients (tus-js-client, Uppy) send and must read across origins.
TUS_REQUEST_HEADERS = ("Tus-Resumable", "Upload-Length", "Upload-Defer-Length",
                       "Upload-Metadata", "Upload-Offset", "Upload-Checksum",
                       "X-HTTP-Method-Override", "X-Requested-With")
TUS_RESPONSE_HEADERS = ("Location", "Tus-Resumable", "Tus-Version", "Tus-Extension",
                        "Tus-Max-Size", "Tus-Checksum-Algorithm", "Upload-Offset",
                        "Upload-Length", "Upload-Defer-Length", "Upload-Metadata",
                        "Upload-Expires", "X-Request-ID")
_FALSE = {"off", "false", "0", "no"}


class ConfigError(ValueError):
    """A setting is invalid; the message names the variable and what is allowed."""


def validate_prefix(prefix: str, var: str = "DB_TABLE_PREFIX") -> str:
    """Return ``prefix`` if it is a safe SQL identifier stem, else raise ConfigError."""
    if not isinstance(prefix, str) or not PREFIX_RE.fullmatch(prefix):
        raise ConfigError(
            f"{var}={prefix!r} is invalid: use 1-32 characters matching ^[a-z][a-z0-9_]{{0,31}}$"
        )
    return prefix


def _bool(var: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{var}={raw!r} is invalid: use on/off, true/false or 1/0")


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str, str], int]:
    def parse(var: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{var}={raw!r} is invalid: expected an integer") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
            raise ConfigError(f"{var}={raw!r} is out of range: allowed {bounds}")
        return value

    return parse


def _float(lo: float = 0.0, hi: float = 100.0) -> Callable[[str, str], float]:
    def parse(var: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(f"{var}={raw!r} is invalid: expected a number") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{var}={raw!r} is out of range: allowed {lo}..{hi}")
        return value

    return parse


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(var: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ConfigError(f"{var}={raw!r} is invalid: allowed values are {', '.join(allowed)}")
        return value

    return parse


def _str(var: str, raw: str) -> str:
    return raw


def _opt_str(var: str, raw: str) -> str | None:
    return raw or None


def _prefix(var: str, raw: str) -> str:
    return validate_prefix(raw, var)


def _origins(var: str, raw: str) -> tuple[str, ...]:
    text = raw.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            raise ConfigError(f"{var} is invalid: expected a JSON list of origins") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{var} is invalid: expected a JSON list of strings")
        return tuple(items)
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _base_url(var: str, raw: str) -> str | None:
    """An absolute http(s) URL without user info, query or fragment; no trailing slash."""
    text = raw.strip()
    if not text:
        return None
    try:
        parts = urlsplit(text)
        port = parts.port  # ValueError when out of range
    except ValueError:
        parts, port = None, None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or "@" in parts.netloc or parts.query or parts.fragment or " " in text
            or port == 0):
        raise ConfigError(f"{var}={raw!r} is invalid: expected an absolute http(s) URL "
                          "such as https://storage.example.org/se01 (no query, no user)")
    return text.rstrip("/")


def _path(var: str, raw: str) -> Path:
    return Path(raw).expanduser()


def _opt_path(var: str, raw: str) -> Path | None:
    return Path(raw).expanduser() if raw else None


def env(name: str, parse: Callable[[str, str], Any], default: Any) -> Any:
    """Declare a field read from env var ``name`` with ``parse`` and ``default``."""
    return field(default=default, metadata={"env": name, "parse": parse})


@dataclass(frozen=True, slots=True)
class Config:
    # application
    app_name: str = env("APP_NAME", _str, "storage-element")
    app_display_name: str = env("APP_DISPLAY_NAME", _str, "Storage Element")
    app_version: str = env("APP_VERSION", _str, "1.0.0")
    app_mode: str = env("APP_MODE", _choice(*MODES), "rw")
    environment: str = env("ENVIRONMENT", _str, "development")
    # server
    server_host: str = env("SERVER_HOST", _str, "0.0.0.0")  # noqa: S104 - a server listens
    server_port: int = env("SERVER_PORT", _int(1, 65535), 8000)
    server_workers: int = env("SERVER_WORKERS", _int(1, 64), 1)
    shutdown_timeout: float = env("SHUTDOWN_TIMEOUT", _float(0, 3600), 30.0)
    # closes a connection idle (or still sending its request headers) this long: the
    # only guard aiohttp has against slowloris headers and piles of idle connections
    keepalive_timeout: float = env("SERVER_KEEPALIVE_TIMEOUT", _float(0.5, 3600), 75.0)
    # absolute URLs handed out (the tus Location): PUBLIC_BASE_URL when set, else the
    # connection's scheme and Host, replaced by a proxy's Forwarded / X-Forwarded-Proto /
    # X-Forwarded-Host only when TRUST_FORWARDED_HEADERS (storage/web/origin.py)
    public_base_url: str | None = env("PUBLIC_BASE_URL", _base_url, None)
    trust_forwarded_headers: bool = env("TRUST_FORWARDED_HEADERS", _bool, False)
    data_dir: Path = env("DATA_DIR", _path, Path("./data"))
    # database
    database_url: str | None = env("DATABASE_URL", _opt_str, None)
    db_host: str | None = env("DB_HOST", _opt_str, None)
    db_port: int = env("DB_PORT", _int(1, 65535), 5432)
    db_username: str = env("DB_USERNAME", _str, "artstore")
    db_password: str = env("DB_PASSWORD", _str, "password")
    db_database: str = env("DB_DATABASE", _str, "artstore_storage_01")
    db_pool_size: int = env("DB_POOL_SIZE", _int(1, 1000), 10)
    db_pool_timeout: float = env("DB_POOL_TIMEOUT", _float(0.1, 3600), 30.0)
    table_prefix: str = env("DB_TABLE_PREFIX", _prefix, "storage_elem_01")
    db_auto_migrate: bool = env("DB_AUTO_MIGRATE", _bool, True)
    ssl_enabled: bool = env("SSL_ENABLED", _bool, False)
    ssl_mode: str = env(
        "SSL_MODE",
        _choice("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
        "require",
    )
    # storage
    storage_type: str = env("STORAGE_TYPE", _choice("local", "s3"), "local")
    storage_local_base_path: Path = env("STORAGE_LOCAL_BASE_PATH", _path, Path("./data/storage"))
    # at most 2**61 (2 EiB): stored + reserved + one request's need stays a bigint
    storage_max_size: int = env("STORAGE_MAX_SIZE", _int(1, 2**61), 1073741824)
    storage_max_file_size: int = env("STORAGE_MAX_FILE_SIZE", _int(0, 2**61), 0)
    storage_disk_reserve: int = env("STORAGE_DISK_RESERVE", _int(0), 64 * 1024 * 1024)
    storage_element_id: str = env("STORAGE_ELEMENT_ID", _str, "se-local-01")
    storage_priority: int = env("STORAGE_PRIORITY", _int(), 100)
    storage_datacenter_location: str = env("STORAGE_DATACENTER_LOCATION", _str, "dc1")
    s3_endpoint_url: str = env("STORAGE_S3_ENDPOINT_URL", _str, "http://localhost:9000")
    s3_access_key_id: str = env("STORAGE_S3_ACCESS_KEY_ID", _str, "minioadmin")
    s3_secret_access_key: str = env("STORAGE_S3_SECRET_ACCESS_KEY", _str, "minioadmin")
    s3_bucket_name: str = env("STORAGE_S3_BUCKET_NAME", _str, "artstore-files")
    s3_app_folder: str = env("STORAGE_S3_APP_FOLDER", _str, "storage_element_01")
    s3_region: str = env("STORAGE_S3_REGION", _str, "us-east-1")
    s3_addressing_style: str = env(
        "STORAGE_S3_ADDRESSING_STYLE", _choice("path", "virtual", "auto"), "path"
    )
    s3_multipart_threshold: int = env(
        "STORAGE_S3_MULTIPART_THRESHOLD", _int(5 * 1024 * 1024), 8 * 1024 * 1024
    )
    # connections of each of the two S3 clients (one for downloads' streams, one for the
    # rest); a download holds one for as long as its client takes to read
    s3_max_connections: int = env("STORAGE_S3_MAX_CONNECTIONS", _int(1, 10_000), 64)
    # a streamed download whose client takes no bytes for this long is cut (its S3
    # connection freed); the download twin of UPLOAD_READ_TIMEOUT
    download_write_timeout: float = env("DOWNLOAD_WRITE_TIMEOUT", _float(0.1, 86400), 60.0)
    # uploads
    upload_chunk_size: int = env("UPLOAD_CHUNK_SIZE", _int(4096, 64 * 1024 * 1024), 1024 * 1024)
    io_threads: int = env("IO_THREADS", _int(1, 512), 32)  # file I/O and fsync run here
    upload_read_timeout: float = env("UPLOAD_READ_TIMEOUT", _float(0.1, 86400), 60.0)
    # bytes/s averaged over the body so far, from the first UPLOAD_READ_TIMEOUT on; 0: off
    upload_min_rate: int = env("UPLOAD_MIN_RATE", _int(0, 2**40), 64 * 1024)
    # resumable (tus) uploads: an unfinished upload untouched this long is removed
    upload_expiry_hours: float = env("UPLOAD_EXPIRY_HOURS", _float(0.0001, 87600), 24.0)
    # bytes one caller (token ``sub``) may hold reserved in unfinished resumable uploads;
    # past it creation and growth get 507.  0: no bound (one upload may hold the capacity)
    upload_max_pending_bytes: int = env("UPLOAD_MAX_PENDING_BYTES", _int(0, 2**61), 0)
    # auth
    jwt_public_key_path: Path | None = env("JWT_PUBLIC_KEY_PATH", _opt_path, None)
    jwt_jwks_url: str | None = env("JWT_JWKS_URL", _opt_str, None)
    jwt_algorithm: str = env("JWT_ALGORITHM", _choice("rs256"), "rs256")
    jwt_leeway_seconds: int = env("JWT_LEEWAY_SECONDS", _int(0, 3600), 30)
    jwt_issuer: str | None = env("JWT_ISSUER", _opt_str, None)
    jwt_audience: str | None = env("JWT_AUDIENCE", _opt_str, None)
    # WAL, cache, capacity
    # at least a day: every rebuild guard reads the finished WAL rows of the files it
    # finds, and a maintenance run can take hours (issue 22)
    wal_retention_hours: int = env("WAL_RETENTION_HOURS", _int(24), 168)
    # crash tests only: SIGKILL at this named step (storage/domain/faults.py)
    fault_point: str | None = env("STORAGE_FAULT_POINT", _opt_str, None)
    capacity_warning_threshold: float = env("CAPACITY_WARNING_THRESHOLD", _float(), 80.0)
    capacity_critical_threshold: float = env("CAPACITY_CRITICAL_THRESHOLD", _float(), 90.0)
    capacity_full_threshold: float = env("CAPACITY_FULL_THRESHOLD", _float(), 98.0)
    # observability
    log_level: str = env(
        "LOG_LEVEL", _choice("debug", "info", "warning", "error", "critical"), "info"
    )
    log_format: str | None = env("LOG_FORMAT", _choice("json", "text"), None)
    metrics_enabled: bool = env("METRICS_ENABLED", _bool, True)
    metrics_path: str = env("METRICS_PATH", _str, "/metrics")
    health_liveness_path: str = env("HEALTH_LIVENESS_PATH", _str, "/health/live")
    health_readiness_path: str = env("HEALTH_READINESS_PATH", _str, "/health/ready")
    cors_enabled: bool = env("CORS_ENABLED", _bool, True)
    cors_allow_origins: tuple[str, ...] = env(
        "CORS_ALLOW_ORIGINS", _origins, ("http://localhost:4200", "http://localhost:8000")
    )
    cors_allow_credentials: bool = env("CORS_ALLOW_CREDENTIALS", _bool, True)
    cors_max_age: int = env("CORS_MAX_AGE", _int(0), 600)
    cors_allow_methods: tuple[str, ...] = env(
        "CORS_ALLOW_METHODS", _origins,
        ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"),
    )
    cors_allow_headers: tuple[str, ...] = env(
        "CORS_ALLOW_HEADERS", _origins,
        ("Content-Type", "Authorization", "X-Request-ID", "X-Trace-ID", *TUS_REQUEST_HEADERS),
    )
    cors_expose_headers: tuple[str, ...] = env("CORS_EXPOSE_HEADERS", _origins,
                                               TUS_RESPONSE_HEADERS)
    otel_exporter_otlp_endpoint: str | None = env("OTEL_EXPORTER_OTLP_ENDPOINT", _opt_str, None)
    otel_service_name: str | None = env("OTEL_SERVICE_NAME", _opt_str, None)
    mode_refresh_interval: float = env("MODE_REFRESH_INTERVAL", _float(0.05, 60), 0.25)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Config:
        """Build a Config from ``environ``; raise ConfigError naming the first bad variable."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            raw = environ.get(name)
            if raw is not None and (raw != "" or f.default is None):
                values[f.name] = f.metadata["parse"](name, raw)
        config = cls(**{**values, **overrides})
        config.check()
        return config

    def check(self) -> None:
        """Cross-field rules that a single variable cannot express."""
        validate_prefix(self.table_prefix)
        if not (
            self.capacity_warning_threshold
            <= self.capacity_critical_threshold
            <= self.capacity_full_threshold
        ):
            raise ConfigError(
                "CAPACITY_WARNING_THRESHOLD <= CAPACITY_CRITICAL_THRESHOLD <= "
                "CAPACITY_FULL_THRESHOLD must hold"
            )
        folder = self.s3_app_folder.strip("/")
        if self.storage_type == "s3" and (not folder or "/" in folder):
            raise ConfigError(
                f"STORAGE_S3_APP_FOLDER={self.s3_app_folder!r} is invalid: use one non-empty "
                "path segment without '/' (a folder nested in another element's folder "
                "would mix their objects and uploads)"
            )
        if self.cors_allow_credentials and "*" in self.cors_allow_origins:
            raise ConfigError(
                "CORS_ALLOW_ORIGINS='*' cannot be combined with CORS_ALLOW_CREDENTIALS=on"
            )

    @property
    def embedded(self) -> bool:
        """True when no database is configured and the service starts its own PostgreSQL."""
        return not self.database_url and not self.db_host

    @property
    def dsn(self) -> str | None:
        """libpq URI for the configured database, or None for the embedded default."""
        if self.database_url:
            return self.database_url
        if not self.db_host:
            return None
        user = quote(self.db_username, safe="")
        password = quote(self.db_password, safe="")
        dsn = f"postgresql://{user}:{password}@{self.db_host}:{self.db_port}/{self.db_database}"
        return dsn + (f"?sslmode={self.ssl_mode}" if self.ssl_enabled else "")

    def with_(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied and re-checked (used by tests and the CLI)."""
        config = replace(self, **changes)
        config.check()
        return config
