"""Per-request edits of the next-token logits before sampling: `logit_bias`, `min_tokens` (EOS and
stop tokens held back) and a grammar's allowed-token bitmask. Only the rows that ask for one are
touched; the others keep the shared tensor untouched. A row whose grammar ends where the model
leaves it is drawn unmasked and then `ended_where_left`: a token outside the grammar becomes the end."""

from __future__ import annotations

import torch

from edgeacc_ray.engine.request import Sequence, apply_bitmasks


def apply_logit_controls(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """`logits` [len(seqs), vocab]; a copy with the controls applied, or `logits` itself when no row has any."""
    rows = [i for i, s in enumerate(seqs) if s.params.has_logit_controls]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        seq, row = seqs[i], logits[i]
        p = seq.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
            row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype)
        if seq.num_output_tokens < p.min_tokens:
            held = sorted(seq.eos_token_ids | set(p.stop_token_ids))
            if held:
                row[torch.tensor(held, dtype=torch.long)] = float("-inf")
    masked = [i for i in rows if seqs[i].grammar_mask is not None and not _may_leave(seqs[i])]
    if masked:
        sub = logits[masked]
        apply_bitmasks(sub, torch.stack([seqs[i].grammar_mask.bitmask for i in masked]))
        logits[masked] = sub
    return logits


def ended_where_left(tokens: list[int], seqs: list[Sequence]) -> list[int]:
    """`tokens` drawn with the controls applied, with each token a leavable grammar does not allow
    replaced by its end token: the model's mass outside the grammar goes to ending it."""
    out = list(tokens)
    for i, seq in enumerate(seqs):
        if _may_leave(seq) and not seq.grammar_mask.allows(out[i]):
            out[i] = seq.grammar_mask.end_token
    return out


def _may_leave(seq: Sequence) -> bool:
    """The grammar is complete here and ends when left, and min_tokens no longer holds the end back."""
    mask = seq.grammar_mask
    return (
        mask is not None
        and mask.end_token is not None
        and seq.num_output_tokens >= seq.params.min_tokens
    )
