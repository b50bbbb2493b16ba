"""The route table: every endpoint of the element in one place."""

from __future__ import annotations

from aiohttp import web

from ..domain.element import config_key
from . import openapi
from .views import cache, download, files, health, ops, search, tus


def setup_routes(app: web.Application) -> None:
    config = app[config_key]
    app.add_routes([
        web.get("/", health.root, name="root"),
        web.get(config.health_liveness_path, health.live, name="live"),
        web.get(config.health_readiness_path, health.ready, name="ready"),
        web.get("/health/startup", health.startup, name="startup"),
        web.post("/api/v1/files/upload", files.upload, name="upload",
                 expect_handler=files.upload_expect),
        web.get("/api/v1/files", files.list_files, name="list"),
        web.get("/api/v1/files/", files.list_files, name="list_slash"),
        web.get("/api/v1/files/search", search.search_files, name="search"),
        web.put("/api/v1/files/{file_id}", files.put_raw, name="put_raw",
                expect_handler=files.upload_expect),
        web.get("/api/v1/files/{file_id}", files.get_metadata, name="metadata"),
        web.patch("/api/v1/files/{file_id}", files.patch, name="patch"),
        web.delete("/api/v1/files/{file_id}", files.delete, name="delete"),
        web.get("/api/v1/files/{file_id}/download", download.download, name="download"),
    ])
    app.add_routes([  # resumable uploads (tus 1.0.0)
        web.options("/api/v1/uploads", tus.options, name="tus_options"),
        web.post("/api/v1/uploads", tus.create, name="tus_create", expect_handler=tus.expect),
        web.head("/api/v1/uploads/{file_id}", tus.head, name="tus_head"),
        web.patch("/api/v1/uploads/{file_id}", tus.patch, name="tus_patch",
                  expect_handler=tus.expect),
        web.delete("/api/v1/uploads/{file_id}", tus.terminate, name="tus_delete"),
        web.post("/api/v1/uploads/{file_id}", tus.override, name="tus_override",
                 expect_handler=tus.expect),
    ])
    app.add_routes([
        web.get("/api/v1/info", ops.info, name="info"),
        web.get("/api/v1/capacity", ops.capacity_view, name="capacity"),
        web.get("/api/v1/mode", ops.get_mode, name="mode"),
        web.post("/api/v1/mode", ops.set_mode, name="set_mode"),
        web.post("/api/v1/mode/transition", ops.set_mode, name="mode_transition"),
        web.get("/api/v1/mode/history", ops.mode_history, name="mode_history"),
        web.get("/api/v1/openapi.json", openapi.serve, name="openapi"),
    ])
    app.add_routes([
        web.post("/api/v1/cache/rebuild", cache.rebuild, name="cache_rebuild"),
        web.post("/api/v1/cache/rebuild/incremental", cache.rebuild_incremental,
                 name="cache_rebuild_incremental"),
        web.get("/api/v1/cache/consistency", cache.consistency, name="cache_consistency"),
        web.post("/api/v1/cache/cleanup-expired", cache.cleanup_expired,
                 name="cache_cleanup_expired"),
        web.delete("/api/v1/gc/{file_id}", cache.gc_delete, name="gc_delete"),
        web.get("/api/v1/gc/{file_id}/exists", cache.gc_exists, name="gc_exists"),
    ])
    if config.metrics_enabled:  # both forms: upstream scrapers use /metrics/
        path = config.metrics_path.rstrip("/") or "/metrics"
        app.add_routes([web.get(path, health.metrics_view, name="metrics"),
                        web.get(path + "/", health.metrics_view, name="metrics_slash")])
