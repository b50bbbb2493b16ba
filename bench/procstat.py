"""Sample a process's RSS and CPU time from /proc in a background asyncio task.

``/proc/<pid>/status`` gives ``VmRSS`` (kB); ``/proc/<pid>/stat`` fields 14 and 15 give
``utime`` and ``stime`` in clock ticks. Only the given PID is sampled (threads are part of
it; child processes such as an embedded PostgreSQL are not).

    async with ProcSampler(pid, interval=0.05) as sampler:
        ...  # the work being measured
    print(sampler.result.peak_rss_mib, sampler.result.rss_growth_mib, sampler.result.cpu_s)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import asdict, dataclass

MIB = 1 << 20
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def read_rss(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    parts = line.split()
                    return int(parts[1]) * 1024  # the unit is always kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` in seconds, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            raw = fh.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 overall
    except (IndexError, ValueError):
        return None
    return (utime + stime) / _TICKS


@dataclass
class ProcStats:
    pid: int
    samples: int
    start_rss: int
    end_rss: int
    peak_rss: int
    cpu_s: float
    wall_s: float

    @property
    def rss_growth(self) -> int:
        """Peak RSS during the window minus RSS at its start (bytes, >= 0)."""
        return max(0, self.peak_rss - self.start_rss)

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss / MIB

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_growth / MIB

    @property
    def cpu_util(self) -> float:
        """CPU seconds per wall second (1.0 = one core busy)."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        d: dict[str, float | int] = asdict(self)
        d.update(
            rss_growth=self.rss_growth,
            peak_rss_mib=round(self.peak_rss_mib, 2),
            rss_growth_mib=round(self.rss_growth_mib, 2),
            cpu_util=round(self.cpu_util, 3),
        )
        return d


class ProcSampler:
    """Background sampler; use as ``async with`` or call ``start()`` / ``await stop()``.

    The sampling loop is bounded: it stops after ``max_seconds`` even if never stopped.
    """

    def __init__(self, pid: int, interval: float = 0.05, max_seconds: float = 3600.0) -> None:
        self.pid = pid
        self.interval = interval
        self.max_seconds = max_seconds
        self.result: ProcStats | None = None
        self._task: asyncio.Task[None] | None = None
        self._start_rss = 0
        self._peak = 0
        self._last = 0
        self._samples = 0
        self._cpu0 = 0.0
        self._t0 = 0.0

    def _sample(self) -> None:
        rss = read_rss(self.pid)
        if rss is not None:
            self._samples += 1
            self._last = rss
            self._peak = max(self._peak, rss)

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._cpu0 = read_cpu_seconds(self.pid) or 0.0
        self._start_rss = read_rss(self.pid) or 0
        self._peak = self._last = self._start_rss
        self._samples = 1 if self._start_rss else 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        deadline = self._t0 + self.max_seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(self.interval)
            self._sample()

    async def stop(self) -> ProcStats:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._sample()
        cpu1 = read_cpu_seconds(self.pid)
        self.result = ProcStats(
            pid=self.pid,
            samples=self._samples,
            start_rss=self._start_rss,
            end_rss=self._last,
            peak_rss=self._peak,
            cpu_s=max(0.0, (cpu1 if cpu1 is not None else self._cpu0) - self._cpu0),
            wall_s=time.monotonic() - self._t0,
        )
        return self.result

    async def __aenter__(self) -> ProcSampler:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
