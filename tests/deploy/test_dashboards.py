"""What operators look at (``deploy/observability``): every PromQL expression of the
Grafana dashboard and of the alerting rules parses (``promql-parser``), and every metric
it names, with every label it matches on, is exported by a running element's /metrics
after an upload, a download and a resumable (tus) upload."""

from __future__ import annotations

import json
import re

import promql_parser
import pytest
import yaml
from dockerenv import ROOT
from helpers import upload
from prometheus_client.parser import text_string_to_metric_families
from tus_helpers import create, patch

pytestmark = pytest.mark.deploy
OBSERVABILITY = ROOT / "deploy" / "observability"
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*"}
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus, not by the element


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"]
             for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("definition", "")
        m = re.fullmatch(r"label_values\((.+), *(\w+)\)", query)
        if m:  # a Grafana function: its selector is PromQL
            exprs.append(m.group(1))
    for name, value in GRAFANA_VARIABLES.items():
        exprs = [e.replace(name, value) for e in exprs]
    assert "$" not in "".join(exprs), "a Grafana variable the test does not know"
    return exprs


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((OBSERVABILITY / "prometheus-rules.yaml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def selectors(node) -> list:
    """Every vector selector in a parsed expression."""
    if isinstance(node, promql_parser.VectorSelector):
        return [node]
    found = []
    for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None:
            found += selectors(child)
    for child in getattr(node, "args", None) or []:
        found += selectors(child)
    return found


def used(exprs: list[str]) -> dict[str, set[str]]:
    """{metric name: label names matched on} over all expressions (each must parse)."""
    names: dict[str, set[str]] = {}
    for expr in exprs:
        parsed = promql_parser.parse(expr)
        found = selectors(parsed)
        assert found, f"no metric in {expr!r}"
        for sel in found:
            assert sel.name, f"a selector without a metric name in {expr!r}"
            labels = {m.name for m in sel.matchers.matchers}
            names.setdefault(sel.name, set()).update(labels)
    return names


async def exported(client, auth) -> dict[str, set[str]]:
    """{sample name: label names} of /metrics after an upload, a download, a tus upload."""
    body = await upload(client, auth(), b"dashboards" * 100)
    resp = await client.get(f"/api/v1/files/{body['file_id']}/download", headers=auth())
    assert resp.status == 200 and await resp.read() == b"dashboards" * 100
    path = await create(client, auth(), length=5)
    await patch(client, auth(), path, 0, b"hello")
    resp = await client.get("/metrics")
    assert resp.status == 200
    samples: dict[str, set[str]] = {}
    completed = 0.0
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
            if sample.name == "storage_tus_uploads_completed_total":
                completed = sample.value
    assert completed == 1  # the tus upload went through
    return samples


@pytest.mark.parametrize("source", ["dashboard", "rules"])
async def test_every_metric_exists(source, client, auth):
    exprs = dashboard_exprs() if source == "dashboard" else rule_exprs()
    names = used(exprs)
    samples = await exported(client, auth)
    missing = sorted(set(names) - set(samples))
    assert not missing, f"{source} uses metrics /metrics does not export: {missing}"
    for name, labels in names.items():
        unknown = labels - samples[name] - SCRAPE_LABELS
        assert not unknown, f"{source}: {name} has no label {sorted(unknown)}"


def test_the_alerts_asked_for():
    """Capacity above 90 %, not ready, 5xx rate, recovery finding pending rows, the
    consistency report failing."""
    rules = yaml.safe_load((OBSERVABILITY / "prometheus-rules.yaml").read_text())
    by_name = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    expected = {
        "StorageElementCapacityHigh": ("storage_capacity_percent_used", "> 90"),
        "StorageElementNotReady": ("storage_health_status", "== 2"),
        "StorageElement5xxRate": ("storage_http_requests_total", '"5.."'),
        "StorageElementRecoveryFoundPendingRows": ("storage_recovery_actions_total",
                                                   "rolled_back"),
        "StorageElementConsistencyReportFailing": ("storage_cache_consistency_reports_total",
                                                   "inconsistent"),
    }
    for alert, fragments in expected.items():
        assert all(f in by_name[alert] for f in fragments), alert


def test_the_dashboard_shows_what_was_asked_for():
    """Throughput, latency, errors, capacity, mode, WAL pending, group-commit batch sizes
    and tus uploads each have a panel."""
    names = used(dashboard_exprs())
    for wanted in ("storage_http_requests_total", "storage_file_upload_bytes_total",
                   "storage_http_request_duration_seconds_bucket",
                   "storage_capacity_percent_used", "storage_mode",
                   "storage_wal_pending_operations", "storage_group_commit_members_bucket",
                   "storage_tus_uploads_started_total"):
        assert wanted in names, wanted


def test_compose_prometheus_points_at_them():
    """The compose stack's optional Prometheus scrapes the three elements and loads the
    rules file."""
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    mounts = {v.split(":")[1]: ROOT / "deploy" / v.split(":")[0] for v in prometheus["volumes"]}
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    (rule_file,) = config["rule_files"]
    assert mounts[rule_file].resolve() == OBSERVABILITY / "prometheus-rules.yaml"
    (job,) = config["scrape_configs"]
    targets = job["static_configs"][0]["targets"]
    elements = {name for name in compose["services"] if name.startswith("se-")}
    assert sorted(targets) == sorted(f"{name}:8000" for name in elements)
    assert job["metrics_path"] == "/metrics"
