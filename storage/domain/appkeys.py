"""Typed application keys, declared in one place."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..backends.base import Backend
from ..config import Config
from ..db.pool import Db
from .runtime import Runtime

config_key = web.AppKey("config", Config)
dsn_key = web.AppKey("dsn", str)
db_key = web.AppKey("db", Db)
backend_key = web.AppKey("backend", Backend)
runtime_key = web.AppKey("runtime", Runtime)
auth_key = web.AppKey("auth", Any)
metrics_key = web.AppKey("metrics", Any)
