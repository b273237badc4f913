"""The CUDA form of Semi-PD's compute split: shares of the GPU's SMs instead of cores.

Two processes run kernels at the same time on one GPU only under MPS. Each process's ceiling is its
`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`, read once when CUDA starts in it (`set_mps_share`, before any
CUDA call), so a running process cannot change it. The live split therefore moves *inside* those
ceilings, between partitions created once at start: torch's green contexts (`torch.cuda.green_contexts`,
one per level, each a fixed SM count), switched at step boundaries by `SmSplitFollower`, the CUDA
counterpart of core_split.CoreSplitFollower. The decode process still decides with the same
SplitController and publishes through the same ControlBlock; the controller's "cores" are SM units
(tenths of the GPU), so nothing above this file changes.

Without MPS the two processes time-share the GPU (kernels of different processes never overlap), a
split would buy nothing, and a warning says so. With MPS but without green contexts in this torch
build, each process keeps its start share (Semi-PD's fixed overlapping split: prefill 80, decode 100).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

import torch

from edgeacc_ray.engine.split.core_split import ControlBlock, SplitFollower

log = logging.getLogger(__name__)

SM_UNITS = 10  # the controller moves the split in tenths of the GPU
MPS_PERCENTAGE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
MPS_PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
MPS_DEFAULT_PIPE = "/tmp/nvidia-mps"
DEFAULT_LEVELS = (30, 50, 70, 100)  # pre-created partitions, in percent of the SMs
GREEN_SM_GRANULARITY = (
    8  # green contexts split SMs in groups (8 on Hopper); counts are rounded down to it
)


class SmSplitMode(str, Enum):
    GREEN_CONTEXTS = "mps+green_contexts"  # live: partitions switched at step boundaries
    MPS_FIXED = "mps_fixed"  # each process at its start share for its whole life
    TIME_SHARING = "time_sharing"  # no MPS: the processes take turns on the whole GPU


class MpsShareTooLate(RuntimeError):
    """The MPS share was set after CUDA started in this process: MPS would ignore it."""


def mps_pipe_directory() -> Path:
    return Path(os.environ.get(MPS_PIPE_ENV, MPS_DEFAULT_PIPE))


def mps_running(pipe_directory: Path | None = None) -> bool:
    """True when an MPS control daemon serves this machine (its `control` pipe exists). Checked on the
    host, without starting CUDA: the answer decides each process's start share."""
    return (pipe_directory or mps_pipe_directory()).joinpath("control").exists()


def green_contexts_supported() -> bool:
    try:
        from torch.cuda import green_contexts
    except ImportError:
        return False
    return bool(getattr(green_contexts, "SUPPORTED", False))


def set_mps_share(percentage: int) -> None:
    """This process's MPS ceiling; must run before CUDA starts in it (a spawned child's initializer)."""
    if not 1 <= percentage <= 100:
        raise ValueError(f"an MPS share is 1..100 percent, got {percentage}")
    if torch.cuda.is_initialized():
        raise MpsShareTooLate(
            f"CUDA already started in pid {os.getpid()}: {MPS_PERCENTAGE_ENV} would be ignored"
        )
    os.environ[MPS_PERCENTAGE_ENV] = str(percentage)


def detect_mode(mps: bool, green: bool) -> SmSplitMode:
    if not mps:
        return SmSplitMode.TIME_SHARING
    return SmSplitMode.GREEN_CONTEXTS if green else SmSplitMode.MPS_FIXED


@dataclass(frozen=True)
class SmPartitions:
    """The pre-created partitions: each phase switches to the smallest level covering the share the
    controller gave it (never less than asked), so a move costs a context switch, not a restart."""

    levels: tuple[int, ...] = DEFAULT_LEVELS

    def __post_init__(self) -> None:
        if not self.levels or any(not 1 <= level <= 100 for level in self.levels):
            raise ValueError(f"partition levels are percentages in 1..100, got {self.levels}")
        object.__setattr__(self, "levels", tuple(sorted(set(self.levels))))

    def choose(self, units: int, total: int = SM_UNITS) -> int:
        """The level (percent) for a phase holding `units` of `total`; a phase with none keeps the
        smallest level (it has nothing to run)."""
        wanted = 100 * units / total
        return next((level for level in self.levels if level >= wanted - 1e-9), self.levels[-1])

    def num_sms(self, level: int, total_sms: int) -> int:
        """SMs of a level's green context: rounded down to the hardware's group size, at least one group."""
        sms = total_sms * level // 100
        return max(GREEN_SM_GRANULARITY, sms - sms % GREEN_SM_GRANULARITY)


class PartitionApplier(Protocol):
    level: int | None

    def use(self, level: int) -> None: ...


class FixedShare:
    """MPS without green contexts, or no MPS: the share cannot move; records what was asked."""

    def __init__(self) -> None:
        self.level: int | None = None

    def use(self, level: int) -> None:
        self.level = level


class GreenContexts:
    """One green context per partition level below 100 (100: the process's own context), created once;
    `use` switches the current one between steps. torch's binding changed names across versions
    (make_current/pop_current, then set_context/pop_context); both are accepted."""

    def __init__(self, partitions: SmPartitions, device_index: int) -> None:
        from torch.cuda.green_contexts import GreenContext

        total = torch.cuda.get_device_properties(device_index).multi_processor_count
        self.sm_counts = {level: partitions.num_sms(level, total) for level in partitions.levels}
        self.contexts = {
            level: GreenContext.create(num_sms=sms, device_id=device_index)
            for level, sms in self.sm_counts.items()
            if sms < total
        }
        self.level: int | None = None
        self._active = None

    def use(self, level: int) -> None:
        if level == self.level:
            return
        if self._active is not None:
            torch.cuda.synchronize()  # the last step's kernels finish in the context they started in
            _call(self._active, "pop_context", "pop_current")
            self._active = None
        context = self.contexts.get(level)
        if context is not None:
            _call(context, "set_context", "make_current")
            self._active = context
        self.level = level


def _call(context, *names: str) -> None:
    for name in names:
        method = getattr(context, name, None)
        if method is not None:
            method()
            return
    raise AttributeError(f"green context has none of {names}")


def make_applier(
    mode: SmSplitMode, partitions: SmPartitions, device_index: int
) -> PartitionApplier:
    """Green contexts where the mode allows and creation succeeds; a fixed share otherwise (logged)."""
    if mode is SmSplitMode.GREEN_CONTEXTS:
        try:
            return GreenContexts(partitions, device_index)
        except (RuntimeError, AttributeError) as exc:
            log.warning(
                "green contexts unavailable (%s): each process keeps its MPS start share", exc
            )
    return FixedShare()


@dataclass(frozen=True)
class SmSplitReport:
    """One process's view of the SM split, for the GPU check and server info. Crosses processes."""

    role: str
    mode: str
    mps_percentage: str | None  # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE as this process started with it
    level: int | None  # the partition in use (percent), None before the first step
    sm_counts: dict[int, int]  # level -> SMs of its green context (empty: no green contexts)


class SmSplitFollower(SplitFollower):
    """Applies one role's share of the published split (in SM units) at this process's step boundary."""

    def __init__(
        self,
        control: ControlBlock,
        role: str,
        mode: SmSplitMode,
        applier: PartitionApplier,
        partitions: SmPartitions = SmPartitions(),
    ) -> None:
        super().__init__(control, role)
        self.mode, self.applier, self.partitions = mode, applier, partitions

    def _apply(self, units: tuple[int, ...]) -> None:
        if self.mode is not SmSplitMode.TIME_SHARING:
            self.applier.use(self.partitions.choose(len(units)))

    def report(self) -> SmSplitReport:
        return SmSplitReport(
            self.role,
            self.mode.value,
            os.environ.get(MPS_PERCENTAGE_ENV),
            self.applier.level,
            dict(getattr(self.applier, "sm_counts", {})),
        )


def start_follower(
    control: ControlBlock,
    role: str,
    device_index: int,
    partitions: SmPartitions = SmPartitions(),
    live: bool = True,
) -> SmSplitFollower:
    """The follower of this process, its mode detected here (warns when the GPU can only be time-shared).
    `live=False` keeps the start share (the decode side with CUDA graphs: a graph is bound to the
    context it was captured in, so it cannot be replayed inside a green context)."""
    mode = detect_mode(mps_running(), live and green_contexts_supported())
    if mode is SmSplitMode.TIME_SHARING:
        log.warning(
            "Semi-PD on CUDA without MPS (no %s/control): prefill and decode time-share the GPU, "
            "the SM split is not applied",
            mps_pipe_directory(),
        )
    return SmSplitFollower(
        control, role, mode, make_applier(mode, partitions, device_index), partitions
    )


PREFILL_MPS_SHARE = 80  # Semi-PD's default prefill ceiling (decode keeps 100: the shares overlap)


def prefill_mps_share() -> int:
    """The prefill process's MPS ceiling: the whole GPU when green contexts will partition it live,
    Semi-PD's fixed 80% otherwise. Decided on the host, before the child starts CUDA."""
    return 100 if green_contexts_supported() else PREFILL_MPS_SHARE
