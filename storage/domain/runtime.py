"""Mutable per-app state kept behind one AppKey (the app itself is frozen after startup)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ..config import Config


@dataclass
class Runtime:
    """What changes while the app runs: the effective mode and lifecycle flags."""

    config: Config
    mode: str = ""
    started: bool = False
    recovering: bool = False
    stopping: bool = False
    active_requests: int = 0  # requests inside the handlers (graceful shutdown waits for 0)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    lease: Any = None  # this process's liveness lease (storage.domain.liveness.Lease)

    def __post_init__(self) -> None:
        self.mode = self.mode or self.config.app_mode
        self.idle.set()

    def enter(self) -> None:
        self.active_requests += 1
        self.idle.clear()

    def leave(self) -> None:
        self.active_requests -= 1
        if self.active_requests <= 0:
            self.idle.set()
