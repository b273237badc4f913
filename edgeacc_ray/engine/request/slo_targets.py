"""Latency targets that are a property of this model on this device, not constants.

A target is the user's SLO when one is set. Without one, the running bound has no TPOT target (it
may cut throughput only to hold an SLO the user asked for), and Semi-PD's split, which moves compute
between the phases and so never cuts throughput, follows a derived target: DERIVED_FACTOR x the
fastest window p90 measured so far (the phase's latency when least loaded). A slow device thus gets a
loose target and a fast one a tight one, and nothing moves before the first window is measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

DERIVED_FACTOR = 3.0

Source = Literal["user", "derived", "none"]


@dataclass(frozen=True)
class TargetStats:
    """One target as /get_server_info and /metrics show it; `ms` None while there is none."""

    name: str  # running_bound_tpot, split_ttft, split_tpot
    ms: float | None
    source: Source
    floor_ms: float | None  # fastest window p90 measured (what a derived target follows)


@dataclass
class LatencyTarget:
    name: str
    user_ms: float | None
    derive: bool = True  # False: no target without the user's
    floor_ms: float = math.inf

    def observe(self, window_p90_ms: float) -> None:
        self.floor_ms = min(self.floor_ms, window_p90_ms)

    @property
    def source(self) -> Source:
        if self.user_ms is not None:
            return "user"
        return "derived" if self.derive and math.isfinite(self.floor_ms) else "none"

    @property
    def ms(self) -> float:
        """The target now; inf when there is none (nothing is over it)."""
        source = self.source
        return (
            self.user_ms
            if source == "user"
            else DERIVED_FACTOR * self.floor_ms
            if source == "derived"
            else math.inf
        )

    def stats(self) -> TargetStats:
        value = self.ms
        return TargetStats(
            self.name,
            value if math.isfinite(value) else None,
            self.source,
            self.floor_ms if math.isfinite(self.floor_ms) else None,
        )
