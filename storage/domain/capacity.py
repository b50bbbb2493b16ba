"""How full the element is, as ``/api/v1/capacity``, ``/api/v1/info`` and the gauges report it.

The ingester sends a file to an element only when ``health == "healthy"`` and
``capacity.available >= file size`` (reference §14.1), so ``available`` is exactly
what the next upload can get from ``reservations.reserve``, never more:

- ``room = min(STORAGE_MAX_SIZE - stored - reserved,
               free disk - STORAGE_DISK_RESERVE - reserved)`` (no disk term on S3);
- ``available = room - UPLOAD_OVERHEAD``, clamped at 0.  A multipart upload reserves
  its whole body (``Content-Length``: file plus framing and form fields) before the
  file size is known, so a file of exactly the remaining room would be refused; the
  64 KiB allowance covers the ingester's framing and fields.  Raw ``PUT`` bodies
  reserve their exact size and can use the allowance too;
- ``used = stored + reserved`` (committed file bytes from the trigger-maintained
  totals plus the reservations of uploads in flight);
- ``total = STORAGE_MAX_SIZE``, or ``used`` plus what the filesystem still offers
  (free disk less the reserve and the reservations) when that is smaller; never
  below ``used``.  The allowance comes off ``available`` only, so ``used +
  available`` is 64 KiB short of ``total`` while the element has room (upstream
  reported the whole filesystem as ``total``; the configured cap and the reserve are
  what uploads obey);
- ``percent_used = used / total * 100`` (2 decimals; 100 when ``total`` is 0).

``health``: healthy below ``CAPACITY_CRITICAL_THRESHOLD`` percent used, degraded
from there, unhealthy from ``CAPACITY_FULL_THRESHOLD``, when nothing more fits
(``available`` 0: level ``full``) or when the database or the storage cannot be
reached (then ``available`` is 0).  Everything is O(1): one row of
``<prefix>_config``, the pending WAL rows and one ``statvfs``; S3 is never listed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ..config import Config
from .element import Element
from .reservations import FORM_ALLOWANCE

log = logging.getLogger(__name__)
PROBE_TIMEOUT = 5.0
UPLOAD_OVERHEAD = FORM_ALLOWANCE  # multipart framing + form fields
HEALTH_VALUES = ("healthy", "degraded", "unhealthy")
LEVELS = ("ok", "warning", "critical", "full")


@dataclass(frozen=True, slots=True)
class Usage:
    stored: int
    files: int
    reserved: int
    pending_wal: int


@dataclass(frozen=True, slots=True)
class Capacity:
    total: int
    used: int
    available: int
    percent_used: float
    health: str
    level: str
    usage: Usage | None  # None when the database could not be read
    problems: tuple[str, ...] = ()

    def to_json(self) -> dict[str, int | float]:
        return {"total": self.total, "used": self.used, "available": self.available,
                "percent_used": self.percent_used}


def level_for(percent: float, config: Config) -> str:
    """ok / warning / critical / full against the three CAPACITY_*_THRESHOLD values."""
    if percent >= config.capacity_full_threshold:
        return "full"
    if percent >= config.capacity_critical_threshold:
        return "critical"
    if percent >= config.capacity_warning_threshold:
        return "warning"
    return "ok"


def health_for(level: str, reachable: bool) -> str:
    if not reachable or level == "full":
        return "unhealthy"
    return "degraded" if level == "critical" else "healthy"


def compute(config: Config, usage: Usage, free: int | None) -> tuple[int, int, int, float]:
    """(total, used, available, percent_used) from the usage and the free disk bytes."""
    used = usage.stored + usage.reserved
    room = config.storage_max_size - used
    if free is not None:
        room = min(room, free - config.storage_disk_reserve - usage.reserved)
    available = max(room - UPLOAD_OVERHEAD, 0)
    total = used + max(room, 0)  # = STORAGE_MAX_SIZE unless the disk offers less
    percent = round(used / total * 100, 2) if total > 0 else 100.0
    return total, used, available, percent


async def usage(el: Element) -> Usage:
    rec = await el.db.pool.fetchrow(el.db.q.element_usage)
    return Usage(stored=rec["stored"], files=rec["files"], reserved=rec["reserved"],
                 pending_wal=rec["pending"])


async def _storage_free(el: Element) -> int | None:
    await el.backend.check()
    return await el.backend.free_bytes()


async def snapshot(el: Element) -> Capacity:
    """The current capacity; never raises (an unreachable part makes it unhealthy)."""
    problems: list[str] = []
    used_now: Usage | None = None
    free: int | None = None
    reachable = True
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            used_now = await usage(el)
    except Exception as exc:  # noqa: BLE001 - reported as unhealthy, never a 500
        problems.append(f"database: {type(exc).__name__}")
        reachable = False
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            free = await _storage_free(el)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"storage: {getattr(exc, 'detail', None) or type(exc).__name__}")
        reachable = False
    if problems:
        log.warning("capacity probe failed: %s", "; ".join(problems))
    if used_now is None:  # unknown usage counts as full: nothing may be sent here
        total = el.config.storage_max_size
        return Capacity(total=total, used=total, available=0, percent_used=100.0,
                        health="unhealthy", level="full", usage=None, problems=tuple(problems))
    if not reachable:
        used = used_now.stored + used_now.reserved
        total = max(el.config.storage_max_size, used)
        percent = round(used / total * 100, 2) if total else 100.0
        return Capacity(total=total, used=used, available=0, percent_used=percent,
                        health="unhealthy", level=level_for(percent, el.config), usage=used_now,
                        problems=tuple(problems))
    total, used, available, percent = compute(el.config, used_now, free)
    level = level_for(percent, el.config) if available else "full"
    return Capacity(total=total, used=used, available=available, percent_used=percent,
                    health=health_for(level, True), level=level, usage=used_now)
