"""Storage backends behind one seam (:mod:`.base`): local disk and S3; and the staging
of resumable uploads behind another (:mod:`.staging`)."""

from __future__ import annotations

from ..config import Config
from .base import Backend
from .staging import Staging


def make_backend(config: Config) -> Backend:
    """The backend chosen by ``STORAGE_TYPE`` (S3's client library is imported only then)."""
    if config.storage_type == "s3":
        from .s3 import S3Backend

        return S3Backend(config)
    from .local import LocalBackend

    return LocalBackend(config)


def make_staging(backend: Backend) -> Staging:
    """The staging of ``backend``'s kind."""
    if backend.name == "s3":
        from .staging_s3 import S3Staging

        return S3Staging(backend)  # type: ignore[arg-type]
    from .staging_local import LocalStaging

    return LocalStaging(backend)  # type: ignore[arg-type]
