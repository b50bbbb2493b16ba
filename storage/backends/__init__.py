"""Storage backends behind one seam: local disk and S3."""

from __future__ import annotations

from ..config import Config
from .base import Backend


def make_backend(config: Config) -> Backend:
    """The backend chosen by ``STORAGE_TYPE``."""
    if config.storage_type == "s3":
        from .s3 import S3Backend

        return S3Backend(config)
    from .local import LocalBackend

    return LocalBackend(config)
