"""``/api/v1/info``, ``/api/v1/capacity`` and the runtime mode API (reference §8.1-8.2, §14)."""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web

from ...auth.access import Access, gate, identity
from ...db import migrate
from ...domain import capacity, modes, validate
from ...domain.element import Element, element
from ...errors import BadRequest, invalid
from ...models import utcnow
from ...observability.metrics import metrics_key

MAX_HISTORY = 1000


@functools.cache
def _expected_migrations() -> frozenset[str]:
    return frozenset(p.stem for p in migrate.MIGRATIONS_DIR.glob("*.py")
                     if not p.stem.startswith(("_", "post-apply")))


async def pending_migrations(el: Element) -> list[str]:
    """Migrations on disk that this prefix has not applied (readiness)."""
    applied = {r["migration_id"] for r in await el.db.pool.fetch(el.db.q.applied_migrations)}
    return sorted(_expected_migrations() - applied)


def _status(mode: str, stopping: bool, db_ok: bool) -> str:
    """admin-module's vocabulary: operational, degraded, maintenance, offline."""
    if stopping:
        return "offline"
    if not db_ok:
        return "degraded"
    return "maintenance" if mode == "ar" else "operational"


@gate(Access.PUBLIC)
async def info(request: web.Request) -> web.Response:
    """Discovery for admin-module: all twelve keys, always, with int counts from the DB."""
    el = element(request)
    config = el.config
    try:
        usage: capacity.Usage | None = await capacity.usage(el)
    except Exception:  # noqa: BLE001 - upstream answered 0/0; we also say "degraded"
        usage = None
    mode = el.runtime.mode
    return web.json_response({
        "name": config.app_name,
        "display_name": config.app_display_name,
        "version": config.app_version,
        "mode": mode,
        "storage_type": config.storage_type,
        "base_path": str(el.backend.location),
        "capacity_bytes": config.storage_max_size,
        "used_bytes": usage.stored if usage else 0,
        "file_count": usage.files if usage else 0,
        "status": _status(mode, el.runtime.stopping, usage is not None),
        "priority": config.storage_priority,
        "element_id": config.storage_element_id,
        "timestamp": utcnow().isoformat(),
    })


@gate(Access.PUBLIC)
async def capacity_view(request: web.Request) -> web.Response:
    """What the ingester polls (reference §8.2); see storage/domain/capacity.py for the numbers."""
    el = element(request)
    cap = await capacity.snapshot(el)
    request.app[metrics_key].set_capacity(cap)
    return web.json_response({
        "storage_id": el.config.storage_element_id,
        "mode": el.runtime.mode,
        "capacity": cap.to_json(),
        "health": cap.health,
        "backend": el.config.storage_type,
        "location": el.config.storage_datacenter_location,
        "last_update": utcnow().isoformat().replace("+00:00", "Z"),
    })


def _mode_body(mode: str, row: dict[str, Any]) -> dict[str, Any]:
    changed_at = row["mode_changed_at"]
    return {
        "mode": mode,
        "persisted": row["current_mode"] is not None,
        "changed_at": changed_at.isoformat() if changed_at else None,
        "changed_by": row["mode_changed_by"],
        "allowed_operations": list(modes.OPERATIONS[mode]),
        "allowed_transitions": modes.allowed_targets(mode),
    }


@gate(Access.READ)
async def get_mode(request: web.Request) -> web.Response:
    el = element(request)
    row = await modes.persisted(el)
    return web.json_response(_mode_body(el.runtime.mode, row))


async def _transition_body(request: web.Request) -> tuple[Any, bool]:
    if request.content_length is not None and request.content_length > 64 * 1024:
        raise BadRequest("request body too large (limit 64 KiB)")
    body = validate.strict_json(await request.read() or b"")
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    if "target_mode" not in body:
        raise invalid("target_mode", "Field required")
    target = body["target_mode"]
    if not isinstance(target, str):
        raise invalid("target_mode", "Input should be a string", target)
    confirm = body.get("confirm", False)
    if confirm is None:
        confirm = False
    if not isinstance(confirm, bool):
        raise invalid("confirm", "Input should be a valid boolean", confirm)
    return target.strip().lower(), confirm


@gate(Access.ADMIN)
async def set_mode(request: web.Request) -> web.Response:
    """``{"target_mode", "confirm"}``: rw → ro → ar, ro → rw with confirm; edit is isolated."""
    el = element(request)
    target, confirm = await _transition_body(request)
    change = await modes.change_mode(el, target, confirm, identity(request))
    request.app[metrics_key].set_mode(change.to_mode)
    return web.json_response({
        "previous_mode": change.from_mode,
        "current_mode": change.to_mode,
        "transitioned_at": change.changed_at.isoformat(),
        "changed_by": change.changed_by,
    })


@gate(Access.ADMIN)
async def mode_history(request: web.Request) -> web.Response:
    el = element(request)
    limit = validate.int_param(request.query.get("limit"), "limit", 100, lo=1, hi=MAX_HISTORY,
                               clamp=True)
    return web.json_response(
        {"history": [c.to_history() for c in await modes.history(el, limit)]})
