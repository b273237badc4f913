"""CPU share of every process on the host during a run: which process used how many cores.

The servers under test are many processes (Serve's proxy, the Ingress, engine replicas, vLLM's API
server and engine core, the benchmark client itself); a throughput figure means little without
knowing which of them kept the cores busy. Reads /proc/<pid>/stat at the start and end of a run and
groups processes by their title (Ray sets `ray::ServeReplica:app:Deployment`); Linux only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

MIN_SHARE = 0.01  # processes below this many cores are left out of the report
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _title(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
    except OSError:
        return ""
    if not words:
        return ""
    if words[0].startswith("ray::"):
        return words[0].split(" ")[0]
    head = os.path.basename(words[0])
    if head.startswith("python") and len(words) > 1 and words[1] == "-c":
        return "python -c"
    if head.startswith("python") and len(words) > 1:  # python -m module / python script.py
        rest = words[2] if words[1] == "-m" and len(words) > 2 else os.path.basename(words[1])
        return f"python {rest}"
    return head


def _cpu_ticks() -> dict[str, tuple[str, int]]:
    """pid -> (title, user + system ticks so far)."""
    ticks: dict[str, tuple[str, int]] = {}
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[pid] = (_title(pid), int(fields[11]) + int(fields[12]))
    return ticks


@dataclass
class ProcessCPU:
    """Started at a run's beginning; `shares()` at its end gives cores used per process title."""

    _start: dict[str, tuple[str, int]]
    _t0: float

    @classmethod
    def start(cls) -> "ProcessCPU":
        return cls(_cpu_ticks(), time.monotonic())

    def shares(self) -> dict[str, float]:
        """Cores each process title used since start (busiest first; titles shared by several
        processes are summed)."""
        end, seconds = _cpu_ticks(), max(time.monotonic() - self._t0, 1e-9)
        used: dict[str, float] = {}
        for pid, (title, ticks) in end.items():
            before = self._start.get(pid, (title, 0))[1]
            share = (ticks - before) / _CLOCK_TICKS / seconds
            if title:
                used[title] = used.get(title, 0.0) + share
        return {
            k: round(v, 3) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= MIN_SHARE
        }
