"""Runtime mode transitions (goartstore §4): rules, persistence, cross-process refresh.

The permission matrix itself stays artStore's (:func:`require`, checked when a request
starts against ``runtime.mode`` and again where the change commits, against the mode in
the database).  This module also decides which *mode changes* are allowed, stores
the mode in ``<prefix>_config.current_mode`` with one history row per change,
and keeps every process of the element in step:

- ``rw -> ro -> ar`` is the permanent lifecycle; ``ro -> rw`` is the single
  backward step and needs ``confirm: true``; ``edit`` is isolated.
- A persisted mode (non-NULL ``current_mode``) overrides ``APP_MODE`` at startup.
- Each process polls the persisted mode every ``MODE_REFRESH_INTERVAL`` seconds
  (0.25 s by default), so a change made through any process is seen by all of
  them within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from ..config import MODES
from ..errors import BadRequest, Conflict
from ..models import Identity, utcnow
from .element import Element, element_key

log = logging.getLogger(__name__)

FORWARD = {("rw", "ro"), ("ro", "ar")}
CONFIRMED = {("ro", "rw")}
OPERATIONS = {
    "edit": ("upload", "download", "update", "delete", "list"),
    "rw": ("upload", "download", "update", "list"),
    "ro": ("download", "list"),
    "ar": ("download", "list"),  # artStore never blocked downloads in ar (reference §1.2)
}


# the modes that allow each change, and what a refused one is told (artStore's messages)
ALLOWED = {"upload": ("edit", "rw"), "update": ("edit", "rw"), "delete": ("edit",)}
_REFUSED = {
    "upload": "File upload not allowed in {mode} mode",
    "update": "Metadata update not allowed in {mode} mode",
    "delete": "File deletion not allowed in {mode} mode. Only EDIT mode allows deletion.",
}


def require(action: str, mode: str) -> None:
    """:raises BadRequest: when ``mode`` does not allow ``action`` (the artStore matrix,
    reference §1.2, with its exact messages)."""
    if mode not in ALLOWED[action]:
        raise BadRequest(_REFUSED[action].format(mode=mode))


class InvalidTransition(Conflict):
    code = "invalid_transition"


class ConfirmationRequired(Conflict):
    code = "confirmation_required"


def allowed_targets(current: str) -> list[str]:
    """The modes ``current`` may change to (with confirmation where needed)."""
    return [to for (frm, to) in sorted(FORWARD | CONFIRMED) if frm == current]


def check_transition(current: str, target: Any, confirm: bool) -> None:
    """Raise unless ``current -> target`` is allowed.

    :raises BadRequest: ``target`` is not a mode, or is the current one.
    :raises ConfirmationRequired: ``ro -> rw`` without ``confirm``.
    :raises InvalidTransition: any other change (edit in or out, skipping, leaving ar).
    """
    if target not in MODES:
        raise BadRequest(f"Unknown mode {str(target)[:20]!r}: expected one of {', '.join(MODES)}")
    if target == current:
        raise BadRequest(f"The element is already in {current} mode")
    if (current, target) in FORWARD:
        return
    if (current, target) in CONFIRMED:
        if not confirm:
            raise ConfirmationRequired(
                f"Changing {current} -> {target} re-opens the element for writes; "
                "send confirm: true to do it"
            )
        return
    allowed = allowed_targets(current)
    raise InvalidTransition(
        f"Changing {current} -> {target} is not allowed; from {current} the element can go to "
        + (", ".join(allowed) if allowed else "no other mode")
    )


@dataclass(frozen=True, slots=True)
class ModeChange:
    from_mode: str
    to_mode: str
    changed_by: str
    changed_at: datetime

    def to_history(self) -> dict[str, str]:
        return {"from_mode": self.from_mode, "to_mode": self.to_mode,
                "changed_by": self.changed_by, "changed_at": self.changed_at.isoformat()}


async def change_mode(el: Element, target: Any, confirm: bool, who: Identity) -> ModeChange:
    """Check, persist and apply one transition; the row lock serialises concurrent changes
    (and the writes in flight, see migrations/0007.group_commit.py)."""
    q = el.db.q
    async with el.db.pool.acquire() as conn, conn.transaction():
        # PATCH/DELETE in flight finish first (each holds this lock shared), and uploads
        # commit under the row locked next: nothing is written after a change to ro
        await conn.execute(q.lock_writes)
        row = await conn.fetchrow(q.lock_mode)
        current = row["current_mode"] or el.runtime.mode
        check_transition(current, target, confirm)
        now = utcnow()
        await conn.execute(q.set_mode, target, now, who.sub)
        rec = await conn.fetchrow(q.insert_mode_history, current, target, who.sub, who.name, now)
    el.runtime.mode = target
    log.info("mode changed %s -> %s by %s (%s)", current, target, who.sub, who.name)
    return ModeChange(**dict(rec))


async def history(el: Element, limit: int) -> list[ModeChange]:
    return [ModeChange(**dict(r)) for r in await el.db.pool.fetch(el.db.q.list_mode_history,
                                                                   limit)]


async def persisted(el: Element) -> dict[str, Any]:
    """``current_mode`` (None: APP_MODE applies), ``mode_changed_at``, ``mode_changed_by``."""
    return dict(await el.db.pool.fetchrow(el.db.q.get_mode))


def _apply(el: Element, mode: str | None, who: str | None, *, startup: bool) -> None:
    if mode is None or mode == el.runtime.mode:
        return
    if mode not in MODES:
        log.error("ignoring invalid persisted mode %r in %s_config", mode, el.prefix)
        return
    if startup:
        log.warning("APP_MODE=%s is overridden by the persisted mode %s (set by %s); "
                    "change it with POST /api/v1/mode", el.config.app_mode, mode, who)
    else:
        log.info("mode changed %s -> %s by %s (seen from another process)",
                 el.runtime.mode, mode, who)
    el.runtime.mode = mode


async def load_persisted_mode(app: web.Application) -> None:
    """Startup hook: a persisted mode wins over ``APP_MODE`` (logged)."""
    el = app[element_key]
    row = await persisted(el)
    _apply(el, row["current_mode"], row["mode_changed_by"], startup=True)


async def refresh_once(el: Element) -> None:
    row = await persisted(el)
    _apply(el, row["current_mode"], row["mode_changed_by"], startup=False)


async def _refresh_loop(el: Element, interval: float) -> None:
    failing = False
    while True:
        await asyncio.sleep(interval)
        try:
            async with asyncio.timeout(max(interval * 4, 2.0)):
                await refresh_once(el)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database may be away for a while; keep the last mode
            if not failing:
                log.warning("cannot refresh the mode from the database: %r", exc)
            failing = True
        else:
            failing = False


mode_task_key = web.AppKey("mode_refresh_task", asyncio.Task)


async def mode_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: poll the persisted mode in the background while the app runs."""
    el = app[element_key]
    task = asyncio.create_task(_refresh_loop(el, el.config.mode_refresh_interval),
                               name=f"mode-refresh-{el.prefix}")
    app[mode_task_key] = task
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
