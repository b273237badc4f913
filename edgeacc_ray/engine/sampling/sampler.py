"""Turn last-position logits into next tokens: logit controls (bias, min_tokens, grammar), penalties,
temperature, top-k/top-p/min-p, seeds, and log-probabilities of the chosen token with top alternatives."""

from __future__ import annotations

import torch

from edgeacc_ray.engine.request import Sequence, TokenLogprob
from edgeacc_ray.engine.sampling.logit_controls import apply_logit_controls, ended_where_left


def sample(
    logits: torch.Tensor, seqs: list[Sequence]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [len(seqs), vocab] float32 -> one token id per sequence, and logprobs where asked for
    (of the model's distribution, before penalties, biases and grammars)."""
    raw = logits
    logits = apply_logit_controls(logits, seqs)
    if any(s.params.has_penalties for s in seqs):
        logits = logits.clone() if logits is raw else logits
        for row, seq in enumerate(seqs):
            if seq.params.has_penalties:
                _apply_penalties(logits[row], seq)
    greedy = [s.params.greedy for s in seqs]
    if all(greedy):
        tokens = logits.argmax(dim=-1).tolist()
    else:
        tokens = _sample_random(logits, seqs, greedy)
    if any(s.grammar_mask is not None for s in seqs):
        tokens = ended_where_left(tokens, seqs)
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if wanted:
        log_p = torch.log_softmax(raw[wanted], dim=-1)
        for j, row in enumerate(wanted):
            logprobs[row] = _token_logprob(log_p[j], tokens[row], seqs[row].params.logprobs)
    return tokens, logprobs


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    p = seq.params
    vocab = row.shape[0]
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
        values = row[seen]
        row[seen] = torch.where(
            values > 0, values / p.repetition_penalty, values * p.repetition_penalty
        )
    output = seq.output_token_ids
    if output and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab)[
            :vocab
        ].float()
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def _sample_random(logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> list[int]:
    temps = torch.tensor([1.0 if g else s.params.temperature for s, g in zip(seqs, greedy)])
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    if any(s.params.top_k > 0 or s.params.top_p < 1.0 or s.params.min_p > 0.0 for s in seqs):
        probs = _filter(probs, seqs)
    tokens = logits.argmax(dim=-1).tolist()
    unseeded = [i for i, s in enumerate(seqs) if not greedy[i] and s.generator is None]
    if unseeded:
        drawn = torch.multinomial(probs[unseeded], 1).squeeze(1).tolist()
        for i, token in zip(unseeded, drawn):
            tokens[i] = token
    for i, seq in enumerate(seqs):
        if not greedy[i] and seq.generator is not None:
            tokens[i] = int(torch.multinomial(probs[i], 1, generator=seq.generator))
    return tokens


def _filter(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Zero out tokens outside each row's top-k, top-p nucleus and min-p floor (the best token always stays)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[1])[None, :]
    top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else probs.shape[1] for s in seqs])
    top_p = torch.tensor([s.params.top_p for s in seqs])
    min_p = torch.tensor([s.params.min_p for s in seqs])
    drop = rank >= top_k[:, None]
    drop |= (sorted_p.cumsum(dim=-1) - sorted_p) > top_p[:, None]
    drop |= sorted_p < min_p[:, None] * sorted_p[:, :1]
    drop[:, 0] = False
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)


def _token_logprob(log_p: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if top_n:
        values, ids = log_p.topk(top_n)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id=token, logprob=float(log_p[token]), top=top)
