"""Who may start: a request is admitted only while the KV pages it may still take (its reservation)
fit beside what the admitted requests have reserved, and while fewer than the running bound run.

A reservation is the rest of the prompt plus the output expected from now on, in pages not yet held,
so prefix pages shared with other requests count once (they are held already). The expected output
is SGLang's new-token ratio times what `max_tokens` leaves (at most `reservation_clip_tokens`). The
ratio follows the share of `max_tokens` that finished requests produced, never below
`new_token_ratio_min`, and rises after a retraction. At 1.0 with no clip, every request's whole
output is reserved and the pool cannot run short; below, it can, and the scheduler then retracts
at most `max_retractions` sequences per step (never a storm), newest first.
"""

from __future__ import annotations

import math

from edgeacc_ray.engine.request import Sequence
from edgeacc_ray.engine.scheduling.running_bound import RunningBound

RATIO_EWMA = 0.1  # weight of one finished request in the learned ratio
RETRACTION_RATIO_STEP = 0.1  # the ratio rises this much after each retraction
RETRACT_FRACTION = 16  # a step retracts at most 1/16 of the running batch (at least one sequence)


class AdmissionPolicy:
    def __init__(
        self,
        page_size: int,
        max_model_len: int,
        bound: RunningBound,
        ratio_init: float = 1.0,
        ratio_min: float = 1.0,
        clip_tokens: int | None = None,
    ) -> None:
        """The defaults reserve every output in full (the engine passes its settings)."""
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.bound = bound
        self.ratio_min = ratio_min
        self.ratio = max(ratio_init, ratio_min)
        self.clip_tokens = clip_tokens

    def reserved_tokens(self, seq: Sequence) -> int:
        """Tokens of KV seq is expected to hold at most: its tokens so far plus the expected rest of
        its output (the last sampled token is never computed)."""
        remaining = seq.params.max_tokens - seq.num_output_tokens
        if self.clip_tokens is not None:
            remaining = min(remaining, self.clip_tokens)
        expected = min(seq.num_tokens + math.ceil(self.ratio * remaining), self.max_model_len) - 1
        return max(expected, seq.num_tokens)

    def pages_to_come(self, seq: Sequence) -> int:
        """Pages seq is expected to take beyond those it holds (its outstanding reservation)."""
        return max(0, -(-self.reserved_tokens(seq) // self.page_size) - len(seq.page_table))

    def has_room(self, num_active: int) -> bool:
        """May one more start beside `num_active` admitted requests? A refusal is told to the running
        bound (it only grows while it holds requests back)."""
        if num_active < self.bound.value:
            return True
        self.bound.held_back()
        return False

    def fits(self, committed_pages: int, seq: Sequence, free_pages: int) -> bool:
        """Does seq's reservation fit beside the admitted requests' outstanding ones (`committed_pages`)?
        `free_pages` counts what allocation can take now (evictable cached pages too)."""
        return committed_pages + self.pages_to_come(seq) <= free_pages

    @staticmethod
    def max_retractions(num_running: int) -> int:
        return max(1, num_running // RETRACT_FRACTION)

    def retracted(self) -> None:
        """The pool ran short: the expected outputs were too small."""
        self.ratio = min(1.0, self.ratio + RETRACTION_RATIO_STEP)

    def finished(self, seq: Sequence) -> None:
        """Learn from a request that ran to its end (stop or length): the share of its output room it used."""
        room = min(seq.params.max_tokens, self.max_model_len - seq.num_prompt_tokens)
        if self.clip_tokens is not None:
            room = min(room, self.clip_tokens)
        used = min(1.0, seq.num_output_tokens / max(room, 1))
        self.ratio = max(self.ratio_min, self.ratio + RATIO_EWMA * (used - self.ratio))
