"""Prompt (input) logprobs: the log-softmax at the prompt positions of the requests that ask (vLLM's
prompt_logprobs, OpenAI's echo with logprobs, SGLang's logprob_start_len), computed as their chunks
run, in whichever process runs them (the engine's, or Semi-PD's prefill process).

Only the positions asked for go through the LM head, a slice of rows at a time, so a long prompt never
holds [tokens, vocab] logits at once. The positions must be computed, not read from a cache: a sequence
that still needs them lets a cache serve at most `Sequence.num_cacheable_tokens` tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from edgeacc_ray.engine.request import Sequence, TokenLogprob

ROWS_PER_SLICE = 256  # rows through the LM head at once: 256 x 150k vocab x 4 B = 150 MB at most


@dataclass
class PromptRows:
    """Hidden rows [row, row + count) of one forward hold the positions whose next tokens are
    seq.token_ids[first_token : first_token + count], all prompt tokens seq still wants scored."""

    seq: Sequence
    row: int
    first_token: int
    count: int


def rows_to_score(seq: Sequence, start: int, n: int, row: int) -> PromptRows | None:
    """The rows of a chunk (positions [start, start + n), the first at hidden row `row`) whose prompt
    logprobs seq still needs; None when it needs none of them."""
    token = seq.next_prompt_logprob
    if token is None:
        return None
    first = token - 1  # the position that predicts `token`
    if first < start:
        raise RuntimeError(
            f"request {seq.request_id}: position {first} is needed for prompt logprobs but the chunk "
            f"starts at {start} (a cache served it; num_cacheable_tokens was not honoured)"
        )
    end = min(start + n, seq.num_prompt_tokens - 1)  # positions past it predict output tokens
    if first >= end:
        return None
    return PromptRows(seq, row + first - start, token, end - first)


def record(
    rows: list[PromptRows], hidden: torch.Tensor, logits: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Score the rows (hidden [T, D] of the forward; `logits` the model's float32 LM head) and append
    each position's entry to its sequence's prompt_logprobs, in order."""
    for part in rows:
        seq, top_n = part.seq, part.seq.params.prompt_logprobs
        for offset in range(0, part.count, ROWS_PER_SLICE):
            k = min(ROWS_PER_SLICE, part.count - offset)
            at = part.row + offset
            log_p = torch.log_softmax(
                logits(hidden[at : at + k]).float(), dim=-1
            )  # [k, vocab], on the model's device
            first = part.first_token + offset
            targets = torch.tensor(
                seq.token_ids[first : first + k], dtype=torch.long, device=log_p.device
            )
            chosen = log_p.gather(1, targets[:, None]).squeeze(1)
            ranks = (log_p > chosen[:, None]).sum(dim=1) + 1
            if top_n:
                values, ids = log_p.topk(top_n, dim=-1)
                tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
            else:
                tops = [[] for _ in range(k)]
            seq.prompt_logprobs.extend(
                TokenLogprob(token_id=t, logprob=lp, top=top, rank=r)
                for t, lp, top, r in zip(targets.tolist(), chosen.tolist(), tops, ranks.tolist())
            )
