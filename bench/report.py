"""Aggregate repeated runs, judge the targets, and write Markdown / JSON / PNG reports."""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.load import MIB, Scenario, size_label
from bench.plan import TARGET_LINES, metric_of, rule_of

# --------------------------------------------------------------------------- machine


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _mount_of(path: Path) -> str:
    best, desc = "", "?"
    target = str(path.resolve())
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 3 and target.startswith(parts[1]) and len(parts[1]) > len(best):
            best, desc = parts[1], f"{parts[2]} on {parts[0]} (mounted at {parts[1]})"
    return desc


def machine_facts(workdir: Path | None = None) -> dict[str, Any]:
    cpu = "?"
    for line in _read("/proc/cpuinfo").splitlines():
        if line.lower().startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    ram = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            ram = int(line.split()[1]) * 1024
    facts: dict[str, Any] = {
        "cpu_model": cpu or platform.processor() or "?",
        "cores": os.cpu_count(),
        "ram_gib": round(ram / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
    }
    if workdir is not None:
        facts["disk"] = _mount_of(workdir)
    return facts


# --------------------------------------------------------------------------- aggregation


@dataclass
class Cell:
    """All measured runs of one scenario on one target."""

    scenario: Scenario
    target: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""  # why there is no number, if there is none

    @property
    def metric(self) -> str:
        return metric_of(self.scenario)

    def _value(self, run: dict[str, Any]) -> float:
        return float(run["req_s"] if self.metric == "req/s" else run["mib_s"])

    @property
    def values(self) -> list[float]:
        return [self._value(r) for r in self.runs if r["requests_ok"] > 0]

    @property
    def median(self) -> float | None:
        v = self.values
        return statistics.median(v) if v else None

    @property
    def median_run(self) -> dict[str, Any] | None:
        ok = [r for r in self.runs if r["requests_ok"] > 0]
        if not ok:
            return None
        ok.sort(key=self._value)
        return ok[(len(ok) - 1) // 2]

    def _proc(self, key: str, who: str = "server") -> list[float]:
        return [float(r[who][key]) for r in self.runs if r.get(who)]

    @property
    def rss_growth_mib(self) -> float | None:
        v = self._proc("rss_growth_mib")
        return max(v) if v else None

    @property
    def peak_rss_mib(self) -> float | None:
        v = self._proc("peak_rss_mib")
        return max(v) if v else None

    @property
    def server_cpu_s(self) -> float | None:
        v = self._proc("cpu_s")
        return statistics.median(v) if v else None

    @property
    def server_cpu_util(self) -> float | None:
        v = self._proc("cpu_util")
        return statistics.median(v) if v else None

    @property
    def client_cpu_util(self) -> float | None:
        v = self._proc("cpu_util", "client")
        return statistics.median(v) if v else None

    def _pg_per_request(self, key: str) -> float | None:
        per = [r["pg"][key] / r["requests_ok"] for r in self.runs
               if r.get("pg") and r["requests_ok"] > 0]
        return statistics.median(per) if per else None

    @property
    def pg_xacts_per_request(self) -> float | None:
        return self._pg_per_request("xacts")

    @property
    def pg_cpu_ms_per_request(self) -> float | None:
        v = self._pg_per_request("cpu_s")
        return None if v is None else v * 1000

    @property
    def errors(self) -> int:
        return sum(int(r["errors"]) for r in self.runs)

    @property
    def error_kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.runs:
            for k, n in r.get("error_kinds", {}).items():
                out[k] = out.get(k, 0) + n
        return out

    def as_dict(self) -> dict[str, Any]:
        v = self.values
        mr = self.median_run or {}
        return {
            "scenario": self.scenario.name,
            "target": self.target,
            "op": self.scenario.op,
            "role": self.scenario.role,
            "size": self.scenario.size,
            "concurrency": self.scenario.concurrency,
            "requests": self.scenario.requests,
            "metric": self.metric,
            "median": self.median,
            "min": min(v) if v else None,
            "max": max(v) if v else None,
            "values": v,
            "p50_ms": mr.get("p50_ms"),
            "p90_ms": mr.get("p90_ms"),
            "p99_ms": mr.get("p99_ms"),
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "peak_rss_mib": self.peak_rss_mib,
            "rss_growth_mib": self.rss_growth_mib,
            "server_cpu_s": self.server_cpu_s,
            "server_cpu_util": self.server_cpu_util,
            "client_cpu_util": self.client_cpu_util,
            "pg_xacts_per_request": self.pg_xacts_per_request,
            "pg_cpu_ms_per_request": self.pg_cpu_ms_per_request,
            "note": self.note,
            "runs": self.runs,
        }


def fmt(v: float | None, digits: int | None = None) -> str:
    if v is None:
        return "-"
    if digits is None:
        digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
    return f"{v:,.{digits}f}"


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def fmt_cell(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.median is None:
        return f"- ({cell.note or 'no successful request'})"
    v = cell.values
    s = f"{fmt(cell.median)} {cell.metric}"
    if len(v) > 1:
        s += f" [{fmt(min(v))}–{fmt(max(v))}]"
    if cell.errors:
        s += f" ({cell.errors} err)"
    return s


def compare_rows(
    scenarios: list[Scenario], cells: dict[tuple[str, str], Cell]
) -> list[dict[str, Any]]:
    """One row per scenario (plus an RSS row for the big transfer)."""
    rows: list[dict[str, Any]] = []
    for sc in scenarios:
        ours, ceil = cells.get((sc.name, "ours")), cells.get((sc.name, "ceiling"))
        rule = rule_of(sc)
        om = ours.median if ours else None
        cm = ceil.median if ceil else None
        ratio = om / cm if om is not None and cm else None
        status = "-"
        if rule is not None and rule.kind == "ratio":
            status = "n/a" if ratio is None else ("PASS" if ratio >= rule.threshold else "FAIL")
        rows.append(
            {
                "scenario": sc.name,
                "metric": cells_metric(sc),
                "ours": om,
                "ceiling": cm,
                "ours_text": fmt_cell(ours),
                "ceiling_text": fmt_cell(ceil),
                "ratio": ratio,
                "target": rule.describe() if rule and rule.kind == "ratio" else "-",
                "status": status,
            }
        )
        if rule is not None and rule.kind == "rss":
            og = ours.rss_growth_mib if ours else None
            cg = ceil.rss_growth_mib if ceil else None
            rows.append(
                {
                    "scenario": f"{sc.name} server RSS growth",
                    "metric": "MiB",
                    "ours": og,
                    "ceiling": cg,
                    "ours_text": "-"
                    if og is None
                    else f"{fmt(og, 1)} MiB (peak {fmt(ours.peak_rss_mib if ours else None, 1)})",
                    "ceiling_text": "-"
                    if cg is None
                    else f"{fmt(cg, 1)} MiB (peak {fmt(ceil.peak_rss_mib if ceil else None, 1)})",
                    "ratio": None,
                    "target": rule.describe(),
                    "status": "n/a" if og is None else ("PASS" if og < rule.threshold else "FAIL"),
                }
            )
    return rows


def cells_metric(sc: Scenario) -> str:
    return metric_of(sc)


# --------------------------------------------------------------------------- rendering


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    cfg = report["config"]
    out = [f"# Storage element benchmark — {report['date']}", ""]
    mode = "quick (smoke sizes — numbers are not meaningful)" if cfg["quick"] else "full"
    out += [
        f"Mode: **{mode}**; ours: {cfg['ours_status']}; storage: {cfg['storage']}; "
        f"repeats: {cfg['repeats']} (median [min–max]); warm-up: {cfg['warmup']}; "
        f"pinning: {cfg['pinning']}.",
        "",
        "## Targets",
        "",
        *[f"- {t}" for t in TARGET_LINES],
        "",
        "## Machine",
        "",
        "| CPU | cores | RAM | kernel | Python | aiohttp | disk under test |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {m['cpu_model']} | {m['cores']} | {m['ram_gib']} GiB | {m['kernel']} | "
        f"{m['python']} | {m['aiohttp']} | {m.get('disk', '?')} |",
        "",
        "## Results",
        "",
        "| scenario | ours | ceiling | ours/ceiling | target | pass/fail |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.0%}"
        out.append(
            f"| {r['scenario']} | {r['ours_text']} | {r['ceiling_text']} | {ratio} | "
            f"{r['target']} | {r['status']} |"
        )
    judged = [r for r in report["rows"] if r["status"] in ("PASS", "FAIL")]
    if judged:
        npass = sum(r["status"] == "PASS" for r in judged)
        out += ["", f"**{npass}/{len(judged)} targets met.**"]
    out += [
        "",
        "## Details (median run of each cell)",
        "",
        "| scenario | server | size | c | requests | median | p50 ms | p90 ms | p99 ms | "
        "errors | server peak RSS MiB | RSS growth MiB | server CPU | client CPU | "
        "PostgreSQL transactions / req | PostgreSQL CPU ms / req |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- | --- |",
    ]
    for c in report["cells"]:
        size = size_label(c["size"]) if c["size"] else "-"
        util = c["client_cpu_util"]
        out.append(
            f"| {c['scenario']} | {c['target']} | {size} | {c['concurrency']} | "
            f"{c['requests']} | {fmt(c['median'])} {c['metric']} | {fmt(c['p50_ms'])} | "
            f"{fmt(c['p90_ms'])} | {fmt(c['p99_ms'])} | {c['errors']} | "
            f"{fmt(c['peak_rss_mib'], 1)} | {fmt(c['rss_growth_mib'], 1)} | "
            f"{pct(c['server_cpu_util'])} | {pct(util)} | "
            f"{fmt(c.get('pg_xacts_per_request'), 3)} | {fmt(c.get('pg_cpu_ms_per_request'), 3)} |"
        )
    if report.get("scaleout"):
        out += ["", "## Scale-out", "", report["scaleout"].rstrip()]
    errs = [
        (c["scenario"], c["target"], c["error_kinds"]) for c in report["cells"] if c["error_kinds"]
    ]
    if errs:
        out += ["", "## Errors", ""]
        out += [f"- {s} / {t}: {k}" for s, t, k in errs]
    out += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(out) + "\n"


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def make_chart(report: dict[str, Any], path: Path) -> str | None:
    """Write a PNG (throughput ours vs ceiling + latency percentiles); return a note
    instead if matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install -e '.[bench]')"
    cells = report["cells"]
    scen = list(dict.fromkeys(c["scenario"] for c in cells))
    by = {(c["scenario"], c["target"]): c for c in cells}
    targets = [t for t in ("ours", "ceiling") if any(c["target"] == t for c in cells)]
    if not scen:
        return "chart skipped: no results"
    groups = [
        (
            "MiB/s",
            [s for s in scen if any(by.get((s, t), {}).get("metric") == "MiB/s" for t in targets)],
        ),
        (
            "req/s",
            [s for s in scen if any(by.get((s, t), {}).get("metric") == "req/s" for t in targets)],
        ),
    ]
    groups = [(u, ss) for u, ss in groups if ss]
    fig, axes = plt.subplots(len(groups) + 1, 1, figsize=(11, 4 * (len(groups) + 1)))
    colors = {"ours": "tab:blue", "ceiling": "tab:gray"}
    width = 0.8 / max(1, len(targets))
    for ax, (unit, ss) in zip(axes, groups, strict=False):
        for k, t in enumerate(targets):
            xs = [i + k * width for i in range(len(ss))]
            med = [by.get((s, t), {}).get("median") or 0 for s in ss]
            lo = [m - (by.get((s, t), {}).get("min") or m) for s, m in zip(ss, med, strict=True)]
            hi = [(by.get((s, t), {}).get("max") or m) - m for s, m in zip(ss, med, strict=True)]
            ax.bar(xs, med, width, yerr=[lo, hi], label=t, color=colors[t], capsize=3)
        ax.set_xticks([i + width * (len(targets) - 1) / 2 for i in range(len(ss))], ss)
        ax.set_ylabel(unit)
        ax.set_title(f"throughput ({unit}, median of repeats, whiskers min–max)")
        ax.legend()
    ax = axes[-1]
    series = [(t, q) for t in targets for q in ("p50_ms", "p90_ms", "p99_ms")]
    width = 0.8 / len(series)
    shades = {"p50_ms": 1.0, "p90_ms": 0.65, "p99_ms": 0.35}
    for k, (t, q) in enumerate(series):
        xs = [i + k * width for i in range(len(scen))]
        ys = [by.get((s, t), {}).get(q) or 0 for s in scen]
        ax.bar(xs, ys, width, label=f"{t} {q[:3]}", color=colors[t], alpha=shades[q])
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(scen))], scen, rotation=30)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_title("latency percentiles (median run)")
    ax.legend(ncol=2, fontsize="small")
    fig.suptitle(f"storage element benchmark {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


__all__ = [
    "MIB",
    "Cell",
    "compare_rows",
    "machine_facts",
    "make_chart",
    "render_markdown",
    "write_json",
]
