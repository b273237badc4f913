"""Semi-PD's end in the decode engine: the shared storage, the live split of the device and the
dispatcher to the prefill process, as one object. The step loop calls it at its edges: take what
came back (`returned`), the prompt budget (`token_budget`), hand prompts over (`hand_over`), time a
decode step (`observe_decode`); a colocated engine has none."""

from __future__ import annotations

import concurrent.futures as cf
import time
from typing import Callable

import torch

from edgeacc_ray.engine.hardware import use_cores
from edgeacc_ray.engine.request import Sequence, SplitStats, TargetStats
from edgeacc_ray.engine.semi_pd.prefill_dispatcher import InFlight, PrefillDispatcher
from edgeacc_ray.engine.semi_pd.prefill_messages import PrefillBatchResult
from edgeacc_ray.engine.semi_pd.setup import SemiPDParts


class DecodeSide:
    def __init__(self, parts: SemiPDParts, dispatcher: PrefillDispatcher) -> None:
        self.storage = parts.storage
        self.spec = parts.spec  # what the prefill process maps
        self.split = parts.split
        self.dispatcher = dispatcher
        self._control, self._follower = parts.control, parts.follower
        self._initial_cores = parts.initial_cores

    # -- the step's edges -----------------------------------------------------------------------
    def returned(self) -> list[tuple[InFlight, PrefillBatchResult | BaseException]]:
        """The prefill batches that came back since the last step (their rates feed the split)."""
        done = self.dispatcher.completed()
        for flight, result in done:
            if not isinstance(result, BaseException):
                self.split.observe_rate(
                    "prefill", flight.num_cores, flight.num_tokens, result.compute_seconds
                )
        return done

    def token_budget(self) -> int:
        return self.dispatcher.token_budget()

    def hand_over(
        self,
        prefills: list[Sequence],
        prompts_wait: bool,
        decodes_run: bool,
        set_mask: Callable[[Sequence], None],
    ) -> None:
        """Move the split for the load the scheduler left, then send the scheduled prompts (a
        constrained one with its first token's mask: the prefill process samples it)."""
        before = self.split.current
        split = self.split.decide(time.monotonic(), prompts_wait, decodes_run)
        if split != before:
            self._control.publish(split)
        self._follower.sync()
        if prefills:
            for seq in prefills:
                if seq.matcher is not None:
                    set_mask(seq)
            self.dispatcher.dispatch(prefills, num_cores=len(self.split.current.prefill))

    def observe_ttft(self, seconds: float) -> None:
        self.split.observe_ttft(seconds)

    def observe_decode(self, tpot: float | None, num_decode: int, seconds: float) -> None:
        """A decode step: its time per output token (None after a gap) and its rate on our cores."""
        if tpot is not None:
            self.split.observe_tpot(tpot)
        self.split.observe_rate("decode", len(self._follower.cores), num_decode, seconds)

    # -- waiting --------------------------------------------------------------------------------
    def waiting(self) -> bool:
        """Batches are out and none has come back yet."""
        return self.dispatcher.waiting()

    def futures(self) -> list[cf.Future]:
        return [flight.future for flight in self.dispatcher.in_flight]

    # -- introspection and end ------------------------------------------------------------------
    def targets(self) -> list[TargetStats]:
        return self.split.targets()

    def stats(self) -> SplitStats:
        current, d = self.split.current, self.dispatcher
        return SplitStats(
            prefill_cores=list(current.prefill) if current else [],
            decode_cores=list(current.decode) if current else [],
            base_prefill_cores=self.split.base,
            moves_total=self.split.moves_total,
            ttft_p90_ms=self.split.last_ttft_p90_ms,
            tpot_p90_ms=self.split.last_tpot_p90_ms,
            prefill_batches_total=d.batches_total,
            prefill_compute_seconds_total=d.compute_seconds_total,
            prefill_roundtrip_seconds_total=d.roundtrip_seconds_total,
            storage=self.spec.name,
        )

    def close(self, compute_threads: int) -> None:
        """Release the shared segment and give this process back the cores the split pinned it to."""
        self.storage.close()
        if self._initial_cores is not None:
            use_cores(self._initial_cores)
            torch.set_num_threads(compute_threads)
