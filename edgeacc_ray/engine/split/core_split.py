"""The CPU form of Semi-PD's SM split: which cores compute prefill and which compute decode.

The decode process decides (engine/split/split_controller.py) and publishes the split in the control block
of the shared segment; each process applies its part at its own step boundary (`CoreSplitFollower`),
so cores move between the phases live, with no restart and no message on the request path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from edgeacc_ray.engine.hardware import use_cores

_EPOCH, _PREFILL, _DECODE = 0, 1, 2


@dataclass(frozen=True)
class CoreSplit:
    prefill: tuple[int, ...]
    decode: tuple[int, ...]

    def describe(self) -> str:
        return f"prefill {list(self.prefill)} / decode {list(self.decode)}"


def _mask(cores: tuple[int, ...]) -> int:
    return sum(1 << c for c in cores)


def _cores(mask: int) -> tuple[int, ...]:
    return tuple(c for c in range(63) if mask >> c & 1)


class ControlBlock:
    """The split as int64 words in shared memory; written only by the decode process."""

    def __init__(self, words: torch.Tensor) -> None:
        self.words = words

    def publish(self, split: CoreSplit) -> None:
        self.words[_PREFILL] = _mask(split.prefill)
        self.words[_DECODE] = _mask(split.decode)
        self.words[_EPOCH] += 1  # last: a reader that sees the new epoch sees the new masks

    def read(self) -> tuple[int, CoreSplit]:
        epoch = int(self.words[_EPOCH])
        return epoch, CoreSplit(_cores(int(self.words[_PREFILL])), _cores(int(self.words[_DECODE])))


class SplitFollower(ABC):
    """Applies one role's share of the published split to this process when it changes (`_apply`: cores
    on CPU, an SM partition on CUDA). A role with no units (its phase is idle) keeps its last ones: it
    does not run anyway."""

    def __init__(self, control: ControlBlock, role: str) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        self.control = control
        self.role = role
        self.epoch = -1
        self.cores: tuple[int, ...] = ()

    @abstractmethod
    def _apply(self, units: tuple[int, ...]) -> None:
        """Compute on `units` from now on."""

    def sync(self) -> tuple[int, ...]:
        epoch, split = self.control.read()
        if epoch != self.epoch:
            self.epoch = epoch
            units = getattr(split, self.role)
            if units and units != self.cores:
                self._apply(units)
                self.cores = units
        return self.cores


class CoreSplitFollower(SplitFollower):
    """The CPU follower: the role's cores become this process's compute cores."""

    def _apply(self, units: tuple[int, ...]) -> None:
        use_cores(list(units))
