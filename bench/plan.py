"""The scenario plans of ``python -m bench`` and the pass/fail targets (issue 16, which
raised issue 10's for small and medium bodies to what group commit should reach)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, replace

from bench.load import GIB, KIB, MIB, Scenario, size_label

# role -> body size (full run / quick run); "big" comes from --big-size.
SIZES_FULL = {"small": 4 * KIB, "medium": 1 * MIB, "large": 64 * MIB, "big": 2 * GIB}
SIZES_QUICK = {"small": 4 * KIB, "medium": 64 * KIB, "large": 1 * MIB, "big": 8 * MIB}

# (op, role, concurrency, requests full, requests quick)
_PLAN: tuple[tuple[str, str, int, int, int], ...] = (
    ("put", "small", 16, 3000, 40),
    ("get", "small", 16, 4000, 40),
    ("post", "small", 16, 2000, 20),
    ("put", "medium", 8, 500, 20),
    ("get", "medium", 8, 2000, 40),
    ("post", "medium", 8, 300, 20),
    ("put", "large", 2, 24, 6),
    ("get", "large", 2, 48, 8),
    ("put", "big", 1, 1, 1),
    ("get", "big", 1, 1, 1),
    ("meta", "api", 16, 3000, 40),
    ("list", "api", 16, 500, 10),
)

RSS_LIMIT_MIB = 50.0

TARGET_LINES = (
    "4 KiB uploads (PUT and multipart) >= 35% of the ceiling's req/s",
    "1 MiB uploads (PUT and multipart) >= 75% of the ceiling's MiB/s",
    "4 KiB downloads >= 50% of the ceiling's req/s; 1 MiB downloads >= 80% of its MiB/s",
    "64 MiB uploads and downloads >= 90% of the ceiling's MiB/s",
    "server RSS growth < 50 MiB during the big transfer (upload and download)",
    "PostgreSQL transactions per upload <= 0.5 at 4 KiB (c=16), and PostgreSQL CPU per "
    "upload <= 0.3 ms with four elements on one database (scale-out section)",
)
RATIO_TARGETS = {("put", "small"): 0.35, ("post", "small"): 0.35, ("put", "medium"): 0.75,
                 ("post", "medium"): 0.75, ("get", "small"): 0.50, ("get", "medium"): 0.80,
                 ("put", "large"): 0.90, ("get", "large"): 0.90}
XACTS_PER_UPLOAD = 0.5
SCALEOUT_PG_MS = 0.3


def build_plan(
    quick: bool = False, big_size: int | None = None, max_seconds: float | None = None
) -> list[Scenario]:
    sizes = dict(SIZES_QUICK if quick else SIZES_FULL)
    if big_size:
        sizes["big"] = big_size
    out = []
    for op, role, conc, n_full, n_quick in _PLAN:
        size = 0 if role == "api" else sizes[role]
        limit = max_seconds or (20.0 if quick else 120.0)
        if role == "big" and not max_seconds:
            # at least 10 MiB/s must be possible before the run is cut short
            limit = max(limit, size / (10 * MIB))
        out.append(
            Scenario(
                op=op,
                size=size,
                concurrency=conc,
                requests=n_quick if quick else n_full,
                max_seconds=limit,
                role=role,
            )
        )
    return out


def metric_of(sc: Scenario) -> str:
    """The headline number of a scenario: req/s for tiny bodies and API calls, else MiB/s."""
    return "req/s" if sc.role in ("small", "api") else "MiB/s"


def select(plan: Sequence[Scenario], patterns: str | None) -> list[Scenario]:
    """Filter by comma-separated patterns: a name (``put-1m``), a glob (``*-64m``),
    an op (``put``, ``get``, ``post``, ``meta``, ``list``) or a role
    (``small``, ``medium``, ``large``, ``big``, ``api``)."""
    if not patterns:
        return list(plan)
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [
        sc for sc in plan if any(fnmatch.fnmatch(sc.name, p) or p in (sc.op, sc.role) for p in pats)
    ]


def warmup_of(sc: Scenario) -> Scenario | None:
    """A short run before the repeats; none for the big transfer."""
    if sc.role == "big":
        return None
    n = max(sc.concurrency, sc.requests // 5)
    return replace(sc, requests=n, name=sc.name)


@dataclass(frozen=True)
class Rule:
    """One target: ``kind`` is ``ratio`` (ours/ceiling >= threshold on the headline
    metric) or ``rss`` (ours' RSS growth < threshold MiB)."""

    kind: str
    threshold: float

    def describe(self) -> str:
        if self.kind == "ratio":
            return f">= {self.threshold:.0%} of ceiling"
        return f"RSS growth < {self.threshold:.0f} MiB"


def rule_of(sc: Scenario) -> Rule | None:
    if (sc.op, sc.role) in RATIO_TARGETS:
        return Rule("ratio", RATIO_TARGETS[(sc.op, sc.role)])
    if sc.op in ("put", "get") and sc.role == "big":
        return Rule("rss", RSS_LIMIT_MIB)
    return None


__all__ = ["build_plan", "metric_of", "rule_of", "select", "size_label", "warmup_of"]
