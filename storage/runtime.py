"""Mutable per-app state kept behind one AppKey (the app itself is frozen after startup)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .config import Config


@dataclass
class Runtime:
    """What changes while the app runs: the effective mode and lifecycle flags."""

    config: Config
    mode: str = ""
    started: bool = False
    recovering: bool = False
    stopping: bool = False
    inflight_uploads: set[asyncio.Task] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.mode = self.mode or self.config.app_mode
