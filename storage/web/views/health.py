"""``/``, liveness and readiness (reference §1.3, §8.4), and the Prometheus scrape."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from ...auth.access import Access, gate
from ...db import repo
from ...domain.element import config_key, element, runtime_key
from ...models import utcnow
from ...observability import metrics
from . import ops

log = logging.getLogger(__name__)
READY_STORE_TIMEOUT = 10.0  # seconds the store may take to answer the readiness probe


def _now() -> str:
    return utcnow().isoformat()


@gate(Access.PUBLIC)
async def root(request: web.Request) -> web.Response:
    config = request.app[config_key]
    runtime = request.app[runtime_key]
    return web.json_response({
        "service": "ArtStore Storage Element",
        "version": config.app_version,
        "mode": runtime.mode,
        "storage_type": config.storage_type,
        "status": "operational",
    })


@gate(Access.PUBLIC)
async def live(request: web.Request) -> web.Response:
    return web.json_response(
        {"status": "ok", "timestamp": _now(), "checks": {"process": "running"}}
    )


@gate(Access.PUBLIC)
async def startup(request: web.Request) -> web.Response:
    runtime = request.app[runtime_key]
    done = runtime.started and not runtime.recovering
    return web.json_response(
        {"status": "started" if done else "starting", "timestamp": _now()},
        status=200 if done else 503,
    )


@gate(Access.PUBLIC)
async def ready(request: web.Request) -> web.Response:
    el = element(request)
    checks: dict[str, object] = {
        "storage_type": el.config.storage_type, "storage_mode": el.runtime.mode,
    }
    ok = True
    try:
        async with asyncio.timeout(READY_STORE_TIMEOUT):  # an answer, never a queue
            checks.update(await el.backend.check())
    except Exception as exc:  # any failure makes the element not ready, with the reason
        ok = False
        key = "s3_bucket" if el.backend.name == "s3" else "storage_directory"
        checks[key] = "not_accessible"
        checks["storage_error"] = getattr(exc, "detail", None) or str(exc) or (
            f"no answer within {READY_STORE_TIMEOUT:g} s")
    try:
        await repo.ping(el.db)
        checks["database"] = "connected"
        if pending := await ops.pending_migrations(el):
            ok = False
            checks["migrations"] = "pending: " + ", ".join(pending)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        ok = False
        checks["database"] = "unavailable"
        checks["database_error"] = type(exc).__name__
    if el.runtime.stopping:
        ok = False
        checks["lifecycle"] = "stopping"
    if el.runtime.recovering:
        ok = False
        checks["recovery"] = "running"
    return web.json_response(
        {"status": "ready" if ok else "not_ready", "timestamp": _now(), "checks": checks},
        status=200 if ok else 503,
    )


@gate(Access.PUBLIC)
async def metrics_view(request: web.Request) -> web.Response:
    """Prometheus text exposition of this element's registry."""
    try:
        await asyncio.wait_for(metrics.refresh(request.app), timeout=10)
    except TimeoutError:
        log.warning("metrics refresh timed out; serving the last values")
    body = await asyncio.to_thread(generate_latest, request.app[metrics.metrics_key].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})
