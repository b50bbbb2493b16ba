"""The running element: config, database, backend and runtime state of one app, and the
typed keys under which an aiohttp app holds it and its parts (set by
``storage.web.app`` while it starts, in that order, before the Element exists)."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from ..backends.base import Backend
from ..config import Config
from ..db.pool import Db
from .groupcommit import GroupCommit
from .runtime import Runtime
from .served import ServedCache


@dataclass(frozen=True, slots=True)
class Element:
    config: Config
    db: Db
    backend: Backend
    runtime: Runtime
    commits: GroupCommit  # the write batcher: reservations and finishes of uploads
    served: ServedCache = field(default_factory=ServedCache)  # download facts, for a minute

    @property
    def prefix(self) -> str:
        return self.db.q.prefix


config_key = web.AppKey("config", Config)
dsn_key = web.AppKey("dsn", str)
db_key = web.AppKey("db", Db)
backend_key = web.AppKey("backend", Backend)
runtime_key = web.AppKey("runtime", Runtime)
element_key = web.AppKey("element", Element)


def element(request: web.Request) -> Element:
    return request.app[element_key]
