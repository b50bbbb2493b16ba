"""Prometheus metrics: one registry per app (never the global one), scraped at ``/metrics``
(:func:`storage.web.views.health.metrics_view`).

Family names follow artStore where it had them (reference §8.5): upstream declared
them and never updated them; here every family below moves.  Request, upload and
download figures are recorded by :func:`observe_request`, called from the request
middleware; gauges that mirror the database (files, bytes, capacity, WAL) are
refreshed on each scrape.

Other modules count through ``app[metrics_key]`` (a :class:`Metrics`), e.g. the
cache rebuild and startup recovery::

    m = app[metrics_key]
    m.record_recovery(report.summary(), seconds, ok=True)   # one recovery pass
    m.recovery_actions.labels(action="rolled_back").inc(n)  # or single actions
    m.cache_rebuilds.labels(operation="lazy", status="success").inc()  # lazy refreshes
    m.cache_entries.labels(action="updated").inc()          # created|updated|deleted

The cache API (``cache_*`` routes: operation, outcome, duration, entries changed from
``result.statistics``) and GC deletes (route ``gc_delete``, by outcome) are counted by
the request middleware from the route and the response, so their handlers need nothing.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from ..config import MODES, Config
from ..domain import capacity
from ..domain.element import config_key, element_key

log = logging.getLogger(__name__)

UPLOAD_ROUTES = ("upload", "put_raw")
DOWNLOAD_ROUTES = ("download",)
DELETE_ROUTES = ("delete",)
GC_ROUTES = ("gc_delete",)
GC_OUTCOMES = ("deleted", "already_deleted")
CACHE_ROUTES = {"cache_rebuild": "full", "cache_rebuild_incremental": "incremental",
                "cache_cleanup_expired": "cleanup_expired", "cache_consistency": "consistency"}
TRANSFER_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
RECOVERY_STATUSES = ("success", "error")
RECOVERY_ACTIONS = ("completed", "rolled_back", "skipped", "errors", "temps_removed",
                    "wal_purged")
CONSISTENCY_RESULTS = ("consistent", "inconsistent")
CACHE_OUTCOMES = ("success", "busy", "error")
HEALTH_CODES = {"healthy": 0, "degraded": 1, "unhealthy": 2}
LEVEL_CODES = {"ok": 0, "warning": 1, "critical": 2, "full": 3}


class Metrics:
    """Every metric family of one element, in its own registry."""

    def __init__(self, config: Config) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        # HTTP
        self.requests = Counter("storage_http_requests", "HTTP requests by route template",
                                ["method", "route", "status"], registry=r)
        self.request_duration = Histogram(
            "storage_http_request_duration_seconds", "HTTP request latency by route template",
            ["method", "route"], buckets=REQUEST_BUCKETS, registry=r)
        self.requests_in_flight = Gauge("storage_http_requests_in_flight",
                                        "HTTP requests being served", registry=r)
        # file operations (upstream names)
        self.uploads = Counter("storage_file_uploads", "Uploads finished, by outcome",
                               ["status"], registry=r)
        self.downloads = Counter("storage_file_downloads", "Downloads finished, by outcome",
                                 ["status"], registry=r)
        self.deletes = Counter("storage_file_deletes", "File deletions, by outcome",
                               ["status"], registry=r)
        for counter in (self.uploads, self.downloads, self.deletes):
            for outcome in ("success", "error"):
                counter.labels(outcome)
        self.upload_bytes = Counter("storage_file_upload_bytes",
                                    "Bytes of files stored by uploads", registry=r)
        self.download_bytes = Counter("storage_file_download_bytes",
                                      "Bytes of file data sent by downloads", registry=r)
        self.upload_duration = Histogram(
            "storage_file_upload_duration_seconds", "Duration of successful uploads",
            buckets=TRANSFER_BUCKETS, registry=r)
        self.download_duration = Histogram(
            "storage_file_download_duration_seconds", "Duration of successful downloads",
            buckets=TRANSFER_BUCKETS, registry=r)
        self.uploads_in_flight = Gauge("storage_uploads_in_flight",
                                       "Uploads being received right now", registry=r)
        # what is stored (refreshed from the database on scrape)
        self.files = Gauge("storage_files_total", "Files stored (database count)", registry=r)
        self.stored_bytes = Gauge("storage_stored_bytes", "Bytes of files stored", registry=r)
        self.wal_pending = Gauge("storage_wal_pending_operations",
                                 "WAL operations not yet committed or rolled back", registry=r)
        self.reserved_bytes = Gauge("storage_reserved_bytes",
                                    "Capacity reserved by uploads in flight", registry=r)
        # capacity (upstream names)
        self.capacity_total = Gauge("storage_capacity_total_bytes",
                                    "Capacity: used + available", registry=r)
        self.capacity_used = Gauge("storage_capacity_used_bytes",
                                   "Capacity used: stored + reserved bytes", registry=r)
        self.capacity_free = Gauge("storage_capacity_free_bytes",
                                   "Capacity the next upload can get", registry=r)
        self.capacity_percent = Gauge("storage_capacity_percent_used",
                                      "Percent of capacity used", registry=r)
        self.capacity_status = Gauge(
            "storage_capacity_status", "0 ok, 1 warning, 2 critical, 3 full", registry=r)
        self.health_status = Gauge(
            "storage_health_status", "0 healthy, 1 degraded, 2 unhealthy", registry=r)
        for name, value in (("warning", config.capacity_warning_threshold),
                            ("critical", config.capacity_critical_threshold),
                            ("full", config.capacity_full_threshold)):
            Gauge(f"storage_threshold_{name}_percent", f"CAPACITY_{name.upper()}_THRESHOLD",
                  registry=r).set(value)
        info = Gauge("storage_element_info", "Static facts about this element",
                     ["element_id", "name", "version", "storage_type"], registry=r)
        info.labels(config.storage_element_id, config.app_name, config.app_version,
                    config.storage_type).set(1)
        self.mode = Gauge("storage_mode", "1 for the current mode", ["mode"], registry=r)
        # maintenance work done by other modules (recovery, cache rebuild, GC)
        self.recovery_runs = Counter("storage_recovery_runs",
                                     "Recovery passes (at startup and every few minutes)",
                                     ["status"], registry=r)
        self.recovery_actions = Counter(
            "storage_recovery_actions", "What recovery passes did: pending WAL rows completed "
            "or rolled back, rows skipped or failed, temp files removed, WAL rows purged",
            ["action"], registry=r)
        self.recovery_duration = Histogram("storage_recovery_duration_seconds",
                                           "Duration of recovery runs",
                                           buckets=TRANSFER_BUCKETS, registry=r)
        # every known label value from the start: alerts see the first increase from 0
        for status in RECOVERY_STATUSES:
            self.recovery_runs.labels(status)
        for action in RECOVERY_ACTIONS:
            self.recovery_actions.labels(action)
        self.cache_rebuilds = Counter("storage_cache_rebuilds", "Cache rebuild operations",
                                      ["operation", "status"], registry=r)
        for operation in CACHE_ROUTES.values():
            for outcome in CACHE_OUTCOMES:
                self.cache_rebuilds.labels(operation, outcome)
        self.cache_rebuild_duration = Histogram(
            "storage_cache_rebuild_duration_seconds", "Duration of cache operations",
            ["operation"], buckets=TRANSFER_BUCKETS, registry=r)
        self.cache_entries = Counter("storage_cache_entries",
                                     "Cache rows changed by rebuilds", ["action"], registry=r)
        self.consistency_reports = Counter(
            "storage_cache_consistency_reports", "Consistency reports (GET "
            "/api/v1/cache/consistency), by result", ["result"], registry=r)
        for result in CONSISTENCY_RESULTS:
            self.consistency_reports.labels(result)
        self.gc_deletes = Counter("storage_gc_deletes", "GC delete requests, by outcome",
                                  ["status"], registry=r)
        self.group_commit = Histogram(
            "storage_group_commit_members", "Reservations and finishes per group commit "
            "(one database statement and transaction each)", buckets=BATCH_BUCKETS,
            registry=r)
        # resumable uploads (tus): counted by storage/web/views/tus.py and the recovery passes
        self.tus_started = Counter("storage_tus_uploads_started",
                                   "Resumable uploads created", registry=r)
        self.tus_completed = Counter("storage_tus_uploads_completed",
                                     "Resumable uploads made into files", registry=r)
        self.tus_expired = Counter("storage_tus_uploads_expired",
                                   "Unfinished resumable uploads removed after "
                                   "UPLOAD_EXPIRY_HOURS", registry=r)
        self.tus_terminated = Counter("storage_tus_uploads_terminated",
                                      "Resumable uploads terminated by their clients",
                                      registry=r)
        self.tus_bytes = Counter("storage_tus_bytes_received",
                                 "Bytes stored by resumable uploads (PATCH and POST bodies)",
                                 registry=r)
        self.tus_rehashes = Counter("storage_tus_rehashes",
                                    "Running sha256 rebuilt from staged bytes (a PATCH that "
                                    "landed in another process or after a restart)",
                                    registry=r)
        self.set_mode(config.app_mode)

    def record_recovery(self, summary: dict[str, int], seconds: float, ok: bool = True) -> None:
        """One recovery pass: its outcome, duration and each non-zero count of ``summary``
        (e.g. ``{"completed": 1, "rolled_back": 2, "temps_removed": 3}``) as actions."""
        self.recovery_runs.labels("success" if ok else "error").inc()
        self.recovery_duration.observe(seconds)
        for action, count in summary.items():
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                self.recovery_actions.labels(action).inc(count)

    def count_recovery(self, report) -> None:
        """One recovery pass (a :class:`storage.domain.recovery.Report`): the run, what it
        did to pending WAL rows and temp files, and to resumable uploads."""
        self.recovery_runs.labels("success").inc()
        for action in RECOVERY_ACTIONS:
            count = getattr(report, action)
            if count > 0:
                self.recovery_actions.labels(action).inc(count)
        self.tus_completed.inc(report.uploads_completed)
        self.tus_expired.inc(report.uploads_expired)

    def set_mode(self, current: str) -> None:
        for mode in MODES:
            self.mode.labels(mode).set(1 if mode == current else 0)

    def set_capacity(self, cap: capacity.Capacity) -> None:
        self.capacity_total.set(cap.total)
        self.capacity_used.set(cap.used)
        self.capacity_free.set(cap.available)
        self.capacity_percent.set(cap.percent_used)
        self.capacity_status.set(LEVEL_CODES[cap.level])
        self.health_status.set(HEALTH_CODES[cap.health])
        if cap.usage is not None:
            self.files.set(cap.usage.files)
            self.stored_bytes.set(cap.usage.stored)
            self.reserved_bytes.set(cap.usage.reserved)
            self.wal_pending.set(cap.usage.pending_wal)


metrics_key = web.AppKey("metrics", Metrics)


def install(app: web.Application) -> Metrics:
    """Create the app's Metrics at factory time, so startup hooks can count too."""
    metrics = Metrics(app[config_key])
    app[metrics_key] = metrics
    return metrics


def route_label(request: web.BaseRequest) -> str:
    """The route template (``/api/v1/files/{file_id}``), never a raw path."""
    route = getattr(request.match_info, "route", None)
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "unmatched"


def route_name(request: web.BaseRequest) -> str | None:
    route = getattr(request.match_info, "route", None)
    return getattr(route, "name", None)


def _json_field(resp: web.StreamResponse | None, key: str):
    """A top-level field of a small JSON response the handler returned, else None."""
    body = getattr(resp, "body", None)
    if not isinstance(body, bytes | bytearray) or len(body) > 64 * 1024:
        return None
    try:
        return json.loads(body).get(key)
    except (ValueError, AttributeError):
        return None


def observe_request(request: web.Request, resp: web.StreamResponse | None, status: int,
                    duration: float) -> None:
    """Count one finished request; ``resp`` is None when the handler raised."""
    metrics: Metrics = request.app[metrics_key]
    method = request.method if request.method in METHODS else "OTHER"
    route = route_label(request)
    metrics.requests.labels(method, route, str(status)).inc()
    metrics.request_duration.labels(method, route).observe(duration)
    name = route_name(request)
    ok = 200 <= status < 300
    if name in UPLOAD_ROUTES:
        metrics.uploads.labels("success" if ok else "error").inc()
        if ok and resp is not None:
            size = _json_field(resp, "file_size")
            metrics.upload_bytes.inc(size if isinstance(size, int) else 0)
            metrics.upload_duration.observe(duration)
    elif name in DOWNLOAD_ROUTES and request.method == "GET" and status != 304:
        metrics.downloads.labels("success" if ok else "error").inc()
        if ok and resp is not None:
            metrics.download_bytes.inc(resp.content_length or 0)
            metrics.download_duration.observe(duration)
    elif name in DELETE_ROUTES:
        metrics.deletes.labels("success" if ok else "error").inc()
    elif name in GC_ROUTES:
        outcome = _json_field(resp, "status") if ok else None
        metrics.gc_deletes.labels(outcome if outcome in GC_OUTCOMES else "error").inc()
    elif name in CACHE_ROUTES:
        _observe_cache(metrics, CACHE_ROUTES[name], resp, status, duration)


def _observe_cache(metrics: Metrics, operation: str, resp: web.StreamResponse | None,
                   status: int, duration: float) -> None:
    """The cache API's outcome and its ``result.statistics`` (reference §7.4 envelope)."""
    ok = 200 <= status < 300
    outcome = "success" if ok else "busy" if status in (409, 503) else "error"
    metrics.cache_rebuilds.labels(operation, outcome).inc()
    if not ok:
        return
    metrics.cache_rebuild_duration.labels(operation).observe(duration)
    result = _json_field(resp, "result")
    stats = result.get("statistics") if isinstance(result, dict) else None
    for action in ("created", "updated", "deleted"):
        count = stats.get(f"entries_{action}") if isinstance(stats, dict) else None
        if isinstance(count, int) and count > 0:
            metrics.cache_entries.labels(action).inc(count)


async def refresh(app: web.Application) -> None:
    """Pull the database- and disk-derived gauges up to date (one O(1) probe)."""
    metrics: Metrics = app[metrics_key]
    el = app.get(element_key)
    if el is None:
        return
    metrics.set_mode(el.runtime.mode)
    metrics.set_capacity(await capacity.snapshot(el))


