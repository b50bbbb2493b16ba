"""The app factory: ``make_app(config)`` wires resources, middlewares and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from ..auth.bearer import auth_ctx, auth_middleware
from ..backends import make_backend
from ..config import Config
from ..db import migrate
from ..db.embedded import EmbeddedPostgres
from ..db.pool import close_db, open_db
from ..domain import liveness, recovery_passes
from ..domain.element import (
    Element,
    backend_key,
    config_key,
    db_key,
    dsn_key,
    element_key,
    runtime_key,
)
from ..domain.groupcommit import GroupCommit
from ..domain.modes import load_persisted_mode, mode_ctx
from ..domain.runtime import Runtime
from ..errors import error_middleware
from ..observability import metrics
from ..observability.metrics import metrics_key
from ..observability.tracing import tracing_ctx
from . import middleware
from .middleware import cors_middleware, request_middleware
from .protocol import HANDLER_ARGS
from .routes import setup_routes
from .views import tus

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """Startup cannot continue; the message is one line for the operator."""


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    """Resolve the DSN (starting the embedded PostgreSQL if needed) and migrate the schema."""
    config = app[config_key]
    embedded = None
    dsn = config.dsn
    if dsn is None:
        embedded = EmbeddedPostgres(config.data_dir)
        dsn = await asyncio.to_thread(embedded.start)
    app[dsn_key] = dsn
    try:
        if config.db_auto_migrate:
            await asyncio.to_thread(migrate.apply, dsn, config.table_prefix)
        else:
            pending = (await asyncio.to_thread(migrate.status, dsn, config.table_prefix)).pending
            if pending:
                raise StartupError(
                    f"database schema for prefix {config.table_prefix!r} is behind "
                    f"(pending: {', '.join(pending)}); run `python run.py migrate` "
                    "or set DB_AUTO_MIGRATE=on"
                )
        db = await open_db(dsn, config.table_prefix, max_size=config.db_pool_size,
                           timeout=config.db_pool_timeout)
        app[db_key] = db
        log.info("database ready: %s (prefix %s)", "embedded" if embedded else _safe(dsn),
                 config.table_prefix)
        yield
        await close_db(db)
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


def _safe(dsn: str) -> str:
    """The DSN without its password, for logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return dsn


async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[config_key]
    backend = make_backend(config)
    await backend.start()
    app[backend_key] = backend
    log.info("storage ready: %s at %s", backend.name, backend.location)
    yield
    await backend.close()


async def element_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[config_key]
    runtime = Runtime(config)
    app[runtime_key] = runtime
    db, backend = app[db_key], app[backend_key]
    commits = GroupCommit(db, config, backend.free_bytes,
                          observe=app[metrics_key].group_commit.observe)
    app[element_key] = Element(config, db, backend, runtime, commits)
    for hook in app.get(startup_hooks_key, ()):
        await hook(app)
    runtime.started = True
    yield
    runtime.stopping = True
    await commits.close()


async def recovery_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context (after ``element_ctx``): this process's lease, startup recovery
    before the port opens, the serve lock for the process lifetime, the heartbeat and
    the periodic maintenance task.  At shutdown the group commit drains *before* the
    lease and the serve lock are given up: until then this process is alive to the
    others, and nobody resolves the intents its last commits settle."""
    el = app[element_key]
    dsn = app[dsn_key]
    counted = app[metrics_key].count_recovery
    lease = liveness.Lease(el.db, "serving")  # registered by the startup pass
    el.runtime.lease = lease
    el.commits.orphaned = lease.disown
    conn = await recovery_passes.connect(dsn)
    el.runtime.recovering = True
    try:
        report = await recovery_passes.startup(el, conn, serve=True, lease=lease)
        log.info("startup recovery (%s pass): %s", report.mode, report.summary())
        counted(report)
    except Exception:  # serve anyway: pending rows stay pending, the periodic pass retries
        log.exception("startup recovery failed")
        app[metrics_key].recovery_runs.labels("error").inc()
    finally:
        el.runtime.recovering = False
    if not lease.registered:  # the pass failed before: the next heartbeat retries
        with contextlib.suppress(Exception):
            await lease.register()
    holder = [conn]
    tasks = [asyncio.create_task(recovery_passes.keep_alive(el, dsn, holder, lease),
                                 name="liveness"),
             asyncio.create_task(recovery_passes.maintain(el, counted), name="wal-maintenance")]
    try:
        yield
    finally:
        el.runtime.stopping = True
        await el.commits.close()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await lease.drop()
        except Exception:  # noqa: BLE001 - it expires by itself
            log.warning("could not drop this process's lease; it expires in %gs",
                        liveness.LEASE_TTL_S)
        await holder[0].close()


startup_hooks_key = web.AppKey("startup_hooks", list)


def make_app(config: Config) -> web.Application:
    """Build the application for one element; nothing global is touched."""
    app = web.Application(
        middlewares=[error_middleware, request_middleware, cors_middleware, auth_middleware],
        client_max_size=1024 * 1024,
        handler_args=HANDLER_ARGS,  # the parser's limits: 414 / 431 (storage/web/protocol.py)
    )
    app[config_key] = config
    app[startup_hooks_key] = [load_persisted_mode]  # the persisted mode first: hooks see it
    metrics.install(app)
    middleware.install(app)
    tus.install(app)
    app.cleanup_ctx.extend([auth_ctx, database_ctx, storage_ctx, tracing_ctx, element_ctx,
                            recovery_ctx, mode_ctx])
    setup_routes(app)
    return app
