"""Realistic file-metadata rows for the search benchmark, loaded through the repository layer.

Deterministic for a seed.  The shape follows a document store used by a few hundred
people over three years: Zipf-distributed uploaders and projects, mostly PDFs, photos
and office files, filenames such as ``invoice_apollo_2024-03.pdf`` or ``IMG_0042.JPG``,
some Cyrillic names, a description on half the files, a version on a quarter and
custom metadata (project, department, year, status, tags, sometimes a client or a
case id) on three quarters.  Rows are produced in upload order (created_at ascending).
"""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from storage.db import repo_search
from storage.db.pool import Db
from storage.models import FileMeta

YEARS = 3
BATCH = 1000

_SYLLABLES = (
    "ka",
    "lo",
    "ri",
    "men",
    "tor",
    "sa",
    "vel",
    "on",
    "dra",
    "pi",
    "zu",
    "nex",
    "ar",
    "qui",
    "bel",
    "mo",
    "ta",
    "ris",
    "gen",
    "do",
    "lux",
    "fi",
    "ver",
    "no",
)
DOCTYPES = (
    "report",
    "invoice",
    "contract",
    "minutes",
    "proposal",
    "budget",
    "summary",
    "analysis",
    "presentation",
    "statement",
    "receipt",
    "policy",
    "agreement",
    "specification",
    "diagram",
    "roadmap",
    "plan",
    "schedule",
    "review",
    "memo",
    "brief",
    "forecast",
    "audit",
    "letter",
    "notes",
    "checklist",
    "manual",
    "design",
)
RU_DOCTYPES = (
    "отчёт",
    "договор",
    "счёт",
    "акт",
    "протокол",
    "смета",
    "план",
    "приказ",
    "служебная_записка",
    "спецификация",
)
RU_WORDS = (
    "квартал",
    "итоги",
    "бюджет",
    "поставка",
    "ремонт",
    "закупка",
    "проект",
    "отдел",
    "склад",
    "аренда",
)
DEPARTMENTS = (
    "finance",
    "legal",
    "hr",
    "engineering",
    "marketing",
    "sales",
    "operations",
    "research",
    "design",
    "support",
    "it",
    "procurement",
)
STATUSES = ("draft", "review", "final", "approved", "archived")
ADJECTIVES = (
    "quarterly",
    "annual",
    "monthly",
    "weekly",
    "final",
    "draft",
    "signed",
    "revised",
    "internal",
    "external",
    "confidential",
    "preliminary",
    "updated",
)
MONTHS = (
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
)
# extension -> (content type, weight, median size in bytes)
TYPES = {
    "pdf": ("application/pdf", 25, 350_000),
    "jpg": ("image/jpeg", 18, 2_800_000),
    "png": ("image/png", 8, 600_000),
    "heic": ("image/heic", 2, 2_000_000),
    "gif": ("image/gif", 1, 300_000),
    "tiff": ("image/tiff", 2, 9_000_000),
    "webp": ("image/webp", 1, 200_000),
    "docx": ("application/vnd.openxmlformats-officedocument.wordprocessingml.document", 10, 80_000),
    "xlsx": ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", 8, 60_000),
    "pptx": (
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        3,
        4_000_000,
    ),
    "csv": ("text/csv", 4, 200_000),
    "txt": ("text/plain", 4, 8_000),
    "json": ("application/json", 3, 30_000),
    "xml": ("application/xml", 2, 50_000),
    "zip": ("application/zip", 3, 25_000_000),
    "mp4": ("video/mp4", 3, 120_000_000),
    "mov": ("video/quicktime", 1, 300_000_000),
}


def _word(rnd: random.Random, n: int) -> str:
    return "".join(rnd.choice(_SYLLABLES) for _ in range(n))


@dataclass(frozen=True, slots=True)
class Vocabulary:
    projects: tuple[str, ...]
    words: tuple[str, ...]
    clients: tuple[str, ...]
    users: tuple[tuple[str, str, str], ...]  # (id, username, full name)

    @classmethod
    def build(cls, seed: int) -> Vocabulary:
        rnd = random.Random(seed)
        projects = sorted({_word(rnd, rnd.randint(2, 3)) for _ in range(600)})[:400]
        words = sorted({_word(rnd, rnd.randint(2, 4)) for _ in range(6000)})[:5000]
        clients = sorted(
            {_word(rnd, 2).capitalize() + rnd.choice((" Ltd", " GmbH", " Inc")) for _ in range(300)}
        )
        users = tuple(
            (
                str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
                f"{_word(rnd, 1)[0]}{_word(rnd, 2)}{i}",
                f"{_word(rnd, 2)} {_word(rnd, 3)}".title(),
            )
            for i in range(300)
        )
        return cls(tuple(projects), tuple(words), tuple(clients), users)


class Generator:
    """Produces :class:`FileMeta` rows; ``rows(n)`` yields them in upload order."""

    def __init__(self, seed: int = 7, end: datetime | None = None) -> None:
        self.rnd = random.Random(seed)
        self.vocab = Vocabulary.build(seed)
        self.end = end or datetime.now(UTC)
        self.start = self.end - timedelta(days=365 * YEARS)
        exts = list(TYPES)
        self._ext_cum = _cumulative([TYPES[e][1] for e in exts])
        self._exts = exts
        self._user_cum = _cumulative([1 / (i + 1) ** 1.1 for i in range(len(self.vocab.users))])
        self._project_cum = _cumulative([1 / (i + 1) for i in range(len(self.vocab.projects))])
        self._word_cum = _cumulative([1 / (i + 1) ** 0.9 for i in range(len(self.vocab.words))])

    def _pick(self, items, cum):
        return items[_bisect(cum, self.rnd.random() * cum[-1])]

    def rows(self, n: int) -> Iterator[FileMeta]:
        span = (self.end - self.start).total_seconds()
        for i in range(n):
            at = self.start + timedelta(seconds=span * (i + self.rnd.random()) / n)
            yield self.row(at)

    def row(self, at: datetime) -> FileMeta:
        rnd, v = self.rnd, self.vocab
        ext = self._pick(self._exts, self._ext_cum)
        ctype, _w, median = TYPES[ext]
        uid, username, fullname = self._pick(v.users, self._user_cum)
        project = self._pick(v.projects, self._project_cum)
        name = self._filename(ext, project, at)
        file_id = uuid.UUID(int=rnd.getrandbits(128), version=4)
        size = max(0, int(median * math.exp(rnd.gauss(0, 1.2))))
        stamp = at.strftime("%Y%m%dT%H%M%S")
        return FileMeta(
            file_id=file_id,
            original_filename=name,
            storage_filename=f"{name.rsplit('.', 1)[0][:60]}_{username}_{stamp}_{file_id}.{ext}",
            file_size=size,
            content_type=ctype,
            created_at=at,
            updated_at=at,
            created_by_id=uid,
            created_by_username=username,
            created_by_fullname=fullname,
            storage_path=at.strftime("%Y/%m/%d/%H/"),
            checksum=f"{rnd.getrandbits(256):064x}",
            description=self._description(project) if rnd.random() < 0.5 else None,
            version=self._version() if rnd.random() < 0.25 else None,
            metadata_json=self._metadata(project, at) if rnd.random() < 0.75 else None,
            cache_updated_at=at,
            cache_ttl_hours=24,
        )

    def _words(self, k: int) -> list[str]:
        return [self._pick(self.vocab.words, self._word_cum) for _ in range(k)]

    def _filename(self, ext: str, project: str, at: datetime) -> str:
        rnd = self.rnd
        r = rnd.random()
        if ext in ("jpg", "heic") and r < 0.7:
            return f"IMG_{rnd.randint(0, 9999):04d}.{ext.upper() if r < 0.4 else ext}"
        if ext in ("mp4", "mov") and r < 0.6:
            return f"VID_{at:%Y%m%d}_{rnd.randint(0, 999999):06d}.{ext}"
        if r < 0.06:
            return f"{rnd.choice(RU_DOCTYPES).capitalize()}_{rnd.choice(RU_WORDS)}_{at.year}.{ext}"
        if r < 0.35:
            return f"{rnd.choice(DOCTYPES)}_{project}_{at:%Y-%m}.{ext}"
        if r < 0.55:
            return f"{rnd.choice(DOCTYPES)}-{self._words(1)[0]}-v{rnd.randint(1, 9)}.{ext}"
        if r < 0.65:
            return f"Scan {at:%Y-%m-%d} {rnd.randint(1, 40)}.{ext}"
        if r < 0.8:
            words = " ".join(self._words(rnd.randint(1, 3)))
            return f"{words} {rnd.choice(DOCTYPES)}.{ext}"
        return f"{rnd.choice(ADJECTIVES).capitalize()}_{rnd.choice(DOCTYPES)}_{at.year}.{ext}"

    def _description(self, project: str) -> str:
        rnd = self.rnd
        text = (
            f"{rnd.choice(ADJECTIVES).capitalize()} {rnd.choice(DOCTYPES)} for "
            f"{project} ({rnd.choice(DEPARTMENTS)}), {rnd.choice(MONTHS)}. "
            + " ".join(self._words(rnd.randint(3, 12)))
        )
        if rnd.random() < 0.05:
            text += " " + " ".join(rnd.sample(RU_WORDS, 3))
        return text

    def _version(self) -> str:
        rnd = self.rnd
        return (
            f"v{rnd.randint(1, 5)}"
            if rnd.random() < 0.5
            else f"{rnd.randint(0, 3)}.{rnd.randint(0, 12)}.{rnd.randint(0, 30)}"
        )

    def _metadata(self, project: str, at: datetime) -> dict[str, Any]:
        rnd = self.rnd
        meta: dict[str, Any] = {
            "project": project,
            "department": rnd.choice(DEPARTMENTS),
            "year": at.year,
            "status": rnd.choice(STATUSES),
        }
        if rnd.random() < 0.6:
            meta["tags"] = self._words(rnd.randint(1, 3))
        if rnd.random() < 0.3:
            meta["client"] = rnd.choice(self.vocab.clients)
        if rnd.random() < 0.1:
            meta["case_id"] = f"CASE-{rnd.randint(10000, 99999)}"
        return meta


def _cumulative(weights: list[float]) -> list[float]:
    out, total = [], 0.0
    for w in weights:
        total += w
        out.append(total)
    return out


def _bisect(cum: list[float], x: float) -> int:
    lo, hi = 0, len(cum) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


async def load(db: Db, rows: int, *, seed: int = 7, batch: int = BATCH, progress=None) -> int:
    """COPY ``rows`` generated rows into ``db``'s prefix in batches; returns rows loaded.

    Generation (Python) overlaps with the COPY of the previous batch (PostgreSQL).
    """
    gen = Generator(seed)
    it = gen.rows(rows)
    loaded = 0

    async def copy(chunk: list[FileMeta]) -> int:
        async with db.pool.acquire() as conn, conn.transaction():
            return await repo_search.insert_files(conn, db.q, chunk)

    pending: asyncio.Task[int] | None = None
    while chunk := [m for _, m in zip(range(batch), it, strict=False)]:
        if pending is not None:
            loaded += await pending
            if progress:
                progress(loaded)
        pending = asyncio.create_task(copy(chunk))
    if pending is not None:
        loaded += await pending
    return loaded
