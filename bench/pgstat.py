"""What a PostgreSQL cluster spent: CPU seconds of all its processes, and commits.

CPU comes from /proc: the postmaster's own time and its reaped children's
(``cutime``/``cstime``: backends that have exited) plus every live child's time.  The
difference of two readings is the CPU the cluster used in between, whichever backends
did the work.  ``xact_commit`` of ``pg_stat_database`` counts committed transactions
(read-only ones included; the statistics collector publishes them within a second, so
:func:`commits` is read after a short pause).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import asyncpg

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Cluster:
    """A running cluster, found from its data directory's ``postmaster.pid``."""

    pid: int
    port: int
    socket_dir: str

    @classmethod
    def of(cls, pgdata: Path) -> Cluster:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        return cls(pid=int(lines[0]), port=int(lines[3]), socket_dir=lines[4])

    def dsn(self, database: str = "storage", user: str = "postgres") -> str:
        return f"postgresql://{user}@/{database}?host={self.socket_dir}&port={self.port}"

    def cpu_seconds(self) -> float:
        """CPU of the postmaster, of its exited children and of its live children."""
        total = 0.0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            fields = _stat(entry)
            if fields is None:
                continue
            pid, ppid = int(entry.name), int(fields[1])
            if pid == self.pid:  # utime, stime, cutime, cstime
                total += sum(int(f) for f in fields[11:15]) / _TICKS
            elif ppid == self.pid:
                total += (int(fields[11]) + int(fields[12])) / _TICKS
        return total

    def pin(self, cpus: set[int]) -> None:
        """Move the postmaster and every backend to ``cpus`` (new backends inherit it)."""
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _stat(entry)
                if fields is not None and (int(entry.name) == self.pid
                                           or int(fields[1]) == self.pid):
                    try:
                        os.sched_setaffinity(int(entry.name), cpus)
                    except OSError:
                        continue


def _stat(proc: Path) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is index 0)."""
    try:
        raw = (proc / "stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


async def commits(dsn: str) -> int:
    """Committed transactions of the database so far (after the collector caught up)."""
    await asyncio.sleep(1.0)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        return await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    finally:
        await conn.close()
